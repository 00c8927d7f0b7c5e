"""Cache policies and pytrees: validation, invariants under random operations, rollback, reset, rebase."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import library_checks_only
from jstream import cache as C
from jstream.cache import planner


def _empty(policy, b=2, stacked=True):
  return C.init(policy, num_layers=1, batch_size=b, num_kv_heads=1, head_dim=1, stacked=stacked)


_jit_append = jax.jit(C.append)  # one program per shape, not dozens of op-by-op ones


def _append(cache, values, valid=None):
  """Appends ``values [b, t]`` (floats identifying tokens) as keys and values; ``valid`` marks real tokens."""
  x = jnp.asarray(values, jnp.float32)[None, :, :, None, None]  # [l, b, t, k, h]
  seg = None if valid is None else jnp.where(jnp.asarray(valid), 0, -1).astype(jnp.int32)
  return _jit_append(cache, x, x, segment_ids=seg)


def _visible_contents(cache, row):
  vis = np.asarray(C.visible(cache))[row]
  idx = np.asarray(cache.idx)[row]
  k = np.asarray(cache.k)[0, row, 0, :, 0]
  v = np.asarray(cache.v)[0, row, 0, 0, :]
  assert np.array_equal(k[vis], v[vis])
  return {int(i): float(x) for i, x in zip(idx[vis], k[vis])}


def _expected(policy, history):
  """The policy's definition: which track indices the next token sees, and what they hold."""
  n = len(history)
  if isinstance(policy, C.Dense):
    keep = range(n)
  else:
    sinks = getattr(policy, "num_sinks", 0)
    keep = [i for i in range(n) if i < sinks or i > n - policy.window]
  return {i: history[i] for i in keep}


POLICIES = [
  C.Dense(12),
  C.Window(5),
  C.Window(5, max_rollback=3),
  C.SinkWindow(2, 5),
  C.SinkWindow(3, 4, max_rollback=2),
  C.SinkWindow(1, 1, max_rollback=1),
]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@given(data=st.data())
def test_random_operations_keep_the_policy_invariant(policy, data):
  b = 2
  cache = _empty(policy, b)
  hist = [[] for _ in range(b)]  # token values since each row's reset
  spare = policy.max_rollback
  next_value = 1.0
  for _ in range(data.draw(st.integers(1, 8), label="ops")):
    op = data.draw(st.sampled_from(["append", "append", "append", "rollback", "reset"]), label="op")
    if op == "append":
      t = data.draw(st.integers(1, policy.capacity), label="t")
      valid = np.array(data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t), label="valid"))
      valid = valid.reshape(b, t)
      if isinstance(policy, C.Dense):  # Dense must not overflow
        for r in range(b):
          room = policy.max_len - len(hist[r])
          valid[r, np.cumsum(valid[r]) > room] = False
      values = np.arange(b * t, dtype=np.float32).reshape(b, t) + next_value
      next_value += b * t
      cache = _append(cache, values, valid)
      for r in range(b):
        hist[r].extend(values[r][valid[r]].tolist())
    elif op == "rollback":
      n = np.array([data.draw(st.integers(0, min(spare, len(h))), label="n") for h in hist], np.int32)
      cache = C.rollback(cache, jnp.asarray(n))
      for r in range(b):
        del hist[r][len(hist[r]) - n[r] :]
    else:
      rows = np.array(data.draw(st.lists(st.booleans(), min_size=b, max_size=b), label="rows"))
      cache = C.reset(cache, jnp.asarray(rows))
      for r in range(b):
        if rows[r]:
          hist[r] = []
    for r in range(b):
      assert _visible_contents(cache, r) == _expected(policy, hist[r])
      assert int(cache.count[r, 0]) == len(hist[r])
      assert int(cache.next_pos[r]) == len(hist[r])  # positions restart at 0 on reset
      assert np.all(np.asarray(cache.idx)[r] < len(hist[r]))  # nothing from the future is valid
      assert np.asarray(cache.idx)[r, -1] == -1  # the trash slot is never valid


