"""The models of ``jstream bench speculative``: byte-level LMs on the same local text corpus, and draft heads.

  jstream train --config configs/speculative.py:target   # the target (6 layers, width 384, 1000 steps)
  jstream train --config configs/speculative.py:draft    # the draft (1 layer, width 128, 1500 steps)
  jstream train --config configs/speculative.py:distilled  # the draft's shape distilled from the target, 1000 steps
  jstream train --config configs/speculative.py:onpolicy   # ... distilled on its own samples (on-policy)
  jstream train --config configs/speculative.py:targetsamples  # ... distilled on the target's samples
  jstream train --config configs/speculative.py:inner    # the draft's draft for staged speculation (width 64)
  jstream train --config configs/speculative.py:heads    # 4 Medusa heads on the trained target (frozen), 300 steps
  ...:quick                                              # each shrunk to seconds (CI)

The draft only has to guess the target's next bytes; a byte-level model of one layer already predicts most of the
easy ones (spaces, indentation, keyword endings). ``distilled`` trains the same shape on the target's next-byte
distributions instead (DistillSpec: forward KL at temperature 1 by default; ``distill.divergence=tvd`` minimises
one minus the acceptance rate itself: give such a variant its own ``workdir=...``, since a run refuses to resume
under another config) on the corpus' rows; ``onpolicy`` on the same rows continued, after 32 corpus bytes, by the
draft's own samples at temperature 1 (DistillSpec's on-policy data; the sampling adds a draft decode scan to each
step); ``targetsamples`` on rows continued, after 128 corpus bytes, by the target's samples (the text a draft meets
when it is verified; a target decode scan per step, so fewer steps). Any field can be overridden as
``key=value``.
"""

import dataclasses

from jstream import presets
from jstream.train import DistillTask, DraftHeadsTask, TrainConfig

TARGET = dict(num_layers=6, num_heads=6, num_kv_heads=2, embed_dim=384, mlp_dim=1024)
DRAFT = dict(num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=128, mlp_dim=384)
INNER = dict(num_layers=1, num_heads=1, num_kv_heads=1, embed_dim=64, mlp_dim=192)
ROLES = {
  "target": (TARGET, 1000),
  "draft": (DRAFT, 1500),
  "distilled": (DRAFT, 1000),  # each step also runs the target: 1,000 steps cost more than the draft's 1,500
  "onpolicy": (DRAFT, 1000),
  "targetsamples": (DRAFT, 600),  # each step also samples 129 bytes from the target
  "inner": (INNER, 1000),
  "heads": (TARGET, 300),
}
QUICK = {"target": {}, "draft": dict(num_layers=1, embed_dim=32, mlp_dim=64), "inner": None, "heads": {}}
QUICK["inner"] = dict(QUICK["draft"], embed_dim=16, mlp_dim=32)
QUICK["distilled"] = QUICK["onpolicy"] = QUICK["targetsamples"] = QUICK["draft"]
DISTILL = {  # DistillTask fields of the distilled drafts
  "distilled": {},
  "onpolicy": dict(samples="student"),
  "targetsamples": dict(samples="teacher", prompt_len=128),
}


def get_config(*flags: str) -> TrainConfig:
  unknown = set(flags) - {"quick", *ROLES}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/speculative.py")
  roles = [f for f in flags if f in ROLES] or ["target"]
  if len(roles) > 1:
    raise ValueError(f"configs/speculative.py: pick one of {sorted(ROLES)}, got {roles}")
  role, quick = roles[0], "quick" in flags
  suffix = "_quick" if quick else ""
  fields, steps = ROLES[role]
  cfg = presets.byte_lm_run(
    f"runs/speculative_{role}{suffix}",
    steps=steps,
    warmup_steps=100 if role != "heads" else 30,
    checkpoint_every=250 if role != "heads" else 100,
    lr=2e-3 if role != "heads" else 1e-3,
    model=presets.byte_lm(**fields),
  )
  if quick:
    cfg = presets.quick(cfg, steps=10, checkpoint_every=10)
    if QUICK[role]:
      cfg = dataclasses.replace(cfg, model=cfg.model.replace(**QUICK[role]))
  if role == "heads":  # trained on the frozen target of the same mode (its run must exist)
    cfg = dataclasses.replace(cfg, draft_heads=DraftHeadsTask(f"runs/speculative_target{suffix}", num_heads=4))
  if role in DISTILL:  # learns the trained target's distributions (its run must exist)
    kw = DISTILL[role]
    if quick and "samples" in kw:  # quick rows are 65 bytes
      kw = {**kw, "prompt_len": 16}
    cfg = dataclasses.replace(cfg, distill=DistillTask(f"runs/speculative_target{suffix}", **kw))
  return cfg
