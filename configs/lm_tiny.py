"""A tiny byte-level language model on the local Python standard library (+ pydoc prose).

  jstream train --config configs/lm_tiny.py                  # a few CPU minutes
  jstream train --config configs/lm_tiny.py:quick            # seconds (smoke test)
  jstream train --config configs/lm_tiny.py:sink,steps=2000  # with a learned sink token

Flags: ``quick`` (tiny and short), ``sink`` (learned sink token), ``windowed`` (train under a sink + window mask),
``overlap`` (overlapped-chunk training). Any field can be overridden as ``key=value`` (``model.<field>=...``).
"""

from jstream import TransformerConfig
from jstream.train import TrainConfig


def get_config(*flags: str) -> TrainConfig:
  unknown = set(flags) - {"quick", "sink", "windowed", "overlap"}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/lm_tiny.py")
  model = TransformerConfig(
    vocab_size=257,  # 256 bytes + the sink token id
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=128,
    mlp_dim=384,
  )
  cfg = TrainConfig(
    model=model,
    seq_len=256,
    batch_size=16,
    steps=600,
    lr=3e-3,
    warmup_steps=50,
    log_every=20,
    checkpoint_every=200,
    workdir="runs/lm_tiny" + "".join(f"_{f}" for f in sorted(flags)),
    sink_token="sink" in flags,
    train_window=128 if "windowed" in flags else None,
    train_sinks=4 if "windowed" in flags else 0,
    overlap=64 if "overlap" in flags else 0,
  )
  if "quick" in flags:
    from dataclasses import replace

    cfg = replace(
      cfg,
      model=model.replace(num_layers=2, embed_dim=64, mlp_dim=128, num_heads=2, num_kv_heads=1),
      seq_len=64,
      batch_size=8,
      steps=30,
      warmup_steps=5,
      log_every=10,
      checkpoint_every=10,
      train_window=32 if "windowed" in flags else None,
      overlap=16 if "overlap" in flags else 0,
    )
  return cfg
