"""jstream.data: TFDS builders over local data (array_record, no TensorFlow) and grain pipelines.

Small corpora are built into temporary data dirs; every test reads what the builders wrote to disk.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import library_checks_only
from jstream import data as D
from jstream.data import digits as DG
from jstream.data import text as T


def _take(it, n):
  return [np.array(next(it)) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _unit_hash(key: str) -> float:
  """The documented split hash: the first 8 bytes of sha256(key) as a fraction of 2**64."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return sorted((source[i] for i in range(len(source))), key=lambda r: r["index"])


# ----------------------------------------------------------------------------------------------------------------
# Text.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  """Twenty small files in nested folders, one not UTF-8, plus an empty and a hidden file (both skipped)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["stream", "cache", "token", "window", "sink", "chunk", "def", "return", "(", ")", ":", "\n"]
  for i in range(20):
    path = root / f"pkg{i % 3}" / f"mod_{i}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"# file {i}\n" + " ".join(rng.choice(words, size=400 + 50 * i)))
  (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20)
  (root / "empty.txt").write_bytes(b"")
  (root / ".hidden.txt").write_text("not part of the corpus")
  return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def text_cfg(corpus) -> T.TextConfig:
  return D.text_config([corpus], heldout_fraction=0.2)


@pytest.fixture(scope="module")
def text_builder(text_cfg, data_dir) -> T.JstreamText:
  return D.text_builder(text_cfg, data_dir)


def _corpus_files(corpus: Path) -> dict[str, bytes]:
  files = [p for p in corpus.rglob("*") if p.is_file() and not p.name.startswith(".") and p.stat().st_size]
  return {f"{corpus.name}/{p.relative_to(corpus).as_posix()}": p.read_bytes() for p in files}


def test_text_builder_splits_disjoint_by_file(text_builder, corpus, data_dir):
  expected = _corpus_files(corpus)
  assert len(expected) == 21
  keys = {}
  for split in ("train", "heldout"):
    records = _records(text_builder, split)
    assert [r["index"] for r in records] == list(range(len(records)))
    keys[split] = {r["key"].decode() for r in records}
    assert len(keys[split]) == len(records) >= 1
    for r in records:
      assert r["text"].dtype == np.uint8
      assert bytes(r["text"]) == expected[r["key"].decode()]
      assert not r["prose"]
  assert not keys["train"] & keys["heldout"]
  assert keys["train"] | keys["heldout"] == set(expected)
  assert Path(text_builder.data_dir).is_relative_to(data_dir)


def test_text_split_rule_is_per_file_and_stable(corpus, tmp_path):
  config = D.text_config([corpus], heldout_fraction=0.2)
  splits = T.split_documents(config, T.list_documents(config))
  for split, docs in splits.items():
    for doc in docs:
      assert (_unit_hash(doc.key) < 0.2) == (split == "heldout"), doc.key
  # Adding a file moves no other file, and gives a new config name (no collision on disk).
  (tmp_path / "extra.txt").write_text("one more document")
  bigger = D.text_config([corpus, tmp_path / "extra.txt"], heldout_fraction=0.2)
  bigger_splits = T.split_documents(bigger, T.list_documents(bigger))
  for split in splits:
    assert {d.key for d in splits[split]} <= {d.key for d in bigger_splits[split]}
  assert bigger.name != config.name
  assert D.text_config([corpus], heldout_fraction=0.2).name == config.name
  assert D.text_config([corpus], heldout_fraction=0.3).name != config.name


def test_text_split_keeps_both_splits_non_empty(tmp_path):
  for name in ("a.txt", "b.txt", "c.txt"):
    (tmp_path / name).write_text(f"document {name}")
  u = {f"{tmp_path.name}/{n}": _unit_hash(f"{tmp_path.name}/{n}") for n in ("a.txt", "b.txt", "c.txt")}
  for fraction, moved in ((0.0, min(u, key=u.get)), (1.0, max(u, key=u.get))):
    config = D.text_config([tmp_path], heldout_fraction=fraction)
    splits = T.split_documents(config, T.list_documents(config))
    small = splits["heldout"] if fraction == 0.0 else splits["train"]
    assert [d.key for d in small] == [moved]
    assert len(splits["train"]) + len(splits["heldout"]) == 3


