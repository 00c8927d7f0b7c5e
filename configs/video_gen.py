"""Streaming video generation on moving digits (issue 12): the block-causal video diffusion transformer.

  jstream train --config configs/video_gen.py                    # diffusion forcing, ~30 minutes on 2 CPU cores
  jstream train --config configs/video_gen.py:teacher_forcing    # the teacher-forcing baseline
  jstream train --config configs/video_gen.py:self_forcing       # self-rollout training from the run above
  jstream train --config configs/video_gen.py:quick              # seconds (smoke test)

The model (``jstream.models.video_dit``): 4 layers, width 128, 4 query / 2 kv heads, SwiGLU 384, 8x8-pixel patches
of 32x32 frames (16 tokens per frame), one frame per chunk, conditioned on the digit's label (dropped for 10% of the
clips, so that it can be sampled with classifier-free guidance: the benchmarks' ``--guidance 3``); trained with
rectified flow on 8-frame clips of one moving digit (``jstream.data.digits``), batch 16, AdamW at 1e-3, 4,000 steps.
Flags: ``teacher_forcing`` (one chunk per clip noised after clean context, workdir suffix ``_tf``), ``self_forcing``
(Self Forcing: the student rolls out whole clips with its own cache and a 4-step sampler, trained by distribution
matching against the diffusion-forcing run in ``runs/video_gen`` (the teacher, trained first; its real score guided at
scale 3 on digits) and an online critic; lr 1e-4, 400 steps (CartPole 200), workdir suffix ``_sf``), ``cartpole``
(gymnasium's CartPole instead of digits: 32x64 frames, 32 tokens each, every frame conditioned on the action that led to
it; 1000 steps, ``runs/video_gen_cartpole``; with ``self_forcing`` the student continues 2 real frames), ``quick`` (a
tiny model, 8x8 frames (CartPole 8x16), a few steps; with ``self_forcing``, the teacher is the quick run of the same
data). Any field can be overridden as ``key=value`` (``model.<field>=...``, ``generation.<field>=...``).
"""

import dataclasses

from jstream.config import TransformerConfig
from jstream.train import TrainConfig, VideoGenTask


def get_config(*flags: str) -> TrainConfig:
  unknown = set(flags) - {"quick", "teacher_forcing", "self_forcing", "cartpole"}
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/video_gen.py")
  task = VideoGenTask(label_dropout=0.1)  # 10% of clips unlabelled: the model can be sampled with guidance
  model = TransformerConfig(vocab_size=64, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, mlp_dim=384)
  cfg = TrainConfig(
    model=model,
    data="video_gen",
    generation=task,
    batch_size=16,
    steps=4000,  # 1,500 steps draw patch fragments; 4,000 draw the asked-for digit (benchmarks/RESULTS.md)
    lr=1e-3,
    warmup_steps=50,
    weight_decay=0.0,
    log_every=25,
    checkpoint_every=500,
    workdir="runs/video_gen",
  )
  if "cartpole" in flags:  # gymnasium's CartPole, 32x64 frames conditioned on the actions that led to them
    task = dataclasses.replace(
      task, dataset="cartpole", frame_size=(32, 64), class_conditioned=False, label_dropout=0.0, num_train=500
    )
    cfg = dataclasses.replace(cfg, generation=task, steps=1000, workdir="runs/video_gen_cartpole")
  if "teacher_forcing" in flags:
    task = dataclasses.replace(task, objective="teacher_forcing")
    cfg = dataclasses.replace(cfg, generation=task, workdir=cfg.workdir + "_tf")
  if "self_forcing" in flags:
    if "teacher_forcing" in flags:
      raise ValueError("teacher_forcing and self_forcing are two objectives: choose one")
    context = 2 if task.dataset == "cartpole" else 0  # CartPole: continue real frames under the real actions
    guided = 3.0 if task.class_conditioned else 1.0  # the real score guided, as the papers' teachers are
    task = dataclasses.replace(
      task, objective="self_forcing", teacher=cfg.workdir, context_frames=context, teacher_guidance=guided
    )
    steps = 200 if task.dataset == "cartpole" else 400  # CartPole's tokens cost twice as much (the CPU budget)
    cfg = dataclasses.replace(cfg, generation=task, lr=1e-4, steps=steps, warmup_steps=20, workdir=cfg.workdir + "_sf")
  if "quick" in flags:
    small = TransformerConfig(vocab_size=16, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64)
    teacher = {"teacher": cfg.workdir.removesuffix("_sf") + "_quick"} if task.objective == "self_forcing" else {}
    size = (8, 16) if task.dataset == "cartpole" else 8
    episodes = dict(num_train=8, episode_frames=8) if task.dataset == "cartpole" else dict(num_train=32)
    task = dataclasses.replace(task, frame_size=size, patch_size=4, digit_size=6, clip_frames=4, **episodes, **teacher)
    cfg = dataclasses.replace(
      cfg,
      model=small,
      generation=task,
      batch_size=4,
      steps=6,
      log_every=2,
      checkpoint_every=3,
      warmup_steps=1,
      workdir=cfg.workdir + "_quick",
    )
  return cfg
