"""Shared fixtures: small models, tolerances keyed by dtype, hypothesis profiles; a run-wide check that the suite
leaves nothing in the temp dir."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, settings

import jstream

settings.register_profile(
  "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# atol / rtol by compute dtype, for logits of order 1.
TOL = {
  jnp.float32: dict(atol=1e-5, rtol=1e-5),
  jnp.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


def tol(dtype):
  return TOL[jnp.dtype(dtype).type]


def tiny_config(**kw) -> jstream.TransformerConfig:
  base = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, embed_dim=32, mlp_dim=64)
  base.update(kw)
  return jstream.TransformerConfig(**base)


def tiny_model(seed: int = 0, **kw) -> jstream.StreamingTransformer:
  return jstream.StreamingTransformer(tiny_config(**kw), rngs=nnx.Rngs(seed))


def random_tokens(b, n, vocab=64, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, n), 0, vocab, dtype=jnp.int32)


def jit_step(model):
  """``step(tokens, cache, segment_ids) -> (logits, cache)`` compiled once per shape."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, cache, segment_ids=None):
    return nnx.merge(graphdef, state)(tokens, cache, segment_ids=segment_ids)

  def call(tokens, cache, segment_ids=None):
    return step(state, tokens, cache, segment_ids)

  call.jitted = step
  return call


def stream(step, tokens, cache, sizes, segment_ids=None):
  """Streams ``tokens [b, n]`` in chunks of ``sizes``; returns concatenated logits and the cache."""
  out, i = [], 0
  for size in sizes:
    seg = None if segment_ids is None else segment_ids[:, i : i + size]
    logits, cache = step(tokens[:, i : i + size], cache, seg)
    out.append(logits)
    i += size
  return jnp.concatenate(out, axis=1), cache


def chunk_sizes(n, choices, seed=0, cap=None):
  rng = np.random.default_rng(seed)
  sizes, total = [], 0
  while total < n:
    s = int(min(rng.choice(choices), n - total))
    sizes.append(s)
    total += s
  return sizes


@pytest.fixture(scope="session")
def model():
  return tiny_model()


@contextlib.contextmanager
def compilations():
  """Counts XLA compilations by jitted function name inside the block (from ``jax.log_compiles`` records).

  ``with compilations() as n: ...`` then ``n["_stream_nll"]``. Call ``jax.clear_caches()`` first for a count that
  does not depend on what ran before in the process.
  """
  counts = collections.Counter()

  class Counter(logging.Handler):
    def emit(self, record):
      m = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
      if m:
        counts[m.group(1)] += 1

  handler, logger = Counter(), logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield counts
  finally:
    logger.removeHandler(handler)


# ----------------------------------------------------------------------------------------------------------------
# No temp litter. The controller (the only process of a run without xdist) points TMPDIR at a fresh folder before
# any worker starts, so that every test process and every subprocess they start makes its temporary files there,
# and nothing else running on the machine does. When the session ends (after xdist has stopped its workers),
# anything left in that folder fails the run; pytest's own tmp_path base stays in the system temp dir, where it
# always is, with its usual retention. The folder is removed when pytest unconfigures, whatever happened.

_TEMP_ROOT = pytest.StashKey[tuple[str, str | None]]()
_TEMP_LEFT = pytest.StashKey[list[str]]()


def _is_xdist_worker(config: pytest.Config) -> bool:
  return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
  if _is_xdist_worker(config):
    return
  os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
  root = tempfile.mkdtemp(prefix="jstream-tests-")
  config.stash[_TEMP_ROOT] = (root, os.environ.get("TMPDIR"))
  os.environ["TMPDIR"] = root
  tempfile.tempdir = root


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
  if _TEMP_ROOT not in session.config.stash:
    return
  root, _ = session.config.stash[_TEMP_ROOT]
  left = sorted(name for name in os.listdir(root) if not name.startswith("pytest-of-"))
  session.config.stash[_TEMP_LEFT] = left
  if left and session.exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
  left = config.stash.get(_TEMP_LEFT, [])
  if left:
    terminalreporter.section("temp dir litter", red=True)
    terminalreporter.write_line(f"the test run left {len(left)} entries in the temp dir: {left[:20]}")


def pytest_unconfigure(config: pytest.Config) -> None:
  if _TEMP_ROOT not in config.stash:
    return
  root, previous = config.stash[_TEMP_ROOT]
  shutil.rmtree(root, ignore_errors=True)
  tempfile.tempdir = None
  if previous is None:
    os.environ.pop("TMPDIR", None)
  else:
    os.environ["TMPDIR"] = previous


@contextlib.contextmanager
def library_checks_only():
  """Runs the block with the test suite's runtime shape/type checks (jaxtyping + beartype) switched off.

  For tests of the errors jstream itself raises on bad input: what a user, who runs without the checker, sees.
  """
  import jaxtyping

  before = jaxtyping.config.jaxtyping_disable
  jaxtyping.config.update("jaxtyping_disable", True)
  try:
    yield
  finally:
    jaxtyping.config.update("jaxtyping_disable", before)
