"""CartPole videos from gymnasium's real simulator and renderer, with the actions that drove them: a TFDS builder,
a replay function and grain pipelines of action-conditioned clips.

Conventions
  * **Simulator.** gymnasium's ``CartPole-v1`` (``gym.make("CartPole-v1", render_mode="rgb_array")``), stepped and
    rendered through ``env.unwrapped`` (no time limit, no order or passive checkers): its equations of motion
    (Euler, ``tau = 0.02`` s per step, force +-10 N) and its pygame renderer (600x400 RGB; SDL's ``dummy`` video
    driver is selected unless ``SDL_VIDEODRIVER`` is already set). Nothing is downloaded.
  * **Frames** are grey uint8 ``[T, H, W]`` with a **black background**: 0 = empty, bright = cart, pole and track
    (models like a zero background). A render is cut to rows ``BAND = (160, 320)`` of its 400 (all 600 columns),
    turned to grey as ``ink = 255 - min(R, G, B)`` (white background 0, black cart and track 255, the brown pole
    154, the blue axle 126; the pole stays bright where a luminance grey would make it 94) and resized to
    ``frame_size`` by area averaging (``_area_matrix``: each output pixel is the mean of the input area it covers,
    in float64, rounded to nearest). The renderer draws the track at row 299, the cart over rows 284-314, the axle
    at row 291 and the pole (120 px from the axle, 10 px wide) up to row 171 when upright: the band holds the
    whole scene for any pole angle up to horizontal (episodes stay within the +-12 degrees where CartPole-v1
    terminates) and any cart position the screen shows (``|x| <= 2.4`` m is the full width; the cart is 50 px).
    At the default ``(32, 64)`` a band pixel is 5 rows x 9.4 columns: the picture is squeezed horizontally by
    1.9x, the cart is about 5x6 pixels, the pole a 1-2 pixel wide line of 24 rows, the track a faint line.
  * **Actions.** ``actions[i]`` (int32) is the action that led to frame ``i``: ``0`` = none (frame 0, the reset
    frame, only there), ``1`` = push left (gym action 0), ``2`` = push right (gym action 1). Frame ``i`` shows
    the state after ``i`` steps; ``states[i]`` (float32 ``[4]``: ``x``, ``x_dot``, ``theta``, ``theta_dot``) is
    that state, as gymnasium's observations give it.
  * **Controller.** A noisy balancing policy that travels: each episode draws a target speed ``v`` uniform in
    ``[-max_speed, max_speed]`` m/s (reversed whenever the cart is more than ``TURN_X = 1`` m from the centre and
    moving outward); the rule pushes right iff ``theta + 0.5 theta_dot + 0.2 (x_dot - v) > 0``. With probability
    ``epsilon`` a step takes a uniform random action instead (so about ``epsilon / 2`` of the steps disagree with
    the rule). Measured on the default config (550 episodes of 64 frames, ``epsilon = 0.3``, ``max_speed = 1``):
    the cart's range in an episode is a median 0.40 m (5 pixels of 64; 0.72 m, 10 pixels, at the 90th percentile),
    the pole's a median 7 degrees, and 25 of the 575 attempts (4%) fell and were retried (none more than twice).
  * **Episodes** have exactly ``episode_frames`` frames and never terminate: an attempt whose pole falls or cart
    leaves (CartPole-v1's termination) before its last frame is dropped and the next attempt runs, up to
    ``MAX_ATTEMPTS``, after which ``make_episode`` raises (lower ``epsilon``, ``max_speed`` or
    ``episode_frames``).
  * **Determinism.** Attempt ``a`` of episode ``index`` of ``split`` uses ``np.random.default_rng([seed,
    split_id, index, a])`` (``split_id``: train 0, test 1), which draws, in order: the gym reset seed
    ``2 k + split_id`` (``k`` uniform in ``[0, 2**62)``: train seeds are even, test seeds odd, so the splits never
    share an initial state), the target speed, then per step a uniform ``u`` (random action iff ``u < epsilon``)
    and, for a random action, the action. An episode is a pure function of ``(config, split, index)``;
    ``reset_seed`` is stored with it, so ``simulate_cartpole(config, reset_seed, actions)`` replays it exactly.
  * **Replay.** ``simulate_cartpole`` starts the real simulator from a reset seed (exact) or from an explicit
    state (set on ``env.unwrapped.state``; the stored float32 ``states`` are rounded, so replays from them are
    close, not exact) and renders the frames an action sequence leads to, for any horizon. It does not stop at
    termination: the equations of motion go on (the pole falls past horizontal and swings below the track, where
    the band cuts it off; a cart beyond about 2.6 m leaves the picture, leaving only the track), and gymnasium's
    warning about stepping a terminated environment is suppressed.
  * **Builder.** ``JstreamCartPole`` (TFDS name ``jstream_cart_pole``), array_record, features ``frames``,
    ``actions``, ``states``, ``reset_seed`` (int64) and ``index``; config name = the main sizes plus a hash of
    every field. Data dir as for every local dataset (``jstream.data.base``). Building costs about 6 ms a frame
    (most of it gymnasium's own render, which copies a 600x400 RGB array): the default config (500 train / 50
    test episodes of 64 frames) built in 3.7 minutes on a busy 2-core CPU machine, once.
  * **Pipelines.** ``cartpole_dataset`` yields ``{"frames": [b, clip_frames, H, W], "actions": int32 [b,
    clip_frames]}``: windows of ``clip_frames`` consecutive frames, starting uniformly at random in an episode
    (the first action of a window that starts after frame 0 is the real action that led to its first frame).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds

from jstream.data.base import LocalBuilder, LocalConfig, check_params, check_split, finish_pipeline, index_feature

SPLITS = ("train", "test")
ENV_ID = "CartPole-v1"
SCREEN = (400, 600)  # (height, width) of gymnasium's CartPole render.
BAND = (160, 320)  # Rows of the render kept: the pole's tip (row 171 upright) to below the cart (row 314).
MAX_ATTEMPTS = 100  # Attempts per episode before make_episode gives up.
TURN_X = 1.0  # The controller turns back beyond this distance from the centre (m).
GAIN_THETA_DOT, GAIN_SPEED = 0.5, 0.2  # Push right iff theta + 0.5 theta_dot + 0.2 (x_dot - v) > 0.
NONE, LEFT, RIGHT = 0, 1, 2  # Stored action ids; a gym action is (id - 1).

_TERMINATED_WARNING = ".*already returned terminated = True.*"


@dataclasses.dataclass(eq=False)
class CartPoleConfig(LocalConfig):
  """A CartPole video dataset (a TFDS builder config); make one with ``cartpole_config``, which names it.

  Attributes:
    frame_size: ``(H, W)`` of a frame.
    episode_frames: frames per episode (``T``).
    num_train: episodes in the train split.
    num_test: episodes in the test split.
    epsilon: probability that a step's action is uniform random instead of the controller's.
    max_speed: the largest target speed of the controller (m/s).
    seed: base seed of the episode generator.
  """

  frame_size: tuple[int, int] = (32, 64)
  episode_frames: int = 64
  num_train: int = 500
  num_test: int = 50
  epsilon: float = 0.3
  max_speed: float = 1.0
  seed: int = 0


def cartpole_config(
  *,
  frame_size: int | tuple[int, int] = (32, 64),
  episode_frames: int = 64,
  num_train: int = 500,
  num_test: int = 50,
  epsilon: float = 0.3,
  max_speed: float = 1.0,
  seed: int = 0,
) -> CartPoleConfig:
  """Checks and names a CartPole video config.

  Args:
    frame_size: ``H`` (square frames) or ``(H, W)``, with ``1 <= H <= 160`` and ``1 <= W <= 600`` (the band of
      the render that is kept; frames are never upsampled).
    episode_frames: frames per episode (>= 2: the reset frame and at least one step).
    num_train: episodes in the train split (>= 1).
    num_test: episodes in the test split (>= 1).
    epsilon: probability of a uniform random action at each step, in [0, 1].
    max_speed: largest target speed of the controller in m/s (>= 0).
    seed: base seed in [0, 2**32).

  Returns:
    A ``CartPoleConfig`` whose name encodes its parameters.

  Raises:
    ValueError: a parameter is out of range.
  """
  h, w = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
  band_h, band_w = BAND[1] - BAND[0], SCREEN[1]
  checks = {
    f"frame_size must be (H, W) with 1 <= H <= {band_h} and 1 <= W <= {band_w}": 1 <= h <= band_h and 1 <= w <= band_w,
    "episode_frames must be >= 2": episode_frames >= 2,
    "num_train and num_test must be >= 1": min(num_train, num_test) >= 1,
    "epsilon must be in [0, 1]": 0.0 <= epsilon <= 1.0,
    "max_speed must be >= 0": max_speed >= 0.0,
    "seed must be in [0, 2**32)": 0 <= seed < 2**32,
  }
  check_params(
    checks,
    frame_size=(h, w),
    episode_frames=episode_frames,
    num_train=num_train,
    num_test=num_test,
    epsilon=epsilon,
    max_speed=max_speed,
    seed=seed,
  )
  config = CartPoleConfig(
    name="pending",
    frame_size=(int(h), int(w)),
    episode_frames=int(episode_frames),
    num_train=int(num_train),
    num_test=int(num_test),
    epsilon=float(epsilon),
    max_speed=float(max_speed),
    seed=int(seed),
  )
  name = f"{h}x{w}_t{episode_frames}_{config.signature()}"
  return config.named(name, f"CartPole-v1 videos (gymnasium renderer): {config.params()}")


# ----------------------------------------------------------------------------------------------------------------
# Rendering and simulation.


@functools.lru_cache(maxsize=16)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` area-averaging weights: output pixel ``j`` is the mean of input ``[j s, (j + 1) s)``,
  ``s = n_in / n_out`` (fractional pixels at the edges weigh by their overlap); rows sum to 1."""
  step = n_in / n_out
  lo = np.arange(n_out)[:, None] * step
  i = np.arange(n_in)[None, :]
  overlap = np.clip(np.minimum(lo + step, i + 1) - np.maximum(lo, i), 0.0, None)
  m = overlap / step
  m.flags.writeable = False
  return m


