"""The target / draft pair of ``jstream bench speculative``: two byte-level LMs on the same local text corpus.

  jstream train --config configs/speculative.py:target   # the target (6 layers, width 384, 1000 steps)
  jstream train --config configs/speculative.py:draft    # the draft (1 layer, width 128, 1500 steps)
  ...:quick                                              # both shrunk to seconds (CI)

The draft only has to guess the target's next bytes; a byte-level model of one layer already predicts most of the
easy ones (spaces, indentation, keyword endings). Any field can be overridden as ``key=value``.
"""

import dataclasses

from jstream import presets
from jstream.train import TrainConfig

TARGET = dict(num_layers=6, num_heads=6, num_kv_heads=2, embed_dim=384, mlp_dim=1024)
DRAFT = dict(num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=128, mlp_dim=384)


def get_config(*flags: str) -> TrainConfig:
  unknown = set(flags) - {"quick", "target", "draft"}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/speculative.py")
  if "target" in flags and "draft" in flags:
    raise ValueError("configs/speculative.py: pick one of target / draft")
  role = "draft" if "draft" in flags else "target"
  quick = "quick" in flags
  fields = DRAFT if role == "draft" else TARGET
  cfg = presets.byte_lm_run(
    f"runs/speculative_{role}" + ("_quick" if quick else ""),
    steps=1000 if role == "target" else 1500,
    warmup_steps=100,
    checkpoint_every=250,
    lr=2e-3,
    model=presets.byte_lm(**fields),
  )
  if quick:
    small = dict(num_layers=1, embed_dim=32, mlp_dim=64) if role == "draft" else {}
    cfg = presets.quick(cfg, steps=30, checkpoint_every=30)
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(**small)) if small else cfg
  return cfg
