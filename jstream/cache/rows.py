"""Row operations on a cache: reset, rollback, visibility.

``reset`` and ``rollback`` take any cache (the ``jstream.cache.Cache`` protocol): they normalise their arguments
(which rows, how far, where a row restarts) and call the cache's own ``reset_rows`` / ``rollback_rows``; the
``KVCache`` versions are here, the ``Recompute`` baseline's are in ``jstream.cache.recompute``. ``visible`` is the
KV cache's visibility of its slots to the next token. All are masked writes: no shape depends on the rows chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jstream._compat import is_concrete
from jstream.cache.policies import layout, slot_track
from jstream.typing import Array, ArrayLike, Bool, Int

if TYPE_CHECKING:
  from jstream.cache.kv import KVCache


def start_positions(start_position: Int[ArrayLike, " b"] | Int[ArrayLike, ""], batch_size: int) -> Int[Array, " b"]:
  """``start_position`` (a scalar or ``[b]``) as int32 ``[b]``; negative concrete values are an error."""
  start = jnp.broadcast_to(jnp.asarray(start_position, jnp.int32), (batch_size,))
  if is_concrete(start) and bool(jnp.any(start < 0)):
    raise ValueError(f"start_position must be >= 0, got {start_position}")
  return start


def rows_mask(rows: ArrayLike | None, batch_size: int) -> Bool[Array, " b"]:
  """``[b]`` bool selection from a bool mask ``[b]``, row indices, or None (all rows)."""
  if rows is None:
    return jnp.ones((batch_size,), bool)
  rows = jnp.asarray(rows)
  if rows.dtype == jnp.bool_:
    if rows.shape != (batch_size,):
      raise ValueError(f"rows mask must be [b] = ({batch_size},), got {rows.shape}")
    return rows
  return jnp.zeros((batch_size,), bool).at[rows].set(True)


def reset(cache, rows=None, start_position=0):
  """Empties the selected rows (a bool mask ``[b]``, row indices, or None for all) of any cache.

  The rows' counters restart and ``next_pos`` becomes ``start_position``. A KV cache also zeroes the rows' keys
  and values: the attention over a cache skips masking the values of invisible slots, so no slot may keep a NaN
  from a previous stream. (This is one pass over the cache; resets are rare.)
  """
  b = cache.batch_size
  return cache.reset_rows(rows_mask(rows, b), start_positions(start_position, b))


def rollback(cache, n, rows=None):
  """Forgets the last ``n`` tokens of the selected rows (``n``: int or ``[b]`` int32) of any cache.

  Exact (the cache is then as if those tokens had never been appended) for ``n <= policy.max_rollback``, and for
  any ``n`` before the ring has wrapped. Tokens that were dropped by the policy cannot come back. ``n`` is clamped
  to the tokens a row holds since its last reset (a row never goes back past its start).

  Raises:
    ValueError: for a negative static ``n``.
  """
  if isinstance(n, (int, np.integer)) and n < 0:
    raise ValueError(f"rollback count must be >= 0, got {n}")
  b = cache.batch_size
  return cache.rollback_rows(jnp.broadcast_to(jnp.asarray(n, jnp.int32), (b,)), rows_mask(rows, b))


# ------------------------------------------------------------------------------------------------ KV caches


def reset_kv(cache: KVCache, sel: Bool[Array, " b"], start: Int[Array, " b"]) -> KVCache:
  """``reset`` of a ``KVCache``: ``sel [b]`` rows restart at stream position ``start [b]``."""
  b = cache.batch_size
  idx = jnp.where(sel[:, None], -1, cache.idx)
  pos = jnp.where(sel[:, None], -1, cache.pos)
  count = jnp.where(sel[:, None], 0, cache.count)
  next_pos = jnp.where(sel, start, cache.next_pos)

  def zero(buf):  # [l, b, ...] stacked or [b, ...] per layer
    lead = 1 if cache.stacked else 0
    keep = sel.reshape((1,) * lead + (b,) + (1,) * (buf.ndim - lead - 1))
    return jnp.where(keep, jnp.zeros((), buf.dtype), buf)

  k, v = jax.tree.map(zero, cache.k), jax.tree.map(zero, cache.v)
  return cache.replace(k=k, v=v, idx=idx, pos=pos, count=count, next_pos=next_pos)


def rollback_kv(cache: KVCache, n: Int[Array, " b"], sel: Bool[Array, " b"]) -> KVCache:
  """``rollback`` of a ``KVCache`` by ``n [b]`` tokens in the ``sel [b]`` rows."""
  held = jnp.sum(cache.count, axis=1)  # tokens since the reset
  n = jnp.where(sel, jnp.clip(n, 0, held), 0)
  cut = cache.next_pos - n  # positions >= cut are forgotten
  gone = (cache.idx >= 0) & (cache.pos >= cut[:, None])  # [b, s]
  num_tracks = cache.count.shape[1]
  if num_tracks == 1:  # exact even for tokens that no longer have a slot
    per_track = n[:, None]
  else:
    track_of = jnp.asarray(slot_track(cache.policy))
    per_track = jnp.stack([jnp.sum(gone & (track_of[None] == m), axis=1) for m in range(num_tracks)], axis=1)
  return cache.replace(
    idx=jnp.where(gone, -1, cache.idx),
    pos=jnp.where(gone, -1, cache.pos),
    count=cache.count - per_track,
    next_pos=cut,
  )


def visible(cache: KVCache, query_idx: Int[Array, "b m"] | None = None) -> Bool[Array, "b s"]:
  """``[b, s]`` bool: the slots a next token of track 0 would attend (valid, within window or sink).

  For multi-track policies pass ``query_idx [b, m]`` (track indices of the query in each track); default: the
  next index of every track.
  """
  lay = layout(cache.policy)
  q = cache.count if query_idx is None else query_idx
  track_of = slot_track(cache.policy)
  qs = q[:, track_of]  # [b, s]
  ok = (cache.idx >= 0) & (cache.idx <= qs)
  window = np.array([tl.track.window or 0 for tl in lay])[track_of]
  unbounded = np.array([tl.track.window is None for tl in lay])[track_of]
  sinks = np.array([tl.track.num_sinks for tl in lay])[track_of]
  in_win = unbounded[None] | ((qs - cache.idx) < window[None]) | (cache.idx < sinks[None])
  return ok & in_win
