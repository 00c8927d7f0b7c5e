"""Score-based eviction: H2O, SnapKV and an age-normalised score, each (layer, kv head) keeping its own tokens.

A bounded cache that keeps the most recent tokens forgets everything older. These policies keep a fixed
``budget`` of tokens per layer and kv head, chosen by how much attention they received: H2O (Zhang et al., 2023)
keeps the "heavy hitters" with the largest accumulated attention mass plus a recent window; SnapKV (Li et al.,
2024) scores keys by the attention of an observation window of the latest queries, pooled over neighbouring keys;
the age-normalised score (Evict3R, StreamMem) divides the accumulated mass by the number of queries that could
attend the key, so old tokens are not kept merely for having been seen more often. The first ``num_sinks``
tokens since a reset (StreamingLLM's sinks) and the last ``recent`` tokens are always kept.

One chunk (any length up to the budget, a single decode token included), per layer and kv head:

1. the chunk's queries attend the cached tokens and, causally, the chunk's own tokens (the attention op with
   per-kv-head key positions);
2. the attention mass each key received (summed over the chunk's queries and the query heads of the kv head,
   in float32 whatever the cache dtype) updates the key's score: H2O and the age-normalised score add it to the
   score so far, SnapKV replaces the score by the mass of the chunk's last ``observation`` queries, max- or
   average-pooled over ``kernel`` neighbouring keys;
3. of the cached tokens and the chunk's tokens, the ``budget`` of highest priority stay (sinks and recent tokens
   first, then by score), compacted into the first slots in stream order.

The cache is therefore always a prefix of valid slots in stream order, and a row holds ``min(tokens since the
reset, budget)`` tokens in every layer and head. Keys are stored before RoPE and rotated when read: at their
stream position (``positions="absolute"``) or at their slot, i.e. their index among the tokens this head keeps
(``"cache_relative"``: StreamingLLM's re-indexing, which the sinks + recent window of a ``SinkWindow`` cache is
a special case of). With ``budget == num_sinks + recent`` nothing is scored and a token-by-token stream equals
``SinkWindow(num_sinks, recent + 1)`` (tested): the recent window holds the tokens before the query, and the query
sees itself too.

Decode under SnapKV rescores every step from its single query (the observation window of a one-token chunk is
that token): TOVA's rule (Oren et al., 2024). The mass of a learned sink (``TransformerConfig.learned_sink``) is not
a key and is not counted. Dropped tokens cannot come back, so these caches cannot roll back (``rollback`` raises).
A cache is ``[l, b, k, budget, h]`` keys and values plus ``[l, b, k, budget]`` indices and scores: every layer of
the model reads and rewrites its slice once per chunk, so the cost per token is that of attending the budget.
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
from jstream.ops import attention as attn_ops
from jstream.positions import Rope, apply_rope, check_position_mode, rope_cos_sin
from jstream.typing import Array, ArrayLike, Bool, Float, Int

_PROTECTED = 3.0e38  # the priority of sinks and recent tokens (above every score)


@dataclasses.dataclass(frozen=True)
class ScorePolicy(Policy):
  """Base class of the score-evicting policies (see the module docstring); subclasses choose ``score``.

  Attributes (every subclass):
    budget: tokens kept per layer and kv head (sinks and the recent window included): the cache capacity.
    recent: the latest tokens always kept (>= 1).
    num_sinks: the first tokens since a reset, always kept.
    positions: ``"absolute"`` or ``"cache_relative"`` (keys re-indexed by their slot among the kept tokens).
  """

  score: ClassVar[str] = ""

  def __post_init__(self):  # the subclasses' validation (dataclasses inherit it)
    name = type(self).__name__
    check_int(f"{name}.budget", self.budget, 1)
    check_int(f"{name}.recent", self.recent, 1)
    check_int(f"{name}.num_sinks", self.num_sinks, 0)
    if self.num_sinks + self.recent > self.budget:
      raise ValueError(
        f"{name}: num_sinks ({self.num_sinks}) + recent ({self.recent}) must be <= budget ({self.budget}): the "
        "tokens that are always kept must fit in the cache"
      )
    check_position_mode(self.positions)

  @property
  def capacity(self) -> int:
    return self.budget

  def make_cache(self, geometry, *, batch_size, dtype, start) -> ScoreCache:
    from jstream.cache.kv import check_storage  # the cache package imports this module

    dtype = check_storage(geometry, dtype)
    shape = (geometry.num_layers, batch_size, geometry.num_kv_heads, self.budget)
    return ScoreCache(
      k=jnp.zeros((*shape, geometry.head_dim), dtype),
      v=jnp.zeros((*shape, geometry.head_dim), dtype),
      idx=jnp.full(shape, -1, jnp.int32),
      score=jnp.zeros(shape, jnp.float32),
      count=jnp.zeros((batch_size,), jnp.int32),
      next_pos=start,
      policy=self,
    )


@dataclasses.dataclass(frozen=True)
class H2O(ScorePolicy):
  """Heavy-hitter oracle (H2O): keep the tokens with the largest accumulated attention mass + a recent window."""

  budget: int
  recent: int
  num_sinks: int = 0
  positions: str = "absolute"
  score: ClassVar[str] = "accumulated"


@dataclasses.dataclass(frozen=True)
class AgeNormalized(ScorePolicy):
  """Accumulated attention mass divided by the number of queries that could attend the token (Evict3R /
  StreamMem's normalisation: a token's mean attention since it arrived, not its total)."""

  budget: int
  recent: int
  num_sinks: int = 0
  positions: str = "absolute"
  score: ClassVar[str] = "mean"


@dataclasses.dataclass(frozen=True)
class SnapKV(ScorePolicy):
  """SnapKV: each chunk rescores every key by the attention of the chunk's last ``observation`` queries, pooled
  over ``kernel`` neighbouring keys (``pooling="max"`` or ``"avg"``); single-token decode becomes TOVA."""

  budget: int
  recent: int
  num_sinks: int = 0
  observation: int = 32
  kernel: int = 7
  pooling: str = "max"
  positions: str = "absolute"
  score: ClassVar[str] = "observation"

  def __post_init__(self):
    super().__post_init__()
    check_int("SnapKV.observation", self.observation, 1)
    check_int("SnapKV.kernel", self.kernel, 1)
    if self.kernel % 2 == 0:
      raise ValueError(f"SnapKV.kernel must be odd (centred pooling), got {self.kernel}")
    if self.pooling not in ("max", "avg"):
      raise ValueError(f"SnapKV.pooling must be 'max' or 'avg', got {self.pooling!r}")


# A pytree node: JAX rebuilds it with placeholder leaves, so its field shapes are documentation (see KVCache).
@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreCache:
  """The cache of a ``ScorePolicy`` (see the module docstring).

  Attributes:
    k, v: ``[l, b, k, s, h]`` keys (before RoPE) and values; the valid slots of a (layer, row, head) are a prefix
      in stream order.
    idx: ``[l, b, k, s]`` int32 index of the slot's token since the reset (-1: empty).
    score: ``[l, b, k, s]`` float32 score of the slot's token (accumulated or observed attention mass).
    count: ``[b]`` int32 tokens since the reset.
    next_pos: ``[b]`` int32 stream position of the next token (a token's position is
      ``next_pos - count + idx``).
    policy: the policy (static).
  """

  k: Array
  v: Array
  idx: Array
  score: Array
  count: Array
  next_pos: Array
  policy: Policy = dataclasses.field(metadata=dict(static=True))

  @property
  def batch_size(self) -> int:
    return self.idx.shape[1]

  @property
  def capacity(self) -> int:
    return self.idx.shape[-1]

  @property
  def num_layers(self) -> int:
    return self.idx.shape[0]

  def replace(self, **kw) -> ScoreCache:
    return dataclasses.replace(self, **kw)

  def held(self) -> Int[Array, " b"]:
    """``[b]`` tokens each row holds (in every layer and head)."""
    return jnp.minimum(self.count, self.capacity)

  # -- the cache protocol (see jstream.cache.Cache) ---------------------------------------------------------------

  def check_model(self, geometry) -> None:
    have = (self.num_layers, self.k.shape[2], self.k.shape[4])
    if tuple(geometry[:3]) != have:
      raise ValueError(
        f"cache was built for (layers, kv_heads, head_dim) = {have}, this model needs {tuple(geometry[:3])}; "
        "build it with model.init_cache"
      )

  def step(self, model, tokens: Int[Array, "b t"], segment_ids: Int[ArrayLike, "b t"] | None):
    """Runs a chunk through ``model`` (``model(tokens, cache)``); ``segment_ids`` may mark padding (-1)."""
    return extend(model, model.embed_tokens(tokens), self, segment_ids=segment_ids)

  def reset_rows(self, sel: Bool[Array, " b"], start: Int[Array, " b"]) -> ScoreCache:
    row = sel[None, :, None, None]
    return self.replace(
      k=jnp.where(row[..., None], jnp.zeros((), self.k.dtype), self.k),
      v=jnp.where(row[..., None], jnp.zeros((), self.v.dtype), self.v),
      idx=jnp.where(row, -1, self.idx),
      score=jnp.where(row, 0.0, self.score),
      count=jnp.where(sel, 0, self.count),
      next_pos=jnp.where(sel, start, self.next_pos),
    )

  def rollback_rows(self, n: Int[Array, " b"], sel: Bool[Array, " b"]) -> ScoreCache:
    raise ValueError(
      f"{type(self.policy).__name__} caches cannot roll back: the tokens evicted while the rolled-back tokens "
      "were added cannot come back (use a Window or SinkWindow policy with max_rollback)"
    )


class _Chunk(typing.NamedTuple):
  """Per-chunk quantities shared by every layer."""

  valid: Array  # [b, t] a real token
  tok_idx: Array  # [b, t] index since the reset, -1 padding
  count: Array  # [b] tokens since the reset after the chunk
  q_rope: tuple[Array, Array]  # cos/sin [b, t, h/2] of the chunk's queries and keys
  offset: Array  # [b] stream position of index 0 (absolute RoPE of cached keys)
  poison: Array  # [b] rows whose absolute positions overran int32
  order: Array  # [b, s + t] the candidates (cache slots, then the chunk) with the tokens first, in stream order


def _rebase(cache: ScoreCache) -> ScoreCache:
  """Shifts indices down before ``count`` can overflow int32 (every ``2**29`` tokens); sinks keep theirs, and a
  kept token older than the shift is clamped to the first non-sink index (its order among such tokens is lost)."""
  do = cache.count >= plan_lib.REBASE_AT  # [b]
  shift = jnp.where(do, plan_lib.REBASE_SHIFT, 0)
  sinks = cache.policy.num_sinks
  moved = jnp.maximum(cache.idx - shift[None, :, None, None], sinks)
  idx = jnp.where((cache.idx >= sinks) & do[None, :, None, None], moved, cache.idx)
  return cache.replace(idx=idx, count=cache.count - shift)


def _chunk(cache: ScoreCache, valid: Array, head_dim: int, rope_base: float | Rope) -> _Chunk:
  held_before = cache.held()
  nvalid = jnp.cumsum(valid.astype(jnp.int32), axis=1)
  tok_idx = jnp.where(valid, cache.count[:, None] + nvalid - 1, -1)
  count = cache.count + nvalid[:, -1]
  offset = cache.next_pos - cache.count
  if cache.policy.positions == "absolute":
    q_pos = cache.next_pos[:, None] + nvalid - 1
    poison = cache.next_pos > plan_lib.INT32_MAX - nvalid[:, -1]
  else:  # after the held tokens, which sit at their slots 0 .. held - 1
    q_pos = held_before[:, None] + nvalid - 1
    poison = jnp.zeros_like(valid[:, 0])
  q_rope = rope_cos_sin(jnp.maximum(q_pos, 0), head_dim, rope_base)
  # Empty cache slots sit between the held tokens and the chunk, padding inside the chunk: both go last.
  s, t = cache.capacity, valid.shape[1]
  slot = jnp.arange(s, dtype=jnp.int32)[None]
  key = jnp.concatenate(
    [
      jnp.where(slot < held_before[:, None], slot, 2 * (s + t) + slot),
      jnp.where(valid, held_before[:, None] + nvalid - 1, 3 * (s + t) + jnp.arange(t, dtype=jnp.int32)[None]),
    ],
    axis=1,
  )
  return _Chunk(valid, tok_idx, count, q_rope, offset, poison, jnp.argsort(key, axis=1))


def _pool(mass: Float[Array, "b k s"], order: Int[Array, "b s"], kernel: int, pooling: str) -> Float[Array, "b k s"]:
  """Pools ``mass`` over ``kernel`` neighbouring tokens in stream order (``order`` puts the candidates in it)."""
  if kernel == 1:
    return mass
  perm = jnp.broadcast_to(order[:, None], mass.shape)
  m = jnp.take_along_axis(mass, perm, axis=-1)
  pad = [(0, 0), (0, 0), (kernel // 2, kernel // 2)]
  if pooling == "max":
    m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), pad)
  else:
    m = jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), pad) / kernel
  return (
    jnp.zeros_like(mass)
    .at[jnp.arange(mass.shape[0])[:, None, None], jnp.arange(mass.shape[1])[None, :, None], perm]
    .set(m)
  )


def _drop_one(priority: Float[Array, "b k c"], stream: Int[Array, "b c"]) -> Int[Array, "b k s"]:
  """The candidates kept when one of ``c = budget + 1`` goes (a one-token chunk): all but the last of lowest
  priority in stream order (``stream``: the candidates in stream order, empty slots last), in stream order. What
  ``top_k`` and a sort pick, ties included (``top_k`` keeps the lower index), at the cost of one ``argmin``."""
  c = priority.shape[-1]
  perm = jnp.broadcast_to(stream[:, None], priority.shape)
  ranked = jnp.take_along_axis(priority, perm, axis=-1)[..., ::-1]
  drop = c - 1 - jnp.argmin(ranked, axis=-1)[..., None]  # the last minimum in stream order
  i = jnp.arange(c - 1, dtype=jnp.int32)
  return jnp.take_along_axis(perm, i + (i >= drop), axis=-1)


def _layer(policy: ScorePolicy, ch: _Chunk, state, q, k, v, *, rope_base: float | Rope, impl, sink_part):
  """One layer: attention of the chunk over cache + chunk, scores, eviction. ``state = (k, v, idx, score)`` of
  this layer (``[b, k, s, h]``, ``[b, k, s]``); returns ``(out [b, t, n, h], new state)``."""
  ck, cv, cidx, cscore = state
  b, t, _, h = q.shape
  heads, s = cidx.shape[1], cidx.shape[2]
  # RoPE at read: cached keys at their stream position or their slot, the chunk at its queries' positions.
  if policy.positions == "absolute":
    kcos, ksin = rope_cos_sin(jnp.maximum(cidx + ch.offset[:, None, None], 0), h, rope_base)
  else:
    kcos, ksin = (a[None, None] for a in rope_cos_sin(jnp.arange(s, dtype=jnp.int32), h, rope_base))
  qcos, qsin = ch.q_rope
  q_rot = apply_rope(q, qcos[:, :, None], qsin[:, :, None])
  chunk_k = apply_rope(k, qcos[:, :, None], qsin[:, :, None]).swapaxes(1, 2)  # [b, k, t, h]
  keys = jnp.concatenate([apply_rope(ck.astype(q.dtype), kcos, ksin), chunk_k.astype(q.dtype)], axis=2)
  values = jnp.concatenate([cv.astype(q.dtype), v.swapaxes(1, 2).astype(q.dtype)], axis=2)
  cand_idx = jnp.concatenate([cidx, jnp.broadcast_to(ch.tok_idx[:, None], (b, heads, t))], axis=2)  # [b, k, s+t]
  res = attn_ops.attention(
    q_rot,
    keys,
    values,
    q_positions=ch.tok_idx,
    k_positions=cand_idx,
    kv_layout="bksh",
    out_dtype=jnp.float32,
    return_lse=True,
    return_key_mass=True,
    impl=impl,
  )
  out = res.out if sink_part is None else attn_ops.merge([(res.out, res.lse), sink_part])[0]
  mass = res.key_mass.astype(jnp.float32)  # [b, k, s+t]
  cand_score = jnp.concatenate([cscore, jnp.zeros((b, heads, t), jnp.float32)], axis=2)
  if policy.score == "observation":
    if t > policy.observation:  # the mass of the last `observation` queries only
      observe = ch.tok_idx >= (ch.count - policy.observation)[:, None]
      mass = attn_ops.attention(
        q_rot,
        keys,
        values,
        q_positions=jnp.where(observe, ch.tok_idx, -1),
        k_positions=cand_idx,
        kv_layout="bksh",
        return_key_mass=True,
        impl=impl,
      ).key_mass.astype(jnp.float32)
    cand_score = _pool(mass, ch.order, policy.kernel, policy.pooling)
  else:
    cand_score = cand_score + mass
  # Priority: sinks and recent tokens first, then the score; empty slots and padding last.
  live = cand_idx >= 0
  count = ch.count[:, None, None]
  keep_always = (cand_idx < policy.num_sinks) | (cand_idx >= count - policy.recent)
  rank = cand_score / jnp.maximum(count - cand_idx, 1).astype(jnp.float32) if policy.score == "mean" else cand_score
  priority = jnp.where(live, jnp.where(keep_always, _PROTECTED, rank), -jnp.inf)
  if t == 1:  # decode: one of the budget + 1 candidates goes, no ranking needed
    order = _drop_one(priority, ch.order)
  else:
    top_priority, top = jax.lax.top_k(priority, s)  # [b, k, s] candidates to keep
    # Back into stream order (candidates are in stream order), the picks of empty candidates last.
    order = jnp.sort(jnp.where(top_priority > -jnp.inf, top, s + t + top), axis=-1)
    order = jnp.where(order >= s + t, order - s - t, order)
  keep = jnp.take_along_axis(live, order, axis=-1)
  new_idx = jnp.where(keep, jnp.take_along_axis(cand_idx, order, axis=-1), -1)
  new_score = jnp.where(keep, jnp.take_along_axis(cand_score, order, axis=-1), 0.0)
  raw_k = jnp.concatenate([ck, k.swapaxes(1, 2).astype(ck.dtype)], axis=2)
  raw_v = jnp.concatenate([cv, v.swapaxes(1, 2).astype(cv.dtype)], axis=2)
  new_k = jnp.take_along_axis(raw_k, order[..., None], axis=2)
  new_v = jnp.take_along_axis(raw_v, order[..., None], axis=2)
  return out.astype(q.dtype), (new_k, new_v, new_idx, new_score)


def extend(
  model, x: Float[Array, "b t d"], cache: ScoreCache, *, segment_ids: Int[ArrayLike, "b t"] | None = None
) -> tuple[Float[Array, "b t v"], ScoreCache]:
  """Runs input embeddings ``x [b, t, d]`` through ``model``'s layers against a ``ScoreCache``; returns
  ``(logits [b, t, v], cache)``. ``segment_ids``: optional ``[b, t]``, 0 for a token and -1 for padding (not
  attended, not cached, no position taken).

  Raises:
    ValueError: ``segment_ids`` of the wrong shape or (when concrete) naming a track other than 0, or a chunk
      longer than the budget.
  """
  b, t = x.shape[:2]
  if t > cache.capacity:
    raise ValueError(f"chunk of {t} tokens is longer than the cache budget {cache.capacity} ({cache.policy})")
  valid = jnp.ones((b, t), bool)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if segment_ids.shape != (b, t):
      raise ValueError(f"segment_ids must be [b, t] = {(b, t)}, got {segment_ids.shape}")
    if is_concrete(segment_ids) and bool(jnp.any(segment_ids > 0)):
      raise ValueError(f"{type(cache.policy).__name__} caches have one track: segment_ids must be 0 or -1")
    valid = segment_ids >= 0
  cfg = model.config
  cache = _rebase(cache)
  ch = _chunk(cache, valid, cfg.head_dim, cfg.rope)
  policy = cache.policy

  def attend(attn, q, k, v, state):
    return _layer(policy, ch, state, q, k, v, rope_base=cfg.rope, impl=cfg.attention_impl, sink_part=attn.sink_part(q))

  logits, (k, v, idx, score) = model.run_layers(x, (cache.k, cache.v, cache.idx, cache.score), attend)
  logits = jnp.where(ch.poison[:, None, None], jnp.nan, logits)
  if is_concrete(ch.poison) and bool(jnp.any(ch.poison)):
    raise ValueError(f"absolute positions past 2**31 - 1 under {policy}; use positions='cache_relative'")
  added = jnp.sum(valid, axis=1, dtype=jnp.int32)
  new = cache.replace(k=k, v=v, idx=idx, score=score, count=ch.count, next_pos=cache.next_pos + added)
  return logits, new


__all__ = ["H2O", "AgeNormalized", "ScoreCache", "ScorePolicy", "SnapKV", "extend"]
