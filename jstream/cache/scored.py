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
   first, then by score; of equal priorities the later token goes).

A row holds ``min(tokens since the reset, budget)`` tokens in every layer and head; ``rank`` is each slot's place
among the tokens its head keeps, in stream order. Two paths, one rule:

* a chunk (``t > 1``) rewrites each layer's slice, the kept tokens compacted into the first slots in stream order;
* a single token (decode) reads every layer's cache in place and writes nothing while the layers run (its own key
  is one more partial attention, merged by log-sum-exp, and its key mass is normalised over both:
  ``jstream.ops.attention.key_mass``); after the last layer its key and value go, per layer and head, into an empty
  slot or the slot of the token it evicts, and only the ``[l, b, k, s]`` indices, ranks and scores are rewritten.
  No key or value moves, so the bookkeeping per decoded token is small next to the attention it rides on
  (``experiments/bench_eviction.py``).

Positions. ``positions="absolute"``: keys are stored rotated by RoPE at their stream position, once, as they are
written (as H2O, SnapKV and TOVA keep them). ``"cache_relative"`` (StreamingLLM's re-indexing, of which the sinks +
recent window of a ``SinkWindow`` cache is a special case): a key's position is its rank, which drops by one for
every token evicted before it, so keys are stored un-rotated and rotated at their rank when read (re-rotating
stored keys on every eviction would accumulate rounding error in bf16 caches); this costs a pass over the keys per
layer and token that absolute positions do not pay. With ``budget == num_sinks + recent`` nothing is scored and a
token-by-token stream equals ``SinkWindow(num_sinks, recent + 1)`` (tested): the recent window holds the tokens
before the query, and the query sees itself too.

