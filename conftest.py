"""Settings for every test process (tests/ and pallas_kernels/) and the subprocesses they start.

Compilation dominates the suite's time on a CPU: it builds hundreds of small XLA programs, and on a 2-core CI machine
LLVM's optimisation passes are most of each compile (about 2x on the model tests). Tests run small shapes for
correctness, not speed, so they compile at LLVM's lowest optimisation level; the numerics are IEEE either way (XLA
CPU does not enable fast-math). Benchmarks and users keep XLA's defaults.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  os.environ["XLA_FLAGS"] = " ".join([_flags, *_FAST_COMPILE]).strip()
