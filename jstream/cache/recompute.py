"""StreamingLLM's "sliding window with re-computation" baseline: no KV cache, only the last token ids.

For every new token the model re-encodes the last ``window`` tokens from scratch at positions ``0..window-1``
(``model.forward``) and keeps the last logits, so each token costs a forward pass over the window. It is a
reference point for the bounded KV caches, not a method to use. Its cache (``TokenCache``) implements the same
protocol as ``KVCache`` (``jstream.cache.Cache``), so the model, the rollouts and the row operations treat both
alike.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar

import jax
import jax.numpy as jnp

from jstream._compat import is_concrete
from jstream.cache import planner as plan_lib
from jstream.cache.policies import Policy
from jstream.checks import check_int
from jstream.typing import Array, ArrayLike, Bool, Float, Int


@dataclasses.dataclass(frozen=True)
class Recompute(Policy):
  """StreamingLLM's "sliding window with re-computation" baseline (see the module docstring).

  Attributes:
    window: tokens re-encoded for every new token.
  """

  window: int
  # Not a field: the re-encoded window always takes positions 0..window-1.
  positions: ClassVar[str] = "cache_relative"

  def __post_init__(self):
    check_int("Recompute.window", self.window, 1)

  @property
  def capacity(self) -> int:
    return self.window

  def make_cache(self, geometry, *, batch_size, dtype, start) -> TokenCache:
    del geometry, dtype  # token ids only: any model, no float storage
    w = self.window
    return TokenCache(
      tokens=jnp.zeros((batch_size, w), jnp.int32),
      idx=jnp.full((batch_size, w), -1, jnp.int32),
      count=jnp.zeros((batch_size,), jnp.int32),
      next_pos=start,
      policy=self,
    )


# A pytree node: JAX rebuilds it with placeholder leaves (``jax.eval_shape``, tree maps), so its field shapes are
# documentation and are not checked at run time; the functions that take and return it are checked.
@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenCache:
  """Cache of the ``Recompute`` baseline: the last ``window`` token ids of each row.

  Attributes:
    tokens: ``[b, w]`` ring of token ids.
    idx: ``[b, w]`` int32 index of each held token in the stream since the reset (-1 empty), rebased like
      ``KVCache.idx``.
    count: ``[b]`` int32 tokens since the reset (rebased).
    next_pos: ``[b]`` int32 stream position of the next token.
    policy: the ``Recompute`` policy (static).
  """

  tokens: Int[Array, "b s"]
  idx: Int[Array, "b s"]
  count: Int[Array, " b"]
  next_pos: Int[Array, " b"]
  policy: Policy = dataclasses.field(metadata=dict(static=True))

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def capacity(self) -> int:
    return self.tokens.shape[1]

  def replace(self, **kw) -> TokenCache:
    return dataclasses.replace(self, **kw)

  # -- the cache protocol (see jstream.cache.Cache) ---------------------------------------------------------------

  def check_model(self, geometry) -> None:
    del geometry  # token ids fit any model

  def step(
    self, model, tokens: Int[Array, "b t"], segment_ids: Int[ArrayLike, "b t"] | None
  ) -> tuple[Float[Array, "b t v"], TokenCache]:
    """One forward over the window per token; padding (``segment_ids == -1``) leaves the cache as it was (its
    logits are those of the window with it appended).

    Raises:
      ValueError: ``segment_ids`` of the wrong shape, or (when concrete) other than 0 and -1.
    """
    valid = jnp.ones(tokens.shape, bool)
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids, jnp.int32)
      if segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids must be [b, t] = {tokens.shape}, got {segment_ids.shape}")
      if is_concrete(segment_ids) and bool(jnp.any(segment_ids > 0)):
        raise ValueError("the Recompute baseline has one segment: segment_ids must be 0 (token) or -1 (padding)")
      valid = segment_ids >= 0
    w = self.capacity

    def one(c, x):
      tok, ok = x
      new, logits = advance(c, tok)
      keep = lambda a, b: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
      return jax.tree.map(keep, new, c), logits

    def advance(c, tok):
      count, idx = c.count, c.idx
      rebase = count >= plan_lib.REBASE_AT
      shift = plan_lib.rebase_shift(w)
      count = jnp.where(rebase, count - shift, count)
      idx = jnp.where(rebase[:, None] & (idx >= 0), idx - shift, idx)
      slot = jnp.remainder(count, w)
      bidx = jnp.arange(tok.shape[0])
      toks = c.tokens.at[bidx, slot].set(tok)
      idx = idx.at[bidx, slot].set(count)
      # Oldest first: rotate the ring so that the slot after the newest comes first.
      order = jnp.remainder(slot[:, None] + 1 + jnp.arange(w)[None], w)
      window_toks = jnp.take_along_axis(toks, order, axis=1)
      window_idx = jnp.take_along_axis(idx, order, axis=1)
      held = window_idx >= 0
      positions = jnp.where(held, jnp.cumsum(held, axis=1) - 1, -1).astype(jnp.int32)
      logits = model.forward(window_toks, positions=positions)[:, -1]
      return c.replace(tokens=toks, idx=idx, count=count + 1, next_pos=c.next_pos + 1), logits

    cache, logits = jax.lax.scan(one, self, (tokens.T, valid.T))
    return jnp.swapaxes(logits, 0, 1), cache

  def reset_rows(self, sel: Bool[Array, " b"], start: Int[Array, " b"]) -> TokenCache:
    return self.replace(
      idx=jnp.where(sel[:, None], -1, self.idx),
      count=jnp.where(sel, 0, self.count),
      next_pos=jnp.where(sel, start, self.next_pos),
    )

  def rollback_rows(self, n: Int[Array, " b"], sel: Bool[Array, " b"]) -> TokenCache:
    n = jnp.where(sel, jnp.clip(n, 0, self.count), 0)
    gone = (self.idx >= 0) & (self.idx >= (self.count - n)[:, None])
    return self.replace(
      idx=jnp.where(gone, -1, self.idx), count=jnp.maximum(self.count - n, 0), next_pos=self.next_pos - n
    )
