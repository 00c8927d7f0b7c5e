"""The streaming video-QA data: answers recomputed independently from the event log, frames redrawn from it,
chunking and determinism, the builder and the pipeline, bad input."""

import collections
import itertools

import numpy as np
import pytest

from conftest import library_checks_only
from jstream.data import digits
from jstream.data import video_qa as V

NUMBER = {w: i for i, w in enumerate(V.NUMBERS)}


def long_stream(ticks=900, index=3, split="test", **kw):
  config = V.video_qa_config(question_prob=kw.pop("question_prob", 0.6), **kw)
  return config, V.VideoQAStream(config, split, index).take(ticks)


def expected_answer(question, chunk, config):
  """The answer to ``question`` from the event log and the drawn objects alone."""
  f, words = question.frame, question.words.split()
  past = [e for e in chunk.events if e[0] <= f]
  entries = [e for e in past if e[1] == V.ENTER]
  exits = [e for e in past if e[1] == V.EXIT]
  drawn = [row for row in chunk.objects[f - chunk.start] if row[0] >= 0]
  if question.qtype == "where":
    top, left = words[5] == "top", words[6] == "left"
    h, w = config.frame_size
    s = config.digit_size
    inside = [lab for _, lab, _, y, x in drawn if (2 * y + s < h) == top and (2 * x + s < w) == left]
    assert len(inside) <= 1, "asked about a quadrant with two digits"
    return V.NUMBERS[inside[0]] if inside else "none"
  if question.qtype == "count_now":
    return V.NUMBERS[len(drawn)]
  if question.qtype == "first_in":
    return V.NUMBERS[entries[0][3]]
  if question.qtype == "first_out":
    return V.NUMBERS[exits[0][3]]
  if question.qtype == "count":
    n = sum(e[3] == NUMBER[words[5]] for e in entries)
    return V.NUMBERS[n] if n < 10 else "many"
  if question.qtype == "order":
    a, b = NUMBER[words[1]], NUMBER[words[4]]
    first = {}
    for e in entries:
      first.setdefault(e[3], e[0])
    return "yes" if a in first and (b not in first or first[a] < first[b]) else "no"
  raise AssertionError(question.qtype)


def test_answers_equal_an_independent_recomputation_from_the_event_log():
  config, chunk = long_stream()
  by_type = collections.Counter(q.qtype for q in chunk.questions)
  assert set(by_type) == set(V.QTYPES), by_type
  answers = collections.defaultdict(collections.Counter)
  for q in chunk.questions:
    if q.qtype != "proactive":
      assert q.due == q.frame
      want = expected_answer(q, chunk, config)
      assert q.answer == want, (q, want)
      answers[q.qtype][q.answer] += 1
  assert answers["order"]["yes"] > 0 and answers["order"]["no"] > 0
  assert len(answers["where"]) > 2 and len(answers["count"]) > 2


def test_proactive_requests_are_announced_at_the_next_entry_of_their_digit():
  _, chunk = long_stream()
  requests = [q for q in chunk.questions if q.qtype == "proactive"]
  entries = [e for e in chunk.events if e[1] == V.ENTER]
  want = []
  for q in requests:
    label = NUMBER[q.answer]
    later = [e[0] for e in entries if e[0] > q.frame and e[3] == label]
    if later:
      want.append((later[0], q.frame, label))
  assert chunk.announcements == want and len(want) >= 3
  # One request pending at a time: each is asked after the previous one was announced.
  for prev, nxt in itertools.pairwise(requests):
    done = [a for a in chunk.announcements if a[1] == prev.frame]
    assert done and done[0][0] <= nxt.frame


