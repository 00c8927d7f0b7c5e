"""Fixed-capacity caches for streaming: the policies that decide which slot a token takes, and the cache pytrees.

One concern per module:

* ``policies``: ``Dense``, ``Window``, ``SinkWindow``, ``Segmented`` (frozen, hashable dataclasses) and the static
  slot layout (tracks, sinks, ring, trash slot) they imply;
* ``kv``: the ``KVCache`` pytree (keys, values, per-slot positions, per-row counters), ``init`` and the writes;
* ``planner``: ``plan``, where each token of a chunk goes (track, index, position, slot), and the index rebase
  of endless streams;
* ``rows``: ``reset``, ``rollback`` and ``visible``, masked per row;
* ``recompute``: the ``Recompute`` baseline and its ``TokenCache`` (token ids only);
* ``scored``: score-based eviction (``H2O``, ``SnapKV``, ``AgeNormalized``) and its ``ScoreCache`` (each layer and
  kv head keeps its own tokens);
* ``session``: ``save`` / ``restore`` of a stream's cache with orbax.

The cache protocol
  Every cache pytree (``KVCache``, ``TokenCache``, ``ScoreCache``) has ``policy``, ``batch_size``, ``capacity``
  and four methods, so that the model and the rollouts never branch on its type:

  * ``check_model(geometry)``: raises unless the cache fits the model (``Geometry``: layers, kv heads, head dim,
    stacked);
  * ``step(model, tokens, segment_ids) -> (logits, cache)``: runs a chunk (``model(tokens, cache)`` calls it);
  * ``reset_rows(sel, start)`` / ``rollback_rows(n, sel)``: the row operations behind ``reset`` / ``rollback``.

  A policy builds its cache: ``policy.make_cache(geometry, batch_size=, dtype=, start=)`` (``init``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

from jstream._compat import is_concrete
from jstream.cache.kv import Geometry, KVCache, append, layer_buffer, write
from jstream.cache.planner import INT32_MAX, REBASE_AT, Plan, group_starts_and_ends, plan, rebase, rebase_shift
from jstream.cache.policies import Dense, KVPolicy, Policy, Segmented, SinkWindow, Track, TrackLayout, Window, layout
from jstream.cache.recompute import Recompute, TokenCache
from jstream.cache.rows import reset, rollback, rows_mask, start_positions, visible
from jstream.cache.scored import H2O, AgeNormalized, ScoreCache, ScorePolicy, SnapKV
from jstream.cache.session import restore, save
from jstream.checks import check_int
from jstream.typing import Array


@runtime_checkable
class Cache(Protocol):
  """What every cache pytree provides (see the module docstring)."""

  policy: Policy

  @property
  def batch_size(self) -> int: ...

  @property
  def capacity(self) -> int: ...

  def check_model(self, geometry: Geometry) -> None: ...

  def step(self, model, tokens: Array, segment_ids: Array | None) -> tuple[Array, Cache]: ...

  def reset_rows(self, sel: Array, start: Array) -> Cache: ...

  def rollback_rows(self, n: Array, sel: Array) -> Cache: ...


def init(
  policy: Policy,
  *,
  num_layers: int,
  batch_size: int,
  num_kv_heads: int,
  head_dim: int,
  dtype=None,
  start_position=0,
  stacked: bool = True,
) -> Cache:
  """Builds an empty cache for ``policy``.

  Args:
    policy: a ``Dense``, ``Window``, ``SinkWindow``, ``Segmented``, ``Recompute`` or score-evicting (``H2O``,
      ``SnapKV``, ``AgeNormalized``) policy.
    num_layers, num_kv_heads, head_dim: the model's cache geometry.
    batch_size: number of independent streams.
    dtype: storage dtype of keys and values (float32 by default; bfloat16 or float16).
    start_position: stream position of each row's first token (scalar or ``[b]``); only absolute RoPE sees it.
    stacked: one ``[l, ...]`` array per k/v (models that scan over layers) or a tuple of per-layer arrays.

  Raises:
    TypeError / ValueError: on an unknown policy, a non-floating dtype or non-positive sizes.
  """
  if not isinstance(policy, Policy):
    raise TypeError(f"expected a cache policy (Dense, Window, SinkWindow, Segmented, Recompute), got {policy!r}")
  check_int("batch_size", batch_size, 1)
  start = start_positions(start_position, batch_size)
  geometry = Geometry(num_layers, num_kv_heads, head_dim, stacked)
  cache = policy.make_cache(geometry, batch_size=batch_size, dtype="float32" if dtype is None else dtype, start=start)
  # Commit a new cache to the default device, where a compiled rollout's output cache lives: an uncommitted input
  # makes the next call (fed the first's committed output) compile again when the parameters are committed (a
  # model restored from a checkpoint). Each leaf stays in the memory it was made in (a memory's store in host memory).
  leaves = jax.tree.leaves(cache)
  if leaves and all(is_concrete(x) for x in leaves):
    device = jax.devices()[0]

    def commit(x):
      memory = getattr(getattr(x, "sharding", None), "memory_kind", None)
      return jax.device_put(x, jax.sharding.SingleDeviceSharding(device, memory_kind=memory))

    cache = jax.tree.map(commit, cache)
  return cache


__all__ = [
  "H2O",
  "INT32_MAX",
  "REBASE_AT",
  "AgeNormalized",
  "Cache",
  "Dense",
  "Geometry",
  "KVCache",
  "KVPolicy",
  "Plan",
  "Policy",
  "Recompute",
  "ScoreCache",
  "ScorePolicy",
  "Segmented",
  "SinkWindow",
  "SnapKV",
  "TokenCache",
  "Track",
  "TrackLayout",
  "Window",
  "append",
  "group_starts_and_ends",
  "init",
  "layer_buffer",
  "layout",
  "plan",
  "rebase",
  "rebase_shift",
  "reset",
  "restore",
  "rollback",
  "rows_mask",
  "save",
  "start_positions",
  "visible",
  "write",
]
