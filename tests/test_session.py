"""Session save / restore: a stream's cache saved with orbax and restored continues the stream bit-identically, for
every policy and position mode (and in a fresh process for a subset that spans both position modes and buffer
layouts); a cache saved under one policy or shape is refused under another."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_step, random_tokens, tiny_model
from jstream import cache as C

POLICIES = {
  "dense": C.Dense(64),
  "window_abs": C.Window(8),
  "sinkwindow_abs": C.SinkWindow(2, 8, max_rollback=1),
  "sinkwindow_rel": C.SinkWindow(2, 8, positions="cache_relative"),
  "segmented_rel": C.Segmented((C.SinkWindow(1, 4), C.Window(6)), positions="cache_relative"),
  "recompute": C.Recompute(8),
}
SIZES_BEFORE, SIZES_AFTER = [5, 1, 5], [1, 5, 1]  # a chunk and a single token (the read-only path): two shapes
# Every policy with stacked (layer-scan) buffers; one with per-layer buffers.
CASES = [(name, p, True) for name, p in POLICIES.items()] + [
  ("segmented_rel_per_layer", POLICIES["segmented_rel"], False)
]

# The cases a fresh process also restores (every case is restored in this process): both position modes, both
# buffer layouts, two tracks, and a cache that is not a KVCache.
FRESH = ("sinkwindow_abs", "segmented_rel_per_layer", "recompute")

# Run in a fresh process: rebuild the model from its seed, restore the cache, stream the second half.
CONTINUE = """
import sys, json, numpy as np
sys.path.insert(0, {tests!r})
from conftest import jit_step, random_tokens, tiny_model
from test_session import CASES, FRESH, SIZES_AFTER, SIZES_BEFORE, segments
from jstream import cache as C
for name, policy, scan in [c for c in CASES if c[0] in FRESH]:
  model = tiny_model(seed=3, scan_layers=scan)
  tokens = random_tokens(2, sum(SIZES_BEFORE + SIZES_AFTER), seed=4)
  cache = C.restore({root!r} + "/" + name, like=model.init_cache(policy, 2))
  step, i, logits = jit_step(model), sum(SIZES_BEFORE), []
  for s in SIZES_AFTER:
    lg, cache = step(tokens[:, i : i + s], cache, segments(policy, i, s))
    logits.append(np.asarray(lg))
    i += s
  np.save({root!r} + "/" + name + ".npy", np.concatenate(logits, axis=1))
"""


def segments(policy, start, size):
  """Segment ids of tokens ``start .. start + size`` (two tracks for Segmented, with a padded token)."""
  if not isinstance(policy, C.Segmented):
    return None
  seg = (np.arange(start, start + size)[None] * np.array([[1], [3]])) % 5 % 2
  seg[1, 0] = -1  # padding inside a chunk is not cached either
  return jnp.asarray(seg, jnp.int32)


def _stream(step, tokens, cache, policy, start, sizes):
  out, i = [], start
  for s in sizes:
    lg, cache = step(tokens[:, i : i + s], cache, segments(policy, i, s))
    out.append(np.asarray(lg))
    i += s
  return np.concatenate(out, axis=1), cache


def test_restored_cache_continues_the_stream_bit_identically_in_a_fresh_process(tmp_path):
  tokens = random_tokens(2, sum(SIZES_BEFORE + SIZES_AFTER), seed=4)
  want = {}
  for name, policy, scan in CASES:
    model = tiny_model(seed=3, scan_layers=scan)
    step = jit_step(model)
    _, cache = _stream(step, tokens, model.init_cache(policy, 2), policy, 0, SIZES_BEFORE)
    C.save(cache, tmp_path / name)
    want[name], _ = _stream(step, tokens, cache, policy, sum(SIZES_BEFORE), SIZES_AFTER)
    # restored here, from the files alone (the shapes and policy from a fresh cache), it continues identically
    back = C.restore(tmp_path / name, like=model.init_cache(policy, 2))
    got, _ = _stream(step, tokens, back, policy, sum(SIZES_BEFORE), SIZES_AFTER)
    np.testing.assert_array_equal(got, want[name], err_msg=name)
  tests = str(pathlib.Path(__file__).resolve().parent)
  code = CONTINUE.format(tests=tests, root=str(tmp_path))
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  for name in FRESH:
    got = np.load(tmp_path / f"{name}.npy")
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want[name], err_msg=name)


def test_restore_refuses_another_policy_shape_or_dtype(tmp_path):
  model = tiny_model(seed=5)
  cache = model.init_cache(C.SinkWindow(2, 8), 2)
  _, cache = jit_step(model)(random_tokens(2, 5, seed=6), cache)
  C.save(cache, tmp_path / "c")
  back = C.restore(tmp_path / "c", like=jax.eval_shape(lambda: model.init_cache(C.SinkWindow(2, 8), 2)))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(a, b)
  others = {
    "policy": model.init_cache(C.SinkWindow(2, 8, positions="cache_relative"), 2),
    "policy: saved": model.init_cache(C.Window(10), 2),
    "type": model.init_cache(C.Recompute(10), 2),
    "array .idx": model.init_cache(C.SinkWindow(2, 8), 3),  # batch size
    "array .k": model.init_cache(C.SinkWindow(2, 8), 2, dtype=jnp.bfloat16),
    "array .k[": tiny_model(seed=5, scan_layers=False).init_cache(C.SinkWindow(2, 8), 2),  # per-layer buffers
  }
  for what, like in others.items():
    with pytest.raises(ValueError, match=r"does not fit this stream.*" + re.escape(what)):
      C.restore(tmp_path / "c", like=like)
  with pytest.raises(FileNotFoundError, match="no saved cache"):
    C.restore(tmp_path / "missing", like=cache)
  with pytest.raises(FileExistsError):
    C.save(cache, tmp_path / "c")
  meta = json.dumps(C.session.describe(cache))
  assert "SinkWindow" in meta and '"window": 8' in meta
