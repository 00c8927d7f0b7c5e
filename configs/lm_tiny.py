"""A tiny byte-level language model on the local Python standard library (+ pydoc prose).

  jstream train --config configs/lm_tiny.py                  # a few CPU minutes
  jstream train --config configs/lm_tiny.py:quick            # seconds (smoke test)
  jstream train --config configs/lm_tiny.py:sink,steps=2000  # with a learned sink token

Flags: ``quick`` (tiny and short), ``sink`` (learned sink token), ``windowed`` (train under a sink + window mask),
``overlap`` (overlapped-chunk training), ``needle`` (half the samples carry a planted ``name = "value"`` line and its
recall: the model ``jstream bench needle`` reads), ``recall`` (every sample carries 4 needles and their recalls,
interleaved: name lookup and copying to learn; ``runs/lm_tiny_recall``), ``copy`` (a quarter of the samples are a
random string repeated, a copying curriculum; combine as ``copy,recall``). Any field can be overridden as
``key=value`` (``model.<field>=...``).
The model and the quick shrink are shared with ``configs/streaming_llm.py`` (``jstream.presets``).
"""

from jstream import presets
from jstream.train import TrainConfig


def get_config(*flags: str) -> TrainConfig:
  unknown = set(flags) - {"quick", "sink", "windowed", "overlap", "needle", "recall", "copy"}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/lm_tiny.py")
  quick, windowed, overlap = "quick" in flags, "windowed" in flags, "overlap" in flags
  cfg = presets.byte_lm_run(
    "runs/lm_tiny" + "".join(f"_{f}" for f in sorted(flags)),
    steps=600,
    warmup_steps=50,
    checkpoint_every=200,
    sink_token="sink" in flags,
    train_window=128 if windowed else None,
    train_sinks=4 if windowed else 0,
    overlap=64 if overlap else 0,
    needles=1.0 if "recall" in flags else 0.5 if "needle" in flags else 0.0,
    needle_pairs=4 if "recall" in flags else 1,
    copies=0.25 if "copy" in flags else 0.0,
  )
  if quick:
    cfg = presets.quick(
      cfg, steps=30, checkpoint_every=10, train_window=32 if windowed else None, overlap=16 if overlap else 0
    )
  return cfg
