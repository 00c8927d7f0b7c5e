"""Fixed-capacity cache pytrees and the policies that decide which slot an incoming token takes.

A *policy* is a small frozen (hashable) dataclass: ``Dense(max_len)``, ``Window(window)``,
``SinkWindow(num_sinks, window)``, ``Segmented(...)`` (one sub-policy per segment id, StreamingVLM-style) and the
``Recompute(window)`` baseline. It owns no arrays; ``init`` builds the cache pytree it describes.

Slots and tracks
  A KV policy is a tuple of *tracks*. Track ``m`` holds the tokens whose segment id is ``m`` (``Segmented``) or all
  tokens (the single-track policies). Its slots are ``num_sinks`` write-once sink slots followed by a ring of
  ``window + max_rollback`` slots (``max_len`` for ``Dense``). Tracks are laid out one after the other along the slot
  axis; ``capacity`` is the total. One more slot, the *trash slot* at index ``capacity``, receives the writes of
  tokens that are not kept (padding, tokens overwritten within their own chunk): every write is then an
  unconditional in-place update (a masked write would read the old value and make XLA copy the buffer). The
  trash slot is never valid and never read. The first ``num_sinks`` tokens of a track since its reset fill its
  sink slots, the rest go round the ring.

Positions are data
  Every slot stores two int32 numbers: ``idx``, the token's index within its track since the reset (-1 for an
  empty slot), and ``pos``, its position in the stream (used for absolute RoPE and rollback). Masks are computed
  from ``idx`` alone: a query of track index ``c`` sees key ``j`` iff ``j <= c`` and (``c - j < window`` or
  ``j < num_sinks``). The per-row counters ``count [b, m]`` (next track index) and ``next_pos [b]`` are arrays,
  so a stream of any length compiles once, and batch rows may sit at different positions (ragged rows).

Endless streams
  ``idx`` never overflows: once a track's counter reaches ``2**30`` the counter and the ring's indices are shifted
  down by a multiple of the ring size. Masks only see differences of indices; keys that a model stored rotated by
  their track index are rotated back by the same shift (``Plan.shift``), so outputs are unchanged (tested with
  the threshold lowered). In ``cache_relative`` mode ``pos`` is rebased the same way. In ``absolute`` mode
  ``pos`` is the RoPE position and cannot be rebased: a chunk that would run past ``2**31 - 1`` poisons its row's
  outputs with NaN, and the rollouts (`stream_nll`, `prefill`, `decode`, `generate`) check it on the host before
  they start.

Rollback keeps exactness after the window is full as long as ``n <= max_rollback`` (the spare ring slots still
hold the keys that come back into the window).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jstream._compat import is_concrete
from jstream.checks import check_int
from jstream.positions import check_position_mode
from jstream.typing import Array

INT32_MAX = 2**31 - 1
REBASE_AT = 2**30
_REBASE_SHIFT = 2**29


def rebase_shift(ring: int) -> int:
  """How far a rebase moves the indices of a ring of ``ring`` slots: a multiple of ``ring`` near ``2**29``, so
  every index keeps its slot."""
  return (_REBASE_SHIFT // ring) * ring


# ------------------------------------------------------------------------------------------------ policies


@dataclasses.dataclass(frozen=True)
class Track:
  """One group of slots of a KV policy (see the module docstring)."""

  num_sinks: int
  window: int | None  # None: unbounded (Dense)
  ring: int  # ring slots (>= window)

  @property
  def size(self) -> int:
    return self.num_sinks + self.ring


class Policy:
  """Base class of cache policies."""

  positions: str = "absolute"

  @property
  def capacity(self) -> int:
    raise NotImplementedError

  def tracks(self) -> tuple[Track, ...]:
    raise NotImplementedError

  @property
  def max_rollback(self) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class Dense(Policy):
  """Keep every token, up to ``max_len`` (the full-attention KV cache).

  A stream longer than ``max_len`` is an error: eagerly checked where possible; under ``jit`` the row's outputs
  become NaN.
  """

  max_len: int
  positions: str = "absolute"

  def __post_init__(self):
    check_int("Dense.max_len", self.max_len, 1)
    check_position_mode(self.positions)

  @property
  def capacity(self) -> int:
    return self.max_len

  @property
  def max_rollback(self) -> int:
    return self.max_len

  def tracks(self):
    return (Track(0, None, self.max_len),)


@dataclasses.dataclass(frozen=True)
class Window(Policy):
  """Sliding window: each query sees the last ``window`` tokens (itself included).

  Attributes:
    window: tokens visible to a query.
    positions: ``"absolute"`` or ``"cache_relative"``.
    max_rollback: spare ring slots, so that rolling back up to this many tokens is exact.
  """

  window: int
  positions: str = "absolute"
  max_rollback: int = 0

  def __post_init__(self):
    check_int("Window.window", self.window, 1)
    check_int("Window.max_rollback", self.max_rollback, 0)
    check_position_mode(self.positions)

  @property
  def capacity(self) -> int:
    return self.window + self.max_rollback

  def tracks(self):
    return (Track(0, self.window, self.window + self.max_rollback),)


@dataclasses.dataclass(frozen=True)
class SinkWindow(Policy):
  """Attention sinks + sliding window (StreamingLLM): the first ``num_sinks`` tokens stay forever.

  Attributes:
    num_sinks: number of initial tokens kept.
    window: recent tokens visible to a query (itself included); must be >= ``num_sinks``.
    positions: ``"absolute"`` or ``"cache_relative"`` (StreamingLLM's re-indexing inside the cache).
    max_rollback: spare ring slots for exact rollback.
  """

  num_sinks: int
  window: int
  positions: str = "absolute"
  max_rollback: int = 0

  def __post_init__(self):
    check_int("SinkWindow.num_sinks", self.num_sinks, 0)
    check_int("SinkWindow.window", self.window, 1)
    check_int("SinkWindow.max_rollback", self.max_rollback, 0)
    if self.window < self.num_sinks:
      raise ValueError(
        f"SinkWindow: window ({self.window}) must be >= num_sinks ({self.num_sinks}); the sinks would take more "
        "of the cache than the recent tokens"
      )
    check_position_mode(self.positions)

  @property
  def capacity(self) -> int:
    return self.num_sinks + self.window + self.max_rollback

  def tracks(self):
    return (Track(self.num_sinks, self.window, self.window + self.max_rollback),)


@dataclasses.dataclass(frozen=True)
class Segmented(Policy):
  """One sub-policy per segment id, for multimodal streams (StreamingVLM).

  Token ``t`` with ``segment_ids[t] == m`` is kept by ``segments[m]`` (a ``Dense``, ``Window`` or ``SinkWindow``)
  and every query sees, for each segment, the keys that segment's policy keeps, with windows counted in tokens of
  that segment. E.g. ``Segmented((SinkWindow(4, 512), Window(1024)))`` keeps 4 text sinks, the last 512 text
  tokens and the last 1024 vision tokens. ``segment_ids == -1`` marks padding (not attended, not kept).

  In ``cache_relative`` mode positions are contiguous per segment: a key's position is its index among the
  retained tokens of its segment, and a query sits at the index of the latest token of that segment at or before
  it (sinks adjacent to the window, as in StreamingLLM). The sub-policies' own ``positions`` are ignored.
  """

  segments: tuple[Policy, ...]
  positions: str = "absolute"

  def __post_init__(self):
    if not self.segments:
      raise ValueError("Segmented needs at least one segment policy")
    for p in self.segments:
      if not isinstance(p, (Dense, Window, SinkWindow)):
        raise TypeError(f"Segmented segments must be Dense, Window or SinkWindow, got {type(p).__name__}")
    object.__setattr__(self, "segments", tuple(self.segments))
    check_position_mode(self.positions)

  @property
  def capacity(self) -> int:
    return sum(p.capacity for p in self.segments)

  @property
  def max_rollback(self) -> int:
    return min(p.max_rollback for p in self.segments)

  def tracks(self):
    return tuple(t for p in self.segments for t in p.tracks())


@dataclasses.dataclass(frozen=True)
class Recompute(Policy):
  """StreamingLLM's "sliding window with re-computation" baseline: no KV cache.

  For every new token the model re-encodes the last ``window`` tokens from scratch (positions ``0..window-1``),
  so each token costs a forward pass over the window. The cache holds token ids only.
  """

  window: int
  # Not a field: the re-encoded window always takes positions 0..window-1.
  positions: ClassVar[str] = "cache_relative"

  def __post_init__(self):
    check_int("Recompute.window", self.window, 1)

  @property
  def capacity(self) -> int:
    return self.window

  def tracks(self):
    return ()


# ------------------------------------------------------------------------------------------------ pytrees


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Key/value cache of every layer, with per-slot positions and per-row counters.

  Attributes:
    k: keys, heads-first so one head's slots are contiguous: one stacked ``[l, b, k, s, h]`` array (for models
      that scan over layers) or a tuple of ``l`` arrays ``[b, k, s, h]`` (for unrolled models: XLA:CPU copies a
      layer's slice of a stacked buffer before a dot). The cache treats keys as opaque; jstream's models store
      them rotated by RoPE at the token's position in the policy's frame (see ``jstream.nn.cached_attention``).
    v: values, slots last: ``[l, b, k, h, s]`` or a tuple of ``[b, k, h, s]`` (the weighted sum over slots then
      reads them without a transpose).
    idx: ``[b, s]`` int32 index of the slot's token within its track, -1 for an empty slot.
    pos: ``[b, s]`` int32 stream position of the slot's token (absolute RoPE, rollback).
    count: ``[b, m]`` int32 next track index of each track.
    next_pos: ``[b]`` int32 stream position of the next token.
    policy: the policy (static).
  """

  k: Array
  v: Array
  idx: Array
  pos: Array
  count: Array
  next_pos: Array
  policy: Policy = dataclasses.field(metadata=dict(static=True))

  @property
  def batch_size(self) -> int:
    return self.idx.shape[0]

  @property
  def capacity(self) -> int:
    """Usable slots (the policy's capacity); the buffers hold one more, the trash slot."""
    return self.idx.shape[1] - 1

  @property
  def num_layers(self) -> int:
    return len(self.k) if isinstance(self.k, tuple) else self.k.shape[0]

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, tuple)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """``(b, k, s, h)`` of one layer's keys."""
    return tuple(self.k[0].shape) if isinstance(self.k, tuple) else tuple(self.k.shape[1:])

  @property
  def dtype(self):
    return self.k[0].dtype if isinstance(self.k, tuple) else self.k.dtype

  def replace(self, **kw) -> KVCache:
    return dataclasses.replace(self, **kw)


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

  tokens: Array
  idx: Array
  count: Array
  next_pos: Array
  policy: Policy = dataclasses.field(metadata=dict(static=True))

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def capacity(self) -> int:
    return self.tokens.shape[1]

  def replace(self, **kw) -> TokenCache:
    return dataclasses.replace(self, **kw)