SEGMENTED = [
  C.Segmented((C.SinkWindow(1, 3, max_rollback=2), C.Window(2, max_rollback=2))),
  C.Segmented((C.Dense(9), C.SinkWindow(2, 2, max_rollback=1)), positions="cache_relative"),
]


@pytest.mark.parametrize("policy", SEGMENTED, ids=str)
@given(data=st.data())
def test_random_operations_keep_each_segment_invariant(policy, data):
  """Segmented policies under random appends (tokens of random segments, padding), rollbacks and resets, each
  operation jit-compiled: every track holds exactly what its own policy defines over that track's tokens."""
  b, tracks = 2, len(policy.segments)
  append, rollback, reset = jax.jit(C.append), jax.jit(C.rollback), jax.jit(C.reset)
  cache = _empty(policy, b)
  hist = [[] for _ in range(b)]  # (track, value) since each row's reset, in stream order
  lay = C.layout(policy)
  next_value = 1.0
  for _ in range(data.draw(st.integers(1, 8), label="ops")):
    op = data.draw(st.sampled_from(["append", "append", "append", "rollback", "reset"]), label="op")
    if op == "append":
      t = data.draw(st.integers(1, min(p.capacity for p in policy.segments)), label="t")
      seg = np.array(data.draw(st.lists(st.integers(-1, tracks - 1), min_size=b * t, max_size=b * t), label="seg"))
      seg = seg.reshape(b, t).astype(np.int32)
      for r in range(b):  # a Dense track must not overflow
        for m, sub in enumerate(policy.segments):
          if isinstance(sub, C.Dense):
            room = sub.max_len - sum(1 for tm, _ in hist[r] if tm == m)
            seg[r, np.cumsum(seg[r] == m) > room] = -1
      values = np.arange(b * t, dtype=np.float32).reshape(b, t) + next_value
      next_value += b * t
      x = jnp.asarray(values)[None, :, :, None, None]
      cache = append(cache, x, x, segment_ids=jnp.asarray(seg))
      for r in range(b):
        hist[r].extend((int(m), float(v)) for m, v in zip(seg[r], values[r]) if m >= 0)
    elif op == "rollback":
      n = np.array([data.draw(st.integers(0, min(policy.max_rollback, len(h))), label="n") for h in hist], np.int32)
      cache = rollback(cache, jnp.asarray(n))
      for r in range(b):
        del hist[r][len(hist[r]) - n[r] :]
    else:
      rows = np.array(data.draw(st.lists(st.booleans(), min_size=b, max_size=b), label="rows"))
      cache = reset(cache, jnp.asarray(rows))
      for r in range(b):
        if rows[r]:
          hist[r] = []
    vis = np.asarray(C.visible(cache))
    idx, k = np.asarray(cache.idx), np.asarray(cache.k)[0, :, 0, :, 0]
    for r in range(b):
      assert int(cache.next_pos[r]) == len(hist[r])
      for m, (sub, tl) in enumerate(zip(policy.segments, lay)):
        mine = [v for tm, v in hist[r] if tm == m]
        assert int(cache.count[r, m]) == len(mine)
        got = {
          int(i): float(x)
          for i, x, s in zip(idx[r, tl.base : tl.hi], k[r, tl.base : tl.hi], vis[r, tl.base : tl.hi])
          if s
        }
        assert got == _expected(sub, mine), (m, hist[r])
      assert idx[r, -1] == -1  # the trash slot is never valid