def test_text_slots_follow_the_documented_layout():
  config, chunk = long_stream(ticks=300)
  questions = {q.frame: q for q in chunk.questions}
  announced = {a[0]: a[2] for a in chunk.announcements}
  for i, (ids, mask) in enumerate(zip(chunk.text, chunk.targets)):
    f = chunk.start + i
    want, target = [], []
    if f in announced:
      want += ["<speak>", V.NUMBERS[announced[f]], "<eos>"]
      target += [True] * 3
    else:
      want += ["<silent>"]
      target += [True]
    if f in questions:
      q = questions[f]
      want += ["<q>", *q.words.split()]
      target += [False] * (1 + len(q.words.split()))
      if q.qtype != "proactive":
        want += ["<a>", q.answer, "<eos>"]
        target += [False, True, True]
      assert chunk.qtype[i] == V.QTYPES.index(q.qtype)
    else:
      assert chunk.qtype[i] == -1
    pad = config.text_len - len(want)
    assert V.decode(ids) == " ".join(want)
    np.testing.assert_array_equal(ids[len(want) :], np.zeros(pad))
    np.testing.assert_array_equal(mask, np.array(target + [False] * pad))


@pytest.mark.parametrize("split,augment", [("train", 0), ("test", 0), ("train", 3)])
def test_frames_are_the_logged_digits_drawn_from_the_split_pool(split, augment):
  config, chunk = long_stream(ticks=120, split=split, index=1, augment=augment)
  images, labels = digits.digit_pool(split, config.digit_size, augment)
  if augment:  # the stream draws the augmented variants too
    assert (chunk.objects[..., 2] >= len(digits.digit_pool(split, config.digit_size)[0])).any()
  s = config.digit_size
  on_screen = {}  # object -> label, from the events
  for i, frame in enumerate(chunk.frames):
    f = chunk.start + i
    for e in chunk.events:
      if e[0] == f:
        if e[1] == V.ENTER:
          on_screen[e[2]] = e[3]
        else:
          del on_screen[e[2]]
    drawn = [row for row in chunk.objects[i] if row[0] >= 0]
    assert {int(r[0]): int(r[1]) for r in drawn} == on_screen
    assert len(drawn) <= config.max_on_screen
    redrawn = np.zeros_like(frame)
    for _, lab, image, y, x in drawn:
      assert labels[image] == lab and 0 <= y <= frame.shape[0] - s and 0 <= x <= frame.shape[1] - s
      np.maximum(redrawn[y : y + s, x : x + s], images[image], out=redrawn[y : y + s, x : x + s])
    np.testing.assert_array_equal(redrawn, frame)
  per_frame = collections.Counter((e[0], e[1]) for e in chunk.events)
  assert max(per_frame.values()) == 1  # at most one entry and one exit per frame


def test_augment_leaves_the_test_streams_as_they_are():
  plain, augmented = V.video_qa_config(), V.video_qa_config(augment=2)
  for split, same in (("test", True), ("train", False)):
    a, b = (V.VideoQAStream(c, split, 5).take(80) for c in (plain, augmented))
    assert np.array_equal(a.frames, b.frames) == same
  with pytest.raises(ValueError, match="augment"):
    V.video_qa_config(augment=-1)


def test_a_stream_does_not_depend_on_how_it_is_cut():
  config = V.video_qa_config(question_prob=0.5)
  whole = V.VideoQAStream(config, "train", 7).take(60)
  stream = V.VideoQAStream(config, "train", 7)
  parts = [stream.take(n) for n in (1, 13, 29, 17)]
  assert parts[1].start == 1 and stream.frame == 60
  for name in ("frames", "text", "targets", "qtype", "objects"):
    np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))
  for name in ("questions", "announcements", "events"):
    assert [x for p in parts for x in getattr(p, name)] == getattr(whole, name)
  again = V.VideoQAStream(config, "train", 7).take(60)
  np.testing.assert_array_equal(again.frames, whole.frames)
  other = V.VideoQAStream(config, "train", 8).take(60)
  assert not np.array_equal(other.frames, whole.frames)


