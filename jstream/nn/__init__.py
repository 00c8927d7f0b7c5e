"""NNX layers of streaming transformers and the cache-aware attention that drives them."""

from jstream.nn.layers import MLP, Attention, Block, RMSNorm

__all__ = ["MLP", "Attention", "Block", "RMSNorm"]