Cache = KVCache | TokenCache


def start_positions(start_position, batch_size) -> Array:
  """``start_position`` (a scalar or ``[b]``) as int32 ``[b]``; negative concrete values are an error."""
  start = jnp.broadcast_to(jnp.asarray(start_position, jnp.int32), (batch_size,))
  if is_concrete(start) and bool(jnp.any(start < 0)):
    raise ValueError(f"start_position must be >= 0, got {start_position}")
  return start


def init(
  policy: Policy,
  *,
  num_layers: int,
  batch_size: int,
  num_kv_heads: int,
  head_dim: int,
  dtype=jnp.float32,
  start_position=0,
  stacked: bool = True,
) -> Cache:
  """Builds an empty cache for ``policy``.

  Args:
    policy: a ``Dense``, ``Window``, ``SinkWindow``, ``Segmented`` or ``Recompute`` policy.
    num_layers, num_kv_heads, head_dim: the model's cache geometry.
    batch_size: number of independent streams.
    dtype: storage dtype of keys and values (float32, bfloat16 or float16).
    start_position: stream position of each row's first token (scalar or ``[b]``); only absolute RoPE sees it.
    stacked: one ``[l, ...]`` array per k/v (models that scan over layers) or a tuple of per-layer arrays.

  Raises:
    TypeError / ValueError: on an unknown policy, a non-floating dtype or non-positive sizes.
  """
  if not isinstance(policy, Policy):
    raise TypeError(f"expected a cache policy (Dense, Window, SinkWindow, Segmented, Recompute), got {policy!r}")
  check_int("batch_size", batch_size, 1)
  start = start_positions(start_position, batch_size)
  if isinstance(policy, Recompute):
    w = policy.window
    return TokenCache(
      tokens=jnp.zeros((batch_size, w), jnp.int32),
      idx=jnp.full((batch_size, w), -1, jnp.int32),
      count=jnp.zeros((batch_size,), jnp.int32),
      next_pos=start,
      policy=policy,
    )
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"cache dtype must be floating point, got {dtype}")
  for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
    check_int(name, val, 1)
  c = policy.capacity + 1  # + the trash slot
  kshape = (batch_size, num_kv_heads, c, head_dim)
  vshape = (batch_size, num_kv_heads, head_dim, c)
  if stacked:
    k, v = jnp.zeros((num_layers, *kshape), dtype), jnp.zeros((num_layers, *vshape), dtype)
  else:
    k = tuple(jnp.zeros(kshape, dtype) for _ in range(num_layers))
    v = tuple(jnp.zeros(vshape, dtype) for _ in range(num_layers))
  return KVCache(
    k=k,
    v=v,
    idx=jnp.full((batch_size, c), -1, jnp.int32),
    pos=jnp.full((batch_size, c), -1, jnp.int32),
    count=jnp.zeros((batch_size, len(policy.tracks())), jnp.int32),
    next_pos=start,
    policy=policy,
  )


