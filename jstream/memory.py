"""Memory beyond the window: tokens leaving a bounded cache go to a memory tier that queries still attend.

A sliding-window cache forgets every token that leaves its window. The three memories here keep some, at a fixed
size, beside the cache (a ``KVCache`` of any ``Window`` / ``SinkWindow`` / ``Segmented`` policy, the *local*
cache):

* ``Retrieval`` (ReKV, Di et al., 2025; LiveVLM): every evicted key and value is appended to a *store* of
  ``store_blocks`` blocks of ``block`` consecutive evicted tokens (a ring: the oldest block is overwritten when it
  is full). At every chunk, each layer scores the blocks with its own queries: the mean of the chunk's reading
  queries (rotated at their positions) against each block's mean key (its summary key), summed over the query
  heads of a kv head; the ``top_k`` best blocks per (row, layer, kv head) are gathered into a retrieved segment of
  ``top_k * block`` tokens that the chunk attends beside the local cache. Only the retrieved segment is read by
  attention: the cost per chunk is the window plus ``top_k * block`` tokens, plus one pass over the summary keys,
  which are kept up to date as blocks are written (``MemoryCache.summary``), so no chunk reads the whole store.
* ``Compressed`` (Flash-VStream, Zhang et al., 2024; StreamChat's memory): ``slots`` memory slots per (layer, kv
  head). An evicted token fills an empty slot while there is one; after that it is merged into the slot whose mean
  key is the most similar (cosine), whose key and value become the running means of the tokens merged into it.
  Every slot is attended with its logit raised by ``log(count)`` (proportional attention, as in token merging): a
  slot of ``n`` equal keys receives exactly the attention mass its ``n`` tokens would.
* ``Scored`` (score-based eviction: H2O, Zhang et al., 2023; the age-normalised score of Evict3R and StreamMem):
  ``slots`` memory entries per (layer, kv head) hold the evicted tokens that received the most attention. The
  window is H2O's recent window and the entries its heavy hitters: the tokens a chunk evicts join the entries, the
  chunk's reading queries attend them all, each entry adds the attention mass it received (the query's softmax
  over everything it attends, the window, the chunk and the memory, summed over the chunk's queries and the query
  heads of its kv head, in float32) to its score, and the ``slots`` of highest score stay (``score="mean"``: the
  score per reading query that could attend the entry since it left the window). A token's mass while it was in
  the window is not counted: it enters the memory with the mass of the chunk that evicts it, so an entry's score
  is what it received as a memory entry. The mass needs each query's log-sum-exp over everything it attends,
  which the model passes to the memory (``extend_embeddings(extra_outputs=True)``). Scores and counts are kept per
  (layer, kv head) (``MemoryCache.score`` / ``seen``): each head keeps its own tokens. Only reader queries score:
  with ``readers`` that leave out the memory track (``readers=(0,)`` on a video stream), an evicted token gets no
  mass until a reader comes, and once the entries are full it loses to every entry with mass (of equal priorities
  the older entry stays), so the memory holds the earliest evicted tokens until questions arrive.

Which tokens, which queries. ``track`` (default: the policy's last track, the vision track of
``Segmented((text, vision))``) is the track whose evicted tokens enter the memory; tokens of other tracks are
forgotten as before. ``readers`` (default: every track) are the tracks whose queries attend the memory and, for
``Retrieval``, choose the blocks: ``readers=(0,)`` with a video model is ReKV's question-time retrieval (frames
attend their window only; a question's words retrieve). A query of track index ``c`` in the memory track sees the
memory tokens of index ``<= c - window``, exactly those its window no longer holds: a token evicted by a chunk
enters the memory before that chunk's attention, so nothing is seen twice and nothing falls between the window and
the memory. ``Scored`` memories are scored by their readers' attention only. With ``top_k`` covering every stored
block (or ``slots`` at least the evicted tokens) the local cache plus the memory is the full past, and a stream
equals one under a ``Dense`` cache (tested).

Positions. Keys are stored as the local cache stores them, rotated by RoPE: at their stream position
(``absolute``) or at their index within the memory track (``cache_relative``: StreamingVLM's contiguous positions
per track, the index rebase of endless streams included), and a query attends the memory in the frame it attends
the memory track's window with, so a memory token keeps its true distance (in stream positions or in the track's
tokens) to the query; a merged slot's key is the mean of rotated keys. ``Retrieval(reindex=True)`` instead gives the
retrieved segment ReKV's positions, just before the window in stream order (``reindexed``), for models that cannot
attend far beyond their training length (cache-relative positions only).

Where the memory lives. Everything is one pytree that a compiled stream carries (``MemoryCache``), so a stream of
any length is one compiled program at fixed memory. The store of ``Retrieval`` (its keys, values, indices and
counts, the ``store_blocks * block`` entries, and the block summaries and fills) is in device memory by default;
``Retrieval(..., store_memory="host")`` keeps it in host memory (JAX's ``pinned_host`` memory kind) for the whole
stream: the compiled program writes the evicted tokens into it, updates the touched blocks' summaries, scores the
blocks and gathers the chosen ones on the host (``compute_on("device_host")``), so what crosses between the
memories is of the chunk's size (the evicted tokens, the chunk's mean queries and the index arrays going out, the
retrieved segment coming in), and device memory holds the local cache and the retrieved segment, whatever
``store_blocks`` is. XLA schedules those transfers
asynchronously where the platform allows. Every JAX platform of the tested versions has the memory kind (CPU, where
host and device memory are one, included: there the placement is checked, not a saving); a platform without it gets
an error when the cache is made. ``memory_bytes`` reports the local cache, the memory read by attention (retrieved
segment / slots / entries), the store, the summaries, and what is in device memory.

A memory cache cannot roll back (evicted tokens have left the local cache): ``rollback`` raises.
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from jstream._compat import is_concrete
from jstream.cache import kv as kv_lib
from jstream.cache import planner as plan_lib
from jstream.cache import policies as pol
from jstream.checks import check_int
from jstream.ops import attention as attn_ops
from jstream.positions import Rope, apply_rope, rope_cos_sin
from jstream.process_memory import tree_bytes
from jstream.reduce import cosine_similarity
from jstream.typing import Array, Bool, Float, Int


@dataclasses.dataclass(frozen=True)
class MemoryPolicy(pol.Policy):
  """Base class of the memory policies (see the module docstring): a local KV policy plus a memory tier.

  Attributes:
    local: the local cache's policy: ``Window``, ``SinkWindow`` or ``Segmented`` of them / ``Dense``, either
      position mode; the memory track must be a ``Window`` or ``SinkWindow`` without rollback room.
    track: the track whose evicted tokens enter the memory (default: the last).
    readers: the tracks whose queries attend the memory (default: all).
  """

  local: pol.Policy
  track: int | None = dataclasses.field(default=None, kw_only=True)
  readers: tuple[int, ...] | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    if not isinstance(self.local, (pol.Window, pol.SinkWindow, pol.Segmented)):
      raise TypeError(
        f"{type(self).__name__}.local must be a Window, SinkWindow or Segmented policy, got {self.local!r}"
      )
    tracks = self.local.tracks()
    track = len(tracks) - 1 if self.track is None else self.track
    if not 0 <= track < len(tracks):
      raise ValueError(f"track {self.track} is not a track of {self.local} ({len(tracks)} tracks)")
    object.__setattr__(self, "track", track)
    tr = tracks[track]
    if tr.window is None or tr.ring != tr.window:
      raise ValueError(
        f"the memory track {track} of {self.local} must be a Window or SinkWindow with max_rollback=0 (got {tr}): "
        "its evicted tokens are what the memory keeps"
      )
    readers = tuple(range(len(tracks))) if self.readers is None else tuple(int(r) for r in self.readers)
    if not readers or any(not 0 <= r < len(tracks) for r in readers):
      raise ValueError(f"readers {self.readers} must be tracks of {self.local} (0..{len(tracks) - 1})")
    object.__setattr__(self, "readers", readers)

  @property
  def positions(self) -> str:
    return self.local.positions

  @property
  def capacity(self) -> int:
    return self.local.capacity

  @property
  def max_stream(self) -> int | None:
    return self.local.max_stream

  def tracks(self):
    return self.local.tracks()

  @property
  def window(self) -> int:
    """The memory track's window: a query sees memory tokens ``window`` or more indices behind it."""
    return self.local.tracks()[self.track].window

  @property
  def slots(self) -> int:
    """Memory entries per (row, layer, kv head)."""
    raise NotImplementedError

  def make_cache(self, geometry, *, batch_size, dtype, start) -> MemoryCache:
    local = self.local.make_cache(geometry, batch_size=batch_size, dtype=dtype, start=start)
    num_layers, heads, head_dim, _ = geometry
    shape = (num_layers, batch_size, heads, self.slots)
    blocks = self.store_blocks if isinstance(self, Retrieval) else 0
    scored = (*shape[:3], self.slots if isinstance(self, Scored) else 0)
    on_store = _placer(self)
    return MemoryCache(
      local=local,
      k=on_store(jnp.zeros((*shape, head_dim), local.dtype)),
      v=on_store(jnp.zeros((*shape, head_dim), local.dtype)),
      idx=on_store(jnp.full(shape, -1, jnp.int32)),
      count=on_store(jnp.zeros(shape, jnp.float32)),
      written=jnp.zeros((batch_size,), jnp.int32),
      summary=on_store(jnp.zeros((num_layers, batch_size, heads, blocks, head_dim), jnp.float32)),
      filled=on_store(jnp.zeros((batch_size, blocks), jnp.int32)),
      score=jnp.zeros(scored, jnp.float32),
      seen=jnp.zeros(scored, jnp.float32),
      policy=self,
    )


