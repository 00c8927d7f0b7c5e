"""Dimension legend used in shape comments across jstream, and the ``Array`` type.

One letter per dimension, used in shape comments and docstrings (``# [b, t, n, h]``):

  b  batch (independent streams)          t  query tokens in the current chunk
  s  key slots (cache capacity or keys)   n  query heads
  k  key/value heads (grouped-query)      g  query heads per kv head (n = k * g)
  h  head dimension                       d  model width (embed_dim)
  f  MLP hidden width                     v  vocabulary size
  l  layers                               m  cache tracks of a policy (see jstream.cache)

Positions are int32; -1 marks an empty slot or a padded token.
"""

from __future__ import annotations

from jaxtyping import Array

__all__ = ["Array"]
