"""Dimension legend and the array types used in jstream's signatures.

One letter (or name) per dimension, used in jaxtyping annotations (``Float[Array, "b t n h"]``), shape comments
(``# [b, t, n, h]``) and docstrings:

  b  batch (independent streams)          t  query tokens in the current chunk
  s  key slots (cache capacity or keys)   n  query heads
  k  key/value heads (grouped-query)      g  query heads per kv head (n = k * g)
  h  head dimension                       d  model width (embed_dim)
  f  MLP hidden width                     v  vocabulary size
  l  layers                               m  cache tracks of a policy (see jstream.cache)
  c  chunks of a rollout                  p  prompt tokens

Positions are int32; -1 marks an empty slot or a padded token. In annotations, ``_`` (or a name starting with
``_``) marks a dimension whose meaning depends on a layout argument (the attention op's ``kv_layout``), checked by
the function itself, and ``...`` any leading dimensions.

Shapes are checked at run time in the test suite: ``pytest`` runs with jaxtyping's import hook and beartype
(``--jaxtyping-packages`` in ``pyproject.toml``), so a call with a wrong shape fails there. Outside the tests the
annotations cost nothing, and public functions still check their inputs themselves with clear errors.
"""

from __future__ import annotations

from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int, Shaped

# What public entry points accept for token ids and positions: JAX or NumPy arrays of integers.
IntLike = Int[ArrayLike, "..."]
TokenIds = Int[ArrayLike, "b t"]
"""Token ids ``[b, t]`` of a chunk or a whole stream (``t`` then counts the stream's tokens)."""
SegmentIds = Int[ArrayLike, "b t"] | None
"""Optional track of each token ``[b, t]`` for ``Segmented`` policies (-1: padding)."""
Logits = Float[Array, "b t v"]

# A cache buffer of every layer: stacked (``scan_layers``) or a tuple of per-layer buffers. Keys are stored
# ``[b, k, s, h]`` per layer, values slots-last ``[b, k, h, s]``; ``s`` is the capacity plus the trash slot.
KeyBuffer = Shaped[Array, "l b k s h"] | tuple[Shaped[Array, "b k s h"], ...]
ValueBuffer = Shaped[Array, "l b k h s"] | tuple[Shaped[Array, "b k h s"], ...]
Buffer = Shaped[Array, "l b k _ _"] | tuple[Shaped[Array, "b k _ _"], ...]
"""Either (a function with a ``slots_last`` switch); ``_``: the slot and head axes, in the order of the layout."""

__all__ = [
  "Array",
  "ArrayLike",
  "Bool",
  "Buffer",
  "Float",
  "Int",
  "IntLike",
  "KeyBuffer",
  "Logits",
  "SegmentIds",
  "Shaped",
  "TokenIds",
  "ValueBuffer",
]
