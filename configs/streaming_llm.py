"""StreamingLLM's attention-sink ablations at small scale (also ``jstream demo``'s embedded defaults).

  python -m experiments.streaming_llm                                   # 6 min on a 2-core CPU (RESULTS.md)
  python -m experiments.streaming_llm --quick                           # 15-20 s
  python -m experiments.streaming_llm --config configs/streaming_llm.py:long,base.steps=3000

Flags: ``quick`` (tiny models, 6k-byte streams), ``long`` (five times the training: 40 min on 2 cores).
Overrides: ``window=256``, ``eval_tokens=200000``, ``base.steps=2000``, ``sink.model.embed_dim=256``, ...
The model and the quick shrink are shared with ``configs/lm_tiny.py`` (``jstream.presets``).
"""

import dataclasses

from jstream import presets
from jstream.evaluation import SinkAblationConfig


def get_config(*flags: str) -> SinkAblationConfig:
  unknown = set(flags) - {"quick", "long"}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/streaming_llm.py")
  runs = "runs/streaming_llm" + ("_quick" if "quick" in flags else "_long" if "long" in flags else "")
  base = presets.byte_lm_run(
    f"{runs}/plain",
    model=presets.byte_lm(scan_layers=False),
    steps=2000 if "long" in flags else 400,
    warmup_steps=40,
    checkpoint_every=100,
  )
  sink = dataclasses.replace(base, sink_token=True, workdir=f"{runs}/sink_token")
  cfg = SinkAblationConfig(
    base=base,
    sink=sink,
    window=128,
    sink_counts=(1, 2, 4, 8),
    eval_tokens=100_000,
    segment=4096,
    chunk=64,
    dense_tokens=4096,
    recompute_tokens=1024,
  )
  if "quick" in flags:
    shrink = lambda run: presets.quick(run, steps=40, checkpoint_every=20)
    cfg = dataclasses.replace(
      cfg,
      base=shrink(cfg.base),
      sink=shrink(cfg.sink),
      window=32,
      eval_tokens=6000,
      segment=1024,
      chunk=32,
      dense_tokens=512,
      recompute_tokens=128,
      bins=6,
    )
  return cfg
