"""The write plan of a chunk: which track, index, position and slot each of its tokens takes.

Computed once per chunk from the cache's counters (shared by every layer), before any key is written.

Endless streams
  ``idx`` never overflows: once a track's counter reaches ``2**30`` the counter and the ring's indices are shifted
  down by a multiple of the ring size (``rebase``). Masks only see differences of indices; keys that a model stored
  rotated by their track index are rotated back by the same shift (``Plan.shift``), so outputs are unchanged
  (tested with the threshold lowered). In ``cache_relative`` mode ``pos`` is rebased the same way. In ``absolute``
  mode ``pos`` is the RoPE position and cannot be rebased: a chunk that would run past ``2**31 - 1`` poisons its
  row's outputs with NaN, and the rollouts (``stream_nll``, ``prefill``, ``decode``, ``generate``) check it on the
  host before they start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from jstream.cache.policies import layout, slot_track
from jstream.typing import Array, ArrayLike, Bool, Int, SegmentIds

if TYPE_CHECKING:
  from jstream.cache.kv import KVCache

INT32_MAX = 2**31 - 1
REBASE_AT = 2**30
REBASE_SHIFT = 2**29


def rebase_shift(ring: int) -> int:
  """How far a rebase moves the indices of a ring of ``ring`` slots: a multiple of ``ring`` near ``2**29``, so
  every index keeps its slot."""
  return (REBASE_SHIFT // ring) * ring


class Plan(NamedTuple):
  """Where the tokens of one chunk go, and the positions the attention of that chunk uses.

  Arrays:
    cache: the cache with counters rebased (if needed), before this chunk is written.
    seg: ``[b, t]`` track of each token, -1 for padding.
    tok_idx: ``[b, t]`` index of each token within its track, -1 for padding.
    tok_pos: ``[b, t]`` stream position of each token, -1 for padding (the tokens of a group share one).
    q_idx: ``[b, m, t]`` index of the latest token of track ``m`` that each query sees: at or before the query,
      or, inside a group, at or before the group's last token (-1: none, or padding).
    rope_idx: ``[b, t]`` the track index a key is rotated at in ``cache_relative`` mode: its group's last token's
      (its own outside groups); a sink key's is capped at the track's last sink index.
    sink_slots / ring_slots: ``[b, t]`` slot each token is written to in the sink phase / the ring phase (the
      trash slot ``capacity`` when the token does not go there).
    slots: ``[b, t]`` the slot each token ends in (its sink slot, else its ring slot, else the trash slot).
    poison: ``[b]`` rows whose stream overran what the policy can represent (outputs are set to NaN).
    after: the cache metadata after this chunk (``k``/``v`` not yet written).
    shift: ``[b, m]`` how far each track's indices were shifted down by the rebase (0 almost always). Keys
      stored rotated by track index must be rotated back by the same amount (``cache_relative`` mode).
  """

  cache: KVCache
  seg: Array
  tok_idx: Array
  tok_pos: Array
  q_idx: Array
  rope_idx: Array
  sink_slots: Array
  ring_slots: Array
  slots: Array
  poison: Array
  after: KVCache
  shift: Array


def rebase(cache: KVCache) -> tuple[KVCache, Array]:
  """Shifts track indices (and, in cache_relative mode, stream positions) down before they can overflow.

  Returns the rebased cache and the shift ``[b, m]`` applied to each track's ring indices. Only ``k``/``v`` are
  left alone: keys stored rotated by track index must be rotated by ``-shift`` by the caller.
  """
  lay = layout(cache.policy)
  track_of = jnp.asarray(slot_track(cache.policy))
  shifts = jnp.asarray([rebase_shift(tl.track.ring) for tl in lay], jnp.int32)  # [m]
  sinks = jnp.asarray([tl.track.num_sinks for tl in lay], jnp.int32)
  do = cache.count >= REBASE_AT  # [b, m]
  delta = jnp.where(do, shifts[None], 0)  # [b, m]
  count = cache.count - delta
  slot_delta = delta[:, track_of]  # [b, s]
  is_ring = cache.idx >= sinks[track_of][None]
  idx = jnp.where(is_ring, cache.idx - slot_delta, cache.idx)
  pos, next_pos = cache.pos, cache.next_pos
  if cache.policy.positions == "cache_relative":
    pdo = next_pos >= REBASE_AT
    pdelta = jnp.where(pdo, REBASE_SHIFT, 0)
    next_pos = next_pos - pdelta
    # Old sinks keep the smallest positions; clamping keeps them from wrapping round after many rebases.
    pos = jnp.where(cache.idx >= 0, jnp.maximum(pos - pdelta[:, None], -REBASE_AT), pos)
  return cache.replace(idx=idx, pos=pos, count=count, next_pos=next_pos), delta


def plan(cache: KVCache, segment_ids: SegmentIds, chunk_len: int, groups: Int[Array, "b t"] | None = None) -> Plan:
  """Assigns the tokens of a chunk to tracks, indices, positions and slots (see ``Plan``).

  Args:
    cache: the cache before the chunk.
    segment_ids: ``[b, t]`` int32 track of each token (-1 = padding), or None for all-track-0.
    chunk_len: ``t``.
    groups: optional ``[b, t]`` int32: consecutive tokens with the same id ``>= 0`` form a *group* (the patch
      tokens of a video frame): they take one stream position and see each other (each token of a group sees
      what the group's last token sees), while every token still takes its own track index and slot. -1: a token
      of its own. A group lies inside one chunk and one track; padding ends it.

  Raises:
    ValueError: a chunk longer than the capacity, or ``segment_ids`` or ``groups`` of the wrong shape.
  """
  policy = cache.policy
  lay = layout(policy)
  b, cap = cache.batch_size, cache.capacity
  num_tracks = len(lay)
  if chunk_len > cap:
    raise ValueError(f"chunk of {chunk_len} tokens is longer than the cache capacity {cap} ({policy})")
  cache, shift = rebase(cache)
  if segment_ids is None:
    seg = jnp.zeros((b, chunk_len), jnp.int32)
  else:
    seg = jnp.asarray(segment_ids, jnp.int32)
    if seg.shape != (b, chunk_len):
      raise ValueError(f"segment_ids must be [b, t] = {(b, chunk_len)}, got {seg.shape}")
    seg = jnp.where((seg >= 0) & (seg < num_tracks), seg, -1)
  valid = seg >= 0
  onehot = seg[..., None] == jnp.arange(num_tracks, dtype=jnp.int32)  # [b, t, m]
  cum = jnp.cumsum(onehot.astype(jnp.int32), axis=1)  # inclusive
  q_idx = cache.count[:, None, :] + cum - 1  # [b, t, m]
  q_idx = jnp.moveaxis(q_idx, 2, 1)  # [b, m, t]
  own = jnp.take_along_axis(q_idx, jnp.maximum(seg, 0)[:, None, :], axis=1)[:, 0]  # [b, t]
  tok_idx = jnp.where(valid, own, -1)
  if groups is not None and jnp.shape(groups) != (b, chunk_len):
    raise ValueError(f"groups must be [b, t] = {(b, chunk_len)}, got {jnp.shape(groups)}")
  starts, last = (valid, None) if groups is None else group_starts_and_ends(groups, valid)
  if last is not None:  # a group's tokens see what its last token sees
    q_idx = jnp.take_along_axis(q_idx, last[:, None], axis=2)
  q_idx = jnp.where(valid[:, None], q_idx, -1)
  nstart = jnp.cumsum(starts.astype(jnp.int32), axis=1)
  tok_pos = jnp.where(valid, cache.next_pos[:, None] + nstart - 1, -1)
  new_count = cache.count + cum[:, -1, :]  # [b, m]
  new_next = cache.next_pos + nstart[:, -1]

  sink_slots = jnp.full((b, chunk_len), cap, jnp.int32)
  ring_slots = jnp.full((b, chunk_len), cap, jnp.int32)
  poison = jnp.zeros((b,), bool)
  for m, tl in enumerate(lay):
    tr = tl.track
    mine = seg == m
    if tr.num_sinks:
      is_sink = mine & (tok_idx < tr.num_sinks)
      sink_slots = jnp.where(is_sink, tl.sink_lo + tok_idx, sink_slots)
    in_ring = mine & (tok_idx >= tr.num_sinks)
    # A token overwritten later in the same chunk is not written at all (scatter order is unspecified).
    survives = tok_idx >= new_count[:, m : m + 1] - tr.ring
    ring_slot = tl.ring_lo + jnp.remainder(tok_idx - tr.num_sinks, tr.ring)
    ring_slots = jnp.where(in_ring & survives, ring_slot, ring_slots)
    if tr.window is None:  # Dense: may not wrap
      poison = poison | (new_count[:, m] > tr.ring)
  if policy.positions == "absolute":  # counts real tokens only: padding takes no position
    poison = poison | (cache.next_pos > INT32_MAX - nstart[:, -1])
  # Committed metadata: rows of the slot arrays that receive a token.
  slots = jnp.where(sink_slots < cap, sink_slots, ring_slots)
  bidx = jnp.arange(b)[:, None]
  kept = slots < cap
  idx = cache.idx.at[bidx, slots].set(jnp.where(kept, tok_idx, -1), mode="clip")
  pos = cache.pos.at[bidx, slots].set(jnp.where(kept, tok_pos, -1), mode="clip")
  after = cache.replace(idx=idx, pos=pos, count=new_count, next_pos=new_next)
  rope_idx = tok_idx
  if last is not None:
    group_idx = jnp.where(valid, jnp.take_along_axis(tok_idx, last, axis=1), -1)
    # A sink token of a group sits at its group's last index, or at the last sink index if the group runs on past
    # the sinks (sinks keep indices below num_sinks): a group held whole by the sinks (a video model's frame
    # sinks) keeps distance 0 inside, as it does in the ring.
    track_sinks = jnp.asarray([tl.track.num_sinks for tl in lay], jnp.int32)[jnp.maximum(seg, 0)]
    rope_idx = jnp.where(sink_slots < cap, jnp.minimum(group_idx, track_sinks - 1), group_idx)
  return Plan(cache, seg, tok_idx, tok_pos, q_idx, rope_idx, sink_slots, ring_slots, slots, poison, after, shift)


def group_starts_and_ends(groups: Int[ArrayLike, "b t"], valid: Bool[Array, "b t"]) -> tuple[Array, Array]:
  """The groups of ``plan``: ``starts [b, t]``, the valid tokens that take a new position (the first of a group,
  and every token outside groups); ``last [b, t]``, the index of the last token of each token's group (the token
  itself outside groups). A group's positions are ``cumsum(starts) - 1`` (what ``VideoLM.forward`` uses)."""
  b, t = valid.shape
  here = jnp.arange(t, dtype=jnp.int32)
  g = jnp.asarray(groups, jnp.int32)
  # A token continues the group of the token before it when both are valid and share an id >= 0.
  cont = jnp.zeros((b, t), bool).at[:, 1:].set((g[:, 1:] >= 0) & (g[:, 1:] == g[:, :-1]) & valid[:, 1:] & valid[:, :-1])
  ends = ~jnp.concatenate([cont[:, 1:], jnp.zeros((b, 1), bool)], axis=1)  # the next token does not continue
  last = jax.lax.cummin(jnp.where(ends, here, t), axis=1, reverse=True)
  return valid & ~cont, last