def to_frame(rgb: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
  """A CartPole render (uint8 ``[400, 600, 3]``) as a frame: uint8 ``[H, W]``, the band ``BAND`` of rows, grey
  ``255 - min(R, G, B)`` (background 0), area-averaged to ``frame_size`` (see the module docstring)."""
  if rgb.shape != (*SCREEN, 3):
    raise ValueError(f"expected a CartPole render of shape {(*SCREEN, 3)}, got {rgb.shape}")
  band = rgb[BAND[0] : BAND[1]]
  ink = 255.0 - np.minimum(np.minimum(band[..., 0], band[..., 1]), band[..., 2]).astype(np.float64)  # [band_h, 600]
  h, w = frame_size
  rows = np.einsum("hi,iw->hw", _area_matrix(ink.shape[0], h), ink)
  small = np.einsum("hw,vw->hv", rows, _area_matrix(ink.shape[1], w))
  return np.clip(np.rint(small), 0, 255).astype(np.uint8)


class _Simulator:
  """gymnasium's CartPole-v1, unwrapped: reset from a seed or a state, step by gym action, render to frames."""

  def __init__(self, frame_size: tuple[int, int]):
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen, with no display.
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import gymnasium as gym  # Imported on first use: `import jstream.data` stays light.

    self._wrapped = gym.make(ENV_ID, render_mode="rgb_array")
    self.env = self._wrapped.unwrapped
    self.frame_size = frame_size

  def reset(self, start: int | np.integer | np.ndarray) -> None:
    """Resets with gym seed ``start`` (an int), or with the env seeded 0 and its state set to ``start`` ([4])."""
    if isinstance(start, int | np.integer):
      self.env.reset(seed=int(start))
    else:
      self.env.reset(seed=0)
      self.env.state = np.array(start, dtype=np.float64).reshape(4)

  @property
  def state(self) -> np.ndarray:
    return np.asarray(self.env.state, np.float64)

  def step(self, gym_action: int) -> bool:
    """Steps the physics once; returns whether CartPole-v1 counts the new state as terminated."""
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=_TERMINATED_WARNING)
      _, _, terminated, _, _ = self.env.step(int(gym_action))
    return bool(terminated)

  def frame(self) -> np.ndarray:
    return to_frame(self.env.render(), self.frame_size)

  def close(self) -> None:
    self._wrapped.close()