def test_builder_stores_stream_prefixes_and_the_pipeline_batches_them(tmp_path):
  config = V.video_qa_config(clip_frames=8, num_train=6, num_test=2)
  builder = V.video_qa_builder(config, data_dir=tmp_path)
  source = builder.as_data_source(split="train")
  assert len(source) == 6
  for i in (0, 5):
    chunk = V.VideoQAStream(config, "train", i).take(8)
    np.testing.assert_array_equal(source[i]["frames"], chunk.frames)
    np.testing.assert_array_equal(source[i]["text"], chunk.text)
    np.testing.assert_array_equal(source[i]["targets"], chunk.targets.astype(np.uint8))
    np.testing.assert_array_equal(source[i]["qtype"], chunk.qtype)
    np.testing.assert_array_equal(source[i]["objects"], chunk.objects)
  ds = V.video_qa_dataset("train", batch_size=4, num_epochs=1, shuffle=False, config=config, data_dir=tmp_path)
  (batch,) = list(ds)
  assert batch["frames"].shape == (4, 8, 32, 32) and batch["frames"].dtype == np.float32
  assert float(batch["frames"].max()) <= 1.0 and batch["text"].shape == (4, 8, config.text_len)
  assert batch["targets"].dtype == bool and batch["qtype"].shape == (4, 8)
  assert batch["objects"].shape == (4, 8, config.max_on_screen, 5) and batch["objects"].dtype == np.int32


def test_overlapped_clips_are_windows_of_one_stream_with_the_shared_ticks_untrained(tmp_path):
  """``clips_per_stream=3, clip_overlap=3``: clip ``k`` of stream ``s`` is ticks ``5k .. 5k + 7`` of the stream
  generated in one piece, its first 3 ticks without targets for ``k > 0``; the builder stores them in order (7
  clips: the third stream gives one)."""
  config = V.video_qa_config(clip_frames=8, clips_per_stream=3, clip_overlap=3, num_train=7, num_test=1)
  source = V.video_qa_builder(config, data_dir=tmp_path).as_data_source(split="train")
  assert len(source) == 7
  for i in range(7):
    s, k = divmod(i, 3)
    whole = V.VideoQAStream(config, "train", s).take(18)
    ticks = slice(5 * k, 5 * k + 8)
    clip = source[i]
    assert int(clip["start"]) == 5 * k and int(clip["index"]) == i
    np.testing.assert_array_equal(clip["frames"], whole.frames[ticks])
    np.testing.assert_array_equal(clip["text"], whole.text[ticks])
    np.testing.assert_array_equal(clip["objects"], whole.objects[ticks])
    want = whole.targets[ticks].copy()
    if k:
      assert want[:3].any()  # every tick has a decision to train: the shared ticks lose them
      want[:3] = False
    np.testing.assert_array_equal(clip["targets"], want.astype(np.uint8))
  with pytest.raises(ValueError, match="clip_overlap must be in"):
    V.video_qa_config(clip_frames=8, clips_per_stream=1, clip_overlap=2)


