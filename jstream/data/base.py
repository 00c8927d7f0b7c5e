"""The base of jstream's local datasets: TFDS builders written as array_record (no TensorFlow), never downloaded.

A local dataset is generated on the machine from what it already has (files, a package's bundled data, a
simulator). This module owns what every such dataset shares:

* **Configs named by their parameters.** A ``LocalConfig`` subclass adds the fields that define the data;
  ``params()`` lists them and ``signature()`` hashes them, so that two configs that differ in any field get
  different names, hence different folders on disk, and never collide.
* **Data dir.** ``data_dir`` argument, else ``$JSTREAM_DATA_DIR``, else ``~/.cache/jstream/tfds``
  (``resolve_data_dir``).
* **Built once.** ``Builder.prepare(config, data_dir)`` returns the prepared builder, generating it first if it
  is not on disk; concurrent first uses (pytest workers, grain workers) wait on a file lock instead of racing.
* **Nothing fetched, nothing left behind.** No checksums folder is looked up, and the dataset info is never
  initialised from TFDS's GCS bucket (TFDS would otherwise make an empty temp folder each time a builder is
  constructed before it is prepared).
* **Pipelines** end with ``finish_pipeline``: batching before the workers split the work, so that the batches do
  not depend on the worker count; grain ``IterDataset``s whose ``get_state()`` is a JSON-able dict.

Adding a dataset takes a config, a function that checks and names it, and a builder with its splits and three
methods::

    @dataclasses.dataclass(eq=False)
    class SquaresConfig(base.LocalConfig):
      size: int = 8
      num_train: int = 100


    def squares_config(size: int = 8, num_train: int = 100) -> SquaresConfig:
      if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
      config = SquaresConfig(name="pending", size=size, num_train=num_train)
      return config.named(f"s{size}_{config.signature()}", f"Squares: {config.params()}")


    class JstreamSquares(base.LocalBuilder):  # TFDS name: jstream_squares
      VERSION = tfds.core.Version("1.0.0")
      RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
      SPLITS = ("train",)

      @classmethod
      def default_config(cls) -> SquaresConfig:
        return squares_config()

      def features(self) -> dict[str, tfds.features.FeatureConnector]:
        s = self.builder_config.size
        return {"image": tfds.features.Tensor(shape=(s, s), dtype=np.uint8), "index": base.index_feature()}

      def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        c = self.builder_config
        for i in range(c.num_train):
          yield i, {"image": np.full((c.size, c.size), i % 256, np.uint8), "index": i}


    builder = JstreamSquares.prepare(squares_config(size=4))  # built on first use, then read from disk
    ds = grain.MapDataset.source(builder.as_data_source(split="train"))

Records are stored in the order ``_generate_examples`` yields them (shuffling is disabled); ``jstream.data.text`` and
``jstream.data.digits`` are the two datasets built this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import grain
import numpy as np
import tensorflow_datasets as tfds

ENV_DATA_DIR = "JSTREAM_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/jstream/tfds"

_TFDS_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))

C = TypeVar("C", bound="LocalConfig")
B = TypeVar("B", bound="LocalBuilder")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """The TFDS data dir: ``data_dir`` if given, else ``$JSTREAM_DATA_DIR``, else ``~/.cache/jstream/tfds``."""
  chosen = data_dir if data_dir is not None else os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR
  return Path(chosen).expanduser().resolve()


@dataclasses.dataclass(eq=False)
class LocalConfig(tfds.core.BuilderConfig):
  """A builder config whose subclass fields define the data; see the module docstring for an example."""

  def params(self) -> dict[str, Any]:
    """The fields that define the data (every field but TFDS's own: name, version, description, ...)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _TFDS_FIELDS}

  def signature(self, length: int = 10) -> str:
    """A hex digest of ``params()``: configs that differ in any parameter get different signatures."""
    return hashlib.sha256(repr(sorted(self.params().items())).encode()).hexdigest()[:length]

  def named(self: C, name: str, description: str) -> C:
    """Sets the config's name (its folder under the dataset's) and description; returns the config."""
    self.name = name
    self.description = description
    return self


class _LocalInfo(tfds.core.DatasetInfo):
  """A ``DatasetInfo`` that never looks for precomputed metadata on TFDS's GCS bucket: a local dataset has none
  there, and the lookup leaves an empty ``tmp*tfds`` folder in the system temp dir every time it runs."""

  def initialize_from_bucket(self) -> None:
    return None


def check_split(split: str, splits: Sequence[str]) -> None:
  """Raises ValueError naming the known splits if ``split`` is not one of them."""
  if split not in splits:
    raise ValueError(f"unknown split {split!r}; expected one of {tuple(splits)}")


def index_feature() -> tfds.features.Tensor:
  """The ``index`` feature: an example's rank within its split (int64)."""
  return tfds.features.Tensor(shape=(), dtype=np.int64)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder of a local dataset. Subclasses define ``VERSION``, ``RELEASE_NOTES``, ``SPLITS`` and three
  methods: ``default_config``, ``features`` and ``_generate_examples(split)`` (see the module docstring)."""

  SPLITS: ClassVar[tuple[str, ...]] = ()

  # No code folder with url checksums: nothing is downloaded. (TFDS's lookup of that folder for a package module
  # imports the `importlib_resources` backport, which is not installed on Python >= 3.9.)
  code_path = None

  def __init__(self, *, config: LocalConfig | None = None, **kwargs: Any):
    super().__init__(config=config if config is not None else self.default_config(), **kwargs)

  @classmethod
  def default_config(cls) -> LocalConfig:
    """The config used when none is given."""
    raise NotImplementedError(f"{cls.__name__} must define default_config()")

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    """The features of one example, for ``self.builder_config``."""
    raise NotImplementedError(f"{type(self).__name__} must define features()")

  def _generate_examples(self, split: str) -> Iterable[tuple[int | str, dict[str, Any]]]:
    """The ``(key, example)`` pairs of ``split`` for ``self.builder_config``, in the order they are stored."""
    raise NotImplementedError(f"{type(self).__name__} must define _generate_examples(split)")

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalInfo(
      builder=self,
      description=self.builder_config.description,
      features=tfds.features.FeaturesDict(self.features()),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterable[tuple[int | str, dict[str, Any]]]]:
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in self.SPLITS}

  @classmethod
  def prepare(cls: type[B], config: LocalConfig | None = None, data_dir: str | os.PathLike | None = None) -> B:
    """The prepared array_record builder for ``config`` (``default_config()`` if None), built first if it is not
    on disk.

    Building happens once per (builder, version, config) under ``data_dir`` (see ``resolve_data_dir``);
    concurrent first uses wait on a file lock instead of racing.
    """
    config = config if config is not None else cls.default_config()
    root = resolve_data_dir(data_dir)
    make = lambda: cls(config=config, data_dir=str(root), file_format="array_record")
    builder = make()
    if builder.is_prepared():
      return builder
    with _file_lock(root / f".{cls.name}-{config.name}.lock"):
      builder = make()  # Re-read: another process may have built it while we waited.
      if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def check_params(checks: dict[str, bool], **values: Any) -> None:
  """Raises ``ValueError`` with the message of the first failed check and every parameter's value (the config
  functions of the datasets: ``checks`` maps a message to whether its condition holds)."""
  for message, ok in checks.items():
    if not ok:
      raise ValueError(f"{message}; got " + ", ".join(f"{k}={v}" for k, v in values.items()))


def frames_dataset(
  make_builder: Callable[[], tfds.core.DatasetBuilder],
  split: str,
  extract: Any,
  *,
  batch_size: int,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  dtype: Any,
  worker_count: int,
  read_options: grain.ReadOptions | None,
) -> grain.IterDataset:
  """The pipeline of the video datasets: the split's records of the builder ``make_builder()`` prepares
  (shuffled with ``seed`` unless ``shuffle`` is False), repeated ``num_epochs`` times (None: forever), mapped by
  the picklable ``extract``, batched (``finish_pipeline``). ``dtype`` (what ``extract`` converts frames to) must
  be uint8 or a float dtype; it is checked before anything is built."""
  if not (np.dtype(dtype) == np.uint8 or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"dtype must be np.uint8 or a float dtype, got {dtype}")
  ds = grain.MapDataset.source(make_builder().as_data_source(split=split))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(extract)
  return finish_pipeline(ds, batch_size, worker_count=worker_count, read_options=read_options)


def ensure_absl_flags_parsed() -> None:
  """Marks absl flags as parsed (grain's worker processes read them; pytest and notebooks never parse them)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def finish_pipeline(
  ds: grain.MapDataset,
  batch_size: int,
  *,
  worker_count: int = 0,
  read_options: grain.ReadOptions | None = None,
  drop_remainder: bool = True,
) -> grain.IterDataset:
  """Batches a ``MapDataset`` of examples and turns it into an ``IterDataset`` (with ``worker_count`` processes).

  Batching happens before the workers split the work, so the batches do not depend on ``worker_count``.

  Raises:
    ValueError: ``batch_size < 1`` or ``worker_count < 0``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  it = ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  if worker_count > 0:
    ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it
