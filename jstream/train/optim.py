"""The optimizer: AdamW, linear warmup then cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax

from jstream.train.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``.

  A video-QA run with ``VideoTask.encoder_steps`` has this schedule twice: over the encoder-only steps, then
  afresh over the joint steps. This is the frame side's schedule (and the one logged as ``lr``); the language
  model's is ``lm_schedule``."""
  first = cfg.encoder_steps
  if first:
    return optax.join_schedules([_warmup_cosine(cfg, first), _warmup_cosine(cfg, cfg.steps - first)], [first])
  return _warmup_cosine(cfg, cfg.steps)


def lm_schedule(cfg: TrainConfig) -> optax.Schedule:
  """The language model's schedule in a run with encoder-only steps: warmup and decay over the joint steps,
  indexed by the language model's own step count (0 at the first joint step)."""
  return _warmup_cosine(cfg, cfg.steps - cfg.encoder_steps)


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


def in_lm(path) -> bool:
  """Whether a parameter path is on the language model's side: inside ``VideoLM.lm``, or its ``projector`` (the
  map into the language model's inputs, which the encoder-only steps do not run)."""
  return getattr(path[0], "key", None) in ("lm", "projector")


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with decoupled weight decay on matrices.

  With encoder-only steps (``cfg.encoder_steps``) the language model and the frame side have separate AdamW
  states: the language model's moments and step count stay at their initial values through the encoder-only
  steps (its updates are zero there), so its first joint step is bias-corrected as Adam's first step. One shared
  state would count the encoder-only steps too, and the language model's ``k``-th update would be off by a factor
  of about ``(1 - b1**k) / sqrt(1 - b2**k)``: 0.45 at ``k = 1`` and 1.03 at ``k = 10`` with this config's defaults
  (``b2 = 0.95``), but 3.2, 6.5 and 2.3 at ``k = 1, 10, 200`` with ``b2 = 0.999``."""
  clip = optax.clip_by_global_norm(cfg.clip_norm)
  first = cfg.encoder_steps

  def adamw(lr):
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask)

  if cfg.data == "video_gen" and cfg.generation.objective == "self_forcing":
    return _self_forcing_optimizer(cfg, adamw)
  if cfg.draft_heads is not None:  # the target stays frozen: no update, no optimizer state
    part = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", None), params)
    return optax.multi_transform(
      {"heads": optax.chain(clip, adamw(schedule(cfg))), "target": optax.set_to_zero()}, part
    )
  if not first:
    return optax.chain(clip, adamw(schedule(cfg)))
  lm = optax.transforms.conditionally_mask(adamw(lm_schedule(cfg)), lambda step: step >= first)
  sides = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: "lm" if in_lm(path) else "frame", params)
  return optax.chain(clip, optax.multi_transform({"lm": lm, "frame": adamw(schedule(cfg))}, sides))


def _self_forcing_optimizer(cfg: TrainConfig, adamw) -> optax.GradientTransformation:
  """Self-rollout training (``jstream.models.self_forcing``): the student and the critic each with their own
  clipping and AdamW; the student updated every ``critic_steps`` steps (its moments, step count and schedule count
  its own updates only); the teacher never."""
  every = cfg.generation.critic_steps

  def chain(steps):
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw(_warmup_cosine(cfg, steps)))

  generator = chain(max(cfg.steps // every, 1))
  if every > 1:
    generator = optax.transforms.conditionally_mask(generator, lambda step: step % every == every - 1)
  part = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", None), params)
  parts = {"generator": generator, "critic": chain(cfg.steps), "teacher": optax.set_to_zero()}
  return optax.multi_transform(parts, part)