@pytest.mark.parametrize("policy", [C.SinkWindow(2, 4, max_rollback=3), C.Window(4, max_rollback=3)], ids=str)
def test_rollback_after_wrap_restores_exactly(policy):
  full = _empty(policy, 1)
  vals = np.arange(1, 21, dtype=np.float32)[None]
  full = _append(full, vals[:, :7])
  full = _append(full, vals[:, 7:13])
  back = C.rollback(full, 3)
  fresh = _append(_append(_empty(policy, 1), vals[:, :7]), vals[:, 7:10])
  assert _visible_contents(back, 0) == _visible_contents(fresh, 0)
  # and streaming on from there agrees too
  a, b = _append(back, vals[:, 13:16]), _append(fresh, vals[:, 13:16])
  assert _visible_contents(a, 0) == _visible_contents(b, 0)


def test_rollback_never_goes_past_the_start_of_a_row():
  cache = _append(_empty(C.Window(4)), [[1.0, 2.0], [3.0, 4.0]])
  back = C.rollback(cache, jnp.array([5, 1], jnp.int32))  # row 0 holds 2 tokens only
  assert np.asarray(back.next_pos).tolist() == [0, 1] and np.asarray(back.count)[:, 0].tolist() == [0, 1]
  again = _append(back, [[5.0], [6.0]])
  assert _visible_contents(again, 0) == {0: 5.0} and _visible_contents(again, 1) == {0: 3.0, 1: 6.0}


def test_rows_are_independent_and_reset_zeroes():
  policy = C.SinkWindow(1, 3)
  cache = _append(_empty(policy, 2), [[1, 2, 3], [4, 5, 6]])
  cache = C.reset(cache, jnp.array([False, True]), start_position=100)
  assert int(cache.next_pos[1]) == 100 and int(cache.next_pos[0]) == 3
  assert np.all(np.asarray(cache.k)[:, 1] == 0) and np.all(np.asarray(cache.v)[:, 1] == 0)
  cache = _append(cache, [[7, 8], [9, 10]])
  assert _visible_contents(cache, 0) == {0: 1.0, 3: 7.0, 4: 8.0}
  assert _visible_contents(cache, 1) == {0: 9.0, 1: 10.0}
  assert np.asarray(cache.pos)[1][np.asarray(cache.idx)[1] == 1][0] == 101


def test_stacked_and_per_layer_layouts_agree():
  policy = C.SinkWindow(1, 3)
  a = _append(_empty(policy, 1, stacked=True), [[1, 2, 3, 4]])
  b = _append(_empty(policy, 1, stacked=False), [[1, 2, 3, 4]])
  np.testing.assert_array_equal(a.k[0], b.k[0])
  np.testing.assert_array_equal(a.v[0], b.v[0])
  assert not b.stacked and b.num_layers == 1 and b.layer_shape == a.layer_shape


def test_segmented_tracks_keep_their_own_windows():
  policy = C.Segmented((C.SinkWindow(1, 2), C.Window(3)))
  cache = _empty(policy, 1)
  x = jnp.arange(1, 11, dtype=jnp.float32)[None, None, :, None, None]
  seg = jnp.array([[0, 1, 1, 0, 1, 1, 0, 0, 1, 1]], jnp.int32)
  cache = C.append(cache, x[:, :, :5], x[:, :, :5], segment_ids=seg[:, :5])
  cache = C.append(cache, x[:, :, 5:], x[:, :, 5:], segment_ids=seg[:, 5:])
  assert np.asarray(cache.count).tolist() == [[4, 6]]
  idx, k = np.asarray(cache.idx)[0], np.asarray(cache.k)[0, 0, 0, :, 0]
  track0 = {int(i): float(v) for i, v in zip(idx[:3], k[:3]) if i >= 0}
  track1 = {int(i): float(v) for i, v in zip(idx[3:6], k[3:6]) if i >= 0}
  assert track0 == {0: 1.0, 2: 7.0, 3: 8.0}  # sink, then the last two of segment 0
  assert track1 == {3: 6.0, 4: 9.0, 5: 10.0}  # the last three of segment 1
  vis = np.asarray(C.visible(cache))[0]
  assert vis[:3].sum() == 2 and vis[3:6].sum() == 2  # next token of each track: itself + window-1


