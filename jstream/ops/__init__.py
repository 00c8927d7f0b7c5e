"""Numerical ops with a plain reference and registered fast implementations."""

from jstream.ops import attention

__all__ = ["attention"]
