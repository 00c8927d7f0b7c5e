"""Losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jstream.typing import Array


def next_token_loss(logits: Array, targets: Array, mask: Array | None = None) -> tuple[Array, Array]:
  """Mean cross-entropy of ``logits [b, t, v]`` against ``targets [b, t]`` over ``mask`` (default: all).

  Returns ``(mean loss, number of counted tokens)``; float32 whatever the logits' dtype.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = jnp.ones_like(nll, bool) if mask is None else mask.astype(bool)
  count = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(count, 1), count


DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
"""What ``distill_loss`` can minimise between the teacher ``p`` and the student ``q`` (DistillSpec, Zhou et al.
2024): forward KL ``KL(p || q)``, reverse KL ``KL(q || p)``, Jensen-Shannon ``(KL(p || m) + KL(q || m)) / 2`` with
``m = (p + q) / 2``, and total variation ``sum |p - q| / 2``, which is one minus the acceptance rate of a
speculative draft sampled from ``q`` and verified against ``p``."""


def acceptance(teacher_logits: Array, student_logits: Array, temperature: float = 1.0) -> Array:
  """Per position, ``sum_v min(p_v, q_v)`` for ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``: the
  probability that the target (teacher) accepts a single draft sampled from ``q`` (Leviathan et al.'s ``beta``);
  float32."""
  p = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  q = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.minimum(p, q), axis=-1)


def distill_loss(
  student_logits: Array,
  teacher_logits: Array,
  mask: Array | None = None,
  *,
  divergence: str = "fkl",
  temperature: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
  """Mean divergence between the teacher's and the student's next-token distributions at ``temperature`` (the
  temperature the student will be sampled at as a draft: no ``temperature**2`` rescaling), over ``mask``.

  Args:
    student_logits, teacher_logits: ``[b, t, v]`` (the teacher's are not differentiated).
    mask: ``[b, t]`` positions that count (default: all).
    divergence: one of ``DIVERGENCES``.
    temperature: > 0; both distributions are ``softmax(logits / temperature)``.

  Returns:
    ``(mean divergence, metrics)``; metrics: ``acceptance``, the mean of ``sum_v min(p_v, q_v)`` at the same
    temperature (the expected share of single drafts the target accepts, Leviathan et al.'s ``beta``), and
    ``tokens``, the number of counted positions. float32 whatever the logits' dtype.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ")
  logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  logp = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1))
  p, q = jnp.exp(logp), jnp.exp(logq)
  if divergence == "fkl":
    d = jnp.sum(p * (logp - logq), axis=-1)
  elif divergence == "rkl":
    d = jnp.sum(q * (logq - logp), axis=-1)
  elif divergence == "jsd":
    logm = jnp.logaddexp(logp, logq) - jnp.log(2.0)
    d = 0.5 * jnp.sum(p * (logp - logm) + q * (logq - logm), axis=-1)
  else:
    d = 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
  mask = jnp.ones(d.shape, bool) if mask is None else mask.astype(bool)
  count = jnp.sum(mask)
  mean = lambda x: jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(count, 1)
  accept = jnp.sum(jnp.minimum(p, q), axis=-1)  # acceptance(), from the log-probabilities already here
  return mean(d), {"acceptance": jax.lax.stop_gradient(mean(accept)), "tokens": count}