@dataclasses.dataclass(frozen=True)
class Retrieval(MemoryPolicy):
  """ReKV-style offload and retrieval (see the module docstring).

  Attributes:
    block: evicted tokens per block (a video frame's tokens: one block per frame).
    top_k: blocks retrieved per (row, layer, kv head) at each chunk.
    store_blocks: blocks the store holds (a ring over blocks).
    store_memory: ``"device"`` (default) or ``"host"``: the memory the store lives in (see the module docstring).
    reindex: ReKV's positions for the retrieved segment: its tokens, in stream order, take the track indices just
      before the window of the chunk's newest reading query (the newest one it may see at its own index, the others
      contiguous before it), so a question attends what it retrieved at the distances it was trained with, however
      old. Which tokens a query may see does not change. Needs ``cache_relative`` positions (the stored keys are
      rotated at their track index there).
  """

  block: int = 16
  top_k: int = 4
  store_blocks: int = 256
  store_memory: str = dataclasses.field(default="device", metadata=dict(stored=False))
  reindex: bool = dataclasses.field(default=False, metadata=dict(stored=False))

  def __post_init__(self):
    super().__post_init__()
    check_int("Retrieval.block", self.block, 1)
    check_int("Retrieval.top_k", self.top_k, 1)
    check_int("Retrieval.store_blocks", self.store_blocks, 1)
    if self.top_k > self.store_blocks:
      raise ValueError(f"Retrieval: top_k ({self.top_k}) must be <= store_blocks ({self.store_blocks})")
    if self.store_memory not in ("device", "host"):
      raise ValueError(f"Retrieval.store_memory must be 'device' or 'host', got {self.store_memory!r}")
    if self.reindex and self.positions != "cache_relative":
      raise ValueError(
        "Retrieval(reindex=True) needs a local policy with positions='cache_relative': under absolute positions "
        "the store keeps keys rotated at stream positions it does not record"
      )

  @property
  def slots(self) -> int:
    return self.block * self.store_blocks

  @property
  def read_tokens(self) -> int:
    """Memory tokens a chunk attends (the retrieved segment)."""
    return self.top_k * self.block


