"""What a benchmark ran on, recorded the same way by every script of ``experiments/``."""

from __future__ import annotations

import os
import platform


def device_line() -> str:
  """The first JAX device, the backend, the CPU count and the architecture, e.g. ``cpu (cpu), 2 CPUs, x86_64``."""
  import jax

  return f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, {platform.machine()}"


def machine() -> dict:
  """``platform`` (OS and kernel), ``processor`` and ``cpus`` of this machine, for a results file."""
  return dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count())