def test_self_contained_clips_hold_only_what_their_own_ticks_tell():
  """``self_contained``: the clips cut mid-stream differ from the plain ones (same streams) only where a target
  needs the ticks before the clip: a ``HISTORY`` question leaves its slot (the decision stays), and an announcement
  whose request no tick of the clip asked reads ``<silent>`` (a target) before the rest of its slot; replayed
  here by walking each clip's own slots. A stream's first clip is unchanged; the streams themselves too."""
  weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0)  # requests often, so that some stand across a clip's start
  kw = dict(clip_frames=12, clips_per_stream=4, question_prob=0.6, question_weights=weights, enter_prob=0.4)
  kw["fulfil_prob"] = 0.5  # requests fulfilled often: announcements inside the clips too
  plain, contained = V.video_qa_config(**kw), V.video_qa_config(**kw, self_contained=True)
  history = [V.QTYPES.index(q) for q in V.HISTORY]
  proactive = V.QTYPES.index("proactive")
  hidden = dropped = kept = 0
  for s in range(16):
    for k, (p, c) in enumerate(zip(V.stream_clips(plain, "train", s), V.stream_clips(contained, "train", s))):
      for key in ("frames", "objects", "start"):
        np.testing.assert_array_equal(p[key], c[key])
      if k == 0:
        for key in ("text", "targets", "qtype"):
          np.testing.assert_array_equal(p[key], c[key])
        continue
      visible = None  # the digit word of the request the clip's own ticks asked and nothing announced yet
      for t in range(12):
        text, targets, qtype = p["text"][t].copy(), p["targets"][t].copy(), int(p["qtype"][t])
        if text[0] == V.SPEAK:
          if visible == text[1]:
            kept += 1
            visible = None
          else:  # the request was asked before the clip
            assert visible is None
            text = np.concatenate([[V.SILENT], text[3:], [V.PAD, V.PAD]])
            targets = np.concatenate([[1], targets[3:], [0, 0]]).astype(targets.dtype)
            hidden += 1
        if qtype in history:
          q = list(text).index(V.QUESTION)
          text[q:], targets[q:], qtype = V.PAD, 0, -1
          dropped += 1
        if qtype == proactive:
          asked = text[list(text).index(V.QUESTION) :]
          (visible,) = [w for w in asked if w in {V.WORD_ID[d] for d in V.NUMBERS}]
        np.testing.assert_array_equal(c["text"][t], text)
        np.testing.assert_array_equal(c["targets"][t], targets)
        assert int(c["qtype"][t]) == qtype
  assert hidden >= 3 and dropped >= 10 and kept >= 3, (hidden, dropped, kept)
  assert (
    V.VideoQAStream(contained, "train", 0).take(30).text.tolist()
    == V.VideoQAStream(plain, "train", 0).take(30).text.tolist()
  )
  with library_checks_only(), pytest.raises(ValueError, match="self_contained must be a bool"):
    V.video_qa_config(self_contained=1)


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="text_len must be >= 17"):
    V.video_qa_config(text_len=10)
  with pytest.raises(ValueError, match="unknown types"):
    V.video_qa_config(question_weights={"when": 1.0})
  with pytest.raises(ValueError, match="digit_size"):
    V.video_qa_config(frame_size=8, digit_size=12)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    V.encode("which digit is purple ?")
  with pytest.raises(ValueError, match="split"):
    V.VideoQAStream(split="valid")
  with pytest.raises(ValueError, match="positive int"):
    V.VideoQAStream().take(0)


def test_train_question_weights_change_the_training_clips_mix_and_not_the_evaluation_streams():
  """``VideoTask.train_question_weights``: the training clips' config asks with them, the evaluation streams'
  with ``question_weights``; with where tripled, where-questions make a larger share of the questions the training
  streams actually ask (counted from the streams' question records) and ``count_now`` a smaller one; the
  ``where3`` flag of ``configs/video_lm.py`` sets these weights; bad weights are a construction-time error."""
  import dataclasses
  import pathlib

  from jstream.train import VideoTask, load_config

  base = VideoTask(question_weights=(2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0))
  task = dataclasses.replace(base, train_question_weights=(6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0))
  assert task.data_config().question_weights == (6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0)
  assert task.data_config(curriculum=False).params() == base.data_config().params()

  def shares(config):
    asked = [q.qtype for i in range(40) for q in V.VideoQAStream(config, "train", i).take(48).questions]
    return {t: asked.count(t) / len(asked) for t in V.QTYPES}, len(asked)

  (trained, n), (evaluated, m) = shares(task.data_config()), shares(base.data_config())
  assert n > 200 and m > 200
  assert trained["where"] > 1.5 * evaluated["where"]  # 0.48 against 0.27 (where is not always askable)
  assert trained["count_now"] < evaluated["count_now"]
  flag = load_config(f"{pathlib.Path(__file__).resolve().parents[1]}/configs/video_lm.py:where3").video
  assert flag.train_question_weights == task.train_question_weights and flag.question_weights == base.question_weights
  with pytest.raises(ValueError, match="train_question_weights must be 7"):
    VideoTask(train_question_weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="train_question_weights must be 7"):
    VideoTask(train_question_weights=(0.0,) * 7)