@dataclasses.dataclass(frozen=True)
class Compressed(MemoryPolicy):
  """Flash-VStream-style compressed memory (see the module docstring).

  Attributes:
    slots: memory slots per (row, layer, kv head).
  """

  slots: int = 64

  def __post_init__(self):
    super().__post_init__()
    check_int("Compressed.slots", self.slots, 1)

  @property
  def read_tokens(self) -> int:
    return self.slots


@dataclasses.dataclass(frozen=True)
class Scored(MemoryPolicy):
  """Score-based eviction beyond the window (see the module docstring): H2O's heavy hitters (``score="sum"``), the
  age-normalised score of Evict3R / StreamMem (``"mean"``) or the latest chunk's attention (``"last"``) on the
  memory track.

  Attributes:
    slots: evicted tokens kept per (row, layer, kv head).
    score: ``"sum"``, the attention mass an entry received since it left the window (H2O); ``"mean"``, that mass
      per reading query that could attend it (old entries are not kept merely for having been seen more);
      ``"last"``, the mass it received from the latest chunk (TOVA's rule: what the current queries attend stays;
      SnapKV's observation window without its pooling).
  """

  slots: int = 64
  score: str = "sum"

  def __post_init__(self):
    super().__post_init__()
    check_int("Scored.slots", self.slots, 1)
    if self.score not in ("sum", "mean", "last"):
      raise ValueError(f"Scored.score must be 'sum', 'mean' or 'last', got {self.score!r}")

  @property
  def read_tokens(self) -> int:
    return self.slots


