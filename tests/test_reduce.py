"""Token reduction before the cache (jstream.reduce) against plain NumPy models of each rule, on random tokens."""

import math

import numpy as np
import pytest

from jstream import reduce as R


def np_cos(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na < 1e-6 and nb < 1e-6:
    return 1.0
  if na < 1e-6 or nb < 1e-6:
    return 0.0
  return float(a @ b / (na * nb))


def drifting_tokens(b, n, p, d, seed):
  """Frames whose places either repeat the previous frame with a little noise, drift, or change completely."""
  rng = np.random.default_rng(seed)
  x = np.zeros((b, n, p, d), np.float32)
  x[:, 0] = rng.normal(size=(b, p, d))
  for f in range(1, n):
    kind = rng.integers(3, size=(b, p, 1))
    noise = rng.normal(size=(b, p, d))
    x[:, f] = np.where(kind == 0, x[:, f - 1] + 0.05 * noise, np.where(kind == 1, x[:, f - 1] + 0.3 * noise, noise))
  return x


def np_drop(tokens, threshold=None, keep_ratio=None, reference="previous"):
  b, n, p, _ = tokens.shape
  keep = np.zeros((b, n, p), bool)
  for r in range(b):
    ref = None
    for f in range(n):
      cur = tokens[r, f]
      if ref is None:
        keep[r, f], ref = True, cur.copy()
        continue
      sim = np.array([np_cos(cur[i], ref[i]) for i in range(p)])
      if threshold is not None:
        kf = sim <= threshold
      else:
        kk = max(1, math.ceil(keep_ratio * p))
        chosen = sorted(range(p), key=lambda i: (sim[i], i))[:kk]
        kf = np.isin(np.arange(p), chosen)
      keep[r, f] = kf
      ref = cur.copy() if reference == "previous" else np.where(kf[:, None], cur, ref)
  return keep


@pytest.mark.parametrize("reference", ["previous", "kept"])
@pytest.mark.parametrize("rule", [{"threshold": 0.9}, {"keep_ratio": 0.4}])
def test_differential_drop_equals_a_numpy_model(rule, reference):
  tokens = drifting_tokens(3, 12, 10, 8, seed=1)
  got, _ = R.differential_drop(tokens, R.init_drop_state(3, 10, 8), reference=reference, **rule)
  want = np_drop(tokens, reference=reference, **rule)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert want[:, 0].all() and 0.2 < want[:, 1:].mean() < 0.8  # the first frame keeps all; later ones drop some
  if "keep_ratio" in rule:
    assert (want[:, 1:].sum(-1) == 4).all()


def test_the_kept_reference_catches_slow_drift_the_previous_frame_misses():
  """A place that drifts a little every frame: against the previous frame it is always similar (dropped after the
  first frame); against the last kept token it is kept again once the drift adds up."""
  rng = np.random.default_rng(2)
  x = np.zeros((1, 30, 1, 16), np.float32)
  x[0, 0, 0] = rng.normal(size=16)
  for f in range(1, 30):
    x[0, f, 0] = x[0, f - 1, 0] + 0.12 * rng.normal(size=16)
  prev, _ = R.differential_drop(x, R.init_drop_state(1, 1, 16), threshold=0.95)
  kept, _ = R.differential_drop(x, R.init_drop_state(1, 1, 16), threshold=0.95, reference="kept")
  assert np.asarray(prev)[0, :, 0].sum() == 1
  assert np.asarray(kept)[0, 1:, 0].sum() >= 2
  np.testing.assert_array_equal(np.asarray(kept), np_drop(x, threshold=0.95, reference="kept"))


@pytest.mark.parametrize("reference", ["previous", "kept"])
def test_differential_drop_in_chunks_equals_one_call_and_resets_start_over(reference):
  tokens = drifting_tokens(2, 11, 6, 4, seed=3)
  whole, _ = R.differential_drop(tokens, R.init_drop_state(2, 6, 4), threshold=0.9, reference=reference)
  state, parts = R.init_drop_state(2, 6, 4), []
  for a, z in ((0, 1), (1, 5), (5, 11)):
    keep, state = R.differential_drop(tokens[:, a:z], state, threshold=0.9, reference=reference)
    parts.append(np.asarray(keep))
    if z == 5:
      at5 = state
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), np.asarray(whole))
  state = R.reset_drop_state(at5, np.array([True, False]))
  keep, _ = R.differential_drop(tokens[:, 5:], state, threshold=0.9, reference=reference)
  np.testing.assert_array_equal(np.asarray(keep)[0], np_drop(tokens[:1, 5:], threshold=0.9, reference=reference)[0])
  np.testing.assert_array_equal(np.asarray(keep)[1], np.asarray(whole)[1, 5:])  # the other row goes on


