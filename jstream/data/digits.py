"""Moving-digit videos from scikit-learn's bundled 8x8 handwritten digits: a TFDS builder and grain pipelines.

Conventions
  * **Frames** are uint8 ``[T, H, W]`` (0 = background, 255 = full ink), one channel. The pipelines yield uint8
    ``[batch, T, H, W]`` by default, or float32 in [0, 1] (``x / 255``) with ``dtype=np.float32``.
  * **Digits** come from ``sklearn.datasets.load_digits`` (1,797 images of 8x8 pixels, values 0..16, shipped with
    scikit-learn), upscaled bilinearly to ``digit_size`` x ``digit_size`` and scaled to 0..255. Images with
    ``index % 5 == 4`` (359 of them) are the test pool, the rest (1,438) the train pool: test clips show unseen
    handwriting.
  * **Motion.** Each of ``num_digits`` digits starts at a uniform random top-left corner in
    ``[0, H - digit_size] x [0, W - digit_size]`` and moves at a constant speed, uniform in
    ``[min_speed, max_speed]`` pixels per frame, in a uniform random direction, bouncing elastically off the walls:
    the unfolded straight line ``p0 + v t`` is folded into ``[0, L]`` (``L = H - digit_size`` or
    ``W - digit_size``), so any speed bounces correctly. ``positions`` ``[T, num_digits, 2]`` (float32, ``(y, x)``
    of the top-left corner) is the exact trajectory; a digit is drawn at the rounded position, and overlapping
    digits combine by pixel-wise maximum.
  * **Determinism.** Clip ``index`` of ``split`` is a pure function of the config and
    ``np.random.default_rng([seed, split_id, index])`` (``split_id``: train 0, test 1); see ``make_clip``.
  * **Builder.** ``JstreamMovingDigits`` (TFDS name ``jstream_moving_digits``), array_record, features ``frames``,
    ``labels`` (int32 ``[num_digits]``), ``positions`` and ``index``; config name = the main sizes plus a hash of
    every field, so configs never collide. Data dir as for every local dataset (``jstream.data.base``): argument,
    else ``$JSTREAM_DATA_DIR``, else ``~/.cache/jstream/tfds``; built once, on first use. The default config (2,000
    train / 200 test clips of 20 frames of 32x32) builds in about a second.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds

from jstream.data.base import LocalBuilder, LocalConfig, check_params, check_split, frames_dataset, index_feature

SPLITS = ("train", "test")
SOURCE_SIZE = 8  # load_digits images are 8x8.
TEST_EVERY = 5  # Source images with index % 5 == 4 form the test pool.


@dataclasses.dataclass(eq=False)
class DigitsConfig(LocalConfig):
  """A moving-digits dataset (a TFDS builder config); make one with ``digits_config``, which names it.

  Attributes:
    frame_size: ``(H, W)`` of a frame.
    digit_size: side of an upscaled digit, at most ``min(H, W)``.
    num_digits: digits per clip.
    num_frames: frames per clip (``T``).
    min_speed: smallest speed, pixels per frame.
    max_speed: largest speed, pixels per frame.
    num_train: clips in the train split.
    num_test: clips in the test split.
    seed: base seed of the clip generator.
  """

  frame_size: tuple[int, int] = (32, 32)
  digit_size: int = 16
  num_digits: int = 2
  num_frames: int = 20
  min_speed: float = 1.0
  max_speed: float = 3.0
  num_train: int = 2000
  num_test: int = 200
  seed: int = 0


def digits_config(
  *,
  frame_size: int | tuple[int, int] = 32,
  digit_size: int = 16,
  num_digits: int = 2,
  num_frames: int = 20,
  speed: tuple[float, float] = (1.0, 3.0),
  num_train: int = 2000,
  num_test: int = 200,
  seed: int = 0,
) -> DigitsConfig:
  """Checks and names a moving-digits config.

  Args:
    frame_size: ``H`` (square frames) or ``(H, W)``.
    digit_size: side of an upscaled digit in pixels.
    num_digits: digits per clip (>= 1).
    num_frames: frames per clip (>= 1).
    speed: ``(min, max)`` speed in pixels per frame, ``0 <= min <= max``.
    num_train: clips in the train split (>= 1).
    num_test: clips in the test split (>= 1).
    seed: base seed in [0, 2**32).

  Returns:
    A ``DigitsConfig`` whose name encodes its parameters.

  Raises:
    ValueError: a parameter is out of range (e.g. a digit larger than the frame).
  """
  h, w = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
  lo, hi = (float(s) for s in speed)
  checks = {
    "digit_size must be in [1, min(frame_size)]": 1 <= digit_size <= min(h, w),
    "num_digits, num_frames, num_train and num_test must be >= 1": min(num_digits, num_frames, num_train, num_test) > 0,
    "speed must be (min, max) with 0 <= min <= max": 0.0 <= lo <= hi,
    "seed must be in [0, 2**32)": 0 <= seed < 2**32,
  }
  check_params(
    checks,
    frame_size=(h, w),
    digit_size=digit_size,
    num_digits=num_digits,
    num_frames=num_frames,
    speed=speed,
    num_train=num_train,
    num_test=num_test,
    seed=seed,
  )
  config = DigitsConfig(
    name="pending",
    frame_size=(int(h), int(w)),
    digit_size=int(digit_size),
    num_digits=int(num_digits),
    num_frames=int(num_frames),
    min_speed=lo,
    max_speed=hi,
    num_train=int(num_train),
    num_test=int(num_test),
    seed=int(seed),
  )
  name = f"{h}x{w}_d{digit_size}_n{num_digits}_t{num_frames}_{config.signature()}"
  return config.named(name, f"Moving digits from sklearn load_digits: {config.params()}")


# ----------------------------------------------------------------------------------------------------------------
# Clip generation (pure numpy).


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` bilinear interpolation weights (pixel centres aligned, edges clamped)."""
  centres = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(centres).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = centres - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