# A pytree node (see jstream.cache.kv.KVCache on why field shapes are documentation only).
@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemoryCache:
  """A local ``KVCache`` plus a memory tier (see the module docstring).

  Attributes:
    local: the local cache.
    k, v: ``[l, b, k, S, h]`` memory keys (rotated as the local cache stores them) and values; ``S`` is the
      store (``Retrieval``: ``block * store_blocks`` tokens, block ``j`` is entries ``[j * block, (j + 1) *
      block)``) or the slots (``Compressed``: mean key and value of the tokens merged into each).
    idx: ``[l, b, k, S]`` int32 track index of the entry's token (``Compressed``: the latest merged), -1 empty.
    count: ``[l, b, k, S]`` float32 tokens the entry stands for (0 empty).
    written: ``[b]`` int32 tokens appended since the reset (``Retrieval``'s write pointer).
    summary: ``Retrieval``: ``[l, b, k, store_blocks, h]`` float32 mean key of each block's stored tokens (its
      summary key), kept up to date as blocks are written, so that choosing blocks reads the summaries and not the
      store (a ``cache_relative`` rebase rotates them with the keys, in float32: equal to the mean of a low-precision
      store up to its rounding until the block is rewritten); ``Compressed``: empty (no blocks).
    filled: ``[b, store_blocks]`` int32 tokens stored in each block (``Compressed``: empty).
    score: ``Scored``: ``[l, b, k, slots]`` float32 attention mass each entry received since it left the window
      (the others: empty).
    seen: ``Scored``: ``[l, b, k, slots]`` float32 reading queries that could attend each entry since then.
    policy: the ``MemoryPolicy`` (static).
  """

  local: kv_lib.KVCache
  k: Array
  v: Array
  idx: Array
  count: Array
  written: Array
  summary: Array
  filled: Array
  score: Array
  seen: Array
  policy: MemoryPolicy = dataclasses.field(metadata=dict(static=True))

  @property
  def batch_size(self) -> int:
    return self.local.batch_size

  @property
  def capacity(self) -> int:
    return self.local.capacity

  @property
  def dtype(self):
    return self.local.dtype

  def replace(self, **kw) -> MemoryCache:
    return dataclasses.replace(self, **kw)

  # -- the cache protocol (see jstream.cache.Cache) ---------------------------------------------------------------

  def check_model(self, geometry: kv_lib.Geometry) -> None:
    self.local.check_model(geometry)

  def step(self, model, tokens: Array, segment_ids: Array | None):
    """Runs a chunk of token ids through ``model`` against this cache."""
    return model.extend(tokens, self, segment_ids=segment_ids)

  def reset_rows(self, sel: Array, start: Array) -> MemoryCache:
    keep = ~sel[None, :, None, None]

    def clear(keep, idx, count, summary, filled):  # -1 / 0 in the reset rows (arithmetic: a host computation makes
      kept = keep.astype(idx.dtype)  # no constants)
      summary = summary * keep[..., None].astype(summary.dtype)
      return idx * kept + kept - 1, count * keep.astype(count.dtype), summary, filled * kept[0, :, 0]

    idx, count, summary, filled = _on_store(self.policy, clear, keep, self.idx, self.count, self.summary, self.filled)
    return self.replace(
      local=self.local.reset_rows(sel, start),
      idx=idx,
      count=count,
      written=jnp.where(sel, 0, self.written),
      summary=summary,
      filled=filled,
      score=jnp.where(keep, self.score, 0.0),
      seen=jnp.where(keep, self.seen, 0.0),
    )

  def rollback_rows(self, n: Array, sel: Array) -> MemoryCache:
    raise ValueError(
      f"a {type(self.policy).__name__} memory cache cannot roll back: evicted tokens have left the local cache"
    )

  # -- one chunk --------------------------------------------------------------------------------------------------

  def extend_embeddings(
    self,
    model,
    x: Float[Array, "b t d"],
    *,
    segment_ids: Int[Array, "b t"] | None = None,
    groups: Int[Array, "b t"] | None = None,
  ):
    """Runs input embeddings ``x [b, t, d]`` through ``model`` (a ``StreamingTransformer``) against the local cache
    and the memory: what ``model.extend_embeddings`` does for this cache. Returns ``(logits, cache)``."""
    policy = self.policy
    t = x.shape[1]
    cfg = model.config
    plan = plan_lib.plan(self.local, segment_ids, t, groups)  # the model plans the same chunk again (CSE'd)
    shift = plan.shift[:, policy.track]
    k_out, v_out, idx_out, valid = _evicted(self.local, plan, policy.track)
    relative = policy.positions == "cache_relative"
    if relative:  # gathered before the model rotates the local ring back by a rebase's shift: rotate them too
      k_out = _rotate_back(k_out, shift, cfg.rope)
    mem = self._rebased(shift, cfg.rope)._append(k_out, v_out, idx_out, valid)
    limit = _read_limit(plan, policy)
    q_pos = plan.q_idx[:, policy.track] if relative else plan.tok_pos  # the memory track's window's query frame
    cos, sin = rope_cos_sin(jnp.maximum(q_pos, 0), cfg.head_dim, cfg.rope)

    scored = isinstance(policy, Scored)

    def extra(_, layer, q):
      q_rot = apply_rope(q, cos[:, :, None], sin[:, :, None])
      if isinstance(policy, Retrieval):
        k, v, idx, count = _retrieve(policy, q_rot, limit, mem, layer)
        if policy.reindex:
          k = reindexed(k, idx, count, limit, cfg.rope)
      else:
        k, v, idx, count = (a[layer] for a in (mem.k, mem.v, mem.idx, mem.count))
      part = memory_attention(q_rot, k, v, idx, count, limit)
      if not scored:
        return part
      return part, lambda lse: memory_key_mass(q_rot, k, idx, count, limit, lse)

    logits, local, *mass = model.extend_embeddings(
      x, self.local, segment_ids=segment_ids, groups=groups, extra_attention=extra, extra_outputs=scored
    )
    if scored:
      mem = mem._keep(*mass[0])
    # A chunk with more tokens of the memory track than its window evicts some of its own tokens, which never were
    # in the cache to be moved to the memory: those rows get NaN logits (an error when the chunk is concrete).
    over = jnp.sum(plan.seg == policy.track, axis=1) > policy.window
    if is_concrete(over) and bool(jnp.any(over)):
      raise ValueError(
        f"a chunk holds more tokens of the memory track than its window {policy.window}: tokens it evicts from "
        "itself would be lost; use shorter chunks"
      )
    return jnp.where(over[:, None, None], jnp.nan, logits), mem.replace(local=local)

  def _rebased(self, shift: Int[Array, " b"], rope_base: float | Rope) -> MemoryCache:
    """Track indices shifted down like the local cache's rebase (every ``2**29`` tokens of the track); in
    ``cache_relative`` mode the keys are rotated back by the shift too (in a zero-or-one-trip loop, which updates
    the memory in place when no row rebases: ``jstream.nn.cached_attention.rerotate``)."""
    policy = self.policy

    def shift_idx(shift, idx):  # arithmetic, as in reset_rows
      full = (idx >= 0).astype(idx.dtype)
      return jnp.maximum(idx - shift[None, :, None, None], 0) * full + full - 1

    def rotate(cos, sin, k, summary):
      return _rotated(cos, sin, k), _rotated(cos, sin, summary)

    def body(state):
      cos, sin = rope_cos_sin(-shift, self.k.shape[-1], rope_base)  # [b, h / 2]
      return jnp.array(False), _on_store(policy, rotate, cos, sin, *state[1])

    idx = _on_store(policy, shift_idx, shift, self.idx)
    k, summary = self.k, self.summary
    if policy.positions == "cache_relative":  # a block's mean key rotates with its keys (RoPE is linear)
      k, summary = jax.lax.while_loop(lambda state: state[0], body, (jnp.any(shift != 0), (k, summary)))[1]
    return self.replace(idx=idx, k=k, summary=summary)

  def _append(self, k, v, idx, valid) -> MemoryCache:
    """Adds the evicted tokens ``k, v [l, b, k, t, h]``, ``idx [b, t]`` where ``valid [b, t]`` (in stream order)."""
    if isinstance(self.policy, Retrieval):
      return self._store(k, v, idx, valid)
    if isinstance(self.policy, Scored):
      return self._candidates(k, v, idx, valid)
    return self._merge(k, v, idx, valid)

  def _candidates(self, k, v, idx, valid) -> MemoryCache:
    """``Scored``: the entries followed by the evicted tokens (no mass yet), ``slots + t`` entries that the chunk
    attends; ``_keep`` brings them back to ``slots``."""
    shape = (*self.idx.shape[:3], idx.shape[1])  # [l, b, k, t]
    new = jnp.broadcast_to(jnp.where(valid, idx, -1)[None, :, None], shape)
    zero = jnp.zeros(shape, jnp.float32)

    def cat(old, add):
      return jnp.concatenate([old, add.astype(old.dtype)], axis=3)

    return self.replace(
      k=cat(self.k, k),
      v=cat(self.v, v),
      idx=cat(self.idx, new),
      count=cat(self.count, jnp.broadcast_to(valid[None, :, None], shape)),
      score=cat(self.score, zero),
      seen=cat(self.seen, zero),
    )

  def _keep(self, mass: Float[Array, "l b k m"], seen: Float[Array, "l b k m"]) -> MemoryCache:
    """``Scored``: adds a chunk's attention mass and reading queries to the candidates' and keeps the ``slots`` of
    highest priority per (layer, row, kv head) (the score, or the score per reading query for ``"mean"``; of equal
    priorities the earlier candidate: the entries before the evicted tokens). ``"last"`` replaces every score by
    this chunk's mass (a chunk reads every entry or, without reader queries, none: then all score 0 and, tied, the
    entries stay and the evicted tokens go)."""
    policy = self.policy
    score = mass if policy.score == "last" else self.score + mass
    seen = self.seen + seen
    priority = score / jnp.maximum(seen, 1.0) if policy.score == "mean" else score
    _, top = jax.lax.top_k(jnp.where(self.count > 0, priority, -jnp.inf), policy.slots)  # [l, b, k, slots]

    def take(a):
      return jnp.take_along_axis(a, top if a.ndim == 4 else top[..., None], axis=3)

    return self.replace(
      k=take(self.k),
      v=take(self.v),
      idx=take(self.idx),
      count=take(self.count),
      score=take(score),
      seen=take(seen),
    )

  def _store(self, k, v, idx, valid) -> MemoryCache:
    slots = self.policy.slots
    b, t = valid.shape
    rank = jnp.cumsum(valid, axis=1) - 1
    dest = jnp.where(valid, (self.written[:, None] + rank) % slots, slots)  # slots: dropped
    num_layers, heads = self.k.shape[0], self.k.shape[2]
    per_token = (b, t, num_layers, heads)
    where = _store_index(  # [b, t, l, k, 4]
      jnp.arange(num_layers)[None, None, :, None],
      jnp.arange(b)[:, None, None, None],
      jnp.arange(heads)[None, None, None, :],
      dest[:, :, None, None],
    )
    new = (  # [b, t, l, k, ...]: what each token writes
      jnp.moveaxis(k, (0, 2), (2, 3)).astype(self.k.dtype),
      jnp.moveaxis(v, (0, 2), (2, 3)).astype(self.v.dtype),
      jnp.broadcast_to(idx[:, :, None, None], per_token),
      jnp.ones(per_token, jnp.float32),
    )

    def put(where, store, new):  # store: the buffers [l, b, k, S, ...]
      return tuple(_scatter(buf, where, val) for buf, val in zip(store, new))

    k, v, idx, count = _on_store(self.policy, put, where, (self.k, self.v, self.idx, self.count), new)
    written = self.written + valid.sum(axis=1).astype(jnp.int32)
    return self.replace(k=k, v=v, idx=idx, count=count, written=written)._summarize(self.written, t)

  def _summarize(self, start: Int[Array, " b"], t: int) -> MemoryCache:
    """Recomputes the summary key and fill of the blocks that up to ``t`` tokens appended from write pointer
    ``start`` touched (at most ``t // block + 2`` consecutive blocks of the ring), from the stored tokens."""
    blk, nb = self.policy.block, self.policy.store_blocks
    n = min(nb, t // blk + 2)
    b = start.shape[0]
    touched = (start[:, None] // blk + jnp.arange(n, dtype=jnp.int32)) % nb  # [b, n]
    entries = (touched[:, :, None] * blk + jnp.arange(blk, dtype=jnp.int32)).reshape(b, n * blk)
    rows = jnp.arange(b)[:, None]
    layers, heads = jnp.arange(self.k.shape[0])[None, None, :, None], jnp.arange(self.k.shape[2])
    read = _store_index(layers, rows[:, :, None, None], heads, entries[:, :, None, None])  # [b, n * blk, l, k, 4]
    write = _store_index(layers, rows[:, :, None, None], heads, touched[:, :, None, None])  # [b, n, l, k, 4]

    def summarize(read, write, k, idx, summary, filled):
      keys = _gather(k, read).astype(jnp.float32)  # [b, n * blk, l, k, h]
      full = (_gather(idx, read[:, :, 0, 0]) >= 0).astype(jnp.float32)  # every layer and head stores the same tokens
      fill = full.reshape(b, n, blk).sum(-1)  # [b, n]
      total = (keys * full[:, :, None, None, None]).reshape(b, n, blk, *keys.shape[2:]).sum(2)  # [b, n, l, k, h]
      mean = total / jnp.maximum(fill, 1.0)[:, :, None, None, None]
      return _scatter(summary, write, mean), _scatter(filled, write[:, :, 0, 0, 1:4:2], fill)

    summary, filled = _on_store(self.policy, summarize, read, write, self.k, self.idx, self.summary, self.filled)
    return self.replace(summary=summary, filled=filled)

  def _merge(self, k, v, idx, valid) -> MemoryCache:
    """Each evicted token, in stream order: into the first empty slot, else the most similar slot (cosine of the
    mean keys), per (layer, row, kv head)."""

    def one(mem, xs):
      mk, mv, midx, mcount = mem
      tk, tv, tidx, tvalid = xs  # [l, b, k, h], [l, b, k, h], [b], [b]
      tk32 = tk.astype(jnp.float32)
      empty = mcount == 0  # [l, b, k, S]
      mk32 = mk.astype(jnp.float32)
      cos = cosine_similarity(mk32, tk32[..., None, :])  # [l, b, k, S]
      target = jnp.where(jnp.any(empty, -1), jnp.argmax(empty, -1), jnp.argmax(jnp.where(empty, -jnp.inf, cos), -1))
      hit = (jnp.arange(mcount.shape[-1]) == target[..., None]) & tvalid[None, :, None, None]  # [l, b, k, S]
      n = mcount + hit
      w = jnp.where(hit, 1.0 / jnp.maximum(n, 1.0), 0.0)[..., None]
      mk = (mk32 + w * (tk32[..., None, :] - mk32)).astype(mk.dtype)
      mv = (mv.astype(jnp.float32) + w * (tv.astype(jnp.float32)[..., None, :] - mv.astype(jnp.float32))).astype(
        mv.dtype
      )
      midx = jnp.where(hit, jnp.maximum(midx, tidx[None, :, None, None]), midx)
      return (mk, mv, midx, n), None

    xs = (jnp.moveaxis(k, 3, 0), jnp.moveaxis(v, 3, 0), idx.T, valid.T)
    (mk, mv, midx, count), _ = jax.lax.scan(one, (self.k, self.v, self.idx, self.count), xs)
    return self.replace(k=mk, v=mv, idx=midx, count=count)


def _on_host(policy: MemoryPolicy) -> bool:
  return getattr(policy, "store_memory", "device") == "host"


def host_memory_available() -> bool:
  """Whether the default device has a ``pinned_host`` memory (what ``Retrieval(store_memory="host")`` needs) and
  this JAX the memory spaces and host computations it places the store with."""
  has_api = hasattr(getattr(jax, "memory", None), "Space")
  return has_api and any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())


def _placer(policy: MemoryPolicy):
  """Moves an array into the memory the policy's store lives in (identity for a device store)."""
  if not _on_host(policy):
    return lambda a: a
  if not host_memory_available():
    raise ValueError(
      f"store_memory='host': this platform ({jax.default_backend()}) or JAX ({jax.__version__}) has no pinned_host "
      "memory to keep the retrieval store in; use store_memory='device'"
    )
  return lambda a: jax.device_put(a, jax.memory.Space.Host)


def _on_store(policy: MemoryPolicy, fn, *args):
  """``fn(*args)`` computed where the policy's store lives: for a store in host memory, on the host with the
  arguments moved there and the results left there (XLA's host offloading: ``compute_on("device_host")``)."""
  if not _on_host(policy):
    return fn(*args)
  return compute_on("device_host")(jax.jit(fn))(*jax.tree.map(_placer(policy), args))


def _from_store(policy: MemoryPolicy, fn, *args):
  """``_on_store`` whose (small) results come to device memory: what a chunk reads out of the store."""
  out = _on_store(policy, fn, *args)
  return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device), out) if _on_host(policy) else out