def test_text_builder_is_built_once(text_builder, text_cfg, data_dir):
  info = Path(text_builder.data_dir) / "dataset_info.json"
  before = info.stat().st_mtime_ns
  again = D.text_builder(text_cfg, data_dir)
  assert again.data_dir == text_builder.data_dir
  assert info.stat().st_mtime_ns == before


def test_split_bytes_is_documents_joined_by_separator(text_builder, text_cfg, data_dir):
  for split in ("train", "heldout"):
    stream = D.split_bytes(split, config=text_cfg, data_dir=data_dir)
    expected = b"".join(bytes(r["text"]) + bytes([D.SEPARATOR]) for r in _records(text_builder, split))
    assert stream.dtype == np.uint8
    assert bytes(stream) == expected


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(T.ENV_DATA_DIR, raising=False)
  assert D.resolve_data_dir() == Path("~/.cache/jstream/tfds").expanduser().resolve()
  monkeypatch.setenv(T.ENV_DATA_DIR, str(tmp_path / "env"))
  assert D.resolve_data_dir() == (tmp_path / "env").resolve()
  assert D.resolve_data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()


@pytest.mark.parametrize("sampling", ["random", "chunks"])
def test_text_dataset_shapes_and_determinism(text_builder, text_cfg, data_dir, sampling):
  kw = dict(seq_len=48, batch_size=4, sampling=sampling, config=text_cfg, data_dir=data_dir)
  a = _take(iter(D.text_dataset(seed=0, **kw)), 6)
  b = _take(iter(D.text_dataset(seed=0, **kw)), 6)
  c = _take(iter(D.text_dataset(seed=1, **kw)), 6)
  assert _same(a, b)
  assert not _same(a, c)
  stream = bytes(D.split_bytes("train", config=text_cfg, data_dir=data_dir))
  for batch in a:
    assert batch.shape == (4, 48) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() <= 255
    for row in batch:
      assert bytes(row.astype(np.uint8)) in stream


def test_text_dataset_plants_needles_and_their_recall(text_builder, text_cfg, data_dir):
  import re

  kw = dict(seq_len=64, batch_size=4, sampling="random", config=text_cfg, data_dir=data_dir)
  batches = _take(iter(D.text_dataset(seed=0, needles=1.0, **kw)), 3)
  line = re.compile(rb'\n([a-z]{5}) = "([a-z0-9]{6})"\n')
  for row in np.concatenate(batches):
    b = bytes(row.astype(np.uint8))
    found = [m.groups() for m in line.finditer(b)]
    assert len(found) >= 2 and found[0] == found[-1]  # the needle, and later its recall with the same value
  plain = np.concatenate(_take(iter(D.text_dataset(seed=0, **kw)), 3))
  assert not any(line.search(bytes(r.astype(np.uint8))) for r in plain)
  # several needles per window: three lines, each twice (the line and its recall), none overwriting another
  kw = {**kw, "seq_len": 128}
  for row in np.concatenate(_take(iter(D.text_dataset(seed=1, needles=1.0, needle_pairs=3, **kw)), 3)):
    found = [m.groups() for m in line.finditer(bytes(row.astype(np.uint8)))]
    assert sorted(collections.Counter(found).values()) == [2, 2, 2], found
  with pytest.raises(ValueError, match="needle_pairs"):
    D.text_dataset(seed=0, needles=0.5, needle_pairs=0, **kw)


