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

# What public entry points accept for token ids and positions: JAX arrays or NumPy arrays (or nested lists, which
# the functions convert) of integers.
IntLike = Int[ArrayLike, "..."]

__all__ = ["Array", "ArrayLike", "Bool", "Float", "Int", "IntLike", "Shaped"]