AUGMENT_SEED = 7  # the generator of the training pool's affine variants (``digit_pool(augment=)``)
AUGMENT_ROTATION = 12.0  # degrees, either way
AUGMENT_SCALE = (0.95, 1.25)  # inverse scale per axis: source pixels per output pixel relative to the plain resize
AUGMENT_SHEAR = 0.2
AUGMENT_SHIFT = 0.5  # source pixels, either way


@functools.lru_cache(maxsize=8)
def digit_pool(split: str, digit_size: int, augment: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The digit images of a split's pool: (uint8 ``[n, s, s]`` in 0..255, int32 labels ``[n]``).

  ``augment`` (train split only): the pool also holds this many random affine variants of each image (rotation,
  per-axis scale, shear and a sub-pixel shift about the digit's centre; ``warp``), after the plain images: image
  ``i + k * m`` is variant ``k`` of image ``i`` (``m`` plain images), the same for every call. The test pool is
  never augmented: test clips show the held-out handwriting as written.
  """
  check_split(split, SPLITS)
  if not isinstance(augment, (int, np.integer)) or augment < 0:
    raise ValueError(f"augment must be an int >= 0 (affine variants per training digit), got {augment!r}")
  from sklearn.datasets import load_digits  # Slow import (~1.5 s): only when digits are needed.

  data = load_digits()
  test = np.arange(len(data.images)) % TEST_EVERY == TEST_EVERY - 1
  keep = test if split == "test" else ~test
  source = data.images[keep]
  m = _resize_matrix(SOURCE_SIZE, digit_size)
  images = [np.einsum("ai,nij,bj->nab", m, source, m)]
  if split == "train" and augment:
    rng = np.random.default_rng(AUGMENT_SEED)
    for _ in range(augment):
      n = len(source)
      angle = np.deg2rad(rng.uniform(-AUGMENT_ROTATION, AUGMENT_ROTATION, n))
      cos, sin = np.cos(angle), np.sin(angle)
      rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
      shape = np.zeros((n, 2, 2))
      shape[:, 0, 0], shape[:, 1, 1] = rng.uniform(*AUGMENT_SCALE, (2, n))
      shape[:, 0, 1] = rng.uniform(-AUGMENT_SHEAR, AUGMENT_SHEAR, n)
      shift = rng.uniform(-AUGMENT_SHIFT, AUGMENT_SHIFT, (n, 2))
      images.append(warp(source, digit_size, rotation @ shape, shift))
  images = np.clip(np.rint(np.concatenate(images) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  images.flags.writeable = False
  labels = np.tile(data.target[keep].astype(np.int32), len(images) // len(source))
  labels.flags.writeable = False
  return images, labels


def warp(images: np.ndarray, size: int, inverse: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """Resamples square images ``[n, k, k]`` to ``[n, size, size]`` under an affine map about their centre.

  Output pixel ``(a, b)`` reads the input, bilinearly, at ``centre + inverse @ (c(a, b) - centre) + shift``, where
  ``c`` is the input coordinate the plain resize reads (``_resize_matrix``: pixel centres aligned); points inside
  the input's pixel area are clamped to its outermost pixel centres as the plain resize does, points outside read
  0. With ``inverse`` the identity and ``shift`` 0 this is the plain bilinear resize.

  Args:
    images: ``[n, k, k]`` input images.
    size: the output side.
    inverse: ``[n, 2, 2]`` the map from output to input offsets, ``(y, x)`` order.
    shift: ``[n, 2]`` input-pixel offsets added after it.
  """
  k = images.shape[-1]
  centre = (k - 1) / 2
  nominal = (np.arange(size) + 0.5) * k / size - 0.5
  grid = np.stack(np.meshgrid(nominal, nominal, indexing="ij"), -1) - centre  # [s, s, 2]
  src = np.einsum("nij,abj->nabi", inverse, grid) + centre + shift[:, None, None]
  inside = np.all((src >= -0.5) & (src <= k - 0.5), axis=-1)
  src = np.clip(src, 0, k - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, k - 1)
  fy, fx = (src - lo)[..., 0], (src - lo)[..., 1]
  n = np.arange(len(images))[:, None, None]

  def at(y, x):
    return images[n, y[..., 0], x[..., 1]]

  value = (
    at(lo, lo) * (1 - fy) * (1 - fx) + at(lo, hi) * (1 - fy) * fx + at(hi, lo) * fy * (1 - fx) + at(hi, hi) * fy * fx
  )
  return np.where(inside, value, 0.0)


def bounce(start: np.ndarray, velocity: np.ndarray, num_frames: int, limit: np.ndarray) -> np.ndarray:
  """Positions of points moving in straight lines and bouncing off ``0`` and ``limit``.

  Args:
    start: ``[..., d]`` positions at frame 0, inside ``[0, limit]``.
    velocity: ``[..., d]`` displacement per frame.
    num_frames: number of frames ``T``.
    limit: ``[d]`` upper walls (>= 0).

  Returns:
    float64 ``[T, ..., d]`` positions, all in ``[0, limit]``.
  """
  t = np.arange(num_frames, dtype=np.float64).reshape((-1,) + (1,) * start.ndim)
  return fold(start + velocity * t, limit)


def fold(line: np.ndarray, limit: np.ndarray) -> np.ndarray:
  """Unfolded straight-line positions ``[..., d]`` folded into ``[0, limit]`` (elastic bounces off both walls)."""
  period = 2.0 * np.asarray(limit, np.float64)
  safe = np.where(period > 0, period, 1.0)
  folded = np.abs(np.mod(line + safe / 2, safe) - safe / 2)  # Triangle wave: 0 -> limit -> 0 over one period.
  return np.where(period > 0, folded, 0.0)


def make_clip(config: DigitsConfig, split: str, index: int) -> dict[str, np.ndarray]:
  """Generates clip ``index`` of ``split``: a pure function of ``config``, ``split`` and ``index``.

  Returns:
    ``frames`` uint8 ``[T, H, W]``, ``labels`` int32 ``[num_digits]``, ``positions`` float32
    ``[T, num_digits, 2]`` (top-left ``(y, x)`` of each digit, in ``[0, H - s] x [0, W - s]``).
  """
  check_split(split, SPLITS)
  images, labels = digit_pool(split, config.digit_size)
  rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
  n, s, t = config.num_digits, config.digit_size, config.num_frames
  h, w = config.frame_size
  limit = np.array([h - s, w - s], np.float64)
  pick = rng.integers(0, len(images), size=n)
  start = rng.uniform(0.0, 1.0, size=(n, 2)) * limit
  speed = rng.uniform(config.min_speed, config.max_speed, size=n)
  angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
  velocity = speed[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=-1)
  positions = bounce(start, velocity, t, limit).astype(np.float32)
  corners = np.rint(positions).astype(np.int64)
  frames = np.zeros((t, h, w), np.uint8)
  for f in range(t):
    for d in range(n):
      y, x = corners[f, d]
      np.maximum(frames[f, y : y + s, x : x + s], images[pick[d]], out=frames[f, y : y + s, x : x + s])
  return {"frames": frames, "labels": labels[pick], "positions": positions}


# ----------------------------------------------------------------------------------------------------------------
# TFDS builder.


class JstreamMovingDigits(LocalBuilder):
  """Moving-digit clips (TFDS name ``jstream_moving_digits``); see the module docstring for the conventions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Initial release: bouncing sklearn digits, frames as uint8 tensors."
  }
  SPLITS = SPLITS

  @classmethod
  def default_config(cls) -> DigitsConfig:
    return digits_config()

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    c = self.builder_config
    t, n = c.num_frames, c.num_digits
    return {
      "frames": tfds.features.Tensor(shape=(t, *c.frame_size), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
      "labels": tfds.features.Tensor(shape=(n,), dtype=np.int32),
      "positions": tfds.features.Tensor(shape=(t, n, 2), dtype=np.float32),
      "index": index_feature(),
    }

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    c = self.builder_config
    for i in range(c.num_train if split == "train" else c.num_test):
      yield i, {**make_clip(self.builder_config, split, i), "index": i}


def digits_builder(
  config: DigitsConfig | None = None, data_dir: str | os.PathLike | None = None
) -> JstreamMovingDigits:
  """The prepared moving-digits builder for ``config`` (default config if ``None``), built on first use."""
  return JstreamMovingDigits.prepare(config, data_dir)


# ----------------------------------------------------------------------------------------------------------------
# Pipelines.


@dataclasses.dataclass(frozen=True)
class _Extract:
  """Picks the frames (or the whole example) and converts them to the requested dtype (picklable for workers)."""

  dtype: Any
  with_metadata: bool

  def __call__(self, example: dict[str, Any]) -> Any:
    frames = example["frames"]
    if np.dtype(self.dtype) != np.uint8:
      frames = frames.astype(self.dtype) / np.asarray(255, self.dtype)
    if not self.with_metadata:
      return frames
    return {"frames": frames, "labels": example["labels"], "positions": example["positions"]}


def digits_dataset(
  split: str = "train",
  *,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  dtype: Any = np.uint8,
  with_metadata: bool = False,
  worker_count: int = 0,
  read_options: grain.ReadOptions | None = None,
  config: DigitsConfig | None = None,
  data_dir: str | os.PathLike | None = None,
) -> grain.IterDataset:
  """Batches of moving-digit clips.

  Resuming: ``state = it.get_state()`` (a JSON-able dict) and later ``it = iter(ds); it.set_state(state)`` give
  exactly the batches that would have come next. Only full batches are yielded.

  Args:
    split: ``"train"`` or ``"test"``.
    batch_size: clips per batch.
    seed: shuffle seed in [0, 2**32) (a fresh order every epoch); ignored with ``shuffle=False``.
    shuffle: shuffle the clips (``False``: index order, e.g. for evaluation).
    num_epochs: ``None`` repeats forever.
    dtype: ``np.uint8`` (0..255) or a float dtype (values in [0, 1]).
    with_metadata: yield dicts ``{"frames", "labels" [b, n], "positions" [b, T, n, 2]}`` instead of frames.
    worker_count: grain worker processes (0: in this process, with reader threads).
    read_options: grain reader threads / prefetch (default 2 threads, 16 batches).
    config: the dataset (default ``digits_config()``).
    data_dir: TFDS data dir (see ``jstream.data.base.resolve_data_dir``).

  Returns:
    A ``grain.IterDataset`` of ``[batch_size, T, H, W]`` frame arrays (or dicts with ``with_metadata``).
  """
  check_split(split, SPLITS)
  return frames_dataset(
    lambda: digits_builder(config, data_dir),
    split,
    _Extract(dtype, with_metadata),
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    dtype=dtype,
    worker_count=worker_count,
    read_options=read_options,
  )