def test_text_dataset_mixes_in_repeated_strings(text_builder, text_cfg, data_dir):
  """``copies``: that share of the windows is one random string of letters and digits repeated (the rest is text)."""
  import re

  kw = dict(seq_len=128, batch_size=8, sampling="random", config=text_cfg, data_dir=data_dir)
  rows = np.concatenate(_take(iter(D.text_dataset(seed=0, copies=0.5, **kw)), 4))
  repeated = 0
  for row in rows:
    b = bytes(row.astype(np.uint8))
    m = re.fullmatch(rb"([a-z0-9]{8,64}?)\1+[a-z0-9]*", b)
    if m:
      period = len(m.group(1))
      assert all(b[i] == b[i % period] for i in range(len(b)))
      repeated += 1
  assert 8 <= repeated <= 24  # about half of 32
  with pytest.raises(ValueError, match="copies"):
    D.text_dataset(seed=0, copies=1.5, **kw)
  with pytest.raises(ValueError, match="needles"):
    D.text_dataset(seed=0, needles=0.5, **{**kw, "sampling": "chunks"})


def test_text_chunks_cover_each_epoch_once(text_builder, text_cfg, data_dir):
  stream = D.split_bytes("train", config=text_cfg, data_dir=data_dir)
  seq_len = 100
  n = len(stream) // seq_len
  kw = dict(seq_len=seq_len, batch_size=1, sampling="chunks", config=text_cfg, data_dir=data_dir, num_epochs=2)
  rows = [b[0] for b in D.text_dataset(seed=3, **kw)]
  assert len(rows) == 2 * n
  chunks = {bytes(stream[j * seq_len : (j + 1) * seq_len]): j for j in range(n)}
  for epoch in (rows[:n], rows[n:]):
    order = [chunks[bytes(r.astype(np.uint8))] for r in epoch]
    assert sorted(order) == list(range(n))
    assert order != list(range(n))  # Shuffled.
  assert [bytes(r) for r in rows[:n]] != [bytes(r) for r in rows[n:]]  # A fresh order every epoch.


def test_text_overlapped_chunks(text_builder, text_cfg, data_dir):
  """stride < seq_len: chunks start every ``stride`` bytes, so with the first ``seq_len - stride`` targets of each
  chunk kept out of the loss, every later byte of the stream is a learnt target exactly once per epoch."""
  stream = D.split_bytes("train", config=text_cfg, data_dir=data_dir)
  seq_len, stride = 101, 75
  kw = dict(seq_len=seq_len, batch_size=1, sampling="chunks", stride=stride, config=text_cfg, data_dir=data_dir)
  rows = [b[0] for b in D.text_dataset(seed=4, num_epochs=1, **kw)]
  n = (len(stream) - seq_len) // stride + 1
  starts = {bytes(stream[j * stride : j * stride + seq_len]): j * stride for j in range(n)}
  got = sorted(starts[bytes(r.astype(np.uint8))] for r in rows)
  assert got == [j * stride for j in range(n)]
  overlap = seq_len - 1 - stride  # inputs are row[:-1], targets row[1:]; the first `overlap` targets are context
  learnt = np.concatenate([np.arange(s + 1 + overlap, s + seq_len) for s in got])
  np.testing.assert_array_equal(learnt, np.arange(overlap + 1, got[-1] + seq_len))
  with pytest.raises(ValueError, match="stride must be"):
    D.text_dataset(seed=0, **{**kw, "stride": seq_len + 1})
  with pytest.raises(ValueError, match="stride applies"):
    D.text_dataset(seed=0, **{**kw, "sampling": "random"})


def test_overlap_training_reads_overlapped_chunks(text_builder, text_cfg, data_dir, monkeypatch):
  from jstream import TransformerConfig
  from jstream.train import TrainConfig
  from jstream.train.loop import train_iterator

  monkeypatch.setattr(T, "text_config", lambda *a, **k: text_cfg)
  monkeypatch.setenv("JSTREAM_DATA_DIR", str(data_dir))
  stream = D.split_bytes("train", config=text_cfg, data_dir=data_dir)
  model = TransformerConfig(vocab_size=257, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32)
  cfg = TrainConfig(model=model, seq_len=40, overlap=10, batch_size=3)
  batch = np.asarray(next(train_iterator(cfg)))
  assert batch.shape == (3, 41)
  for row in batch:
    hits = [j for j in range(0, len(stream) - 40, 30) if bytes(stream[j : j + 41]) == bytes(row.astype(np.uint8))]
    assert hits, "each sample is a chunk starting at a multiple of seq_len - overlap"


