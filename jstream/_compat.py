"""Small shims over JAX APIs that move between the tested versions (0.10.x and 0.11.x)."""

from __future__ import annotations

try:  # public in 0.10; kept behind a fallback in case a later release drops it from jax.core
  from jax.core import Tracer
except ImportError:  # pragma: no cover
  from jax._src.core import Tracer


def is_concrete(x) -> bool:
  """True for a value (array or Python scalar) that is not being traced by ``jit``/``scan``/``grad`` and that this
  process can read (an array spread over other processes' devices cannot be: it is checked like a traced one)."""
  if isinstance(x, Tracer):
    return False
  return getattr(x, "is_fully_addressable", True)