def test_fulfil_prob_shows_the_requested_digit_at_entries_while_a_request_is_pending():
  """``fulfil_prob=1``: the first digit to enter after a proactive request is the requested one, announced in that
  tick, its image one of that label's; at 0.3 streams hold more announcements than with uniform entries;
  the training task's curriculum stays out of the evaluation streams (``data_config(curriculum=False)``)."""
  from jstream.train import VideoTask

  config = V.video_qa_config(fulfil_prob=1.0, question_weights={"proactive": 1.0, "count_now": 1.0})
  requests = 0
  for i in range(4):
    stream = V.VideoQAStream(config, "train", i)
    chunk = stream.take(120)
    announced = {qf: f for f, qf, _ in chunk.announcements}
    for q in chunk.questions:
      if q.qtype != "proactive":
        continue
      later = [e for e in chunk.events if e[0] > q.frame and e[1] == V.ENTER]
      if not later:
        continue
      f, _, obj, label = later[0]
      assert V.NUMBERS[label] == q.answer and announced[q.frame] == f
      (row,) = [r for r in chunk.objects[f] if r[0] == obj]
      assert stream._labels[row[2]] == label
      requests += 1
  assert requests >= 8

  def announcements(p):
    c = V.video_qa_config(fulfil_prob=p)
    return sum(len(V.VideoQAStream(c, "train", i).take(48).announcements) for i in range(60))

  assert announcements(0.3) > 1.5 * announcements(0.0)
  task = VideoTask(fulfil_prob=0.3)
  assert task.data_config().fulfil_prob == 0.3 and task.data_config(curriculum=False).fulfil_prob == 0.0
  with pytest.raises(ValueError, match="fulfil_prob must be in"):
    V.video_qa_config(fulfil_prob=1.5)


def test_train_stay_puts_more_exits_in_the_training_clips_and_not_in_the_evaluation_streams():
  """``VideoTask.train_stay``: the training clips' digits stay that many frames (each digit's time on screen,
  read off the streams' entry and exit events, inside the range, and the clips hold more exits than with the
  dataset's stays); the evaluation streams keep the dataset's; the ``exits`` flag sets it; bad ranges are a
  construction-time error."""
  import dataclasses
  import pathlib

  from jstream.train import VideoTask, load_config

  base = VideoTask()
  task = dataclasses.replace(base, train_stay=(4, 16))
  assert task.data_config(curriculum=False).params() == base.data_config().params()

  def stays_and_exits(config):
    stays, exits = [], 0
    for i in range(40):
      events = V.VideoQAStream(config, "train", i).take(60).events
      entered = {obj: f for f, kind, obj, _ in events if kind == V.ENTER}
      left = [(obj, f) for f, kind, obj, _ in events if kind == V.EXIT]
      stays += [f - entered[obj] for obj, f in left]
      exits += sum(f < 24 for _, f in left)
    return np.array(stays), exits

  short, short_exits = stays_and_exits(task.data_config())
  long, long_exits = stays_and_exits(base.data_config())
  assert short.min() >= 4 and short.max() <= 16 + 2  # a colliding exit moves a frame later, past at most the 2 others
  assert long.max() > 20 and short_exits > 1.5 * long_exits
  flag = load_config(f"{pathlib.Path(__file__).resolve().parents[1]}/configs/video_lm.py:exits").video
  assert flag.train_stay == (4, 16) and flag.data_config().stay == (4, 16)
  assert flag.data_config(curriculum=False).stay == V.video_qa_config().stay
  for bad in ((5, 3), (0, 4), (4,)):
    with pytest.raises(ValueError, match="train_stay must be"):
      VideoTask(train_stay=bad)