@pytest.mark.parametrize("worker_count", [0, 1])
def test_text_iterator_checkpoint_restore(text_builder, text_cfg, data_dir, worker_count):
  ds = D.text_dataset(seq_len=32, batch_size=3, seed=7, config=text_cfg, data_dir=data_dir, worker_count=worker_count)
  it = iter(ds)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # A checkpoint stores it as JSON.
  expected = _take(it, 4)
  resumed = iter(ds)
  resumed.set_state(state)
  got = _take(resumed, 4)
  for i in (it, resumed):
    if hasattr(i, "close"):
      i.close()
  assert _same(expected, got)
  assert not _same(expected, _take(iter(D.text_dataset(seq_len=32, batch_size=3, seed=7, config=text_cfg,
                                                         data_dir=data_dir)), 4))  # fmt: skip
  if worker_count:  # Workers change nothing but speed.
    serial = iter(D.text_dataset(seq_len=32, batch_size=3, seed=7, config=text_cfg, data_dir=data_dir))
    assert _same(_take(serial, 9)[5:], expected)


def test_heldout_stream(text_builder, text_cfg, data_dir):
  full = D.split_bytes("heldout", config=text_cfg, data_dir=data_dir)
  s = D.heldout_stream(100, config=text_cfg, data_dir=data_dir)
  assert s.shape == (100,) and s.dtype == np.int32
  np.testing.assert_array_equal(s, full[:100].astype(np.int32))
  assert len(D.heldout_stream(config=text_cfg, data_dir=data_dir)) == len(full)
  with pytest.raises(ValueError, match="held-out split has"):
    D.heldout_stream(len(full) + 1, config=text_cfg, data_dir=data_dir)


def test_default_corpus_stdlib_and_pydoc(tmp_path):
  config = D.text_config()
  assert config.include_pydoc and config.name.startswith("stdlib_")
  stream = D.heldout_stream(100_000, data_dir=tmp_path)
  assert stream.shape == (100_000,) and stream.dtype == np.int32
  builder = D.text_builder(data_dir=tmp_path)
  keys = {}
  for split in ("train", "heldout"):
    records = _records(builder, split)
    keys[split] = {r["key"].decode() for r in records}
    assert not any("site-packages/" in k or "/test/" in k or "/tests/" in k for k in keys[split])
  assert not keys["train"] & keys["heldout"]
  prose = {k for k in keys["heldout"] if k.startswith("pydoc/")}
  code = {k for k in keys["heldout"] if k.startswith("stdlib/") and k.endswith(".py")}
  assert len(prose) > len({k for k in keys["train"] if k.startswith("pydoc/")})  # Topics: mostly held out.
  assert code and len(keys["train"]) > 20 * len(code)  # Files: about 2% held out.
  assert b"def " in bytes(stream.astype(np.uint8)) and b" the " in bytes(stream.astype(np.uint8))


