"""Self-rollout training of the block-causal video diffusion transformer (Self Forcing, Huang et al. 2025).

Teacher forcing and diffusion forcing train every chunk against a context of *real* frames; at inference the
context is the model's own output, and errors compound over a long rollout (exposure bias). Self Forcing trains
on what inference does: the student (``generator``) rolls out a whole clip chunk by chunk with its own KV cache
and its own few-step sampler, and the loss judges the generated clip as a whole.

* **The rollout** (``self_rollout``). Each chunk starts from noise and runs the student's Euler sampler on the
  ``flow.schedule`` grid against the cache; a step index ``s`` is drawn per chunk and row, and the chunk's output is
  the clean-frame prediction at step ``s``, ``x_s - t_s v(x_s)`` (for the last step, exactly the sampler's output;
  for earlier ones, the sampler stopped early: every step learns to produce a clean chunk). Gradients flow through
  that one call only: the steps before it run on stop-gradient parameters, and the chunk is committed to the cache
  (the noise-level-0 pass) with stop-gradient parameters on the stop-gradient output, so no gradient goes through
  cache writes (the paper's memory-bounded recipe; the cache itself is the engine's, as at inference).
* **The objective** (``dmd_losses``): distribution matching distillation (DMD / DMD2, Yin et al. 2024): a frozen
  *real score* model (the teacher: a diffusion-forcing run) and an online *fake score* model (``critic``, trained
  with the flow-matching loss on the student's own clips) are evaluated on the generated clip noised to a random
  level; their difference of clean-frame predictions is the gradient of the KL divergence between the student's and
  the data distribution, applied to the clip through a squared-error surrogate with DMD's normalisation. The
  critic's loss and the student's are summed; stop-gradients separate them exactly (each parameter set receives its
  own loss's gradient), and ``critic_steps`` (DMD2's two time-scale rule) updates the student every that many steps.

Everything is one jitted training step at static shapes (``jstream.train``: ``VideoGenTask(objective="self_forcing",
teacher=WORKDIR)``); the student and the critic start from the teacher's weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jstream import cache as cache_lib
from jstream import flow, rollout
from jstream.models import video_dit
from jstream.models.video_dit import VideoDiT, VideoDiTConfig
from jstream.typing import Array, Float, Int


class SelfForcing(nnx.Module):
  """The three models of self-rollout training, one configuration: ``generator`` (the student, the model that is
  used afterwards), ``critic`` (the online fake-score model) and ``teacher`` (the frozen real-score model; the
  optimizer leaves it unchanged)."""

  PARTS = ("generator", "critic", "teacher")

  def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.generator = VideoDiT(config, rngs=rngs)
    self.critic = VideoDiT(config, rngs=rngs)
    self.teacher = VideoDiT(config, rngs=rngs)

  def load_teacher(self, teacher: VideoDiT) -> None:
    """Copies ``teacher``'s weights into all three models (the student and the critic start from the teacher)."""
    if teacher.config != self.config:
      raise ValueError(
        f"the teacher's model differs from the self-forcing run's: {teacher.config} vs {self.config} (train the "
        "self-forcing run with the teacher's model and task sizes)"
      )
    state = nnx.state(teacher, nnx.Param)
    for part in self.PARTS:
      nnx.update(getattr(self, part), jax.tree.map(jnp.copy, state))


