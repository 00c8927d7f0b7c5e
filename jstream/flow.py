"""Rectified flow (flow matching on straight paths): noising, the velocity target, time sampling, Euler sampling.

Conventions (those of rectified flow / SD3, which CausVid-style video models use): time ``t`` runs from data
(``t = 0``) to noise (``t = 1``); a noised sample is ``x_t = (1 - t) x_0 + t e`` with ``e ~ N(0, I)``; a model
predicts the velocity ``v = dx_t / dt = e - x_0``, trained with the mean squared error to it (``loss``); sampling
integrates ``dx/dt = v(x, t)`` from ``t = 1`` down to ``t = 0`` (``euler``) on a time grid (``schedule``).
``shift`` warps a grid or a sampled time towards the noise end, ``t -> s t / (1 + (s - 1) t)`` (SD3's resolution
shift; ``shift = 1`` is the identity), which spends more of a few-step sampler's steps where the image is formed.

For Gaussian data the optimal velocity and the transport map are closed-form; ``tests/test_flow.py`` checks the
loss and the sampler against them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jstream.typing import Array, ArrayLike, Float


def _expand(t: ArrayLike, x: Array) -> Array:
  """``t [*lead]`` broadcast against ``x [*lead, ...]``."""
  t = jnp.asarray(t, jnp.float32)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def noised(x0: Float[Array, "*lead ..."], noise: Float[Array, "*lead ..."], t: Float[ArrayLike, "*lead"]) -> Array:
  """``x_t = (1 - t) x0 + t noise``; ``t`` has the leading axes of ``x0`` (per sample, or per frame)."""
  t = _expand(t, x0)
  return ((1.0 - t) * x0.astype(jnp.float32) + t * noise.astype(jnp.float32)).astype(x0.dtype)


def velocity_target(x0: Array, noise: Array) -> Array:
  """The velocity of the straight path from ``x0`` to ``noise``: ``noise - x0``."""
  return noise.astype(jnp.float32) - x0.astype(jnp.float32)


def loss(
  velocity: Float[Array, "*lead ..."],
  x0: Float[Array, "*lead ..."],
  noise: Float[Array, "*lead ..."],
  weight: Float[Array, "*lead"] | None = None,
) -> Float[Array, ""]:
  """The flow-matching loss: mean squared error of a predicted ``velocity`` to ``noise - x0``, averaged over the
  trailing (feature) axes, then weighted over the leading ones by ``weight`` (e.g. 0 for context frames that carry
  no target; default 1)."""
  err = jnp.square(velocity.astype(jnp.float32) - velocity_target(x0, noise))
  lead = weight.ndim if weight is not None else 1
  per = jnp.mean(err, axis=tuple(range(lead, err.ndim)))
  if weight is None:
    return jnp.mean(per)
  w = weight.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1e-9)


def shift_time(t: Float[ArrayLike, "*lead"], shift: float) -> Float[Array, "*lead"]:
  """``s t / (1 + (s - 1) t)``: the time warp of SD3 (``shift > 1`` moves times towards the noise end)."""
  if shift <= 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  t = jnp.asarray(t, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_times(rng: Array, shape: tuple[int, ...], *, kind: str = "logit_normal", shift: float = 1.0) -> Array:
  """Training times in ``(0, 1)`` of ``shape``: ``"uniform"``, or ``"logit_normal"`` (``sigmoid`` of a standard
  normal, SD3's default: more weight in the middle, where the velocity is hardest to predict); then ``shift_time``."""
  if kind == "uniform":
    t = jax.random.uniform(rng, shape, jnp.float32)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(jax.random.normal(rng, shape, jnp.float32))
  else:
    raise ValueError(f"kind must be 'uniform' or 'logit_normal', got {kind!r}")
  return shift_time(t, shift)


def schedule(steps: int, shift: float = 1.0) -> Float[Array, " steps_plus_1"]:
  """The sampler's time grid ``[steps + 1]``, from 1 (noise) down to 0 (data), evenly spaced then warped by
  ``shift_time``."""
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)


def euler(
  velocity: Callable[[Array, Array], Array], x1: Float[Array, "..."], times: Float[ArrayLike, " m"]
) -> Float[Array, "..."]:
  """Integrates ``dx/dt = velocity(x, t)`` from ``x1`` at ``times[0]`` along ``times`` (a ``schedule``); returns
  ``x`` at ``times[-1]``. ``velocity(x, t)`` gets ``t`` as a float32 scalar. One ``lax.scan`` over the steps."""

  def step(x, tt):
    t, t_next = tt
    v = velocity(x, t)
    return (x.astype(jnp.float32) + (t_next - t) * v.astype(jnp.float32)).astype(x1.dtype), None

  times = jnp.asarray(times, jnp.float32)
  x, _ = jax.lax.scan(step, x1, (times[:-1], times[1:]))
  return x
