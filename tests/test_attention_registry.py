"""The attention registry: plugins found through the ``jstream.attention`` entry point group and loaded lazily,
``import jstream`` compiles nothing, and the kernel probe runs once, at the first ``impl="auto"`` dispatch on a
platform, outside the trace that dispatch happens in."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_base import make_inputs, numpy_reference

from jstream.ops import attention as A

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: counts JAX's compile events during `import jstream` with the backend made to look
# like an accelerator (the old import registered the kernels and probed them there), then checks the lazy path.
_FRESH_IMPORT = textwrap.dedent(
  """
  import json, sys, warnings
  import jax
  import jax.numpy as jnp

  events = []
  jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: events.append(name))
  compiles = lambda: [e for e in events if e.startswith("/jax/core/compile/")]
  jax.default_backend = lambda: BACKEND
  import jstream

  report = dict(import_compiles=compiles(), plugin_imported_by_import="pallas_kernels" in sys.modules)
  from jstream.ops import attention as A

  report["registered"] = list(A.implementations())
  report["plugin_imported_lazily"] = "pallas_kernels" in sys.modules
  report["compiles_after_registration"] = compiles()
  # First "auto" dispatch on the accelerator-looking platform, inside jit: the kernels' probe runs now (their
  # compiled, non-interpret lowering cannot run on this CPU), fails once with a warning, and XLA serves the call.
  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  pos = jnp.arange(4, dtype=jnp.int32)[None]
  f = jax.jit(lambda q: A.attention(q, q[:, :, :1], q[:, :, :1], q_positions=pos, k_positions=pos, window=2))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    f(q)
    jax.jit(lambda q: f(q) * 2)(q)
  report["probe_warnings"] = [str(w.message) for w in caught if "did not pass its probe" in str(w.message)]
  report["counter_counts"] = len(compiles()) > 0
  print("REPORT " + json.dumps(report))
  """
)


def _fresh_import(backend: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = _FRESH_IMPORT.replace("BACKEND", repr(backend))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
  return json.loads(line.removeprefix("REPORT "))


@pytest.mark.parametrize("backend", ["gpu"])
def test_import_jstream_compiles_nothing_and_probes_lazily(backend):
  report = _fresh_import(backend)
  assert report["import_compiles"] == []
  assert not report["plugin_imported_by_import"]
  assert report["plugin_imported_lazily"] and "pallas" in report["registered"]
  assert report["compiles_after_registration"] == []  # registering is not probing
  assert report["counter_counts"]  # the listener does see compilations (so the zero above means something)
  assert len(report["probe_warnings"]) == 1 and "'pallas'" in report["probe_warnings"][0]


def test_plugins_come_from_the_entry_point_group():
  eps = importlib.metadata.entry_points(group=A.PLUGIN_GROUP)
  assert "pallas_kernels:register" in {ep.value for ep in eps}
  names = A.implementations()
  assert {"xla", "pallas", "pallas_prefill", "pallas_decode", "pallas_tpu"} <= set(names)
  assert A.get_implementation("pallas_decode").name == "pallas_decode"
  with pytest.raises(ValueError, match="unknown attention impl"):
    A.get_implementation("no_such_impl")


def test_the_library_does_not_import_the_kernels():
  """``jstream`` depends on no kernel package by name (plugins come through the entry point group)."""
  offenders = []
  for path in (ROOT / "jstream").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      mods = []
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        mods = [node.module]
      offenders += [f"{path.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] == "pallas_kernels"]
  assert offenders == []


def _private_imports(path: pathlib.Path) -> list[str]:
  """``from x import _name`` and ``alias._name`` where ``alias`` is an imported jstream / pallas_kernels module."""
  tree = ast.parse(path.read_text())
  ours = lambda mod: mod.split(".")[0] in ("jstream", "pallas_kernels")
  aliases, found = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      aliases |= {a.asname or a.name for a in node.names if ours(a.name)}
    elif isinstance(node, ast.ImportFrom) and node.module and ours(node.module):
      for a in node.names:
        if a.name.startswith("_") and not a.name.startswith("__"):
          found.append(f"from {node.module} import {a.name}")
        aliases.add(a.asname or a.name)
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
      if node.attr.startswith("_") and not node.attr.startswith("__"):
        found.append(f"{node.value.id}.{node.attr}")
  return found


def test_no_private_names_cross_the_attention_package_boundaries():
  files = [ROOT / "jstream/ops/attention.py", ROOT / "jstream/nn/cached_attention.py"]
  files += sorted((ROOT / "pallas_kernels").glob("*.py"))
  files += sorted((ROOT / "tests").glob("*attention*.py"))
  found = {str(p.relative_to(ROOT)): _private_imports(p) for p in files}
  assert {k: v for k, v in found.items() if v} == {}


def test_private_name_check_sees_offences(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from jstream.ops import attention as A\nfrom jstream.ops.attention import _x\nA._registry\n")
  assert _private_imports(bad) == ["from jstream.ops.attention import _x", "A._registry"]


class _Recorder:
  """A probe around ``pallas_kernels.probe``: counts its runs and whether it saw concrete arrays."""

  def __init__(self, name):
    self.name, self.runs, self.concrete = name, 0, []

  def __call__(self):
    import pallas_kernels

    self.runs += 1
    self.concrete.append(not isinstance(jnp.zeros(()) + 1, jax.core.Tracer))
    return pallas_kernels.probe(self.name)


def test_lazy_probe_runs_once_outside_the_jit_trace_of_the_first_dispatch():
  """The portable kernels registered for CPU under a test name (interpret mode) with the real probe: the first
  ``"auto"`` dispatch happens inside ``jit``; the probe runs there once, on concrete arrays (it compiles and
  compares numbers), leaks no tracer, passes, and the kernel then serves that and later dispatches."""
  name = "pallas_probe_test"
  recorder = _Recorder(name)
  kernel = A.get_implementation("pallas").fn
  served = []

  def fn(q, *args, **kwargs):
    served.append(q.shape[1])
    return kernel(q, *args, **kwargs)

  A.register(name, fn, platforms=("cpu",), priority=50, probe=recorder)
  try:
    assert recorder.runs == 0  # registering does not probe
    outs = []
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # a failed probe warns: that would fail here
      with jax.checking_leaks():
        for t in (3, 2):  # two jit traces (different shapes)
          q, k, v, qp, kp = make_inputs(t=t, kvh=2, seed=40 + t)
          f = jax.jit(lambda q, k, v, qp=qp, kp=kp: A.attention(q, k, v, q_positions=qp, k_positions=kp, window=4))
          outs.append((f(q, k, v), numpy_reference(q, k, v, qp, kp, window=4).out))
    assert recorder.runs == 1 and recorder.concrete == [True]
    assert A.resolve("auto")[0] == name
    assert 3 in served and 2 in served  # the dispatches themselves (not only the probe) used the kernel
    for got, want in outs:
      np.testing.assert_allclose(got, want, atol=2e-5)
  finally:
    A.unregister(name)


def test_failed_probe_leaves_the_implementation_out_of_auto_once_with_a_warning():
  runs = []

  def probe():
    runs.append(1)
    return "no lowering for this op"

  def raising_probe():
    runs.append(2)
    raise RuntimeError("probe crashed")

  def fn(*args, **kwargs):
    raise AssertionError("auto must not call an implementation whose probe failed")

  A.register("failing_probe_test", fn, platforms=("cpu",), priority=60, probe=probe)
  A.register("raising_probe_test", fn, platforms=("cpu",), priority=61, probe=raising_probe)
  try:
    with pytest.warns(RuntimeWarning, match="did not pass its probe") as caught:
      names = A.resolve("auto")
    assert {"did not pass" in str(w.message) for w in caught} == {True} and len(caught) == 2
    assert "failing_probe_test" not in names and "raising_probe_test" not in names
    q = jax.random.normal(jax.random.key(1), (1, 3, 2, 4))
    pos = jnp.arange(3, dtype=jnp.int32)[None]
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no second warning: the answer is cached
      out = jax.jit(lambda q: A.attention(q, q, q, q_positions=pos, k_positions=pos))(q)
    np.testing.assert_allclose(out, numpy_reference(q, q, q, pos, pos).out, atol=2e-6)
    assert sorted(runs) == [1, 2]
    assert A.resolve("failing_probe_test") == ("failing_probe_test",)  # still available by name
  finally:
    A.unregister("failing_probe_test")
    A.unregister("raising_probe_test")


def test_re_registering_forgets_the_probe_result():
  runs = []
  probe = lambda: runs.append(1) or None
  A.register("reprobe_test", A.xla_attention, platforms=("cpu",), priority=70, probe=probe)
  try:
    A.resolve("auto")
    A.resolve("auto")
    A.register("reprobe_test", A.xla_attention, platforms=("cpu",), priority=70, probe=probe)
    assert A.resolve("auto")[0] == "reprobe_test"
    assert runs == [1, 1]
  finally:
    A.unregister("reprobe_test")
  with pytest.raises(ValueError, match="unknown attention impl"):
    A.unregister("reprobe_test")
