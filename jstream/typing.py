"""Dimension legend and array type aliases used across jstream.

One letter per dimension, used in shape comments (``# [b, t, n, h]``) and jaxtyping annotations:

  b  batch (independent streams)          t  query tokens in the current chunk
  s  key slots (cache capacity or keys)   n  query heads
  k  key/value heads (grouped-query)      g  query heads per kv head (n = k * g)
  h  head dimension                       d  model width (embed_dim)
  f  MLP hidden width                     v  vocabulary size
  l  layers                               m  cache tracks of a policy (see jstream.cache)

Positions are int32; -1 marks an empty slot or a padded token.
"""

from __future__ import annotations

from typing import TypeAlias

import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

ArrayLike: TypeAlias = jax.typing.ArrayLike
DTypeLike: TypeAlias = jax.typing.DTypeLike

Tokens: TypeAlias = Int[Array, "b t"]
Positions: TypeAlias = Int[Array, "b t"]
KeyPositions: TypeAlias = Int[Array, "b s"]
Queries: TypeAlias = Float[Array, "b t n h"]
Keys: TypeAlias = Float[Array, "b s k h"]
Values: TypeAlias = Float[Array, "b s k h"]
Logits: TypeAlias = Float[Array, "b t v"]
Mask: TypeAlias = Bool[Array, "..."]

__all__ = [
  "Array",
  "ArrayLike",
  "Bool",
  "DTypeLike",
  "Float",
  "Int",
  "KeyPositions",
  "Keys",
  "Logits",
  "Mask",
  "PRNGKeyArray",
  "Positions",
  "Queries",
  "Tokens",
  "Values",
]
