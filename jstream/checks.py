"""Argument checks shared across jstream: bad input is a clear error at construction or call time.

These are public because they cross package boundaries (cache policies, training configs, experiments).
"""

from __future__ import annotations

import numpy as np


def check_int(name: str, value, lo: int) -> int:
  """Returns ``value`` as an ``int`` if it is an integer (not a bool) ``>= lo``, else raises ``ValueError``.

  Args:
    name: how the error message names the argument (``"SinkWindow.window"``).
    value: the value to check; Python and NumPy integers are accepted.
    lo: the smallest allowed value.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
  return int(value)


__all__ = ["check_int"]