def frozen(model: nnx.Module) -> nnx.Module:
  """``model`` with stop-gradient parameters: calls through it contribute no gradient (inside a traced function)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def self_rollout(
  generator: VideoDiT,
  cache: cache_lib.KVCache,
  noise: Float[Array, "b n H W C"],
  times: Float[Array, " m1"],
  exit_step: Int[Array, "b c"],
  *,
  labels: Int[Array, " b"] | None = None,
  actions: Int[Array, "b n"] | None = None,
) -> tuple[Float[Array, "b n H W C"], cache_lib.KVCache]:
  """The student's rollout of ``c = n / frames_per_chunk`` chunks after ``cache``, differentiable through one
  denoising call per chunk (see the module docstring).

  Args:
    generator: the student.
    cache: the context (empty, or clean frames committed before).
    noise: the starting noise of every chunk (model range), ``[b, n, H, W, C]``.
    times: the sampler's time grid (``flow.schedule(m, shift)``: ``m + 1`` levels from 1 to 0).
    exit_step: per row and chunk, the step ``s`` in ``[0, m)`` whose clean-frame prediction is the chunk's output
      (``m - 1``: the full sampler).
    labels, actions: conditioning, as ``VideoDiT.velocity`` (``actions`` per frame of the rollout).

  Returns:
    ``(frames, cache)``: the clean chunks (model range), with gradients through each chunk's exit call, and the
    cache after committing them (no gradients).
  """
  cfg = generator.config
  b, n = noise.shape[:2]
  k = cfg.frames_per_chunk
  c = n // k
  m = times.shape[0] - 1
  if exit_step.shape != (b, c):
    raise ValueError(f"exit_step must be [b, chunks] = [{b}, {c}], got {exit_step.shape}")
  fixed = frozen(generator)
  chunked = lambda a: jnp.moveaxis(a.reshape(b, c, k, *a.shape[2:]), 1, 0)  # [c, b, k, ...]
  acts = None if actions is None else chunked(actions)

  def chunk(cache, xs):
    z, s, act = xs

    def step(x, j):
      v = fixed.velocity(x, times[j], cache, labels=labels, actions=act)[0]
      return x + (times[j + 1] - times[j]) * v, x

    _, states = jax.lax.scan(step, z, jnp.arange(m))  # states[j]: the chunk at level times[j]
    x_s = states[s, jnp.arange(b)]  # [b, k, H, W, C]: each row at its exit step
    t_s = times[s][:, None]  # [b, 1]: one level per row, over the chunk's frames
    v = generator.velocity(x_s, jnp.broadcast_to(t_s, (b, k)), cache, labels=labels, actions=act)[0]
    x0 = x_s - t_s[:, :, None, None, None] * v
    cache = fixed.commit(jax.lax.stop_gradient(x0), cache, labels=labels, actions=act)
    return cache, x0

  cache, out = jax.lax.scan(chunk, cache, (chunked(noise), exit_step.T, acts))
  return jnp.moveaxis(out, 0, 1).reshape(noise.shape), cache


def noise_chunks(
  rng: Array, x: Float[Array, "b n H W C"], frames_per_chunk: int, time_range: tuple[float, float], context: int = 0
) -> tuple[Array, Array, Array]:
  """``(x_t, t [b, n], eps)``: ``x`` noised at one uniform level in ``time_range`` per chunk (diffusion forcing),
  the first ``context`` frames (whole chunks) left clean (``t = 0``)."""
  b, n = x.shape[:2]
  k = frames_per_chunk
  rng_t, rng_e = jax.random.split(rng)
  lo, hi = time_range
  t = jnp.repeat(jax.random.uniform(rng_t, (b, n // k), minval=lo, maxval=hi), k, axis=1)
  t = jnp.where(jnp.arange(n)[None] < context, 0.0, t)
  eps = jax.random.normal(rng_e, x.shape, jnp.float32)
  return flow.noised(x, eps, t), t, eps


def dmd_direction(
  x0: Float[Array, "b n H W C"],
  x_t: Float[Array, "b n H W C"],
  t: Float[Array, "b n"],
  v_real: Float[Array, "b n H W C"],
  v_fake: Float[Array, "b n H W C"],
  weight: Float[Array, "b n"],
) -> Float[Array, "b n H W C"]:
  """DMD's update direction for the clean clip ``x0``: the fake model's clean-frame prediction minus the real
  model's, ``(x0_fake - x0_real) / mean|x0 - x0_real|`` (the mean over each row's weighted frames and pixels: DMD's
  normalisation, which makes the step size independent of the noise level). Moving ``x0`` against it moves the
  student's distribution toward the teacher's."""
  tt = t[:, :, None, None, None]
  x0_real, x0_fake = x_t - tt * v_real, x_t - tt * v_fake
  w = weight[:, :, None, None, None]
  per_frame = x0[0, 0].size
  scale = jnp.sum(w * jnp.abs(x0 - x0_real), axis=(1, 2, 3, 4)) / jnp.maximum(jnp.sum(weight, 1) * per_frame, 1.0)
  return (x0_fake - x0_real) / jnp.maximum(scale, 1e-6)[:, None, None, None, None]


def dmd_losses(
  model: SelfForcing,
  rng: Array,
  batch_size: int,
  num_frames: int,
  *,
  steps: int,
  shift: float = 1.0,
  time_range: tuple[float, float] = (0.02, 0.98),
  context: Float[Array, "b n0 H W C"] | None = None,
  labels: Int[Array, " b"] | None = None,
  actions: Int[Array, "b n"] | None = None,
  teacher_guidance: float = 1.0,
) -> tuple[Float[Array, ""], Float[Array, ""], dict[str, Array]]:
  """``(generator_loss, critic_loss, metrics)`` of one self-forcing step.

  The student rolls out ``num_frames`` frames (``steps``-step sampler with ``shift``, a random exit step per chunk
  and row) after the clean ``context`` frames (model range; committed to its cache first, none by default); the
  clip (context + rollout) is noised per chunk (``time_range``, context clean) and scored by the teacher and the
  critic for the generator's DMD surrogate; the critic's flow-matching loss is taken on the stop-gradient clip,
  noised afresh. ``actions`` cover context and rollout frames. ``teacher_guidance``: the real score is the
  teacher's classifier-free guided velocity (``VideoDiT.forward(guidance=)``; the fake score stays unguided, as in
  DMD).
  """
  cfg = model.config
  n0 = 0 if context is None else context.shape[1]
  n = n0 + num_frames
  k = cfg.frames_per_chunk
  if num_frames % k or n0 % k:
    raise ValueError(f"context ({n0}) and rollout ({num_frames}) frames must be whole chunks of {k}")
  policy = video_dit.rolling_policy(cfg, None, n)
  cache = model.generator.init_cache(policy, batch_size)
  past, future = (None, actions) if actions is None or not n0 else (actions[:, :n0], actions[:, n0:])
  if n0:  # the clean context, chunk by chunk, without gradients
    frames = video_dit.from_model(jax.lax.stop_gradient(context))
    cache = rollout.context_frames(frozen(model.generator), frames, cache, labels=labels, actions=past)
  rng_z, rng_s, rng_g, rng_c = jax.random.split(rng, 4)
  shape = (batch_size, num_frames, *cfg.frame_size, cfg.channels)
  noise = jax.random.normal(rng_z, shape, jnp.float32)
  exit_step = jax.random.randint(rng_s, (batch_size, num_frames // k), 0, steps)
  times = flow.schedule(steps, shift)
  gen, _ = self_rollout(model.generator, cache, noise, times, exit_step, labels=labels, actions=future)
  clip = gen if context is None else jnp.concatenate([jax.lax.stop_gradient(context), gen], axis=1)
  weight = (jnp.arange(n)[None] >= n0).astype(jnp.float32) * jnp.ones((batch_size, 1))
  # the generator: DMD through the rollout
  x_t, t, _ = noise_chunks(rng_g, jax.lax.stop_gradient(clip), k, time_range, n0)
  v_real = frozen(model.teacher).forward(x_t, t, labels=labels, actions=actions, guidance=teacher_guidance)
  v_fake = frozen(model.critic).forward(x_t, t, labels=labels, actions=actions)
  direction = jax.lax.stop_gradient(dmd_direction(clip, x_t, t, v_real, v_fake, weight))
  target = jax.lax.stop_gradient(clip) - direction
  w = weight[:, :, None, None, None]
  gen_loss = 0.5 * jnp.sum(w * jnp.square(clip - target)) / jnp.maximum(jnp.sum(w) * clip[0, 0].size, 1.0)
  # the critic: flow matching on the student's clip
  x_c, t_c, eps_c = noise_chunks(rng_c, jax.lax.stop_gradient(clip), k, (0.0, 1.0), n0)
  v = model.critic.forward(x_c, t_c, labels=labels, actions=actions)
  critic_loss = flow.loss(v, jax.lax.stop_gradient(clip), eps_c, weight)
  metrics = {
    "generator_loss": gen_loss,
    "critic_loss": critic_loss,
    "dmd_direction_rms": jnp.sqrt(jnp.sum(w * jnp.square(direction)) / (jnp.sum(w) * clip[0, 0].size)),
    "rollout_mean": jnp.sum(w * video_dit.from_model(clip)) / (jnp.sum(w) * clip[0, 0].size),
  }
  return gen_loss, critic_loss, metrics
