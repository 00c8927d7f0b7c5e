"""Settings for every test process (tests/ and pallas_kernels/) and the subprocesses they start.

Compilation dominates the suite's time on a CPU: it builds hundreds of small XLA programs. Tests run small shapes
for correctness, not speed, so they compile for speed of compilation: LLVM at its lowest optimisation level and
XLA CPU's older loop-fusion emitter instead of its MLIR fusion emitters (on the 2-core EPYC VM: a model test 36 s
-> 15 s, the whole suite about 2.5x). Both keep IEEE numerics (XLA CPU does not enable fast-math). Benchmarks and
users keep XLA's defaults.

An XLA that does not know a flag aborts the process, and flags come and go between jax releases, so the controller
probes the flags once in a subprocess and keeps only what that XLA accepts; workers and subprocesses inherit them.
``JSTREAM_TEST_XLA_DEFAULTS=1`` runs the tests with XLA's default compilation instead.

The same programs are compiled again and again in different processes (two xdist workers, and the CLI and notebook
tests' subprocesses train and run the same quick models), and again in one process after ``jax.clear_caches()``.
So a run shares JAX's persistent compilation cache: the controller makes an empty folder for it (a run starts cold,
nothing is kept between runs) and removes it when pytest unconfigures; every process of the run inherits it.
``JSTREAM_TEST_NO_COMPILE_CACHE=1`` switches it off.

``-n auto`` starts two xdist workers per core (at most one per 4 GiB of memory): a test process keeps a core busy
only about half its time (compiling single-threaded, starting subprocesses and kernels), and on the 2-core VM four
workers ran the suite in 18.7 min against 22.7 with two, at the same CPU time (a rough comparison: the runs'
background load differed in their first minutes; ``benchmarks/RESULTS.md``). ``-n N`` chooses.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

_FAST_COMPILE = (
  ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"),
  ("--xla_cpu_use_fusion_emitters=false",),
)


def _accepted(flags: str) -> bool:
  probe = "import jax.numpy as jnp; (jnp.ones(3) + 1).block_until_ready()"
  env = {**os.environ, "XLA_FLAGS": flags}
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=300).returncode == 0


def _fast_compile_flags() -> None:
  if os.environ.get("JSTREAM_TEST_XLA_PROBED") or os.environ.get("JSTREAM_TEST_XLA_DEFAULTS"):
    return  # chosen already (in a worker or subprocess of a run), or switched off
  os.environ["JSTREAM_TEST_XLA_PROBED"] = "1"
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" in current:
    return  # the caller chose
  chosen = current
  for group in _FAST_COMPILE:
    candidate = " ".join([chosen, *group]).strip()
    if _accepted(candidate):
      chosen = candidate
  os.environ["XLA_FLAGS"] = chosen


_fast_compile_flags()

_CACHE_OWNER = False


def _compile_cache() -> None:
  global _CACHE_OWNER
  if os.environ.get("JSTREAM_TEST_NO_COMPILE_CACHE") == "1" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # switched off, or chosen already (a worker or subprocess of this run, or the caller)
  temp = pathlib.Path(tempfile.gettempdir())
  for stale in temp.glob("jstream-xla-cache-*"):  # left by a killed run (no unconfigure): a day old
    if time.time() - stale.stat().st_mtime > 86_400:
      shutil.rmtree(stale, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jstream-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  _CACHE_OWNER = True


_compile_cache()


def pytest_xdist_auto_num_workers(config) -> int:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  try:
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
  except (ValueError, OSError, AttributeError):
    memory_gib = 8.0
  return max(1, min(2 * cores, int(memory_gib // 4)))


def pytest_unconfigure(config) -> None:
  if _CACHE_OWNER and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)
