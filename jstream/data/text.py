"""Byte-level text streams from local files: a TFDS builder (array_record, no TensorFlow) and grain pipelines.

Conventions
  * **Tokens are bytes.** A document is the raw bytes of a file (no decoding, so files that are not valid UTF-8
    are fine) or the UTF-8 encoding of a ``pydoc_data`` topic. Token ids are 0..255, ``int32`` in the pipelines.
  * **One stream per split.** The documents of a split are concatenated, each followed by one ``SEPARATOR`` byte
    (0, NUL, which text does not contain), in a fixed pseudo-random order (sorted by ``sha256("order:" + key)``),
    so that any prefix of the held-out stream mixes code and prose.
  * **Default corpus:** the ``.py`` files of the local Python standard library (``sysconfig``'s ``stdlib``
    directory, without ``site-packages``/``dist-packages``, ``__pycache__`` and the test directories ``test``,
    ``tests`` and ``idle_test``) plus every topic of ``pydoc_data.topics.topics`` (English prose). ``text_config(
    paths=[...])`` uses any local files and directories instead (every non-hidden file under a directory, or only
    those ending in ``suffixes``).
  * **Split by document, deterministic.** Each document has a key: ``<root name>/<path relative to the root>``
    (``stdlib/...`` for the standard library, whatever its folder is called; a file given directly: its name),
    ``pydoc/<topic>`` for pydoc topics. With ``u`` the first 8 bytes of
    ``sha256(key)`` read as a fraction of ``2**64``, the document is held out iff ``u < heldout_fraction`` (default
    2%) for files and ``u < prose_heldout_fraction`` (default 75%) for pydoc topics: held-out text then has both
    code and English prose, and training still sees some prose. A document's split never depends on the other
    documents, except for one fix-up: when a corpus of two or more documents would leave a split empty, the
    document with the smallest ``u`` (resp. largest) moves to it. Empty files are skipped.
  * **Builder.** ``JstreamText`` (TFDS name ``jstream_text``), stored as array_record under ``data_dir`` (argument,
    else ``$JSTREAM_DATA_DIR``, else ``~/.cache/jstream/tfds``). Its config name is the corpus kind plus a
    signature (hash of the roots, every document's key, size and mtime, the pydoc topics and the split fractions),
    so different corpora, or a corpus whose files changed, never collide. It is built on first use, under a file
    lock, and reused afterwards.
  * **Pipelines** are grain ``MapDataset``s turned into ``IterDataset``s: deterministic given the seed, whatever
    the worker count; ``it.get_state()`` is a JSON-able dict and ``iter(ds).set_state(state)`` resumes exactly.

The builder, its data dir and the pipeline's last step come from ``jstream.data.base``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import grain
import numpy as np
import tensorflow_datasets as tfds

from jstream.data.base import (
  ENV_DATA_DIR,
  LocalBuilder,
  LocalConfig,
  check_split,
  finish_pipeline,
  index_feature,
  resolve_data_dir,
)

SEPARATOR = 0
SPLITS = ("train", "heldout")
__all__ = [
  "ENV_DATA_DIR",
  "SEPARATOR",
  "SPLITS",
  "Document",
  "JstreamText",
  "TextConfig",
  "heldout_stream",
  "list_documents",
  "resolve_data_dir",
  "split_bytes",
  "split_documents",
  "stdlib_dir",
  "text_builder",
  "text_config",
  "text_dataset",
]
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def _unit_hash(key: str) -> float:
  """A stable uniform number in [0, 1) from ``key`` (same on every machine and Python version)."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