Decode under SnapKV rescores every step from its single query (the observation window of a one-token chunk is
that token): TOVA's rule (Oren et al., 2024). The mass of a learned sink (``TransformerConfig.learned_sink``) is not
a key and is not counted. Dropped tokens cannot come back, so these caches cannot roll back (``rollback`` raises).
A padding token (``segment_ids`` -1) changes nothing. A cache is ``[l, b, k, budget, h]`` keys, values slots last
(``[l, b, k, h, budget]``, what the attention's weighted sum reads without a transpose) plus
``[l, b, k, budget]`` indices, ranks and scores.
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
    positions: ``"absolute"`` or ``"cache_relative"`` (keys re-indexed by their rank among the kept tokens).
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
      v=jnp.zeros((*shape[:-1], geometry.head_dim, self.budget), dtype),
      idx=jnp.full(shape, -1, jnp.int32),
      rank=jnp.full(shape, -1, jnp.int32),
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
    k: ``[l, b, k, s, h]`` keys, in no particular slot order, rotated by RoPE at their stream position
      (``absolute``) or not at all (``cache_relative``: rotated at their rank when read). Empty slots hold zeros.
    v: ``[l, b, k, h, s]`` values, slots last. Empty slots hold zeros.
    idx: ``[l, b, k, s]`` int32 index of the slot's token since the reset (-1: empty).
    rank: ``[l, b, k, s]`` int32 the slot's place among the tokens its (layer, head) keeps, in stream order (-1:
      empty); the RoPE position of a ``cache_relative`` key.
    score: ``[l, b, k, s]`` float32 score of the slot's token (accumulated or observed attention mass).
    count: ``[b]`` int32 tokens since the reset.
    next_pos: ``[b]`` int32 stream position of the next token (a token's position is
      ``next_pos - count + idx``).
    policy: the policy (static).
  """

  k: Array
  v: Array
  idx: Array
  rank: Array
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
      rank=jnp.where(row, -1, self.rank),
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
  held: Array  # [b] tokens each (layer, head) holds before the chunk
  q_pos: Array  # [b, t] the chunk's RoPE positions (stream position, or rank among the kept tokens)
  q_rope: tuple[Array, Array]  # cos/sin [b, t, h/2] at q_pos
  poison: Array  # [b] rows whose absolute positions overran int32


def _rebase(cache: ScoreCache) -> ScoreCache:
  """Shifts indices down before ``count`` can overflow int32 (every ``2**29`` tokens); sinks keep theirs, and a
  kept token older than the shift is clamped to the first non-sink index. Only indices move: a token's order is
  its ``rank`` and its absolute position is in its stored key, so the clamp changes neither."""
  do = cache.count >= plan_lib.REBASE_AT  # [b]
  shift = jnp.where(do, plan_lib.REBASE_SHIFT, 0)
  sinks = cache.policy.num_sinks
  moved = jnp.maximum(cache.idx - shift[None, :, None, None], sinks)
  idx = jnp.where((cache.idx >= sinks) & do[None, :, None, None], moved, cache.idx)
  return cache.replace(idx=idx, count=cache.count - shift)


def _chunk(cache: ScoreCache, valid: Array, head_dim: int, rope_base: float | Rope) -> _Chunk:
  held = cache.held()
  nvalid = jnp.cumsum(valid.astype(jnp.int32), axis=1)
  tok_idx = jnp.where(valid, cache.count[:, None] + nvalid - 1, -1)
  count = cache.count + nvalid[:, -1]
  if cache.policy.positions == "absolute":
    q_pos = cache.next_pos[:, None] + nvalid - 1
    poison = cache.next_pos > plan_lib.INT32_MAX - nvalid[:, -1]
  else:  # after the held tokens, which sit at their ranks 0 .. held - 1
    q_pos = held[:, None] + nvalid - 1
    poison = jnp.zeros_like(valid[:, 0])
  q_pos = jnp.maximum(q_pos, 0)
  return _Chunk(valid, tok_idx, count, held, q_pos, rope_cos_sin(q_pos, head_dim, rope_base), poison)


def _stream_order(rank: Int[Array, "b k s"], ch: _Chunk) -> Int[Array, "b k c"]:
  """The candidates (cache slots, then the chunk's tokens) of every head in stream order, empty slots and padding
  last: the held tokens by rank, then the chunk's tokens, which follow them."""
  b, heads, s = rank.shape
  t = ch.valid.shape[1]
  big = 2 * (s + t)
  slot = jnp.arange(s, dtype=jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)
  chunk_rank = ch.held[:, None] + jnp.cumsum(ch.valid.astype(jnp.int32), axis=1) - 1
  key = jnp.concatenate(
    [
      jnp.where(rank >= 0, rank, big + slot),
      jnp.broadcast_to(jnp.where(ch.valid, chunk_rank, 2 * big + pos)[:, None], (b, heads, t)),
    ],
    axis=2,
  )
  return jnp.argsort(key, axis=-1)


def _window_pool(m: Float[Array, "b k c"], kernel: int, pooling: str) -> Float[Array, "b k c"]:
  """Max- or average-pools the last axis over ``kernel`` neighbours (centred; outside counts as nothing)."""
  pad = [(0, 0), (0, 0), (kernel // 2, kernel // 2)]
  if pooling == "max":
    return jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), pad)
  return jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), pad) / kernel


def _pool(mass: Float[Array, "b k c"], order: Int[Array, "b k c"], kernel: int, pooling: str) -> Float[Array, "b k c"]:
  """Pools ``mass`` over ``kernel`` neighbouring tokens in stream order (``order`` puts the candidates in it)."""
  if kernel == 1:
    return mass
  m = _window_pool(jnp.take_along_axis(mass, order, axis=-1), kernel, pooling)
  b, k, _ = mass.shape
  return jnp.zeros_like(mass).at[jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], order].set(m)


def _pool_token(mass, own_mass, rank, held, kernel: int, pooling: str):
  """``_pool`` for a single token: ``mass [b, k, s]`` of the held tokens at their ``rank`` and ``own_mass [b, k]``
  of the token, which follows them (rank ``held [b]``); empty slots count as zero mass after it."""
  if kernel == 1:
    return mass, own_mass
  b, k, s = mass.shape
  bi, ki = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  ranked = jnp.zeros((b, k, s + 1), jnp.float32).at[bi, ki, jnp.where(rank >= 0, rank, s + 1)].set(mass, mode="drop")
  at_own = jnp.broadcast_to(held[:, None, None], (b, k, 1))
  ranked = _window_pool(ranked.at[bi, ki, at_own].set(own_mass[..., None]), kernel, pooling)
  own_pooled = jnp.take_along_axis(ranked, at_own, axis=-1)[..., 0]
  return jnp.where(rank >= 0, jnp.take_along_axis(ranked, jnp.maximum(rank, 0), axis=-1), 0.0), own_pooled


