"""StreamingLLM's attention-sink ablations at small scale (also ``jstream demo``'s embedded defaults).

  python -m experiments.streaming_llm                                   # 6 min on a 2-core CPU (RESULTS.md)
  python -m experiments.streaming_llm --quick                           # 15-20 s
  python -m experiments.streaming_llm --config configs/streaming_llm.py:long,base.steps=3000

Flags: ``quick`` (tiny models, 6k-byte streams), ``long`` (five times the training: 40 min on 2 cores).
Overrides: ``window=256``, ``eval_tokens=200000``, ``base.steps=2000``, ``sink.model.embed_dim=256``, ...
"""

import dataclasses

from experiments.streaming_llm import StreamingLLMConfig
from jstream import TransformerConfig
from jstream.train import TrainConfig


def get_config(*flags: str) -> StreamingLLMConfig:
  unknown = set(flags) - {"quick", "long"}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/streaming_llm.py")
  model = TransformerConfig(
    vocab_size=257, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, mlp_dim=384, scan_layers=False
  )
  base = TrainConfig(
    model=model, seq_len=256, batch_size=16, steps=400, lr=3e-3, warmup_steps=40, log_every=20,
    checkpoint_every=100, workdir="runs/streaming_llm/plain",
  )  # fmt: skip
  cfg = StreamingLLMConfig(
    base=base,
    sink=dataclasses.replace(base, sink_token=True, workdir="runs/streaming_llm/sink_token"),
    window=128,
    sink_counts=(1, 2, 4, 8),
    eval_tokens=100_000,
    segment=4096,
    chunk=64,
    dense_tokens=4096,
    recompute_tokens=1024,
  )
  if "long" in flags:
    cfg = dataclasses.replace(
      cfg,
      base=dataclasses.replace(cfg.base, steps=2000, workdir="runs/streaming_llm_long/plain"),
      sink=dataclasses.replace(cfg.sink, steps=2000, workdir="runs/streaming_llm_long/sink_token"),
    )
  if "quick" in flags:
    small = model.replace(num_layers=2, embed_dim=64, mlp_dim=128, num_heads=2, num_kv_heads=1)
    quick = dict(model=small, seq_len=64, batch_size=8, steps=40, warmup_steps=5, log_every=10, checkpoint_every=20)
    cfg = dataclasses.replace(
      cfg,
      base=dataclasses.replace(cfg.base, **quick, workdir="runs/streaming_llm_quick/plain"),
      sink=dataclasses.replace(cfg.sink, **quick, workdir="runs/streaming_llm_quick/sink_token"),
      window=32,
      eval_tokens=6000,
      segment=1024,
      chunk=32,
      dense_tokens=512,
      recompute_tokens=128,
      bins=6,
    )
  return cfg
