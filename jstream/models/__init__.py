"""Streaming models."""

from jstream.models.lm import StreamingTransformer

__all__ = ["StreamingTransformer"]
