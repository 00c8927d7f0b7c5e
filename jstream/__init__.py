"""jstream: streaming causal models in JAX with explicit caches, bounded memory and constant time per chunk.

Importing it compiles nothing and imports no kernel package: attention kernels register through an entry point
and are probed lazily, at the first dispatch on a platform (see ``jstream.ops.attention``).
"""

from jstream import cache, ops, positions, rollout
from jstream.config import TransformerConfig
from jstream.models.lm import StreamingTransformer

__version__ = "0.1.0"

__all__ = ["StreamingTransformer", "TransformerConfig", "cache", "ops", "positions", "rollout"]