def _priority(policy: ScorePolicy, cand_idx, cand_score, count: Int[Array, " b"]) -> Float[Array, "b k c"]:
  """Sinks and recent tokens first, then the score (per age for ``"mean"``); empty slots and padding last."""
  count = count[:, None, None]
  keep_always = (cand_idx < policy.num_sinks) | (cand_idx >= count - policy.recent)
  rank = cand_score / jnp.maximum(count - cand_idx, 1).astype(jnp.float32) if policy.score == "mean" else cand_score
  return jnp.where(cand_idx >= 0, jnp.where(keep_always, _PROTECTED, rank), -jnp.inf)


def _read_keys(policy: ScorePolicy, ck, crank, q_dtype, rope_base: float | Rope):
  """The cached keys as attention reads them: stored rotated (``absolute``), or rotated now at their rank."""
  if policy.positions == "absolute":
    return ck.astype(q_dtype)
  kcos, ksin = rope_cos_sin(jnp.maximum(crank, 0), ck.shape[-1], rope_base, bound=crank.shape[-1])
  return apply_rope(ck.astype(q_dtype), kcos, ksin)


def _chunk_layer(policy: ScorePolicy, ch: _Chunk, state, q, k, v, *, rope_base: float | Rope, impl, sink_part):
  """One layer of a chunk (``t > 1``): attention over cache + chunk, scores, eviction, and the kept tokens
  compacted into the first slots in stream order. ``state = (k, v, idx, rank, score)`` of this layer (keys
  ``[b, k, s, h]``, values ``[b, k, h, s]``, the rest ``[b, k, s]``); returns ``(out [b, t, n, h], new state)``."""
  ck, cv, cidx, crank, cscore = state
  b, t = q.shape[:2]
  heads, s = cidx.shape[1], cidx.shape[2]
  qcos, qsin = (a[:, :, None] for a in ch.q_rope)
  q_rot = apply_rope(q, qcos, qsin)
  chunk_k = apply_rope(k, qcos, qsin).swapaxes(1, 2)  # [b, k, t, h] rotated at the chunk's positions
  keys = jnp.concatenate([_read_keys(policy, ck, crank, q.dtype, rope_base), chunk_k.astype(q.dtype)], axis=2)
  chunk_v = jnp.transpose(v, (0, 2, 3, 1))  # [b, k, h, t]: values slots last, as the cache keeps them
  values = jnp.concatenate([cv.astype(q.dtype), chunk_v.astype(q.dtype)], axis=3)
  cand_idx = jnp.concatenate([cidx, jnp.broadcast_to(ch.tok_idx[:, None], (b, heads, t))], axis=2)  # [b, k, s+t]
  res = attn_ops.attention(
    q_rot,
    keys,
    values,
    q_positions=ch.tok_idx,
    k_positions=cand_idx,
    kv_layout="bksh",
    v_layout="bkhs",
    out_dtype=jnp.float32,
    return_lse=True,
    return_key_mass=True,
    impl=impl,
  )
  out = res.out if sink_part is None else attn_ops.merge([(res.out, res.lse), sink_part])[0]
  mass = res.key_mass.astype(jnp.float32)  # [b, k, s+t]
  order = _stream_order(crank, ch)  # [b, k, s+t]
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
        v_layout="bkhs",
        return_key_mass=True,
        impl=impl,
      ).key_mass.astype(jnp.float32)
    cand_score = _pool(mass, order, policy.kernel, policy.pooling)
  else:
    cand_score = jnp.concatenate([cscore, jnp.zeros((b, heads, t), jnp.float32)], axis=2) + mass
  priority = _priority(policy, cand_idx, cand_score, ch.count)
  # Ranked in stream order, so that of equal priorities top_k keeps the earlier token (the slots are not in stream
  # order after single tokens); the kept places sorted back into stream order, those of empty candidates last.
  top_priority, top = jax.lax.top_k(jnp.take_along_axis(priority, order, axis=-1), s)  # [b, k, s] places to keep
  top = jnp.sort(jnp.where(top_priority > -jnp.inf, top, s + t + top), axis=-1)
  order = jnp.take_along_axis(order, jnp.where(top >= s + t, top - s - t, top), axis=-1)  # candidates to keep
  keep = jnp.take_along_axis(cand_idx >= 0, order, axis=-1)
  new_idx = jnp.where(keep, jnp.take_along_axis(cand_idx, order, axis=-1), -1)
  new_rank = jnp.where(keep, jnp.arange(s, dtype=jnp.int32), -1)
  new_score = jnp.where(keep, jnp.take_along_axis(cand_score, order, axis=-1), 0.0)
  stored_k = chunk_k if policy.positions == "absolute" else k.swapaxes(1, 2)  # how the cache keeps keys
  raw_k = jnp.concatenate([ck, stored_k.astype(ck.dtype)], axis=2)
  raw_v = jnp.concatenate([cv, chunk_v.astype(cv.dtype)], axis=3)
  zero = jnp.zeros((), ck.dtype)  # empty slots hold zeros: single tokens read the values unmasked
  new_k = jnp.where(keep[..., None], jnp.take_along_axis(raw_k, order[..., None], axis=2), zero)
  new_v = jnp.where(keep[:, :, None], jnp.take_along_axis(raw_v, order[:, :, None], axis=3), zero)
  return out.astype(q.dtype), (new_k, new_v, new_idx, new_rank, new_score)


