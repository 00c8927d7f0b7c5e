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
