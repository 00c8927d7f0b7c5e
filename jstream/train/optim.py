"""The optimizer: AdamW, linear warmup then cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax

from jstream.train.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(cfg.steps, warmup + 1),
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
