"""Readings of this process's memory, for evaluations and benchmarks.

Linux (``/proc``); elsewhere the current RSS is NaN and the peak comes from ``getrusage`` (kilobytes on Linux, bytes
on macOS: only the Linux figures are quoted).
"""

from __future__ import annotations

import resource


def tree_bytes(tree) -> int:
  """Bytes of the arrays in a pytree (a cache, parameters): what it holds, not what the process has allocated."""
  import jax

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def rss_mib() -> tuple[float, float]:
  """``(current RSS, peak RSS)`` of this process in MiB; the peak is since the start or the last
  ``reset_peak_rss()``."""
  cur = peak = float("nan")
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
          peak = int(line.split()[1]) / 1024
  except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return cur, peak


def reset_peak_rss() -> bool:
  """Resets the peak-RSS mark to the current RSS (Linux: ``/proc/self/clear_refs``), so that the next reading is
  the peak of what runs in between. Returns False where that is not possible (the peak then stays process-wide)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


__all__ = ["reset_peak_rss", "rss_mib"]
