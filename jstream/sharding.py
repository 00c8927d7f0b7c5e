"""Sharding over a device mesh: streams (batch rows) over ``"data"``, heads and MLP width over ``"model"``.

``mesh = make_mesh(data=4, model=2)`` lays the devices out as a ``[data, model]`` grid. ``shard_model(model, mesh)``
places the parameters with named shardings (Megatron-style: the fused q/k/v and gate/up projections split their
output features over ``"model"``, the output and down projections their input features, the embedding and output
head the vocabulary; norms replicated), ``shard_cache(cache, mesh)`` places a ``KVCache`` (rows over ``"data"``, kv
heads over ``"model"``), ``shard_batch(x, mesh)`` splits an array's leading (row) axis over ``"data"``, and
``shard_train_state(state, mesh)`` a ``TrainState`` (parameters as above, optimizer moments alike). An axis that a
mesh dimension does not divide is replicated instead, so any model runs on any mesh.

Every jitted entry point (``model(...)``, ``rollout.prefill / decode / generate / stream_nll``, a training step)
then runs sharded without change: jit follows its inputs' shardings (GSPMD) and inserts the collectives. The
numbers equal the unsharded run's up to float reassociation (tested on 8 simulated CPU devices: set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jstream.cache.kv import KVCache

DATA, MODEL = "data", "model"


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence | None = None) -> Mesh:
  """A ``[data, model]`` mesh of ``devices`` (default: all); ``data`` defaults to what ``model`` leaves."""
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ValueError(f"model={model} must be >= 1 and divide the {len(devices)} devices")
  data = len(devices) // model if data is None else data
  if data < 1 or data * model > len(devices):
    raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} are available")
  return Mesh(np.asarray(devices[: data * model], dtype=object).reshape(data, model), (DATA, MODEL))


def mesh_of(x) -> Mesh | None:
  """The mesh of an array placed with a ``NamedSharding`` over more than one device, else None."""
  sh = getattr(x, "sharding", None)
  return sh.mesh if isinstance(sh, NamedSharding) and sh.mesh.size > 1 else None


def _fit(mesh: Mesh, shape: Sequence[int], spec: Sequence[str | None]) -> P:
  """``spec`` with every mesh axis that does not divide its dimension replaced by None (replicated)."""
  return P(*(axis if axis is not None and dim % mesh.shape[axis] == 0 else None for dim, axis in zip(shape, spec)))


# Parameter rules: the last path names -> the spec of the parameter's own (unstacked) axes.
_RULES = {
  ("qkv_proj", "kernel"): (None, MODEL),
  ("qkv_proj", "bias"): (MODEL,),
  ("o", "kernel"): (MODEL, None),
  ("gate_up", "kernel"): (None, MODEL),
  ("down", "kernel"): (MODEL, None),
  ("embed", "embedding"): (MODEL, None),
  ("lm_head", "kernel"): (None, MODEL),
}


def _names(path: Sequence) -> tuple[str, ...]:
  """The names in a pytree key path (or an NNX state path), without ``.value`` and list indices."""
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", k))
    if isinstance(name, str) and name not in ("value", "raw_value"):
      out.append(name)
  return tuple(out)


def param_spec(path: Sequence, shape: Sequence[int], mesh: Mesh) -> P:
  """The partition spec of the parameter at ``path`` (a pytree key path or an NNX state path) with ``shape``: the
  rule of its last two names on its trailing axes (leading axes, e.g. stacked layers, replicated); anything else
  replicated. An optimizer moment's path ends like its parameter's, so it is placed alike."""
  rule = _RULES.get(_names(path)[-2:], ())
  spec = (None,) * (len(shape) - len(rule)) + tuple(rule) if len(rule) <= len(shape) else (None,) * len(shape)
  return _fit(mesh, shape, spec)


def tree_shardings(tree, mesh: Mesh):
  """``NamedSharding``s of every array of ``tree`` (a model's state, a ``TrainState``, optimizer state) by
  ``param_spec`` of its key path."""
  return jax.tree_util.tree_map_with_path(lambda kp, a: NamedSharding(mesh, param_spec(kp, np.shape(a), mesh)), tree)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places ``model``'s state with ``tree_shardings`` (in place) and returns the model."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, tree_shardings(state, mesh)))
  return model


def shard_batch(x, mesh: Mesh):
  """Arrays (or a pytree of arrays) with the leading row axis split over ``"data"`` (replicated when it does not
  divide)."""
  return jax.tree.map(
    lambda a: jax.device_put(a, NamedSharding(mesh, _fit(mesh, np.shape(a), (DATA,) + (None,) * (np.ndim(a) - 1)))),
    x,
  )


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
  """``NamedSharding``s of a ``KVCache``: rows over ``"data"``, kv heads over ``"model"``."""
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache_shardings takes a KVCache, got {type(cache).__name__} (shard it with shard_batch)")

  def buf(a, lead: int):  # keys [(l,) b, k, s, h], values [(l,) b, k, h, s]
    return NamedSharding(mesh, _fit(mesh, a.shape, (None,) * lead + (DATA, MODEL, None, None)))

  def kv(x):
    return tuple(buf(a, 0) for a in x) if isinstance(x, tuple) else buf(x, 1)

  rows = lambda a: NamedSharding(mesh, _fit(mesh, a.shape, (DATA,) + (None,) * (a.ndim - 1)))
  return cache.replace(
    k=kv(cache.k),
    v=kv(cache.v),
    idx=rows(cache.idx),
    pos=rows(cache.pos),
    count=rows(cache.count),
    next_pos=rows(cache.next_pos),
  )


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
  """The cache placed with ``cache_shardings``."""
  return jax.device_put(cache, cache_shardings(cache, mesh))


def shard_train_state(state, mesh: Mesh):
  """A ``jstream.train.TrainState`` (or any pytree of parameters and optimizer state) placed by ``tree_shardings``:
  parameters and their optimizer moments split alike, counters replicated."""
  return jax.device_put(state, tree_shardings(state, mesh))


def bytes_per_device(tree) -> dict[str, int]:
  """Bytes each device holds of a pytree of arrays (by device id)."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      key = str(shard.device.id)
      out[key] = out.get(key, 0) + shard.data.nbytes
  return out


__all__ = [
  "DATA",
  "MODEL",
  "bytes_per_device",
  "cache_shardings",
  "make_mesh",
  "mesh_of",
  "param_spec",
  "shard_batch",
  "shard_cache",
  "shard_model",
  "shard_train_state",
  "tree_shardings",
]
