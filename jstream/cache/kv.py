"""The key/value cache pytree: its arrays, how it is built, and how keys and values are written into it.

Positions are data
  Every slot stores two int32 numbers: ``idx``, the token's index within its track since the reset (-1 for an
  empty slot), and ``pos``, its position in the stream (used for absolute RoPE and rollback). Masks are computed
  from ``idx`` alone: a query of track index ``c`` sees key ``j`` iff ``j <= c`` and (``c - j < window`` or
  ``j < num_sinks``). The per-row counters ``count [b, m]`` (next track index) and ``next_pos [b]`` are arrays,
  so a stream of any length compiles once, and batch rows may sit at different positions (ragged rows).

Layout
  Keys are stored heads-first (``[b, k, s, h]``: one head's slots are contiguous), values slots-last
  (``[b, k, h, s]``: the weighted sum over slots reads them without a transpose on CPU), both with one extra slot,
  the trash slot (``jstream.cache.policies``). A model that scans over layers stacks them (``[l, ...]``); an unrolled
  model keeps a tuple of per-layer arrays (XLA:CPU copies a layer's slice of a stacked buffer before a dot).

Where each token of a chunk goes is decided once per chunk by ``jstream.cache.plan``; row operations (reset,
rollback, visibility) are in ``jstream.cache.rows``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jstream.cache import rows
from jstream.cache.planner import plan
from jstream.cache.policies import Policy
from jstream.checks import check_int
from jstream.typing import Array, Buffer, Float, Int, SegmentIds, Shaped


class Geometry(NamedTuple):
  """What a KV cache must match in the model that reads it."""

  num_layers: int
  num_kv_heads: int
  head_dim: int
  stacked: bool = True


# A pytree node: JAX rebuilds it with placeholder leaves (``jax.eval_shape``, tree maps), so its field shapes are
# documentation and are not checked at run time; the functions that take and return it are checked.
@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Key/value cache of every layer, with per-slot positions and per-row counters.

  Attributes:
    k: keys, one stacked ``[l, b, k, s, h]`` array (models that scan over layers) or a tuple of ``l`` arrays
      ``[b, k, s, h]`` (unrolled models). The cache treats keys as opaque; jstream's models store them rotated by
      RoPE at the token's position in the policy's frame (see ``jstream.nn.cached_attention``).
    v: values, slots last: ``[l, b, k, h, s]`` or a tuple of ``[b, k, h, s]``.
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
  def geometry(self) -> Geometry:
    _, heads, _, head_dim = self.layer_shape
    return Geometry(self.num_layers, heads, head_dim, self.stacked)

  @property
  def dtype(self):
    return self.k[0].dtype if isinstance(self.k, tuple) else self.k.dtype

  def replace(self, **kw) -> KVCache:
    return dataclasses.replace(self, **kw)

  # -- the cache protocol (see jstream.cache.Cache) ---------------------------------------------------------------

  def check_model(self, geometry: Geometry) -> None:
    """Raises unless this cache was built for a model of ``geometry``."""
    if tuple(geometry) != tuple(self.geometry):
      raise ValueError(
        f"cache was built for (layers, kv_heads, head_dim, stacked) = {tuple(self.geometry)}, this model needs "
        f"{tuple(geometry)}; build it with model.init_cache"
      )

  def step(self, model, tokens: Array, segment_ids: Array | None) -> tuple[Array, KVCache]:
    """Runs a chunk through ``model`` against this cache: ``model.extend``."""
    return model.extend(tokens, self, segment_ids=segment_ids)

  def reset_rows(self, sel: Array, start: Array) -> KVCache:
    return rows.reset_kv(self, sel, start)

  def rollback_rows(self, n: Array, sel: Array) -> KVCache:
    return rows.rollback_kv(self, n, sel)


def check_storage(geometry: Geometry, dtype) -> jnp.dtype:
  """``dtype`` as a NumPy dtype, or a clear error for a non-floating dtype or non-positive sizes in ``geometry``."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"cache dtype must be floating point, got {dtype}")
  for name, val in zip(("num_layers", "num_kv_heads", "head_dim"), geometry[:3]):
    check_int(name, val, 1)
  return dtype


def init_kv(policy: Policy, geometry: Geometry, *, batch_size: int, dtype, start: Array) -> KVCache:
  """An empty ``KVCache`` of ``policy`` (see ``jstream.cache.init``)."""
  dtype = check_storage(geometry, dtype)
  c = policy.capacity + 1  # + the trash slot
  kshape = (batch_size, geometry.num_kv_heads, c, geometry.head_dim)
  vshape = (batch_size, geometry.num_kv_heads, geometry.head_dim, c)
  layers = geometry.num_layers
  if geometry.stacked:
    k, v = jnp.zeros((layers, *kshape), dtype), jnp.zeros((layers, *vshape), dtype)
  else:
    k = tuple(jnp.zeros(kshape, dtype) for _ in range(layers))
    v = tuple(jnp.zeros(vshape, dtype) for _ in range(layers))
  return KVCache(
    k=k,
    v=v,
    idx=jnp.full((batch_size, c), -1, jnp.int32),
    pos=jnp.full((batch_size, c), -1, jnp.int32),
    count=jnp.zeros((batch_size, len(policy.tracks())), jnp.int32),
    next_pos=start,
    policy=policy,
  )


# ------------------------------------------------------------------------------------------------ writes


def layer_buffer(buf: Buffer, layer) -> Shaped[Array, "b k _ _"]:
  """Layer ``layer`` ``[b, k, s, h]`` of a stacked buffer or a tuple of per-layer buffers."""
  return buf[layer]


def write(
  buf: Buffer, layer, slots: Int[Array, "b t"], update: Float[Array, "b t k h"], *, slots_last: bool = False
) -> Buffer:
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


def append(
  cache: KVCache, k: Float[Array, "l b t k h"], v: Float[Array, "l b t k h"], segment_ids: SegmentIds = None
) -> KVCache:
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