# ------------------------------------------------------------------------------------------------ layout


class TrackLayout(NamedTuple):
  """Static slot layout of one track: sink slots ``[base, base + num_sinks)``, ring after them."""

  track: Track
  base: int

  @property
  def sink_lo(self) -> int:
    return self.base

  @property
  def ring_lo(self) -> int:
    return self.base + self.track.num_sinks

  @property
  def hi(self) -> int:
    return self.base + self.track.size


def layout(policy: Policy) -> tuple[TrackLayout, ...]:
  out, base = [], 0
  for t in policy.tracks():
    out.append(TrackLayout(t, base))
    base += t.size
  return tuple(out)


def _slot_track(policy: Policy) -> np.ndarray:
  """Static ``[s + 1]`` track id of every slot (the trash slot counts as track 0; its ``idx`` is always -1)."""
  return np.concatenate([np.full(t.size, m, np.int32) for m, t in enumerate(policy.tracks())] + [np.zeros(1, np.int32)])


# ------------------------------------------------------------------------------------------------ planning


class Plan(NamedTuple):
  """Where the tokens of one chunk go, and the positions the attention of that chunk uses.

  Computed once per chunk (shared by every layer). Arrays:
    cache: the cache with counters rebased (if needed), before this chunk is written.
    seg: ``[b, t]`` track of each token, -1 for padding.
    tok_idx: ``[b, t]`` index of each token within its track, -1 for padding.
    tok_pos: ``[b, t]`` stream position of each token, -1 for padding.
    q_idx: ``[b, m, t]`` index of the latest token of track ``m`` at or before each query (-1: none or padding).
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
  slot_track = jnp.asarray(_slot_track(cache.policy))
  shifts = jnp.asarray([rebase_shift(tl.track.ring) for tl in lay], jnp.int32)  # [m]
  sinks = jnp.asarray([tl.track.num_sinks for tl in lay], jnp.int32)
  do = cache.count >= REBASE_AT  # [b, m]
  delta = jnp.where(do, shifts[None], 0)  # [b, m]
  count = cache.count - delta
  slot_delta = delta[:, slot_track]  # [b, s]
  is_ring = cache.idx >= sinks[slot_track][None]
  idx = jnp.where(is_ring, cache.idx - slot_delta, cache.idx)
  pos, next_pos = cache.pos, cache.next_pos
  if cache.policy.positions == "cache_relative":
    pdo = next_pos >= REBASE_AT
    pdelta = jnp.where(pdo, _REBASE_SHIFT, 0)
    next_pos = next_pos - pdelta
    # Old sinks keep the smallest positions; clamping keeps them from wrapping round after many rebases.
    pos = jnp.where(cache.idx >= 0, jnp.maximum(pos - pdelta[:, None], -REBASE_AT), pos)
  return cache.replace(idx=idx, pos=pos, count=count, next_pos=next_pos), delta


def plan(cache: KVCache, segment_ids: Array | None, chunk_len: int) -> Plan:
  """Assigns the tokens of a chunk to tracks, indices, positions and slots (see ``Plan``).

  Args:
    cache: the cache before the chunk.
    segment_ids: ``[b, t]`` int32 track of each token (-1 = padding), or None for all-track-0.
    chunk_len: ``t``.
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
  q_idx = jnp.where(valid[..., None], q_idx, -1)
  q_idx = jnp.moveaxis(q_idx, 2, 1)  # [b, m, t]
  own = jnp.take_along_axis(q_idx, jnp.maximum(seg, 0)[:, None, :], axis=1)[:, 0]  # [b, t]
  tok_idx = jnp.where(valid, own, -1)
  nvalid = jnp.cumsum(valid.astype(jnp.int32), axis=1)
  tok_pos = jnp.where(valid, cache.next_pos[:, None] + nvalid - 1, -1)
  new_count = cache.count + cum[:, -1, :]  # [b, m]
  new_next = cache.next_pos + nvalid[:, -1]

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
    poison = poison | (cache.next_pos > INT32_MAX - nvalid[:, -1])
  # Committed metadata: rows of the slot arrays that receive a token.
  slots = jnp.where(sink_slots < cap, sink_slots, ring_slots)
  bidx = jnp.arange(b)[:, None]
  kept = slots < cap
  idx = cache.idx.at[bidx, slots].set(jnp.where(kept, tok_idx, -1), mode="clip")
  pos = cache.pos.at[bidx, slots].set(jnp.where(kept, tok_pos, -1), mode="clip")
  after = cache.replace(idx=idx, pos=pos, count=new_count, next_pos=new_next)
  return Plan(cache, seg, tok_idx, tok_pos, q_idx, sink_slots, ring_slots, slots, poison, after, shift)