def _token_slot(priority: Float[Array, "b k s"], rank: Int[Array, "b k s"]) -> Int[Array, "b k"]:
  """The slot a single token takes: an empty one (priority -inf) if there is one, else that of the token it
  evicts, the lowest priority, of equal priorities the latest in stream order (the highest rank)."""
  lowest = priority == jnp.min(priority, axis=-1, keepdims=True)
  return jnp.argmax(jnp.where(lowest, rank, -2), axis=-1).astype(jnp.int32)


def _token_layer(policy: ScorePolicy, ch: _Chunk, bufs, layer, q, k, v, *, rope_base: float | Rope, impl, sink_part):
  """One layer of a single token (decode), reading this layer's cache in place: attention over the cache and the
  token's own key, scores, and the slot the token takes (an empty one, or the evicted token's when the head is
  full). Writes nothing; returns ``(out [b, 1, n, h], (slot, key, value, idx, rank, score))`` with ``slot``
  ``[b, k]`` (``s``: no write, a padding token), the key and value ``[b, k, h]`` as the cache stores them and the
  new ``[b, k, s]`` index, rank and score of every slot."""
  kbuf, vbuf, ibuf, rbuf, sbuf = bufs
  ck, cv, cidx, crank, cscore = (a[layer] for a in (kbuf, vbuf, ibuf, rbuf, sbuf))
  b, _, n, h = q.shape
  heads, s = cidx.shape[1], cidx.shape[2]
  g = n // heads
  qcos, qsin = (a[:, :, None] for a in ch.q_rope)
  q_rot = apply_rope(q, qcos, qsin)
  keys = _read_keys(policy, ck, crank, q.dtype, rope_base)
  res = attn_ops.attention(
    q_rot,
    keys,
    cv.astype(q.dtype),
    q_positions=ch.tok_idx,
    k_positions=cidx,
    kv_layout="bksh",
    v_layout="bkhs",
    mask_values=False,  # empty slots hold zeros (see _chunk_layer)
    out_dtype=jnp.float32,
    return_lse=True,
    impl=impl,
  )
  # The token's own key: RoPE at equal positions cancels, so its score is q . k before rotation.
  qf = q.astype(jnp.float32).reshape(b, 1, heads, g, h)
  own = jnp.einsum("btkgh,btkh->btkg", qf, k.astype(jnp.float32)).reshape(b, 1, n) * (h**-0.5)
  own = jnp.where(ch.valid[:, :, None], own, -jnp.inf)
  own_v = jnp.broadcast_to(v.astype(jnp.float32)[:, :, :, None], (b, 1, heads, g, h)).reshape(b, 1, n, h)
  out, lse = attn_ops.merge([(res.out, res.lse), (own_v, own)])
  if sink_part is not None:  # the sink takes its share of the output; key mass stays that of the keys
    out = attn_ops.merge([(out, lse), sink_part])[0]
  mass = attn_ops.key_mass(q_rot, keys, lse, q_positions=ch.tok_idx, k_positions=cidx, kv_layout="bksh")
  own_mass = jnp.sum(jnp.exp(own - jnp.where(jnp.isfinite(lse), lse, 0.0)).reshape(b, heads, g), axis=-1)
  if policy.score == "observation":  # TOVA: this token's attention, pooled in stream order
    score, own_score = _pool_token(mass, own_mass, crank, ch.held, policy.kernel, policy.pooling)
  else:
    score, own_score = cscore + mass, own_mass
  # The token is always kept (recent >= 1); of the held tokens, the last in stream order of lowest priority goes
  # when the head is full, else the token takes an empty slot (priority -inf).
  slot = _token_slot(_priority(policy, cidx, score, ch.count), crank)
  full = (ch.held >= s)[:, None]
  gone = jnp.where(full, jnp.take_along_axis(crank, slot[..., None], axis=-1)[..., 0], s)  # the evicted rank
  here = jnp.arange(s, dtype=jnp.int32) == slot[..., None]
  live = ch.valid[:, 0, None, None]
  new_idx = jnp.where(here, ch.tok_idx[:, :, None], cidx)
  new_rank = jnp.where(here, jnp.minimum(ch.held, s - 1)[:, None, None], crank - (crank > gone[..., None]))
  new_score = jnp.where(here, own_score[..., None], score)
  stored_k = apply_rope(k, qcos, qsin) if policy.positions == "absolute" else k  # [b, 1, k, h]
  return out.astype(q.dtype), (
    jnp.where(live[..., 0], slot, s),
    stored_k[:, 0],
    v[:, 0],
    jnp.where(live, new_idx, cidx),
    jnp.where(live, new_rank, crank),
    jnp.where(live, new_score, cscore),
  )


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

  kw = dict(rope_base=cfg.rope, impl=cfg.attention_impl)
  bufs = (cache.k, cache.v, cache.idx, cache.rank, cache.score)
  if t > 1:

    def attend(attn, q, k, v, layer):
      state = tuple(a[layer] for a in bufs)
      return _chunk_layer(policy, ch, state, q, k, v, sink_part=attn.sink_part(q), **kw)

    logits, (k, v, idx, rank, score) = model.map_layers(x, attend)
  else:  # every layer reads its cache in place; the keys and values are written after the last layer
    head = cache.k.shape[:3]  # [l, b, k]

    def attend(attn, q, k, v, layer):
      return _token_layer(policy, ch, bufs, layer, q, k, v, sink_part=attn.sink_part(q), **kw)

    logits, (slot, ks, vs, idx, rank, score) = model.map_layers(x, attend)
    at = (*jnp.ix_(*(jnp.arange(n) for n in head)), slot)  # slot s (a padding token) is dropped
    k = cache.k.at[at].set(ks.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[at[0], at[1], at[2], :, at[3]].set(vs.astype(cache.v.dtype), mode="drop")
  logits = jnp.where(ch.poison[:, None, None], jnp.nan, logits)
  if is_concrete(ch.poison) and bool(jnp.any(ch.poison)):
    raise ValueError(f"absolute positions past 2**31 - 1 under {policy}; use positions='cache_relative'")
  added = jnp.sum(valid, axis=1, dtype=jnp.int32)
  new = cache.replace(k=k, v=v, idx=idx, rank=rank, score=score, count=ch.count, next_pos=cache.next_pos + added)
  return logits, new


__all__ = ["H2O", "AgeNormalized", "ScoreCache", "ScorePolicy", "SnapKV", "extend"]
