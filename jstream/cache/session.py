"""Saving a stream's cache and continuing the stream elsewhere (another process, another day).

``save(cache, directory)`` writes the cache's arrays with orbax and a JSON description of what they are: the cache
type, its policy (class and fields), and every array's path, shape and dtype. ``restore(directory, like)`` reads
them back into the structure of ``like`` (an empty cache of the same policy, e.g. ``model.init_cache(policy, b)``,
or its ``jax.eval_shape``) and refuses, naming the difference, a checkpoint saved under another policy, batch size,
model geometry or dtype. Restoring is exact: a stream continued from a restored cache gives bit-identical outputs
to the uninterrupted stream (``tests/test_session.py``).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jstream.cache.policies import describe as describe_policy

FORMAT = "jstream-cache/1"


def describe(cache) -> dict:
  """A JSON-able description of a cache: type, policy, and each array's path, shape and dtype."""
  leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
  return {
    "format": FORMAT,
    "type": type(cache).__name__,
    "policy": describe_policy(cache.policy),
    "arrays": {jax.tree_util.keystr(p): [list(x.shape), np.dtype(x.dtype).name] for p, x in leaves},
  }


def _arrays(cache, *, stored: bool = False) -> dict:
  """The cache's arrays by path; ``stored``: those with data (orbax refuses arrays of size 0, which a memory cache
  has for the fields of other memory kinds; ``restore`` rebuilds them from ``like``)."""
  out = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(cache)[0]}
  return {k: x for k, x in out.items() if x.size > 0} if stored else out


def save(cache, directory) -> pathlib.Path:
  """Writes ``cache`` (any policy, any position mode) to the new folder ``directory``; returns its path.

  Raises:
    FileExistsError: ``directory`` exists already.
  """
  path = pathlib.Path(directory).absolute()
  if path.exists():
    raise FileExistsError(f"{path} exists; save a cache to a new folder")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(
      path,
      args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(_arrays(cache, stored=True)), meta=ocp.args.JsonSave(describe(cache))
      ),
    )
  return path


def _differences(saved: dict, want: dict) -> list[str]:
  out = [
    f"{k}: saved {saved.get(k)!r}, expected {want[k]!r}"
    for k in ("format", "type", "policy")
    if saved.get(k) != want[k]
  ]
  if not out:
    for name in sorted(set(saved["arrays"]) | set(want["arrays"])):
      a, b = saved["arrays"].get(name), want["arrays"].get(name)
      if a is None and 0 in b[0]:  # an empty field added since the save (no data to restore)
        continue
      if a != b:
        out.append(f"array {name}: saved {a} (shape, dtype), expected {b}")
  return out


def restore(directory, like):
  """The cache saved in ``directory``, in the structure of ``like``.

  Args:
    directory: a folder written by ``save``.
    like: a cache of the policy, batch size, geometry and dtype the stream continues with (its values are not
      used; ``jax.eval_shape`` of one is enough).

  Raises:
    FileNotFoundError: no saved cache there.
    ValueError: the saved cache has another type, policy, batch size, geometry or dtype than ``like``.
  """
  path = pathlib.Path(directory).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"no saved cache in {path}")
  want = describe(like)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    saved = ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    diffs = _differences(saved, want)
    if diffs:
      raise ValueError(f"the cache saved in {path} does not fit this stream: " + "; ".join(diffs))
    abstract = {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in _arrays(like, stored=True).items()}
    arrays = ckpt.restore(path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))["arrays"]
  treedef = jax.tree.structure(like)
  leaves = [
    _placed_like(arrays[k] if k in arrays else jnp.zeros(x.shape, x.dtype), x) for k, x in _arrays(like).items()
  ]
  return jax.tree.unflatten(treedef, leaves)


def _placed_like(array, like):
  """``array`` in the memory ``like`` is in, when that is not device memory (a retrieval store in host memory)."""
  sharding = getattr(like, "sharding", None)
  if sharding is None or sharding.memory_kind in (None, "device"):
    return array
  return jax.device_put(array, sharding)