def _store_index(layer, row, head, entry) -> Int[Array, "... 4"]:
  """Indices into ``[l, b, k, S]`` store buffers, the four broadcast together and stacked last."""
  return jnp.stack(jnp.broadcast_arrays(*(jnp.asarray(a, jnp.int32) for a in (layer, row, head, entry))), axis=-1)


def _gather(a: Array, where: Int[Array, "... r"]) -> Array:
  """``a[where[..., 0], ..., where[..., r - 1]]``: ``[..., *a.shape[r:]]``, the indices in range. A bare
  ``lax.gather``: a host computation may not make constants (``jnp`` indexing makes some to wrap negative indices)."""
  r, n = where.shape[-1], where.ndim - 1
  dims = jax.lax.GatherDimensionNumbers(
    offset_dims=tuple(range(n, n + a.ndim - r)), collapsed_slice_dims=tuple(range(r)), start_index_map=tuple(range(r))
  )
  mode = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  return jax.lax.gather(a, where, dims, slice_sizes=(1,) * r + a.shape[r:], mode=mode)


def _scatter(a: Array, where: Int[Array, "... r"], values: Array) -> Array:
  """``a`` with ``a[where[..., 0], ..., where[..., r - 1]] = values [..., *a.shape[r:]]``; indices out of range are
  dropped (a bare ``lax.scatter``, like ``_gather``)."""
  r, n = where.shape[-1], where.ndim - 1
  dims = jax.lax.ScatterDimensionNumbers(
    update_window_dims=tuple(range(n, values.ndim)),
    inserted_window_dims=tuple(range(r)),
    scatter_dims_to_operand_dims=tuple(range(r)),
  )
  return jax.lax.scatter(a, where, values.astype(a.dtype), dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _evicted(local: kv_lib.KVCache, plan: plan_lib.Plan, track: int):
  """The tokens of ``track`` that this chunk's ring writes overwrite: ``(k, v [l, b, k, t, h], idx [b, t], valid
  [b, t])``, in stream order (the chunk writes its ring slots in index order)."""
  lay = pol.layout(local.policy)[track]
  slots = plan.ring_slots  # [b, t]; the trash slot for tokens that do not go to a ring
  old = jnp.take_along_axis(plan.cache.idx, slots, axis=1)
  valid = (slots >= lay.ring_lo) & (slots < lay.hi) & (old >= 0)

  def gather_k(buf):  # [b, k, s, h] -> [b, k, t, h]
    return jnp.take_along_axis(buf, slots[:, None, :, None], axis=-2)

  def gather_v(buf):  # [b, k, h, s] -> [b, k, t, h]
    return jnp.swapaxes(jnp.take_along_axis(buf, slots[:, None, None, :], axis=-1), -1, -2)

  if local.stacked:
    k, v = jax.vmap(gather_k)(local.k), jax.vmap(gather_v)(local.v)
  else:
    k = jnp.stack([gather_k(buf) for buf in local.k])
    v = jnp.stack([gather_v(buf) for buf in local.v])
  return k, v, old, valid


def _rotate_back(k: Float[Array, "l b k s h"], shift: Int[Array, " b"], rope_base: float | Rope) -> Array:
  """Keys of every layer ``[l, b, k, s, h]`` rotated by RoPE at ``-shift`` of their row."""
  return _rotated(*rope_cos_sin(-shift, k.shape[-1], rope_base), k)


def _rotated(cos: Float[Array, "b h2"], sin: Float[Array, "b h2"], k: Float[Array, "l b k s h"]) -> Array:
  """Keys of every layer rotated by each row's ``cos`` / ``sin``."""
  return apply_rope(k, cos[None, :, None, None], sin[None, :, None, None]).astype(k.dtype)


def _read_limit(plan: plan_lib.Plan, policy: MemoryPolicy) -> Int[Array, "b t"]:
  """The largest memory index each query may read: ``c - window`` for a reading query whose latest token of the
  memory track has index ``c``; ``-2`` (nothing) for padding, other tracks' queries and queries before the track's
  first token."""
  c = plan.q_idx[:, policy.track]
  reads = jnp.isin(plan.seg, jnp.asarray(policy.readers, jnp.int32)) & (c >= 0)
  return jnp.where(reads, c - policy.window, -2)


def _retrieve(policy: Retrieval, q_rot, limit, mem: MemoryCache, layer):
  """The ``top_k`` blocks of ``layer``'s store ``[b, k, S, ...]`` that the chunk's reading queries score highest
  (mean query . block mean key ``summary [b, k, store_blocks, h]``, summed over a kv head's query heads); blocks
  with nothing stored (``filled [b, store_blocks]``) are not chosen while others are. Reads the summaries and the
  chosen blocks, not the store (on the host, for a store in host memory: only the blocks come to the device)."""
  b, _, n, h = q_rot.shape
  heads, blk = mem.k.shape[2], policy.block
  reads = (limit >= 0)[..., None, None]
  q_mean = jnp.sum(jnp.where(reads, q_rot.astype(jnp.float32), 0.0), axis=1) / jnp.maximum(reads.sum(axis=1), 1)
  q_mean = q_mean.reshape(b, heads, n // heads, h).sum(axis=2)  # [b, k, h]
  rows, kv_heads = jnp.arange(b)[:, None, None], jnp.arange(heads)[:, None]

  def pick(layer, q_mean, offsets, rows, kv_heads, summary, filled, *store):
    summary = _gather(summary, layer)  # [b, k, store_blocks, h]
    # log(0) = -inf: a block with nothing stored is not chosen while others are (no constant made: see _gather)
    score = jnp.einsum("bkh,bkjh->bkj", q_mean, summary) + jnp.log((filled > 0).astype(jnp.float32))[:, None]
    _, top = jax.lax.top_k(score, policy.top_k)  # [b, k, top_k]
    entries = (top[..., None] * blk + offsets).reshape(b, heads, policy.read_tokens)
    where = _store_index(layer, rows, kv_heads, entries)  # [b, k, m, 4]
    return tuple(_gather(a, where) for a in store)

  offsets = jnp.arange(blk, dtype=jnp.int32)
  layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
  args = (layer, q_mean, offsets, rows, kv_heads, mem.summary, mem.filled, mem.k, mem.v, mem.idx, mem.count)
  return _from_store(policy, pick, *args)


def reindexed(
  k: Float[Array, "b k m h"],
  idx: Int[Array, "b k m"],
  count: Float[Array, "b k m"],
  limit: Int[Array, "b t"],
  rope_base: float | Rope,
) -> Float[Array, "b k m h"]:
  """Retrieved keys, rotated at their track index ``idx``, re-rotated to ReKV's positions (``Retrieval.reindex``):
  per (row, kv head), the ``n`` entries a reading query of the chunk may see (``0 <= idx <= max(limit)``, ``count >
  0``), in stream order, take indices ``max(limit) - n + 1 .. max(limit)``; the others stay as they are."""
  newest = jnp.max(limit, axis=1)[:, None, None]  # [b, 1, 1]: the newest memory index the chunk's queries may see
  valid = (idx >= 0) & (count > 0) & (idx <= newest)
  order = jnp.argsort(jnp.where(valid, idx, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)  # place in stream order, the seen entries first
  n = valid.sum(axis=-1, keepdims=True)
  delta = jnp.where(valid, newest - n + 1 + rank - idx, 0)
  cos, sin = rope_cos_sin(delta, k.shape[-1], rope_base)
  return apply_rope(k, cos, sin).astype(k.dtype)


def memory_attention(
  q_rot: Float[Array, "b t n h"],
  k: Float[Array, "b k m h"],
  v: Float[Array, "b k m h"],
  idx: Int[Array, "b k m"],
  count: Float[Array, "b k m"],
  limit: Int[Array, "b t"],
) -> tuple[Float[Array, "b t n h"], Float[Array, "b t n"]]:
  """The partial attention ``(out f32, lse)`` of rotated queries over memory entries: entry ``j`` is seen by
  query ``i`` iff ``0 <= idx[j] <= limit[i]`` and ``count[j] > 0``, with its logit raised by ``log(count[j])``."""
  b, t, n, h = q_rot.shape
  s = _memory_logits(q_rot, k, idx, count, limit)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  total = p.sum(-1)
  out = jnp.einsum("btkgm,bkmh->btkgh", p, v.astype(jnp.float32)) / jnp.maximum(total, 1e-30)[..., None]
  lse = jnp.where(total > 0, m[..., 0] + jnp.log(jnp.maximum(total, 1e-30)), -jnp.inf)
  return out.reshape(b, t, n, h), lse.reshape(b, t, n)


def _memory_logits(q_rot, k, idx, count, limit) -> Float[Array, "b t k g m"]:
  """Float32 logits of rotated queries ``[b, t, n, h]`` over memory entries ``[b, k, m, h]`` grouped by kv head,
  ``log(count)`` added, ``-inf`` where a query does not see an entry (see ``memory_attention``)."""
  b, t, n, h = q_rot.shape
  heads = k.shape[1]
  qf = q_rot.astype(jnp.float32).reshape(b, t, heads, n // heads, h)
  s = jnp.einsum("btkgh,bkmh->btkgm", qf, k.astype(jnp.float32)) * h**-0.5
  s = s + jnp.log(jnp.maximum(count, 1.0))[:, None, :, None, :]
  return jnp.where(_memory_seen(idx, count, limit)[:, :, :, None], s, -jnp.inf)


def _memory_seen(idx, count, limit) -> Bool[Array, "b t k m"]:
  """Which memory entry ``[b, k, m]`` each query ``[b, t]`` sees: ``0 <= idx <= limit`` and ``count > 0``."""
  return ((idx >= 0) & (count > 0))[:, None] & (idx[:, None] <= limit[:, :, None, None])


def memory_key_mass(
  q_rot: Float[Array, "b t n h"],
  k: Float[Array, "b k m h"],
  idx: Int[Array, "b k m"],
  count: Float[Array, "b k m"],
  limit: Int[Array, "b t"],
  lse: Float[Array, "b t n"],
) -> tuple[Float[Array, "b k m"], Float[Array, "b k m"]]:
  """The attention mass each memory entry of one token (``count`` 0 or 1: ``Scored``'s) received from a chunk's
  queries and the number of queries that could attend it: ``(mass, seen)``, ``mass`` summed over the queries and
  the query heads of its kv head, each query's logits normalised by ``lse [b, t, n]``, its log-sum-exp over
  everything it attends (``extend_embeddings(extra_outputs=True)`` passes it): ``ops.attention.key_mass`` with the
  memory's visibility as positions (entry ``idx`` to query ``limit``, causal)."""
  seen = _memory_seen(idx, count, limit)  # [b, t, k, m]
  mass = attn_ops.key_mass(
    q_rot.astype(jnp.float32),
    k.astype(jnp.float32),
    lse,
    q_positions=limit,
    k_positions=idx,  # an empty entry has idx -1
    kv_layout="bksh",
  )
  return mass, jnp.sum(seen, axis=1, dtype=jnp.float32)


def memory_bytes(cache: MemoryCache) -> dict[str, int]:
  """Bytes of the cache's parts: ``local`` (the local cache), ``read`` (the memory entries attention reads per
  chunk: the retrieved segment or the slots), ``store`` (all memory entries, the retrieval store included),
  ``index`` (``Retrieval``'s block summary keys and fills, read at every chunk; ``Scored``'s scores; 0 for
  ``Compressed``), ``device`` (what the cache holds in device memory: all of it, but a store in host memory and its
  summaries)."""
  local = tree_bytes(cache.local)
  store = tree_bytes((cache.k, cache.v, cache.idx, cache.count))
  per_entry = store // cache.policy.slots
  index = tree_bytes((cache.summary, cache.filled, cache.score, cache.seen))
  host = store + tree_bytes((cache.summary, cache.filled)) if _on_host(cache.policy) else 0
  device = local + store + index + tree_bytes(cache.written) - host
  return {
    "local": local,
    "read": per_entry * cache.policy.read_tokens,
    "store": store,
    "index": index,
    "device": device,
  }


__all__ = [
  "Compressed",
  "MemoryCache",
  "MemoryPolicy",
  "Retrieval",
  "Scored",
  "host_memory_available",
  "memory_attention",
  "memory_bytes",
  "memory_key_mass",
  "reindexed",
]