# ----------------------------------------------------------------------------------------------------------------
# Corpus: which documents, and which split each goes to.


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a corpus: a local file (``path``) or a pydoc topic (``topic``), named by ``key``."""

  key: str
  path: Path | None = None
  topic: str | None = None

  @property
  def prose(self) -> bool:
    return self.topic is not None

  def read(self) -> bytes:
    if self.path is not None:
      return self.path.read_bytes()
    return _pydoc_topics()[self.topic].encode("utf-8")


@dataclasses.dataclass(eq=False)
class TextConfig(LocalConfig):
  """A text corpus (a TFDS builder config); make one with ``text_config``, which names it by its signature.

  Attributes:
    roots: absolute paths of the files and directories that make up the corpus.
    suffixes: keep only files ending with one of these (``None``: every non-hidden file).
    skip_tests: skip ``site-packages``, ``__pycache__`` and test directories (the stdlib corpus).
    include_pydoc: add every topic of ``pydoc_data.topics`` as a prose document.
    heldout_fraction: probability that a file is held out.
    prose_heldout_fraction: probability that a pydoc topic is held out.
  """

  roots: tuple[str, ...] = ()
  suffixes: tuple[str, ...] | None = None
  skip_tests: bool = False
  include_pydoc: bool = False
  heldout_fraction: float = 0.02
  prose_heldout_fraction: float = 0.75


@functools.cache
def _pydoc_topics() -> dict[str, str]:
  from pydoc_data.topics import topics

  return dict(topics)


def stdlib_dir() -> Path:
  """The local Python standard library (also inside a virtual environment)."""
  return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _walk(root: Path, suffixes: tuple[str, ...] | None, skip_tests: bool) -> list[Path]:
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and not (skip_tests and d in _SKIP_DIRS)]
    for name in filenames:
      if not name.startswith(".") and (suffixes is None or name.endswith(suffixes)):
        found.append(Path(dirpath, name))
  return found


def list_documents(config: TextConfig) -> list[Document]:
  """The non-empty documents of ``config``, in their stream order (sorted by ``sha256("order:" + key)``)."""
  docs = []
  for root in map(Path, config.roots):
    if root.is_dir():
      name = "stdlib" if root == stdlib_dir() else root.name
      keyed = [(f"{name}/{f.relative_to(root).as_posix()}", f) for f in _walk(root, config.suffixes, config.skip_tests)]
    else:
      keyed = [(root.name, root)]
    docs += [Document(key, path=f) for key, f in keyed if f.is_file() and f.stat().st_size > 0]
  if config.include_pydoc:
    docs += [Document(f"pydoc/{t}", topic=t) for t, text in _pydoc_topics().items() if text]
  return sorted(docs, key=lambda d: (hashlib.sha256(f"order:{d.key}".encode()).digest(), d.key, str(d.path)))


def split_documents(config: TextConfig, docs: Sequence[Document]) -> dict[str, list[Document]]:
  """Assigns each document to ``train`` or ``heldout`` by the hash of its key (see the module docstring)."""
  u = [_unit_hash(d.key) for d in docs]
  held = [ui < (config.prose_heldout_fraction if d.prose else config.heldout_fraction) for d, ui in zip(docs, u)]
  if len(docs) >= 2 and not any(held):
    held[int(np.argmin(u))] = True
  if len(docs) >= 2 and all(held):
    held[int(np.argmax(u))] = False
  return {
    "train": [d for d, h in zip(docs, held) if not h],
    "heldout": [d for d, h in zip(docs, held) if h],
  }


def _signature(config: TextConfig, docs: Sequence[Document]) -> str:
  h = hashlib.sha256()
  fields = (config.roots, config.suffixes, config.skip_tests, config.heldout_fraction, config.prose_heldout_fraction)
  h.update(repr(fields).encode())
  for d in docs:
    if d.path is not None:
      st = d.path.stat()
      h.update(f"{d.key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
      h.update(f"{d.key}\0".encode() + d.read() + b"\n")
  return h.hexdigest()[:16]


def text_config(
  paths: Sequence[str | os.PathLike] | None = None,
  *,
  suffixes: Sequence[str] | None = None,
  include_pydoc: bool | None = None,
  heldout_fraction: float = 0.02,
  prose_heldout_fraction: float = 0.75,
) -> TextConfig:
  """Describes a corpus and checks it; its name is a signature of its contents.

  Args:
    paths: local files and directories; ``None`` for the default corpus (stdlib ``.py`` files + pydoc topics).
    suffixes: keep only files with these endings (default: ``(".py",)`` for the stdlib, every file otherwise).
    include_pydoc: add the pydoc topics (default: only for the default corpus).
    heldout_fraction: probability that a file is held out.
    prose_heldout_fraction: probability that a pydoc topic is held out.

  Returns:
    A ``TextConfig`` to pass to the builder and the pipelines.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: the corpus has no bytes, fewer than two documents (a split by file needs two), or a fraction is
      outside [0, 1].
  """
  for name, frac in (("heldout_fraction", heldout_fraction), ("prose_heldout_fraction", prose_heldout_fraction)):
    if not 0.0 <= frac <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {frac}")
  if paths is None:
    kind, roots, skip_tests = "stdlib", [stdlib_dir()], True
    suffixes = (".py",) if suffixes is None else suffixes
    include_pydoc = True if include_pydoc is None else include_pydoc
  else:
    kind, skip_tests = "files", False
    roots = [Path(p).expanduser() for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
      raise FileNotFoundError(f"text corpus path(s) not found: {', '.join(missing)}")
    roots = [p.resolve() for p in roots]
  config = TextConfig(
    name="pending",
    roots=tuple(str(p) for p in roots),
    suffixes=None if suffixes is None else tuple(suffixes),
    skip_tests=skip_tests,
    include_pydoc=bool(include_pydoc),
    heldout_fraction=float(heldout_fraction),
    prose_heldout_fraction=float(prose_heldout_fraction),
  )
  docs = list_documents(config)
  where = ", ".join(config.roots) + (" + pydoc topics" if config.include_pydoc else "")
  if not docs:
    raise ValueError(f"text corpus has no bytes: no non-empty files found in {where}")
  if len(docs) < 2:
    raise ValueError(f"text corpus {where} has a single non-empty document; the split by file needs at least two")
  description = f"Byte-level text from {where} (suffixes={config.suffixes}), split by file."
  return config.named(f"{kind}_{_signature(config, docs)}", description)


# ----------------------------------------------------------------------------------------------------------------
# TFDS builder.


class JstreamText(LocalBuilder):
  """Local text documents as byte arrays, split ``train`` / ``heldout`` by file (TFDS name ``jstream_text``).

  Features: ``text`` (uint8 ``[n]``, the document's bytes), ``key`` (str, its key: relative path or
  ``pydoc/<topic>``), ``prose`` (bool, a pydoc topic), ``index`` (int64, its rank in stream order within the
  split). Records are stored in stream order.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Initial release: documents as uint8 tensors, split by a hash of the key."
  }
  SPLITS = SPLITS

  @classmethod
  def default_config(cls) -> TextConfig:
    return text_config()

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {
      "text": tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
      "key": tfds.features.Tensor(shape=(), dtype=np.str_),
      "prose": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "index": index_feature(),
    }

  @functools.cached_property
  def _documents(self) -> dict[str, list[Document]]:
    return split_documents(self.builder_config, list_documents(self.builder_config))

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, doc in enumerate(self._documents[split]):
      text = np.frombuffer(doc.read(), dtype=np.uint8)
      yield i, {"text": text, "key": doc.key, "prose": doc.prose, "index": i}


