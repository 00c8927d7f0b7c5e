"""jstream: streaming causal models in JAX with explicit caches, bounded memory and constant time per chunk."""

from jstream import cache, ops, positions, rollout
from jstream.config import TransformerConfig
from jstream.models.lm import StreamingTransformer

__version__ = "0.1.0"

__all__ = ["StreamingTransformer", "TransformerConfig", "cache", "ops", "positions", "rollout"]