def layer_buffer(buf, layer) -> Array:
  """Layer ``layer`` ``[b, k, s, h]`` of a stacked buffer or a tuple of per-layer buffers."""
  return buf[layer]


def write(buf, layer, slots: Array, update: Array, *, slots_last: bool = False):
  """Scatters ``update [b, t, k, h]`` into layer ``layer`` of ``buf`` at ``slots [b, t]``.

  ``buf`` is a stacked ``[l, b, k, s, h]`` array (``layer`` may then be traced) or a tuple of per-layer arrays
  (``layer`` a Python int); ``slots_last`` for value buffers ``[..., b, k, h, s]``. Slots equal to the capacity
  go to the trash slot. Only the written rows are touched, in place under ``jit``.
  """
  if isinstance(buf, tuple):
    return (*buf[:layer], _write_one(buf[layer], slots, update, slots_last), *buf[layer + 1 :])
  return _write_one(buf, slots, update, slots_last, layer=layer)


_DUS_ROWS = 8


def _write_one(buf: Array, slots: Array, update: Array, slots_last: bool, layer=None) -> Array:
  """One layer's write. A single token per row is written with one ``dynamic_update_slice`` per row (for small
  batches): XLA turns a scatter into a masked update that reads the old value, which can make it copy the whole
  buffer to keep that read ordered before the write."""
  b, t = slots.shape
  update = update.astype(buf.dtype)
  lead = () if layer is None else (layer,)
  if t == 1 and b <= _DUS_ROWS:
    for row in range(b):
      u = update[row, 0]  # [k, h]
      u = u[None, :, :, None] if slots_last else u[None, :, None, :]  # [1, k, h, 1] / [1, k, 1, h]
      if layer is not None:
        u = u[None]
      start = (*lead, row, 0, 0, slots[row, 0]) if slots_last else (*lead, row, 0, slots[row, 0], 0)
      buf = jax.lax.dynamic_update_slice(buf, u, start)
    return buf
  bidx = jnp.arange(b)[:, None]
  index = (bidx, slice(None), slice(None), slots) if slots_last else (bidx, slice(None), slots)
  return buf.at[(*lead, *index)].set(update, mode="clip")