def test_text_errors(tmp_path, text_cfg, data_dir):
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    D.text_config([tmp_path / "no_such_dir"])
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(ValueError, match="no bytes"):
    D.text_config([tmp_path / "empty_dir"])
  (tmp_path / "empty_dir" / "a.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="no bytes"):
    D.text_config([tmp_path / "empty_dir"])
  (tmp_path / "one.txt").write_text("a single document")
  with pytest.raises(ValueError, match="at least two"):
    D.text_config([tmp_path / "one.txt"])
  with pytest.raises(ValueError, match="heldout_fraction"):
    D.text_config([tmp_path], heldout_fraction=1.5)
  with pytest.raises(ValueError, match="unknown split"):
    D.split_bytes("validation", config=text_cfg, data_dir=data_dir)
  with pytest.raises(ValueError, match="fewer than seq_len"):
    D.text_dataset("heldout", seq_len=10**7, batch_size=1, seed=0, config=text_cfg, data_dir=data_dir)
  with library_checks_only(), pytest.raises(ValueError, match="sampling"):
    D.text_dataset(seq_len=8, batch_size=1, seed=0, sampling="strided", config=text_cfg, data_dir=data_dir)


# ----------------------------------------------------------------------------------------------------------------
# Moving digits.


@pytest.fixture(scope="module")
def digits_cfg() -> DG.DigitsConfig:
  return D.digits_config(frame_size=(24, 28), digit_size=12, num_digits=3, num_frames=8, num_train=32, num_test=8)


@pytest.fixture(scope="module")
def digits_builder(digits_cfg, data_dir) -> DG.JstreamMovingDigits:
  return D.digits_builder(digits_cfg, data_dir)


def test_digit_pools():
  train, train_labels = DG.digit_pool("train", 16)
  test, test_labels = DG.digit_pool("test", 16)
  assert train.shape == (1438, 16, 16) and test.shape == (359, 16, 16)
  assert train.dtype == np.uint8 and train.max() > 200 and train.min() == 0
  assert set(train_labels) == set(test_labels) == set(range(10))


def test_warp_is_the_plain_resize_at_the_identity_and_moves_pixels_exactly():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 16, (5, 8, 8))
  n = len(images)
  eye, zero = np.tile(np.eye(2), (n, 1, 1)), np.zeros((n, 2))
  m = DG._resize_matrix(8, 12)
  np.testing.assert_allclose(DG.warp(images, 12, eye, zero), np.einsum("ai,nij,bj->nab", m, images, m), atol=1e-12)
  # at the input's own size, a quarter turn and whole-pixel shifts map pixel centres onto pixel centres
  turn = np.tile(np.array([[0.0, -1.0], [1.0, 0.0]]), (n, 1, 1))
  np.testing.assert_allclose(DG.warp(images, 8, turn, zero), np.rot90(images, -1, axes=(1, 2)), atol=1e-12)
  shifted = np.zeros_like(images)
  shifted[:, :, :-2] = images[:, :, 2:]  # reading 2 pixels to the right moves the image 2 pixels left; 0 enters
  np.testing.assert_allclose(DG.warp(images, 8, eye, np.tile([0.0, 2.0], (n, 1))), shifted, atol=1e-12)
  half = DG.warp(images, 8, eye, np.tile([0.5, 0.0], (n, 1)))  # half a pixel down: the mean of two rows
  np.testing.assert_allclose(half[:, :-1], (images[:, :-1] + images[:, 1:]) / 2, atol=1e-12)


def test_augmented_pool_adds_variants_after_the_plain_images():
  plain, plain_labels = DG.digit_pool("train", 12)
  pool, labels = DG.digit_pool("train", 12, 2)
  m = len(plain)
  assert pool.shape == (3 * m, 12, 12) and pool.dtype == np.uint8
  np.testing.assert_array_equal(pool[:m], plain)
  np.testing.assert_array_equal(labels, np.tile(plain_labels, 3))
  for k in (1, 2):  # each variant moves ink (and differs from the other variant) but keeps most of it
    variant = pool[k * m : (k + 1) * m].astype(float)
    moved = np.abs(variant - plain).mean(axis=(1, 2))
    assert (moved > 1).mean() > 0.95
    assert 0.6 < variant.sum() / plain.sum() < 1.1
  assert (pool[m : 2 * m] != pool[2 * m :]).any(axis=(1, 2)).all()
  DG.digit_pool.cache_clear()
  np.testing.assert_array_equal(DG.digit_pool("train", 12, 2)[0], pool)  # the same variants every call
  np.testing.assert_array_equal(DG.digit_pool("test", 12, 2)[0], DG.digit_pool("test", 12)[0])
  with pytest.raises(ValueError, match="augment"):
    DG.digit_pool("train", 12, -1)