@contextlib.contextmanager
def _simulator(frame_size: tuple[int, int]) -> Iterator[_Simulator]:
  sim = _Simulator(frame_size)
  try:
    yield sim
  finally:
    sim.close()


def _check_actions(actions: Any) -> np.ndarray:
  actions = np.asarray(actions)
  if actions.ndim != 1 or len(actions) < 1 or not np.issubdtype(actions.dtype, np.integer):
    raise ValueError(f"actions must be a non-empty 1-D integer array, got shape {actions.shape} {actions.dtype}")
  if not np.isin(actions[1:], (LEFT, RIGHT)).all():
    raise ValueError(f"actions[1:] must be {LEFT} (push left) or {RIGHT} (push right), got {np.unique(actions[1:])}")
  return actions


def simulate_cartpole(
  config: CartPoleConfig, start: int | np.integer | np.ndarray, actions: Any, *, with_states: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Replays the real simulator under ``actions`` and renders the frames, for any horizon.

  Args:
    config: the dataset's config (only ``frame_size`` matters).
    start: a gym reset seed (int: an episode's ``reset_seed`` replays it exactly) or a state ``[4]``
      (``x, x_dot, theta, theta_dot``, set on ``env.unwrapped.state`` in float64).
    actions: int ``[T]``, the dataset's convention: ``actions[i]`` leads to frame ``i`` (``1`` left, ``2``
      right); ``actions[0]`` is ignored (frame 0 is the start state).
    with_states: also return the states.

  Returns:
    uint8 ``[T, H, W]`` frames (and float32 ``[T, 4]`` states with ``with_states``). Stepping goes on after the
    pole falls or the cart leaves (see the module docstring), without gymnasium's warning.

  Raises:
    ValueError: ``actions`` is not 1-D, empty, or has a value other than 1 or 2 after position 0.
  """
  actions = _check_actions(actions)
  with _simulator(config.frame_size) as sim:
    sim.reset(start)
    frames, states = [sim.frame()], [sim.state]
    for a in actions[1:]:
      sim.step(int(a) - 1)
      frames.append(sim.frame())
      states.append(sim.state)
  frames = np.stack(frames)
  return (frames, np.stack(states).astype(np.float32)) if with_states else frames


def _attempt(config: CartPoleConfig, split_id: int, index: int, attempt: int, sim: _Simulator) -> dict | None:
  """One attempt at an episode (see the module docstring's Determinism); None if it terminates early."""
  rng = np.random.default_rng([config.seed, split_id, index, attempt])
  reset_seed = 2 * int(rng.integers(0, 2**62)) + split_id
  target = rng.uniform(-config.max_speed, config.max_speed)
  sim.reset(reset_seed)
  t = config.episode_frames
  frames, states = [sim.frame()], [sim.state]
  actions = np.full(t, NONE, np.int32)
  for i in range(1, t):
    x, x_dot, theta, theta_dot = states[-1]
    if abs(x) > TURN_X and target * x > 0:
      target = -target  # Head back to the centre.
    right = theta + GAIN_THETA_DOT * theta_dot + GAIN_SPEED * (x_dot - target) > 0
    gym_action = int(right) if rng.random() >= config.epsilon else int(rng.integers(0, 2))
    if sim.step(gym_action):
      return None
    actions[i] = gym_action + 1
    frames.append(sim.frame())
    states.append(sim.state)
  return {
    "frames": np.stack(frames),
    "actions": actions,
    "states": np.stack(states).astype(np.float32),
    "reset_seed": np.int64(reset_seed),
    "attempts": attempt + 1,
  }


def _make_episode(config: CartPoleConfig, split: str, index: int, sim: _Simulator) -> dict[str, Any]:
  check_split(split, SPLITS)
  for attempt in range(MAX_ATTEMPTS):
    episode = _attempt(config, SPLITS.index(split), index, attempt, sim)
    if episode is not None:
      return episode
  raise RuntimeError(
    f"episode {index} of {split!r}: the pole fell or the cart left in all {MAX_ATTEMPTS} attempts at "
    f"{config.episode_frames} frames with epsilon={config.epsilon}, max_speed={config.max_speed}; lower them"
  )


def make_episode(config: CartPoleConfig, split: str, index: int) -> dict[str, Any]:
  """Generates episode ``index`` of ``split``: a pure function of ``config``, ``split`` and ``index``.

  Returns:
    ``frames`` uint8 ``[T, H, W]``, ``actions`` int32 ``[T]`` (0 at frame 0, then 1 left / 2 right),
    ``states`` float32 ``[T, 4]``, ``reset_seed`` int64 (even for train, odd for test), and ``attempts`` (int:
    how many attempts it took, 1 if the first survived).

  Raises:
    ValueError: unknown split.
    RuntimeError: every one of ``MAX_ATTEMPTS`` attempts terminated before ``episode_frames`` frames.
  """
  check_split(split, SPLITS)
  with _simulator(config.frame_size) as sim:
    return _make_episode(config, split, index, sim)


# ----------------------------------------------------------------------------------------------------------------
# TFDS builder.


class JstreamCartPole(LocalBuilder):
  """CartPole-v1 episodes with their actions (TFDS name ``jstream_cart_pole``); see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Initial release: gymnasium CartPole-v1 renders (grey, black background), actions and states."
  }
  SPLITS = SPLITS

  @classmethod
  def default_config(cls) -> CartPoleConfig:
    return cartpole_config()

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    c = self.builder_config
    t = c.episode_frames
    return {
      "frames": tfds.features.Tensor(shape=(t, *c.frame_size), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
      "actions": tfds.features.Tensor(shape=(t,), dtype=np.int32),
      "states": tfds.features.Tensor(shape=(t, 4), dtype=np.float32),
      "reset_seed": tfds.features.Tensor(shape=(), dtype=np.int64),
      "index": index_feature(),
    }

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    c = self.builder_config
    with _simulator(c.frame_size) as sim:
      for i in range(c.num_train if split == "train" else c.num_test):
        episode = _make_episode(c, split, i, sim)
        del episode["attempts"]
        yield i, {**episode, "index": i}


def cartpole_builder(
  config: CartPoleConfig | None = None, data_dir: str | os.PathLike | None = None
) -> JstreamCartPole:
  """The prepared CartPole builder for ``config`` (default config if ``None``), built on first use."""
  return JstreamCartPole.prepare(config, data_dir)


# ----------------------------------------------------------------------------------------------------------------
# Pipelines.


@dataclasses.dataclass(frozen=True)
class _Window:
  """Cuts a random window of ``clip_frames`` frames out of an episode (a picklable grain ``random_map``)."""

  clip_frames: int
  dtype: Any
  with_metadata: bool

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    t = example["frames"].shape[0]
    start = int(rng.integers(0, t - self.clip_frames + 1))
    window = slice(start, start + self.clip_frames)
    frames = example["frames"][window]
    if np.dtype(self.dtype) != np.uint8:
      frames = frames.astype(self.dtype) / np.asarray(255, self.dtype)
    out = {"frames": frames, "actions": example["actions"][window]}
    if self.with_metadata:
      out |= {
        "states": example["states"][window],
        "index": example["index"],
        "start": np.int32(start),
        "reset_seed": example["reset_seed"],
      }
    return out


def cartpole_dataset(
  split: str = "train",
  *,
  batch_size: int,
  clip_frames: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  dtype: Any = np.uint8,
  with_metadata: bool = False,
  worker_count: int = 0,
  read_options: grain.ReadOptions | None = None,
  config: CartPoleConfig | None = None,
  data_dir: str | os.PathLike | None = None,
) -> grain.IterDataset:
  """Batches of action-conditioned CartPole clips.

  Each example is a window of ``clip_frames`` consecutive frames of one episode, starting uniformly at random
  (drawn from ``seed`` and the example's position in the stream, so deterministic, and new each epoch).
  Resuming: ``state = it.get_state()`` (a JSON-able dict) and later ``it = iter(ds); it.set_state(state)`` give
  exactly the batches that would have come next. Only full batches are yielded.

  Args:
    split: ``"train"`` or ``"test"``.
    batch_size: clips per batch.
    clip_frames: frames per clip, in ``[1, episode_frames]`` (``episode_frames``: whole episodes).
    seed: seed in [0, 2**32) of the episode order (a fresh order every epoch) and of the windows.
    shuffle: shuffle the episodes (``False``: index order, e.g. for evaluation; windows are still drawn).
    num_epochs: passes over the episodes; ``None`` repeats forever.
    dtype: frames as ``np.uint8`` (0..255) or a float dtype (values in [0, 1]).
    with_metadata: also yield ``states`` float32 ``[b, clip_frames, 4]``, ``index`` int64 ``[b]``, ``start``
      int32 ``[b]`` (the window's first frame in its episode) and ``reset_seed`` int64 ``[b]``.
    worker_count: grain worker processes (0: in this process, with reader threads).
    read_options: grain reader threads / prefetch (default 2 threads, 16 batches).
    config: the dataset (default ``cartpole_config()``).
    data_dir: TFDS data dir (see ``jstream.data.base.resolve_data_dir``).

  Returns:
    A ``grain.IterDataset`` of dicts ``{"frames": [batch_size, clip_frames, H, W], "actions": int32
    [batch_size, clip_frames]}`` (the actions convention of the module docstring).

  Raises:
    ValueError: unknown split, ``clip_frames`` out of range, or a dtype that is neither uint8 nor float.
  """
  check_split(split, SPLITS)
  config = config if config is not None else cartpole_config()
  if not 1 <= clip_frames <= config.episode_frames:
    raise ValueError(f"clip_frames must be in [1, episode_frames={config.episode_frames}], got {clip_frames}")
  if not (np.dtype(dtype) == np.uint8 or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"dtype must be np.uint8 or a float dtype, got {dtype}")
  ds = grain.MapDataset.source(cartpole_builder(config, data_dir).as_data_source(split=split))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).random_map(_Window(int(clip_frames), dtype, with_metadata), seed=seed)
  return finish_pipeline(ds, batch_size, worker_count=worker_count, read_options=read_options)