def append(cache: KVCache, k: Array, v: Array, segment_ids: Array | None = None) -> KVCache:
  """Appends a chunk of keys/values for every layer (no attention): ``k, v [l, b, t, k, h]``.

  This is the model-free cache update the model performs layer by layer; it is what the cache invariants are
  tested on.
  """
  _check_kv(cache, k, v)
  p = plan(cache, segment_ids, k.shape[2])
  kb, vb = cache.k, cache.v
  for layer in range(cache.num_layers):
    kb = write(kb, layer, p.slots, k[layer])
    vb = write(vb, layer, p.slots, v[layer], slots_last=True)
  return p.after.replace(k=kb, v=vb)


def _check_kv(cache: KVCache, k: Array, v: Array):
  _, heads, _, head_dim = cache.layer_shape
  want = (cache.num_layers, cache.batch_size, None, heads, head_dim)
  for name, x in (("k", k), ("v", v)):
    if x.ndim != 5 or any(w is not None and w != s for w, s in zip(want, x.shape)):
      raise ValueError(f"{name} must be [l, b, t, k, h] = {want} (t free), got {x.shape}")


# ------------------------------------------------------------------------------------------------ row ops


def _rows_mask(rows, batch_size) -> Array:
  if rows is None:
    return jnp.ones((batch_size,), bool)
  rows = jnp.asarray(rows)
  if rows.dtype == jnp.bool_:
    if rows.shape != (batch_size,):
      raise ValueError(f"rows mask must be [b] = ({batch_size},), got {rows.shape}")
    return rows
  return jnp.zeros((batch_size,), bool).at[rows].set(True)