def test_digits_builder_matches_make_clip(digits_builder, digits_cfg):
  for split, count in (("train", 32), ("test", 8)):
    records = _records(digits_builder, split)
    assert len(records) == count
    for i in (0, count - 1):
      clip = D.make_clip(digits_cfg, split, i)
      for key in ("frames", "labels", "positions"):
        np.testing.assert_array_equal(records[i][key], clip[key])
    assert records[0]["frames"].shape == (8, 24, 28) and records[0]["frames"].dtype == np.uint8
    assert records[0]["labels"].shape == (3,) and records[0]["positions"].shape == (8, 3, 2)


def test_make_clip_determinism(digits_cfg):
  a = D.make_clip(digits_cfg, "train", 5)
  assert all(np.array_equal(a[k], v) for k, v in D.make_clip(digits_cfg, "train", 5).items())
  other_seed = D.digits_config(frame_size=(24, 28), digit_size=12, num_digits=3, num_frames=8, seed=1)
  for b in (
    D.make_clip(digits_cfg, "train", 6),
    D.make_clip(digits_cfg, "test", 5),
    D.make_clip(other_seed, "train", 5),
  ):
    assert not np.array_equal(a["positions"], b["positions"])


def test_digits_bounce_inside_frame():
  cfg = D.digits_config(frame_size=32, digit_size=16, num_digits=2, num_frames=60, speed=(2.0, 5.0))
  bounces = 0
  for i in range(20):
    clip = D.make_clip(cfg, "train", i)
    pos, frames = clip["positions"].astype(np.float64), clip["frames"]
    assert pos.min() >= 0 and pos.max() <= 16 + 1e-4
    step = np.diff(pos, axis=0)  # [T-1, n, 2]
    speed = np.abs(step).max(axis=0)  # Per digit and axis: the unreflected step length.
    assert np.all(np.linalg.norm(speed, axis=-1) <= 5.0 + 1e-4)
    turns = np.sign(step[1:]) * np.sign(step[:-1]) < 0  # [T-2, n, 2]
    for t, d, a in zip(*np.nonzero(turns)):
      wall_distance = min(pos[t + 1, d, a], 16 - pos[t + 1, d, a])
      assert wall_distance <= speed[d, a] + 1e-4  # Direction changes only next to a wall.
    bounces += turns.sum()
    # Ink only inside the digit boxes (drawn at the rounded positions).
    corners = np.rint(pos).astype(int)
    for f in range(0, 60, 7):
      mask = np.zeros((32, 32), bool)
      for y, x in corners[f]:
        mask[y : y + 16, x : x + 16] = True
      assert frames[f][~mask].max(initial=0) == 0 and frames[f][mask].max() > 100
  assert bounces > 20


def test_digits_dataset_shapes_dtypes_and_determinism(digits_builder, digits_cfg, data_dir):
  kw = dict(batch_size=4, config=digits_cfg, data_dir=data_dir)
  a = _take(iter(D.digits_dataset(seed=0, **kw)), 3)
  assert _same(a, _take(iter(D.digits_dataset(seed=0, **kw)), 3))
  assert not _same(a, _take(iter(D.digits_dataset(seed=1, **kw)), 3))
  assert a[0].shape == (4, 8, 24, 28) and a[0].dtype == np.uint8
  f = _take(iter(D.digits_dataset(seed=0, dtype=np.float32, **kw)), 1)[0]
  assert f.dtype == np.float32 and 0.0 <= f.min() and f.max() <= 1.0
  np.testing.assert_allclose(f, a[0] / 255.0, atol=1e-6)
  batch = next(iter(D.digits_dataset("test", shuffle=False, with_metadata=True, **kw)))
  assert batch["labels"].shape == (4, 3) and batch["positions"].shape == (4, 8, 3, 2)
  np.testing.assert_array_equal(batch["frames"][1], D.make_clip(digits_cfg, "test", 1)["frames"])
  assert len(list(D.digits_dataset("test", shuffle=False, num_epochs=1, **kw))) == 2


def test_digits_iterator_checkpoint_restore(digits_builder, digits_cfg, data_dir):
  ds = D.digits_dataset(batch_size=5, seed=2, config=digits_cfg, data_dir=data_dir)
  it = iter(ds)
  _take(it, 9)  # Past the first epoch (32 clips).
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  resumed = iter(ds)
  resumed.set_state(state)
  assert _same(expected, _take(resumed, 3))