def test_blank_patches_count_as_identical():
  sims = np.asarray(R.cosine_similarity(np.zeros((3, 4)), np.array([[0.0] * 4, [1.0, 0, 0, 0], [0.0] * 4])))
  np.testing.assert_array_equal(sims, [1.0, 0.0, 1.0])
  frames = np.zeros((1, 3, 2, 4), np.float32)
  frames[0, 2, 1] = 1.0  # something appears at place 1 of the last frame
  keep, _ = R.differential_drop(frames, R.init_drop_state(1, 2, 4), threshold=0.9)
  np.testing.assert_array_equal(np.asarray(keep)[0], [[True, True], [False, False], [False, True]])


def test_temporal_merge_equals_a_numpy_model():
  tokens = drifting_tokens(2, 12, 5, 6, seed=4)
  merged, keep = R.temporal_merge(tokens, window=4, threshold=0.9)
  want_tokens, want_keep = tokens.copy(), np.ones((2, 12, 5), bool)
  for r in range(2):
    for w0 in range(0, 12, 4):
      for i in range(5):
        pivot, group = tokens[r, w0, i], [tokens[r, w0, i]]
        for f in range(w0 + 1, w0 + 4):
          if np_cos(tokens[r, f, i], pivot) > 0.9:
            want_keep[r, f, i] = False
            group.append(tokens[r, f, i])
        want_tokens[r, w0, i] = np.mean(group, axis=0)
  np.testing.assert_array_equal(np.asarray(keep), want_keep)
  assert 0.1 < 1 - want_keep.mean() < 0.6
  np.testing.assert_allclose(np.asarray(merged), want_tokens, rtol=1e-5, atol=1e-6)


def np_inverse_transform(scores, k, power, valid):
  out = []
  for s, v in zip(scores, valid):
    frames = np.flatnonzero(v)
    x = s[frames].astype(np.float64)
    span = x.max() - x.min()
    w = ((x - x.min()) / span) ** power if span > 0 else np.ones_like(x)
    if w.sum() == 0:
      w = np.ones_like(x)
    cdf = np.cumsum(w) / w.sum()
    picks = [int(np.argmax(cdf >= (j + 0.5) / k - 1e-7)) for j in range(k)]
    for j in range(1, k):  # coinciding picks move to the next free frame ...
      picks[j] = max(picks[j], picks[j - 1] + 1)
    for j in range(k):  # ... and back from the end
      picks[j] = min(picks[j], len(frames) - k + j)
    out.append(frames[picks])
  return np.array(out)


def test_inverse_transform_sampling_equals_a_numpy_model_and_picks_distinct_frames():
  rng = np.random.default_rng(5)
  scores = rng.normal(size=(4, 40)).astype(np.float32)
  scores[1, 10:14] += 6.0  # one row with a sharp peak: picks crowd there, then spread to distinct frames
  valid = np.ones((4, 40), bool)
  valid[2, 30:] = False  # a shorter clip
  for power in (1.0, 3.0):
    got = np.asarray(R.inverse_transform_sample(scores, 8, power=power, valid=valid))
    np.testing.assert_array_equal(got, np_inverse_transform(scores, 8, power, valid))
    assert (np.diff(got, axis=1) > 0).all() and got[2].max() < 30
  peaked = np.asarray(R.inverse_transform_sample(scores, 8, power=3.0))[1]
  assert np.sum((peaked >= 8) & (peaked < 18)) >= 5
  even = np.asarray(R.inverse_transform_sample(np.ones((1, 40), np.float32), 8))
  np.testing.assert_array_equal(even[0], np.arange(8) * 5 + 2)


def test_bad_input_is_a_clear_error():
  tokens = drifting_tokens(1, 2, 3, 4, seed=6)
  state = R.init_drop_state(1, 3, 4)
  with pytest.raises(ValueError, match="exactly one"):
    R.differential_drop(tokens, state)
  with pytest.raises(ValueError, match="exactly one"):
    R.differential_drop(tokens, state, threshold=0.5, keep_ratio=0.5)
  with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
    R.differential_drop(tokens, state, keep_ratio=1.5)
  with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
    R.differential_drop(tokens, state, keep_ratio=0.0)
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    R.differential_drop(tokens, state, threshold=2.0)
  with pytest.raises(ValueError, match="reference"):
    R.differential_drop(tokens, state, threshold=0.5, reference="first")
  with pytest.raises(ValueError, match="state is for"):
    R.differential_drop(tokens, R.init_drop_state(1, 5, 4), threshold=0.5)
  with pytest.raises(ValueError, match="tokens_per_frame"):
    R.init_drop_state(1, 0, 4)
  with pytest.raises(ValueError, match="window must be"):
    R.temporal_merge(tokens, window=3, threshold=0.5)
  with pytest.raises(ValueError, match="k must be"):
    R.inverse_transform_sample(np.ones((1, 5), np.float32), 6)
  with pytest.raises(ValueError, match="valid frames"):
    R.inverse_transform_sample(np.ones((1, 5), np.float32), 3, valid=np.array([[True, True, False, False, False]]))
  with pytest.raises(ValueError, match="power"):
    R.inverse_transform_sample(np.ones((1, 5), np.float32), 2, power=0.0)
