"""jstream.data.cartpole: CartPole-v1 episodes from gymnasium's simulator, their replay, and clip pipelines.

A small config is built into a temporary data dir; the replay checks step gymnasium here, independently of the
module's own stepping.
"""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest

from jstream import data as D
from jstream.data import cartpole as C

T = 12  # Frames per episode in the test config.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def cfg() -> C.CartPoleConfig:
  return D.cartpole_config(episode_frames=T, num_train=6, num_test=3)


@pytest.fixture(scope="module")
def builder(cfg, data_dir) -> C.JstreamCartPole:
  return D.cartpole_builder(cfg, data_dir)


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return sorted((source[i] for i in range(len(source))), key=lambda r: r["index"])


def _take(it, n):
  return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
  )


def _cart_column(frames: np.ndarray) -> np.ndarray:
  """The horizontal centre of mass of the cart: the bottom quarter of each frame (cart and track), less each row's
  minimum (the track is a uniform line)."""
  bottom = frames[..., 3 * frames.shape[-2] // 4 :, :].astype(np.float64)
  ink = bottom - bottom.min(axis=-1, keepdims=True)
  cols = np.arange(frames.shape[-1])
  return (ink.sum(axis=-2) * cols).sum(-1) / ink.sum(axis=(-2, -1))


# ----------------------------------------------------------------------------------------------------------------
# Episodes.


def test_builder_records_shapes_dtypes_ranges(builder, cfg):
  for split, count in (("train", 6), ("test", 3)):
    records = _records(builder, split)
    assert [int(r["index"]) for r in records] == list(range(count))
    for r in records:
      frames, actions, states = r["frames"], r["actions"], r["states"]
      assert frames.shape == (T, 32, 64) and frames.dtype == np.uint8
      assert actions.shape == (T,) and actions.dtype == np.int32
      assert states.shape == (T, 4) and states.dtype == np.float32
      assert actions[0] == 0 and set(actions[1:].tolist()) <= {1, 2}  # 0 = none only at the reset frame.
      assert np.abs(states[:, 0]).max() < 2.4 and np.abs(states[:, 2]).max() < 12 * np.pi / 180  # Never terminated.
      assert int(r["reset_seed"]) % 2 == C.SPLITS.index(split)
      for f in frames:  # Black background; a bright cart; a visible pole above it.
        assert np.median(f) == 0 and f.max() == 255
        assert f[: 3 * f.shape[0] // 4].max() >= 50
    episode = D.make_episode(cfg, split, count - 1)
    for key in ("frames", "actions", "states", "reset_seed"):
      np.testing.assert_array_equal(records[-1][key], episode[key])


def test_episodes_are_deterministic_and_splits_disjoint(builder, cfg):
  a = D.make_episode(cfg, "train", 2)
  b = D.make_episode(cfg, "train", 2)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  other_seed = D.cartpole_config(episode_frames=T, num_train=6, num_test=3, seed=1)
  for other in (
    D.make_episode(cfg, "train", 3),
    D.make_episode(cfg, "test", 2),
    D.make_episode(other_seed, "train", 2),
  ):
    assert other["reset_seed"] != a["reset_seed"] and not np.array_equal(other["states"], a["states"])
  seeds = {split: {int(r["reset_seed"]) for r in _records(builder, split)} for split in C.SPLITS}
  assert len(seeds["train"]) == 6 and len(seeds["test"]) == 3 and not seeds["train"] & seeds["test"]


def test_stored_episodes_replay_in_gymnasium(builder, cfg):
  """Stepping gymnasium here from the stored reset seed with the stored actions gives the stored states and, once
  rendered and downsampled, the stored frames; the render's ink lies inside the kept band; ``simulate_cartpole``
  agrees."""
  env = gym.make("CartPole-v1", render_mode="rgb_array")
  for split in C.SPLITS:
    for r in _records(builder, split)[:2]:
      obs, _ = env.reset(seed=int(r["reset_seed"]))
      renders = [env.render()]
      np.testing.assert_array_equal(obs, r["states"][0])
      for i in range(1, T):
        obs, _, terminated, truncated, _ = env.step(int(r["actions"][i]) - 1)
        assert not terminated and not truncated
        np.testing.assert_array_equal(obs, r["states"][i])
        renders.append(env.render())
      for rgb, frame in zip(renders, r["frames"]):
        assert (rgb[: C.BAND[0]] == 255).all() and (rgb[C.BAND[1] :] == 255).all()
        np.testing.assert_array_equal(C.to_frame(rgb, cfg.frame_size), frame)
      frames, states = D.simulate_cartpole(cfg, r["reset_seed"], r["actions"], with_states=True)
      np.testing.assert_array_equal(frames, r["frames"])
      np.testing.assert_array_equal(states, r["states"])
  env.close()


def test_action_i_leads_to_frame_i(cfg):
  """Changing ``actions[k]`` leaves frames and states before ``k`` alone and changes state ``k``; ``actions[0]`` is
  ignored."""
  episode = D.make_episode(cfg, "train", 0)
  actions, seed = episode["actions"], int(episode["reset_seed"])
  k = 5
  flipped = actions.copy()
  flipped[k] = 3 - flipped[k]
  frames, states = D.simulate_cartpole(cfg, seed, flipped, with_states=True)
  np.testing.assert_array_equal(states[:k], episode["states"][:k])
  np.testing.assert_array_equal(frames[:k], episode["frames"][:k])
  assert not np.array_equal(states[k], episode["states"][k])
  first = actions.copy()
  first[0] = 2
  np.testing.assert_array_equal(D.simulate_cartpole(cfg, seed, first), episode["frames"])


def test_frames_respond_to_actions(cfg):
  """After a run of right pushes the cart is rendered right of where it started, after left pushes left of it."""
  seed = int(D.make_episode(cfg, "test", 1)["reset_seed"])
  right = D.simulate_cartpole(cfg, seed, [0] + [2] * 15)
  left = D.simulate_cartpole(cfg, seed, [0] + [1] * 15)
  start = _cart_column(right[0])
  assert _cart_column(right[-1]) > start + 3 and _cart_column(left[-1]) < start - 3
  assert np.all(np.diff(_cart_column(right[3:])) > 0) and np.all(np.diff(_cart_column(left[3:])) < 0)


def test_simulate_from_a_state_and_past_termination(cfg):
  episode = D.make_episode(cfg, "train", 1)
  env = gym.make("CartPole-v1")
  env.reset(seed=int(episode["reset_seed"]))
  state = np.array(env.unwrapped.state, np.float64)
  env.close()
  np.testing.assert_array_equal(D.simulate_cartpole(cfg, state, episode["actions"]), episode["frames"])
  # Far past the end of an episode: the pole falls, the cart leaves the screen; no warning, no stop.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    frames, states = D.simulate_cartpole(cfg, state, [0] + [2] * 150, with_states=True)
  assert not [w for w in caught if "terminated" in str(w.message)]
  assert frames.shape == (151, 32, 64) and states.shape == (151, 4)
  assert abs(states[-1, 2]) > np.pi / 2 and states[-1, 0] > 3.0
  assert (frames[-1] == frames[-1][:, :1]).all() and frames[-1].max() > 0  # Only the track is left.


def test_retries_are_deterministic_valid_episodes():
  """A noisy config needs retries: the stored episode is the first attempt that survives, a valid trajectory."""
  noisy = D.cartpole_config(episode_frames=40, epsilon=1.0, num_train=1, num_test=1)
  episode = D.make_episode(noisy, "train", 0)
  assert episode["attempts"] > 1
  with C._simulator(noisy.frame_size) as sim:
    for a in range(episode["attempts"] - 1):
      assert C._attempt(noisy, 0, 0, a, sim) is None
    last = C._attempt(noisy, 0, 0, episode["attempts"] - 1, sim)
  assert all(np.array_equal(last[k], episode[k]) for k in ("frames", "actions", "states", "reset_seed"))
  np.testing.assert_array_equal(
    D.simulate_cartpole(noisy, episode["reset_seed"], episode["actions"]), episode["frames"]
  )


# ----------------------------------------------------------------------------------------------------------------
# Pipelines.


def test_dataset_clips_are_windows_of_episodes(builder, cfg, data_dir):
  kw = dict(batch_size=4, clip_frames=5, config=cfg, data_dir=data_dir)
  a = _take(iter(D.cartpole_dataset(seed=0, **kw)), 3)
  assert _same(a, _take(iter(D.cartpole_dataset(seed=0, **kw)), 3))
  assert not _same(a, _take(iter(D.cartpole_dataset(seed=1, **kw)), 3))
  assert set(a[0]) == {"frames", "actions"}
  assert a[0]["frames"].shape == (4, 5, 32, 64) and a[0]["frames"].dtype == np.uint8
  assert a[0]["actions"].shape == (4, 5) and a[0]["actions"].dtype == np.int32
  records = {split: _records(builder, split) for split in C.SPLITS}
  starts = set()
  for split in C.SPLITS:
    for batch in _take(iter(D.cartpole_dataset(split, seed=3, with_metadata=True, **kw)), 4):
      for j in range(4):
        r, s = records[split][int(batch["index"][j])], int(batch["start"][j])
        starts.add(s)
        assert batch["reset_seed"][j] == r["reset_seed"]
        for key in ("frames", "actions", "states"):
          np.testing.assert_array_equal(batch[key][j], r[key][s : s + 5])
        assert (batch["actions"][j, 0] == 0) == (s == 0) and (batch["actions"][j, 1:] > 0).all()
  assert len(starts) > 3
  f = next(iter(D.cartpole_dataset(seed=0, dtype=np.float32, **kw)))["frames"]
  assert f.dtype == np.float32 and 0.0 <= f.min() and f.max() <= 1.0
  np.testing.assert_allclose(f, a[0]["frames"] / 255.0, atol=1e-6)
  ordered = list(D.cartpole_dataset(shuffle=False, num_epochs=1, with_metadata=True, **{**kw, "batch_size": 3}))
  assert [b["index"].tolist() for b in ordered] == [[0, 1, 2], [3, 4, 5]]
  whole = next(iter(D.cartpole_dataset(shuffle=False, **{**kw, "clip_frames": T})))
  np.testing.assert_array_equal(whole["frames"][1], records["train"][1]["frames"])


def test_dataset_resumes_exactly(builder, cfg, data_dir):
  ds = D.cartpole_dataset(batch_size=4, clip_frames=6, seed=2, config=cfg, data_dir=data_dir)
  it = iter(ds)
  _take(it, 5)  # Past the first epochs (6 episodes).
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  resumed = iter(ds)
  resumed.set_state(state)
  assert _same(expected, _take(resumed, 3))


# ----------------------------------------------------------------------------------------------------------------
# Errors and names.


def test_config_names_and_errors(cfg, data_dir):
  assert D.cartpole_config(episode_frames=T, num_train=6, num_test=3).name == cfg.name
  assert D.cartpole_config(episode_frames=T, num_train=6, num_test=3, epsilon=0.2).name != cfg.name
  assert D.cartpole_config(frame_size=48).frame_size == (48, 48)
  bad = {
    "frame_size": [
      dict(frame_size=(0, 64)),
      dict(frame_size=(32, -1)),
      dict(frame_size=(161, 64)),
      dict(frame_size=601),
    ],
    "episode_frames": [dict(episode_frames=1)],
    "num_train and num_test": [dict(num_train=0), dict(num_test=0)],
    "epsilon": [dict(epsilon=-0.1), dict(epsilon=1.5)],
    "max_speed": [dict(max_speed=-1.0)],
    "seed": [dict(seed=-1), dict(seed=2**32)],
  }
  for message, kwargs in bad.items():
    for kw in kwargs:
      with pytest.raises(ValueError, match=message):
        D.cartpole_config(**kw)
  kw = dict(batch_size=2, config=cfg, data_dir=data_dir)
  for clip in (0, T + 1):
    with pytest.raises(ValueError, match="clip_frames"):
      D.cartpole_dataset(clip_frames=clip, **kw)
  with pytest.raises(ValueError, match="dtype"):
    D.cartpole_dataset(clip_frames=2, dtype=np.int32, **kw)
  with pytest.raises(ValueError, match="unknown split"):
    D.cartpole_dataset("validation", clip_frames=2, **kw)
  with pytest.raises(ValueError, match="unknown split"):
    D.make_episode(cfg, "validation", 0)
  for actions in ([0, 1, 0], [0, 3], [[0, 1]], [], [0.0, 1.0]):
    with pytest.raises(ValueError, match="actions"):
      D.simulate_cartpole(cfg, 0, np.asarray(actions))
  with pytest.raises(ValueError, match="CartPole render"):
    C.to_frame(np.zeros((32, 64, 3), np.uint8), (32, 64))


def test_exhausted_retries_raise(monkeypatch):
  monkeypatch.setattr(C, "MAX_ATTEMPTS", 2)
  with pytest.raises(RuntimeError, match="all 2 attempts"):
    D.make_episode(D.cartpole_config(episode_frames=300, epsilon=1.0), "train", 0)