def text_builder(config: TextConfig | None = None, data_dir: str | os.PathLike | None = None) -> JstreamText:
  """The prepared text builder for ``config`` (default corpus if ``None``), built on first use."""
  return JstreamText.prepare(config, data_dir)


# ----------------------------------------------------------------------------------------------------------------
# Streams and pipelines.


@functools.lru_cache(maxsize=4)
def _load_stream(dataset_dir: str, split: str) -> np.ndarray:
  builder = tfds.builder_from_directory(dataset_dir)
  source = builder.as_data_source(split=split)
  records = sorted((source[i] for i in range(len(source))), key=lambda r: r["index"])
  parts = []
  for r in records:
    parts += [r["text"], np.array([SEPARATOR], np.uint8)]
  stream = np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
  stream.flags.writeable = False
  return stream


def split_bytes(
  split: str = "train", *, config: TextConfig | None = None, data_dir: str | os.PathLike | None = None
) -> np.ndarray:
  """The whole byte stream of a split: read-only uint8 ``[n]`` (documents in stream order, each + ``SEPARATOR``)."""
  check_split(split, SPLITS)
  builder = text_builder(config, data_dir)
  return _load_stream(str(builder.data_dir), split)


def heldout_stream(
  n_bytes: int | None = None, *, config: TextConfig | None = None, data_dir: str | os.PathLike | None = None
) -> np.ndarray:
  """One long held-out byte stream for streaming evaluation.

  Args:
    n_bytes: length to return (the first ``n_bytes`` of the held-out stream); ``None`` for all of it.
    config: the corpus (default: stdlib + pydoc, whose held-out stream has several hundred kB).
    data_dir: TFDS data dir (see ``resolve_data_dir``).

  Returns:
    int32 ``[n_bytes]`` token ids in 0..255.

  Raises:
    ValueError: the held-out split is shorter than ``n_bytes``.
  """
  stream = split_bytes("heldout", config=config, data_dir=data_dir)
  if n_bytes is None:
    n_bytes = len(stream)
  if not 0 <= n_bytes <= len(stream):
    raise ValueError(f"asked for {n_bytes} held-out bytes, but the held-out split has {len(stream)}")
  return stream[:n_bytes].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """Maps a chunk number ``j`` to ``stream[j * stride : j * stride + seq_len]`` as int32 (picklable for workers)."""

  stream: np.ndarray
  seq_len: int
  stride: int

  def __call__(self, j: int) -> np.ndarray:
    start = int(j) * self.stride
    return self.stream[start : start + self.seq_len].astype(np.int32)


