"""The optimizer: AdamW, linear warmup then cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax

from jstream.train.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``.

  A video-QA run with ``VideoTask.encoder_steps`` has this schedule twice: over the encoder-only steps, then
  afresh over the joint steps (the language model starts learning there and gets its own warmup and decay)."""
  first = cfg.video.encoder_steps if cfg.data == "video_qa" else 0
  if 0 < first < cfg.steps:
    return optax.join_schedules([_warmup_cosine(cfg, first), _warmup_cosine(cfg, cfg.steps - first)], [first])
  return _warmup_cosine(cfg, cfg.steps)


def _warmup_cosine(cfg: TrainConfig, steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(steps, warmup + 1),
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


def _decay_mask(params):
  """Weight decay on projection kernels and the embedding; none on norm scales and sink parameters."""

  def is_matrix(path, _):
    names = {getattr(p, "key", getattr(p, "name", str(p))) for p in path}
    return bool(names & {"kernel", "embedding"})

  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(cfg.clip_norm),
    optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask),
  )