def test_digits_config_errors():
  with pytest.raises(ValueError, match="digit_size"):
    D.digits_config(frame_size=16, digit_size=20)
  with pytest.raises(ValueError, match="speed"):
    D.digits_config(speed=(3.0, 1.0))
  with pytest.raises(ValueError, match="unknown split"):
    D.make_clip(D.digits_config(), "validation", 0)
  with pytest.raises(ValueError, match="dtype"):
    D.digits_dataset(batch_size=1, dtype=np.int32, config=D.digits_config(num_train=2, num_test=1))


# ----------------------------------------------------------------------------------------------------------------
# No TensorFlow.


def test_pipelines_do_not_import_tensorflow(tmp_path, corpus):
  """Builds and reads both datasets in a fresh interpreter; TensorFlow must never be imported."""
  script = textwrap.dedent(
    f"""
    import sys
    from jstream import data as D
    cfg = D.text_config([{str(corpus)!r}])
    next(iter(D.text_dataset(seq_len=16, batch_size=2, seed=0, config=cfg, data_dir={str(tmp_path)!r})))
    D.heldout_stream(10, config=cfg, data_dir={str(tmp_path)!r})
    dc = D.digits_config(frame_size=16, digit_size=8, num_frames=4, num_train=4, num_test=2)
    next(iter(D.digits_dataset(batch_size=2, config=dc, data_dir={str(tmp_path)!r})))
    assert "tensorflow_datasets" in sys.modules and "grain" in sys.modules
    print("TF_IMPORTED", "tensorflow" in sys.modules)
    """
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "TF_IMPORTED False" in out.stdout


# ----------------------------------------------------------------------------------------------------------------
# The builder base.


def _docstring_example() -> str:
  """The code block of ``jstream.data.base``'s docstring (after the line ending in ``::``)."""
  from jstream.data import base

  lines = base.__doc__.splitlines()
  start = next(i for i, line in enumerate(lines) if line.endswith("::")) + 1
  block = []
  for line in lines[start:]:
    if line and not line.startswith(" "):
      break
    block.append(line)
  return textwrap.dedent("\n".join(block))


def test_local_builder_docstring_example(tmp_path, monkeypatch):
  """The subclassing example of ``jstream.data.base`` runs as written: built once under $JSTREAM_DATA_DIR, named
  by its parameters, records in order; constructing an unprepared builder makes no temp folder."""
  import dataclasses
  import tempfile
  from collections.abc import Iterator
  from typing import Any, ClassVar

  import grain
  import tensorflow_datasets as tfds

  from jstream.data import base

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  ns = dict(dataclasses=dataclasses, Iterator=Iterator, Any=Any, ClassVar=ClassVar, grain=grain, np=np, tfds=tfds,
            base=base)  # fmt: skip
  exec(compile(_docstring_example(), "jstream.data.base docstring", "exec"), ns)
  builder, ds = ns["builder"], ns["ds"]
  assert Path(builder.data_dir).is_relative_to(tmp_path / "tfds")
  assert len(ds) == 100 and [int(ds[i]["index"]) for i in (0, 99)] == [0, 99]
  np.testing.assert_array_equal(ds[7]["image"], np.full((4, 4), 7, np.uint8))
  small, other = ns["squares_config"](size=4), ns["squares_config"](size=4, num_train=5)
  assert small.name != other.name and small.name == ns["squares_config"](size=4).name
  info = Path(builder.data_dir) / "dataset_info.json"
  before = info.stat().st_mtime_ns
  assert ns["JstreamSquares"].prepare(small).data_dir == builder.data_dir and info.stat().st_mtime_ns == before
  # TFDS would look for the dataset's info on GCS (an empty tmp*tfds folder each time) for an unprepared builder.
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  unprepared = ns["JstreamSquares"](config=other, data_dir=str(tmp_path / "tfds"))
  assert not unprepared.is_prepared() and list(scratch.iterdir()) == []