NAME_CHARS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
VALUE_CHARS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)
NEEDLE_BYTES = 18  # len('\nname = "value"\n') with a 5-letter name and a 6-character value


def random_needle(rng: np.random.Generator) -> tuple[bytes, bytes]:
  """A random needle: a 5-letter name and a 6-character value (letters and digits)."""
  return rng.choice(NAME_CHARS, 5).tobytes(), rng.choice(VALUE_CHARS, 6).tobytes()


def needle_lines(name: bytes, value: bytes) -> tuple[bytes, bytes]:
  """The planted line ``\nname = "value"\n`` and its recall ``\nname = "`` (which the value and ``"\n`` follow)."""
  return b"\n" + name + b' = "' + value + b'"\n', b"\n" + name + b' = "'


def plant_needle(window: np.ndarray, rng: np.random.Generator, pairs: int = 1) -> np.ndarray:
  """``window`` with ``pairs`` random needle lines written over it, each followed later by its recall and the value
  (the associative recall of ``TrainConfig.needles``), at random places that do not overlap; the lines and recalls
  interleave, so recalling a value means finding its name. Windows shorter than the lines are returned as they
  are."""
  n = len(window)
  pairs = min(pairs, n // (2 * NEEDLE_BYTES))
  if pairs < 1:
    return window
  # 2 * pairs non-overlapping line starts, uniformly arranged: sorted draws in the room left by the lines, shifted
  starts = np.sort(rng.integers(0, n - 2 * pairs * NEEDLE_BYTES + 1, size=2 * pairs)) + NEEDLE_BYTES * np.arange(
    2 * pairs
  )
  order = rng.permutation(2 * pairs).reshape(pairs, 2)  # each needle's two places: the earlier has the line
  out = window.copy()
  for places in order:
    line = np.frombuffer(needle_lines(*random_needle(rng))[0], np.uint8)  # the recall is the line again
    for at in starts[places]:
      out[at : at + NEEDLE_BYTES] = line
  return out


@dataclasses.dataclass(frozen=True)
class _RandomWindow:
  """A window of ``seq_len`` bytes starting at a uniform random offset (picklable for workers); with probability
  ``needles`` a needle and its recall are planted in it (``plant_needle``)."""

  stream: np.ndarray
  seq_len: int
  needles: float = 0.0
  needle_pairs: int = 1
  copies: float = 0.0

  def __call__(self, _: int, rng: np.random.Generator) -> np.ndarray:
    start = int(rng.integers(0, len(self.stream) - self.seq_len + 1))
    window = self.stream[start : start + self.seq_len].astype(np.int32)
    if self.copies and rng.random() < self.copies:
      return repeated_string(self.seq_len, rng)
    if self.needles and rng.random() < self.needles:
      window = plant_needle(window, rng, self.needle_pairs)
    return window


def repeated_string(
  n: int, rng: np.random.Generator, length: tuple[int, int] = (8, 64), symbols: np.ndarray = VALUE_CHARS
) -> np.ndarray:
  """``n`` tokens of one random string of ``symbols`` (default: the bytes of letters and digits; its length uniform
  in ``length``, inclusive) repeated: all but its first occurrence is predictable by copying (the induction task of
  ``TrainConfig.copies``)."""
  s = rng.choice(symbols, int(rng.integers(length[0], length[1] + 1))).astype(np.int32)
  return np.resize(s, n)


def text_dataset(
  split: str = "train",
  *,
  seq_len: int,
  batch_size: int,
  seed: int,
  sampling: Literal["random", "chunks"] = "random",
  stride: int | None = None,
  num_epochs: int | None = None,
  needles: float = 0.0,
  needle_pairs: int = 1,
  copies: float = 0.0,
  worker_count: int = 0,
  read_options: grain.ReadOptions | None = None,
  config: TextConfig | None = None,
  data_dir: str | os.PathLike | None = None,
) -> grain.IterDataset:
  """Batches of byte windows from a split, for training.

  An epoch has ``len(stream) // seq_len`` random windows, or ``(len(stream) - seq_len) // stride + 1`` chunks.
  ``sampling="random"``: each window starts at a uniform random
  offset (every offset is possible; seeded per window index). ``sampling="chunks"``: the stream is cut into
  chunks starting every ``stride`` bytes (``stride=seq_len``, the default: consecutive, non-overlapping; smaller:
  each chunk repeats the last ``seq_len - stride`` bytes of the one before, for overlapped-chunk training),
  visited in a fresh shuffled order every epoch. Only full batches are
  yielded. Resuming: ``state = it.get_state()`` (a JSON-able dict) and later ``it = iter(ds); it.set_state(state)``
  give exactly the batches that would have come next.

  Args:
    split: ``"train"`` or ``"heldout"``.
    seq_len: window length (ask for ``t + 1`` to get inputs and next-token targets of length ``t``).
    batch_size: windows per batch.
    seed: seed in [0, 2**32); same seed, same batches.
    sampling: ``"random"`` windows or shuffled ``"chunks"``.
    stride: with ``"chunks"``, bytes between chunk starts, in ``[1, seq_len]`` (default ``seq_len``).
    num_epochs: ``None`` repeats forever.
    needles: with ``"random"`` sampling, the probability that a window carries a planted needle line
      ``name = "value"`` and, later in the window, its recall (``plant_needle``): associative recall to learn.
    needle_pairs: needles (and recalls) planted in such a window, each with its own name and value.
    copies: with ``"random"`` sampling, the probability that a window is a random string repeated instead
      (``repeated_string``): copying to learn.
    worker_count: grain worker processes (0: in this process, with reader threads).
    read_options: grain reader threads / prefetch (default 2 threads, 16 batches).
    config: the corpus (default: stdlib + pydoc).
    data_dir: TFDS data dir (see ``resolve_data_dir``).

  Returns:
    A ``grain.IterDataset`` of int32 ``[batch_size, seq_len]`` arrays with values in 0..255.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  stride = seq_len if stride is None else stride
  if sampling != "chunks" and stride != seq_len:
    raise ValueError("stride applies to sampling='chunks' only")
  if not 1 <= stride <= seq_len:
    raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
  if not 0.0 <= needles <= 1.0:
    raise ValueError(f"needles must be a probability in [0, 1], got {needles}")
  if needles and sampling != "random":
    raise ValueError("needles apply to sampling='random' only")
  if not 0.0 <= copies <= 1.0:
    raise ValueError(f"copies must be a probability in [0, 1], got {copies}")
  if copies and sampling != "random":
    raise ValueError("copies apply to sampling='random' only")
  if not isinstance(needle_pairs, int) or needle_pairs < 1:
    raise ValueError(f"needle_pairs must be an int >= 1, got {needle_pairs!r}")
  stream = split_bytes(split, config=config, data_dir=data_dir)
  if len(stream) < seq_len:
    raise ValueError(f"split {split!r} has {len(stream)} bytes, fewer than seq_len={seq_len}")
  n = (len(stream) - seq_len) // stride + 1 if sampling == "chunks" else len(stream) // seq_len
  ds = grain.MapDataset.range(n)
  if sampling == "chunks":
    ds = ds.shuffle(seed=seed).repeat(num_epochs).map(_Chunk(stream, seq_len, stride))
  elif sampling == "random":
    ds = ds.repeat(num_epochs).random_map(_RandomWindow(stream, seq_len, needles, needle_pairs, copies), seed=seed)
  else:
    raise ValueError(f"sampling must be 'random' or 'chunks', got {sampling!r}")
  return finish_pipeline(ds, batch_size, worker_count=worker_count, read_options=read_options)