def test_rebase_keeps_windows_and_shifts_indices(monkeypatch):
  monkeypatch.setattr(planner, "REBASE_AT", 16)
  monkeypatch.setattr(planner, "REBASE_SHIFT", 8)
  policy = C.SinkWindow(2, 3, positions="cache_relative")
  cache = _empty(policy, 1)
  vals = np.arange(1, 41, dtype=np.float32)[None]
  for i in range(0, 40, 4):
    cache = _append(cache, vals[:, i : i + 4])
    contents = _visible_contents(cache, 0)
    assert sorted(contents.values()) == [1.0, 2.0, *vals[0, i + 2 : i + 4].tolist()]
    assert int(cache.count[0, 0]) < 16 + 4
  assert int(cache.count[0, 0]) < 40  # it was shifted down


def test_policy_validation():
  with pytest.raises(ValueError, match="window"):
    C.Window(0)
  with pytest.raises(ValueError, match="must be >= num_sinks"):
    C.SinkWindow(num_sinks=8, window=4)
  with pytest.raises(ValueError, match="num_sinks"):
    C.SinkWindow(num_sinks=-1, window=4)
  with pytest.raises(ValueError, match="max_len"):
    C.Dense(0)
  with pytest.raises(ValueError, match="positions must be one of"):
    C.Window(4, positions="relative")
  with pytest.raises(TypeError, match="Segmented segments"):
    C.Segmented((C.Recompute(4),))
  with library_checks_only(), pytest.raises(TypeError, match="expected a cache policy"):
    C.init("dense", num_layers=1, batch_size=1, num_kv_heads=1, head_dim=2)
  with pytest.raises(TypeError, match="floating"):
    C.init(C.Dense(4), num_layers=1, batch_size=1, num_kv_heads=1, head_dim=2, dtype=jnp.int32)
  with pytest.raises(ValueError, match="start_position"):
    C.init(C.Dense(4), num_layers=1, batch_size=1, num_kv_heads=1, head_dim=2, start_position=-3)
  cache = _empty(C.Window(4))
  with pytest.raises(ValueError, match="longer than the cache capacity"):
    _append(cache, np.zeros((2, 5)))
  with pytest.raises(ValueError, match="rollback count"):
    C.rollback(cache, -1)
  assert hash(C.SinkWindow(4, 1024)) == hash(C.SinkWindow(4, 1024))  # static under jit


@pytest.mark.parametrize("b,t", [(3, 1), (10, 1), (3, 4)])  # per-row dynamic_update_slice / scatter / scatter
@pytest.mark.parametrize("stacked", [True, False])
def test_write_paths_put_each_row_where_numpy_does(b, t, stacked):
  rng = np.random.default_rng(b * 10 + t)
  layers, kvh, s, h = 2, 2, 7, 3
  k = rng.normal(size=(layers, b, kvh, s, h)).astype(np.float32)
  v = rng.normal(size=(layers, b, kvh, h, s)).astype(np.float32)
  slots = np.stack([rng.permutation(s)[:t] for _ in range(b)]).astype(np.int32)
  upd = rng.normal(size=(b, t, kvh, h)).astype(np.float32)
  kb = jnp.asarray(k) if stacked else tuple(jnp.asarray(x) for x in k)
  vb = jnp.asarray(v) if stacked else tuple(jnp.asarray(x) for x in v)
  kb = C.write(kb, 1, jnp.asarray(slots), jnp.asarray(upd))
  vb = C.write(vb, 1, jnp.asarray(slots), jnp.asarray(upd), slots_last=True)
  for r in range(b):
    for i in range(t):
      k[1, r, :, slots[r, i], :] = upd[r, i]
      v[1, r, :, :, slots[r, i]] = upd[r, i]
  np.testing.assert_array_equal(np.stack(kb) if not stacked else kb, k)
  np.testing.assert_array_equal(np.stack(vb) if not stacked else vb, v)