def reset(cache: Cache, rows=None, start_position=0) -> Cache:
  """Empties the selected rows (a bool mask ``[b]``, row indices, or None for all).

  The rows' counters restart, ``next_pos`` becomes ``start_position``, and their keys and values are zeroed: the
  attention over a cache skips masking the values of invisible slots, so no slot may keep a NaN from a previous
  stream. (This is one pass over the cache; resets are rare.)
  """
  b = cache.batch_size
  sel = _rows_mask(rows, b)
  start = start_positions(start_position, b)
  idx = jnp.where(sel[:, None], -1, cache.idx)
  count = jnp.where(sel.reshape((b,) + (1,) * (cache.count.ndim - 1)), 0, cache.count)
  next_pos = jnp.where(sel, start, cache.next_pos)
  if isinstance(cache, TokenCache):
    return cache.replace(idx=idx, count=count, next_pos=next_pos)
  pos = jnp.where(sel[:, None], -1, cache.pos)

  def zero(buf):  # [l, b, ...] stacked or [b, ...] per layer
    lead = 1 if cache.stacked else 0
    keep = sel.reshape((1,) * lead + (b,) + (1,) * (buf.ndim - lead - 1))
    return jnp.where(keep, jnp.zeros((), buf.dtype), buf)

  k, v = jax.tree.map(zero, cache.k), jax.tree.map(zero, cache.v)
  return cache.replace(k=k, v=v, idx=idx, pos=pos, count=count, next_pos=next_pos)


def rollback(cache: Cache, n, rows=None) -> Cache:
  """Forgets the last ``n`` tokens of the selected rows (``n``: int or ``[b]`` int32).

  Exact (the cache is then as if those tokens had never been appended) for ``n <= policy.max_rollback``, and for
  any ``n`` before the ring has wrapped. Tokens that were dropped by the policy cannot come back. ``n`` is clamped
  to the tokens a row holds since its last reset (a row never goes back past its start).

  Raises:
    ValueError: for a negative static ``n``.
  """
  b = cache.batch_size
  if isinstance(n, (int, np.integer)):
    if n < 0:
      raise ValueError(f"rollback count must be >= 0, got {n}")
  sel = _rows_mask(rows, b)
  held = cache.count if cache.count.ndim == 1 else jnp.sum(cache.count, axis=1)  # tokens since the reset
  n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (b,))
  n = jnp.where(sel, jnp.clip(n, 0, held), 0)
  cut = cache.next_pos - n  # positions >= cut are forgotten
  if isinstance(cache, TokenCache):
    gone = (cache.idx >= 0) & (cache.idx >= (cache.count - n)[:, None])
    return cache.replace(idx=jnp.where(gone, -1, cache.idx), count=jnp.maximum(cache.count - n, 0), next_pos=cut)
  gone = (cache.idx >= 0) & (cache.pos >= cut[:, None])  # [b, s]
  slot_track = jnp.asarray(_slot_track(cache.policy))
  num_tracks = cache.count.shape[1]
  if num_tracks == 1:  # exact even for tokens that no longer have a slot
    per_track = n[:, None]
  else:
    per_track = jnp.stack([jnp.sum(gone & (slot_track[None] == m), axis=1) for m in range(num_tracks)], axis=1)
  return cache.replace(
    idx=jnp.where(gone, -1, cache.idx),
    pos=jnp.where(gone, -1, cache.pos),
    count=cache.count - per_track,
    next_pos=cut,
  )


def visible(cache: KVCache, query_idx: Array | None = None) -> Array:
  """``[b, s]`` bool: the slots a next token of track 0 would attend (valid, within window or sink).

  For multi-track policies pass ``query_idx [b, m]`` (track indices of the query in each track); default: the
  next index of every track.
  """
  lay = layout(cache.policy)
  q = cache.count if query_idx is None else query_idx
  slot_track = _slot_track(cache.policy)
  qs = q[:, slot_track]  # [b, s]
  ok = (cache.idx >= 0) & (cache.idx <= qs)
  window = np.array([tl.track.window or 0 for tl in lay])[slot_track]
  unbounded = np.array([tl.track.window is None for tl in lay])[slot_track]
  sinks = np.array([tl.track.num_sinks for tl in lay])[slot_track]
  in_win = unbounded[None] | ((qs - cache.idx) < window[None]) | (cache.idx < sinks[None])
  return ok & in_win