def test_train_enter_prob_fills_the_training_clips_and_not_the_evaluation_streams():
  """``VideoTask.train_enter_prob``: the training clips' digits enter at that rate (entries counted from the
  streams' events while the canvas has room, against the rate), the evaluation streams keep ``enter_prob``; the
  ``steady`` flag sets it beside ``exits``' stays, and its clips hold three digits in a larger share of ticks than
  ``exits`` alone; bad rates are a construction-time error."""
  import dataclasses
  import pathlib

  from jstream.train import VideoTask, load_config

  base = VideoTask(train_stay=(4, 16))
  task = dataclasses.replace(base, train_enter_prob=0.4)
  assert task.data_config(curriculum=False).params() == base.data_config(curriculum=False).params()

  def entry_rate(config):  # entries over the ticks that had room for one
    entries = room = 0
    for i in range(60):
      chunk = V.VideoQAStream(config, "train", i).take(24)
      drawn = (chunk.objects[..., 0] >= 0).sum(-1)
      entered = {f for f, kind, _, _ in chunk.events if kind == V.ENTER}
      for f in range(24):
        before = drawn[f] - (f in entered)  # after the tick's exits, before its entry
        room += before < config.max_on_screen
        entries += f in entered
    return entries / room

  assert entry_rate(task.data_config()) == pytest.approx(0.4, abs=0.05)
  assert entry_rate(base.data_config()) == pytest.approx(0.2, abs=0.05)
  root = pathlib.Path(__file__).resolve().parents[1]
  steady = load_config(f"{root}/configs/video_lm.py:steady").video
  exits = load_config(f"{root}/configs/video_lm.py:exits").video
  assert steady.train_stay == (4, 16) and steady.train_enter_prob == 2 * steady.enter_prob
  assert steady.data_config(curriculum=False).enter_prob == V.video_qa_config().enter_prob

  def full(config):  # the share of ticks with three digits on screen
    drawn = [(V.VideoQAStream(config, "train", i).take(24).objects[..., 0] >= 0).sum(-1) for i in range(60)]
    return np.mean(np.stack(drawn) == 3)

  assert full(steady.data_config()) > 1.5 * full(exits.data_config())
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="train_enter_prob must be"):
      VideoTask(train_enter_prob=bad)


def test_scene_stats_counts_a_stream_worked_by_hand():
  """``experiments.scene_stats``: one digit at a time that enters at every chance and stays 3 frames enters at
  ticks 0, 3, ..., 21 of a 24-tick clip, each later entry in the tick of the previous digit's exit; the canvas is
  never empty; and the default training clips show fewer exits and more empty ticks than the steady state of the
  evaluation streams (what the experiment is for)."""
  from experiments.scene_stats import scene_stats

  config = V.video_qa_config(max_on_screen=1, enter_prob=1.0, stay=(3, 3), question_prob=0.0, clip_frames=24)
  s = scene_stats(config, "train", 3, 24)
  assert s["on_screen_share"] == [0.0, 1.0]
  assert s["exits_per_clip"] == 7 and s["entries_per_clip_beside"] == [8.0]
  assert s["entries_with_an_exit"] == 0.875 and s["announcements_per_clip"] == 0
  assert s["words_per_tick"] == 1.0  # no questions, no requests: the decision alone
  half = scene_stats(config, "train", 3, 24, burn=12)  # ticks 12..23: entries at 12 .. 21, each with an exit
  assert half["entries_per_clip_beside"] == [8.0] and half["entries_with_an_exit"] == 1.0
  default = V.video_qa_config()
  clips, steady = scene_stats(default, "train", 60, 24), scene_stats(default, "test", 2, 400, burn=50)
  assert clips["exits_per_clip"] < 0.6 * steady["exits_per_clip"]
  assert clips["on_screen_share"][0] > 3 * steady["on_screen_share"][0]
  with pytest.raises(ValueError, match="burn must be"):
    scene_stats(default, "test", 1, 10, burn=10)
