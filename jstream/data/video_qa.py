"""Streaming video question answering on moving digits: endless streams, an event log, templated questions.

A stream is a video of handwritten digits (scikit-learn's, as in ``jstream.data.digits``) that enter the canvas
at random times, move and bounce, and leave after random durations, with questions about what has been seen so
far asked at random times. It is generated tick by tick and never materialised: ``VideoQAStream.take(n)`` returns
the next ``n`` ticks, for as long as one wants.

Conventions
  * **Ticks.** Tick ``f`` is frame ``f`` followed by a text slot of ``text_len`` word ids. Everything said in tick
    ``f`` is about frames ``0 .. f`` only.
  * **Digits.** Each on-screen digit is an *object* with an id (0, 1, 2, ... in order of entry), a label (0-9),
    an image from the split's pool (``digits.digit_pool``: the test split shows held-out handwriting), a start
    corner, a velocity and a leave frame. At most one digit enters per frame (with probability ``enter_prob``
    while fewer than ``max_on_screen`` are on screen) and at most one leaves per frame. A digit that enters at
    frame ``f`` is drawn in frame ``f``; one that leaves at frame ``f`` is drawn up to frame ``f - 1``. Motion:
    constant velocity, bouncing off the walls (``digits.bounce``); a digit is drawn at its rounded corner;
    overlapping digits combine by pixel-wise maximum.
  * **Event log.** ``Chunk.events``: ``(frame, kind, object, label)`` for every entry (kind 0) and exit (kind 1);
    ``Chunk.objects``: ``[n, max_on_screen, 5]`` int32 ``(object, label, image, y, x)`` of every digit drawn in
    each frame (``image``: its index in the split's pool; rows of -1 pad). Ground truth can be recomputed from
    these alone (the tests do).
  * **Questions** (one per tick at most, with probability ``question_prob``, the type drawn by
    ``question_weights`` among the types that can be asked then), answered from the past:

    ========== ======================================== ==============================================
    type       question                                 answer
    ========== ======================================== ==============================================
    where      which digit is in the top left now ?     the label of the one digit whose centre lies in
                                                        that quadrant, or ``none`` (asked only when the
                                                        quadrant holds at most one centre)
    count_now  how many digits are on screen ?          ``zero`` .. ``nine``
    first_in   which digit appeared first ?             the label of object 0
    first_out  what was the first digit to leave ?      the label of the first exit (asked after one)
    count      how many times has a three entered so    ``zero`` .. ``nine``, ``many`` from 10 on
               far ?
    order      did five appear before two ?             ``yes`` iff five entered and two had not
                                                        entered before five first did
    proactive  tell me when a seven appears             nothing then; at the next entry of a seven the
                                                        model speaks ``seven`` (one pending at a time)
    ========== ======================================== ==============================================

    Categories (``CATEGORY``): *now* (where, count_now), *long range* (first_in, first_out), *counting*,
    *order*, *proactive*.
  * **Text slot** of a tick: a decision, then the question if one is asked::

      <silent>                                  nothing to announce
      <speak> seven <eos>                        a pending proactive request is fulfilled in this frame
      ... <q> did five appear before two ? <a> yes <eos>

    then ``<pad>`` up to ``text_len``. ``Chunk.targets`` marks the ids a model is trained to produce: the
    decision, the announced label and its ``<eos>``, and the answer and its ``<eos>``; the question words are
    given.
  * **Determinism.** A stream is a pure function of ``(config, split, index)``: its generator is
    ``np.random.default_rng([seed, split_id, index])`` and how the stream is cut into ``take`` calls does not
    change it.
  * **Builder.** ``JstreamVideoQA`` (TFDS name ``jstream_video_qa``) stores ``num_train`` training clips (and
    ``num_test`` of the test split): the first ``clip_frames`` ticks of streams ``0, 1, ...``, or with
    ``clips_per_stream > 1`` that many consecutive clips of each stream overlapping by ``clip_overlap`` ticks
    (``stream_clips``), as ``frames [T, H, W]`` uint8, ``text [T, L]`` int32, ``targets [T, L]`` uint8,
    ``qtype [T]`` int32 (index in ``QTYPES``; -1: no question), ``objects [T, max_on_screen, 5]`` int32 (as
    ``Chunk.objects``), ``start`` (the clip's first tick) and ``index``; with ``self_contained`` a clip cut
    mid-stream holds no target that needs the ticks before it. ``video_qa_dataset`` batches them with grain.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds

from jstream.data.base import LocalBuilder, LocalConfig, check_params, check_split, frames_dataset, index_feature
from jstream.data.digits import digit_pool, fold

SPLITS = ("train", "test")
ENTER, EXIT = 0, 1

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPECIAL = ("<pad>", "<silent>", "<speak>", "<q>", "<a>", "<eos>")
QUADRANTS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
QTYPES = ("where", "count_now", "first_in", "first_out", "count", "order", "proactive")
CATEGORY = {
  "where": "now",
  "count_now": "now",
  "first_in": "long_range",
  "first_out": "long_range",
  "count": "counting",
  "order": "order",
  "proactive": "proactive",
}
HISTORY = ("first_in", "first_out", "count", "order")
"""The question types whose answers need the stream from its first tick (``VideoQAConfig.self_contained``)."""
_TEMPLATES = {
  "where": "which digit is in the {v} {h} now ?",
  "count_now": "how many digits are on screen ?",
  "first_in": "which digit appeared first ?",
  "first_out": "what was the first digit to leave ?",
  "count": "how many times has a {d} entered so far ?",
  "order": "did {a} appear before {b} ?",
  "proactive": "tell me when a {d} appears",
}


def _vocabulary() -> tuple[str, ...]:
  fixed = (*SPECIAL, *NUMBERS, "many", "none", "yes", "no", "top", "bottom", "left", "right")
  words = {w for t in _TEMPLATES.values() for w in t.split() if not w.startswith("{")}
  return fixed + tuple(sorted(words - set(fixed)))


MAX_QUESTION_WORDS = max(len(t.split()) for t in _TEMPLATES.values())
"""Words in the longest question."""
WORDS = _vocabulary()
"""The word vocabulary: special tokens first (``<pad>`` = 0), then answers, then the other template words."""
WORD_ID = {w: i for i, w in enumerate(WORDS)}
PAD, SILENT, SPEAK, QUESTION, ANSWER, EOS = (WORD_ID[w] for w in SPECIAL)
LABEL_WORDS = tuple(WORD_ID[w] for w in (*NUMBERS, "none"))
"""The word naming each patch label of the video model (digits 0-9, then no digit: ``VideoLMConfig.label_words``)."""
PLACE_WORDS = tuple(WORD_ID[w] for w in ("top", "bottom", "left", "right"))
"""The words naming a frame token's quadrant (``VideoLMConfig.place_words``), as where-questions name them."""


def encode(words: str | Sequence[str]) -> np.ndarray:
  """int32 ids of ``words`` (a space-separated string or a sequence), or a clear error naming an unknown word."""
  seq = words.split() if isinstance(words, str) else list(words)
  unknown = [w for w in seq if w not in WORD_ID]
  if unknown:
    raise ValueError(f"words outside the vocabulary: {unknown} (see jstream.data.video_qa.WORDS)")
  return np.asarray([WORD_ID[w] for w in seq], np.int32)


def request_slots(length: int) -> np.ndarray:
  """The slot of each proactive request, ``tell me when a {d} appears`` for ``d`` = zero .. nine, ``[10, length]``
  int32: ``<q>`` and the question's words, padded with ``PAD`` (what ``Activation.encode`` reads)."""
  words = [[QUESTION, *encode(_TEMPLATES["proactive"].format(d=d))] for d in NUMBERS]
  if max(map(len, words)) > length:
    raise ValueError(f"a request of {max(map(len, words))} words does not fit a slot of {length}")
  return np.asarray([w + [PAD] * (length - len(w)) for w in words], np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
  """The words of ``ids``, ``<pad>`` dropped."""
  return " ".join(WORDS[int(i)] for i in np.asarray(ids).reshape(-1) if int(i) != PAD)


@dataclasses.dataclass(eq=False)
class VideoQAConfig(LocalConfig):
  """A streaming video-QA dataset (a TFDS builder config); make one with ``video_qa_config``, which names it.

  Attributes:
    frame_size: ``(H, W)`` of a frame.
    digit_size: side of an upscaled digit.
    max_on_screen: most digits on screen at once (at most 9).
    enter_prob: probability that a digit enters in a frame while there is room.
    stay: ``(min, max)`` frames a digit stays on screen.
    speed: ``(min, max)`` speed in pixels per frame.
    question_prob: probability of a question in a tick.
    question_weights: relative frequency of each type in ``QTYPES``.
    text_len: word slots per tick.
    clip_frames: ticks per stored training clip.
    clips_per_stream: consecutive clips cut from each stream (1: its first ``clip_frames`` ticks).
    clip_overlap: ticks a clip shares with the one before it in its stream (StreamingVLM's overlapped chunks):
      clip ``k`` of a stream covers ticks ``k * (clip_frames - clip_overlap)`` onwards, and in every clip but a
      stream's first, the shared ticks are context only (no targets: the previous clip trained them).
    num_train: clips in the train split.
    num_test: clips in the test split.
    seed: base seed of the stream generator.
    fulfil_prob: probability that a digit entering while a proactive request is pending shows the requested digit
      (an image of that label instead of a uniform draw from the pool): a training curriculum in which requests
      are fulfilled sooner and more often, so that a clip holds more announcements to learn from. 0 (the
      default): every entry is a uniform draw, and the streams are those of a config without this field.
    augment: the train split's digit pool also holds this many random affine variants of each training image
      (``digits.digit_pool(augment=)``): more handwriting for the frame encoder to learn from. The test split is
      unchanged (its pool is never augmented). 0 (the default): the streams of a config without this field.
    self_contained: every clip but a stream's first holds only what can be told from its own ticks, so that clips
      cut mid-stream train a model for a long stream's steady state without targets it cannot learn: a proactive
      request asked before the clip is not announced in it (its announcement tick reads ``<silent>``, as for a
      model that never saw the request), and the questions whose answers need the stream before the clip
      (``first_in``, ``first_out``, ``count``, ``order``: ``HISTORY``) are not asked in it (their slots keep only
      the decision). The streams are unchanged; only the stored clips are. ``False`` (the default): clips hold
      their stream's ticks as they are.
  """

  frame_size: tuple[int, int] = (32, 32)
  digit_size: int = 12
  max_on_screen: int = 3
  enter_prob: float = 0.2
  stay: tuple[int, int] = (6, 30)
  speed: tuple[float, float] = (0.5, 2.0)
  question_prob: float = 0.25
  question_weights: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
  text_len: int = 17
  clip_frames: int = 48
  clips_per_stream: int = 1
  clip_overlap: int = 0
  num_train: int = 2000
  num_test: int = 200
  seed: int = 0
  fulfil_prob: float = 0.0
  augment: int = 0
  self_contained: bool = False


def video_qa_config(
  *,
  frame_size: int | tuple[int, int] = 32,
  digit_size: int = 12,
  max_on_screen: int = 3,
  enter_prob: float = 0.2,
  stay: tuple[int, int] = (6, 30),
  speed: tuple[float, float] = (0.5, 2.0),
  question_prob: float = 0.25,
  question_weights: Sequence[float] | dict[str, float] | None = None,
  text_len: int = 17,
  clip_frames: int = 48,
  clips_per_stream: int = 1,
  clip_overlap: int = 0,
  num_train: int = 2000,
  num_test: int = 200,
  seed: int = 0,
  fulfil_prob: float = 0.0,
  augment: int = 0,
  self_contained: bool = False,
) -> VideoQAConfig:
  """Checks and names a video-QA config (arguments as the ``VideoQAConfig`` attributes).

  ``question_weights`` may be a dict by type name (missing types get 0) or a sequence in ``QTYPES`` order.

  Raises:
    ValueError: a parameter is out of range (a digit larger than the frame, a text slot too short for the
      longest question, ...), naming it.
  """
  h, w = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
  if question_weights is None:
    weights = VideoQAConfig.question_weights
  elif isinstance(question_weights, dict):
    bad = set(question_weights) - set(QTYPES)
    if bad:
      raise ValueError(f"question_weights has unknown types {sorted(bad)}; types are {QTYPES}")
    weights = tuple(float(question_weights.get(t, 0.0)) for t in QTYPES)
  else:
    weights = tuple(float(x) for x in question_weights)
  need = _longest_slot()
  checks = {
    "digit_size must be in [1, min(frame_size)]": 1 <= digit_size <= min(h, w),
    "max_on_screen must be in [1, 9]": 1 <= max_on_screen <= 9,
    "enter_prob and question_prob must be in [0, 1]": 0 <= enter_prob <= 1 and 0 <= question_prob <= 1,
    "stay must be (min, max) with 1 <= min <= max": 1 <= stay[0] <= stay[1],
    "speed must be (min, max) with 0 <= min <= max": 0 <= speed[0] <= speed[1],
    f"question_weights must be {len(QTYPES)} non-negative numbers, not all 0": (
      len(weights) == len(QTYPES) and min(weights) >= 0 and sum(weights) > 0
    ),
    f"text_len must be >= {need} (the longest slot)": text_len >= need,
    "clip_frames, clips_per_stream, num_train and num_test must be >= 1": (
      min(clip_frames, clips_per_stream, num_train, num_test) >= 1
    ),
    "clip_overlap must be in [0, clip_frames), and 0 with one clip per stream": (
      0 <= clip_overlap < clip_frames and (clips_per_stream > 1 or clip_overlap == 0)
    ),
    "seed must be in [0, 2**32)": 0 <= seed < 2**32,
    "fulfil_prob must be in [0, 1]": 0 <= fulfil_prob <= 1,
    "augment must be an int >= 0": isinstance(augment, (int, np.integer)) and augment >= 0,
    "self_contained must be a bool": isinstance(self_contained, bool),
  }
  check_params(
    checks,
    frame_size=(h, w),
    digit_size=digit_size,
    max_on_screen=max_on_screen,
    enter_prob=enter_prob,
    stay=stay,
    speed=speed,
    question_prob=question_prob,
    question_weights=weights,
    text_len=text_len,
    clip_frames=clip_frames,
    clips_per_stream=clips_per_stream,
    clip_overlap=clip_overlap,
    num_train=num_train,
    num_test=num_test,
    seed=seed,
    fulfil_prob=fulfil_prob,
    augment=augment,
    self_contained=self_contained,
  )
  config = VideoQAConfig(
    name="pending",
    frame_size=(int(h), int(w)),
    digit_size=int(digit_size),
    max_on_screen=int(max_on_screen),
    enter_prob=float(enter_prob),
    stay=(int(stay[0]), int(stay[1])),
    speed=(float(speed[0]), float(speed[1])),
    question_prob=float(question_prob),
    question_weights=weights,
    text_len=int(text_len),
    clip_frames=int(clip_frames),
    clips_per_stream=int(clips_per_stream),
    clip_overlap=int(clip_overlap),
    num_train=int(num_train),
    num_test=int(num_test),
    seed=int(seed),
    fulfil_prob=float(fulfil_prob),
    augment=int(augment),
    self_contained=bool(self_contained),
  )
  name = f"{h}x{w}_d{digit_size}_m{max_on_screen}_t{clip_frames}_{config.signature()}"
  return config.named(name, f"Streaming video QA on moving digits: {config.params()}")


def _longest_slot() -> int:
  return 3 + 1 + MAX_QUESTION_WORDS + 1 + 1 + 1  # <speak> label <eos> <q> question <a> answer <eos>


# ----------------------------------------------------------------------------------------------------------------
# Streams.


@dataclasses.dataclass(frozen=True)
class Question:
  """A question asked in tick ``frame``: ``qtype`` (in ``QTYPES``), its words and the answer word.

  For ``proactive`` questions ``answer`` is the label word to announce later and ``due`` is ``None``: the
  announcement, when it comes, is in ``Chunk.announcements``. For the others ``due == frame``.
  """

  frame: int
  qtype: str
  words: str
  answer: str
  due: int | None


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Ticks ``start .. start + n - 1`` of a stream.

  Attributes:
    start: the first tick's frame index.
    frames: uint8 ``[n, H, W]``.
    text: int32 ``[n, text_len]`` word ids of each tick's slot.
    targets: bool ``[n, text_len]``: the ids a model produces (decision, announcement, answer).
    qtype: int32 ``[n]`` index in ``QTYPES`` of the tick's question, -1 for none.
    questions: the questions asked in these ticks, in order.
    announcements: ``(frame, question frame, label)`` of proactive announcements due in these ticks.
    events: ``(frame, kind, object, label)`` entries (``ENTER``) and exits (``EXIT``) in these ticks.
    objects: int32 ``[n, max_on_screen, 5]`` ``(object, label, image, y, x)`` of the digits drawn in each frame.
  """

  start: int
  frames: np.ndarray
  text: np.ndarray
  targets: np.ndarray
  qtype: np.ndarray
  questions: list[Question]
  announcements: list[tuple[int, int, int]]
  events: list[tuple[int, int, int, int]]
  objects: np.ndarray


@dataclasses.dataclass
class _Digit:
  obj: int
  label: int
  image: int
  start: int
  corner: np.ndarray  # float64 [2], top-left at frame ``start``
  velocity: np.ndarray  # float64 [2]
  leave: int


class VideoQAStream:
  """An endless video-QA stream, generated tick by tick (see the module docstring).

  Args:
    config: the dataset config (default ``video_qa_config()``).
    split: ``"train"`` or ``"test"`` (the digit pool: test shows held-out handwriting).
    index: which stream; ``(config, split, index)`` determines it.
  """

  def __init__(self, config: VideoQAConfig | None = None, split: str = "test", index: int = 0):
    check_split(split, SPLITS)
    if not isinstance(index, (int, np.integer)) or index < 0:
      raise ValueError(f"index must be a non-negative int, got {index!r}")
    self.config = config or video_qa_config()
    self.split, self.index = split, int(index)
    self._images, self._labels = digit_pool(split, self.config.digit_size, self.config.augment)
    self._by_label = [np.flatnonzero(self._labels == d) for d in range(10)]
    self._rng = np.random.default_rng([self.config.seed, SPLITS.index(split), self.index])
    self.frame = 0  # the next tick's frame
    self._next_obj = 0
    self._active: list[_Digit] = []
    self._first_in: int | None = None  # label of object 0
    self._first_out: int | None = None
    self._entries = np.zeros(10, np.int64)
    self._first_entry = np.full(10, -1, np.int64)  # frame of each label's first entry
    self._pending: tuple[int, int] | None = None  # proactive (question frame, label)
    self._limit = np.array(self.config.frame_size, np.float64) - self.config.digit_size

  def __iter__(self) -> Iterator[Chunk]:
    """Chunks of one tick each, forever."""
    while True:
      yield self.take(1)

  def take(self, n: int) -> Chunk:
    """The next ``n`` ticks."""
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"n must be a positive int, got {n!r}")
    c = self.config
    h, w = c.frame_size
    frames = np.zeros((n, h, w), np.uint8)
    text = np.full((n, c.text_len), PAD, np.int32)
    targets = np.zeros((n, c.text_len), bool)
    qtype = np.full((n,), -1, np.int32)
    objects = np.full((n, c.max_on_screen, 5), -1, np.int32)
    questions, announcements, events = [], [], []
    start = self.frame
    for i in range(n):
      f = self.frame
      tick_events = self._update(f)
      events += tick_events
      corners = self._draw(f, frames[i], objects[i])
      slot, mask, question, announcement = self._text(f, tick_events, corners)
      if announcement is not None:
        announcements.append(announcement)
      if question is not None:
        questions.append(question)
        qtype[i] = QTYPES.index(question.qtype)
      text[i, : len(slot)] = slot
      targets[i, : len(mask)] = mask
      self.frame += 1
    return Chunk(start, frames, text, targets, qtype, questions, announcements, events, objects)

  # -------------------------------------------------------------------------------------------- simulation

  def _text(self, f, tick_events, corners) -> tuple[list[int], list[bool], Question | None, tuple | None]:
    """Tick ``f``'s text slot (ids and target flags), its question and its proactive announcement."""
    slot, mask, announcement = [], [], None

    def say(ids, target):
      slot.extend(int(x) for x in ids)
      mask.extend([target] * len(ids))

    pending = self._pending
    if pending is not None and any(e[1] == ENTER and e[3] == pending[1] for e in tick_events):
      announcement = (f, *pending)
      say([SPEAK, WORD_ID[NUMBERS[pending[1]]], EOS], True)
      self._pending = None
    else:
      say([SILENT], True)
    question = self._ask(f, corners)
    if question is not None:
      say([QUESTION, *encode(question.words)], False)
      if question.qtype != "proactive":
        say([ANSWER], False)
        say([WORD_ID[question.answer], EOS], True)
    return slot, mask, question, announcement

  def _update(self, f: int) -> list[tuple[int, int, int, int]]:
    """Exits and the entry of frame ``f``; returns their events."""
    c, rng = self.config, self._rng
    events = []
    for d in [d for d in self._active if d.leave == f]:
      self._active.remove(d)
      events.append((f, EXIT, d.obj, d.label))
      if self._first_out is None:
        self._first_out = d.label
    enter = rng.random() < c.enter_prob
    if enter and len(self._active) < c.max_on_screen:
      image = int(rng.integers(len(self._images)))
      if c.fulfil_prob > 0 and self._pending is not None and rng.random() < c.fulfil_prob:
        pool = self._by_label[self._pending[1]]  # the requested digit, an image drawn as uniformly
        image = int(pool[image % len(pool)])
      label = int(self._labels[image])
      corner = rng.uniform(0.0, 1.0, size=2) * self._limit
      speed, angle = rng.uniform(*c.speed), rng.uniform(0.0, 2.0 * np.pi)
      leave = f + int(rng.integers(c.stay[0], c.stay[1] + 1))
      while any(d.leave == leave for d in self._active):  # at most one exit per frame
        leave += 1
      velocity = speed * np.array([np.sin(angle), np.cos(angle)])
      self._active.append(_Digit(self._next_obj, label, image, f, corner, velocity, leave))
      events.append((f, ENTER, self._next_obj, label))
      if self._next_obj == 0:
        self._first_in = label
      self._next_obj += 1
      self._entries[label] += 1
      if self._first_entry[label] < 0:
        self._first_entry[label] = f
    return events

  def _draw(self, f: int, frame: np.ndarray, objects: np.ndarray) -> list[tuple[int, int, int]]:
    """Draws frame ``f``; fills ``objects``; returns ``(label, y, x)`` corners of the digits drawn."""
    s = self.config.digit_size
    corners = []
    for j, d in enumerate(self._active):
      pos = fold(d.corner + d.velocity * (f - d.start), self._limit)
      y, x = (int(v) for v in np.rint(pos))
      np.maximum(frame[y : y + s, x : x + s], self._images[d.image], out=frame[y : y + s, x : x + s])
      objects[j] = (d.obj, d.label, d.image, y, x)
      corners.append((d.label, y, x))
    return corners

  def _ask(self, f: int, corners: list[tuple[int, int, int]]) -> Question | None:
    """Maybe a question in tick ``f`` (random draws in a fixed order, whatever is askable)."""
    c, rng = self.config, self._rng
    ask, pick, a, b, flip = rng.random(), rng.random(), int(rng.integers(10)), int(rng.integers(9)), rng.random()
    quadrant = QUADRANTS[int(rng.integers(4))]
    if ask >= c.question_prob:
      return None
    h, w = c.frame_size
    half = c.digit_size / 2
    inside = [
      lab
      for lab, y, x in corners
      if ((y + half < h / 2) == (quadrant[0] == "top")) and ((x + half < w / 2) == (quadrant[1] == "left"))
    ]
    seen = np.flatnonzero(self._first_entry >= 0)
    askable = {
      "where": len(inside) <= 1,
      "count_now": True,
      "first_in": self._first_in is not None,
      "first_out": self._first_out is not None,
      "count": True,
      "order": len(seen) > 0,
      "proactive": self._pending is None,
    }
    weights = np.array([wt if askable[t] else 0.0 for t, wt in zip(QTYPES, c.question_weights)])
    if weights.sum() == 0:
      return None
    qtype = QTYPES[int(np.searchsorted(np.cumsum(weights) / weights.sum(), pick, side="right"))]
    if qtype == "where":
      words = _TEMPLATES["where"].format(v=quadrant[0], h=quadrant[1])
      answer = NUMBERS[inside[0]] if inside else "none"
    elif qtype == "count_now":
      words, answer = _TEMPLATES["count_now"], NUMBERS[len(corners)]
    elif qtype == "first_in":
      words, answer = _TEMPLATES["first_in"], NUMBERS[self._first_in]
    elif qtype == "first_out":
      words, answer = _TEMPLATES["first_out"], NUMBERS[self._first_out]
    elif qtype == "count":
      n = int(self._entries[a])
      words, answer = _TEMPLATES["count"].format(d=NUMBERS[a]), NUMBERS[n] if n < 10 else "many"
    elif qtype == "order":
      first = int(seen[a % len(seen)])  # a digit that has appeared
      other = [d for d in range(10) if d != first][b]
      fa, fb = self._first_entry[first], self._first_entry[other]
      words = _TEMPLATES["order"].format(a=NUMBERS[first], b=NUMBERS[other])
      if flip < 0.5:  # ask the other way round half of the time
        first, other, fa, fb = other, first, fb, fa
        words = _TEMPLATES["order"].format(a=NUMBERS[first], b=NUMBERS[other])
      answer = "yes" if fa >= 0 and (fb < 0 or fa < fb) else "no"
    else:
      self._pending = (f, a)
      return Question(f, qtype, _TEMPLATES["proactive"].format(d=NUMBERS[a]), NUMBERS[a], None)
    return Question(f, qtype, words, answer, f)


# ----------------------------------------------------------------------------------------------------------------
# TFDS builder and pipelines.


def clips_span(config: VideoQAConfig) -> int:
  """The ticks of a stream, from its first, that its ``clips_per_stream`` clips cover (``stream_clips``)."""
  return config.clip_frames + (config.clips_per_stream - 1) * (config.clip_frames - config.clip_overlap)


def stream_clips(config: VideoQAConfig, split: str, stream: int) -> list[dict[str, np.ndarray]]:
  """The ``clips_per_stream`` clips of stream ``stream`` of ``split``: ``clip_frames`` ticks each, clip ``k``
  starting at tick ``k * (clip_frames - clip_overlap)``; a clip's ticks shared with the previous clip keep their
  words but lose their targets. ``start`` is each clip's first tick in the stream."""
  t, o, k = config.clip_frames, config.clip_overlap, config.clips_per_stream
  step = t - o
  chunk = VideoQAStream(config, split, stream).take(clips_span(config))
  clips = []
  for j in range(k):
    a = j * step
    text, targets, qtype = chunk.text[a : a + t].copy(), chunk.targets[a : a + t].copy(), chunk.qtype[a : a + t].copy()
    if j and config.self_contained:
      _self_contained(chunk, a, text, targets, qtype)
    targets = targets.astype(np.uint8)
    if j:
      targets[:o] = 0
    clips.append(
      {
        "frames": chunk.frames[a : a + t],
        "text": text,
        "targets": targets,
        "qtype": qtype,
        "objects": chunk.objects[a : a + t],
        "start": np.int32(a),
      }
    )
  return clips


def _self_contained(chunk: Chunk, a: int, text: np.ndarray, targets: np.ndarray, qtype: np.ndarray) -> None:
  """Rewrites in place the slots (``text``, ``targets``, ``qtype``) of the clip of ``chunk`` (a stream's ticks from
  its first) that starts at tick ``a``, as ``VideoQAConfig.self_contained`` says: the announcement of a request
  asked before tick ``a`` reads ``<silent>``, and the ``HISTORY`` questions leave their slots."""
  history = [QTYPES.index(q) for q in HISTORY]
  for i in np.flatnonzero(np.isin(qtype, history)):
    q = int(np.flatnonzero(text[i] == QUESTION)[0])
    text[i, q:], targets[i, q:], qtype[i] = PAD, False, -1
  for frame, asked, _ in chunk.announcements:
    if asked < a <= frame < a + len(text):  # the request was asked before the clip: the clip cannot know it
      row, mask = text[frame - a], targets[frame - a]
      rest, rest_mask = row[3:].copy(), mask[3:].copy()  # what follows <speak> label <eos>
      row[:], mask[:] = PAD, False
      row[0], mask[0] = SILENT, True
      row[1 : 1 + len(rest)], mask[1 : 1 + len(rest)] = rest, rest_mask


def make_clip(config: VideoQAConfig, split: str, index: int) -> dict[str, np.ndarray]:
  """The builder's example ``index``: clip ``index % clips_per_stream`` of stream ``index // clips_per_stream``
  (``stream_clips``; with one clip per stream, the first ``clip_frames`` ticks of stream ``index``)."""
  k = config.clips_per_stream
  return stream_clips(config, split, index // k)[index % k]


class JstreamVideoQA(LocalBuilder):
  """Video-QA training clips (TFDS name ``jstream_video_qa``); see the module docstring."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "Initial release: moving-digit streams with questions.",
    "1.1.0": "Clips carry the digits drawn in each frame (objects).",
    "1.2.0": "Several overlapped clips per stream (clips_per_stream, clip_overlap); clips carry their first tick.",
  }
  SPLITS = SPLITS

  @classmethod
  def default_config(cls) -> VideoQAConfig:
    return video_qa_config()

  def features(self) -> dict[str, tfds.features.FeatureConnector]:
    c = self.builder_config
    t, ln = c.clip_frames, c.text_len
    zlib = tfds.features.Encoding.ZLIB
    return {
      "frames": tfds.features.Tensor(shape=(t, *c.frame_size), dtype=np.uint8, encoding=zlib),
      "text": tfds.features.Tensor(shape=(t, ln), dtype=np.int32),
      "targets": tfds.features.Tensor(shape=(t, ln), dtype=np.uint8),
      "qtype": tfds.features.Tensor(shape=(t,), dtype=np.int32),
      "objects": tfds.features.Tensor(shape=(t, c.max_on_screen, 5), dtype=np.int32),
      "start": tfds.features.Scalar(dtype=np.int32),
      "index": index_feature(),
    }

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    c = self.builder_config
    n, k = (c.num_train if split == "train" else c.num_test), c.clips_per_stream
    for stream in range(-(-n // k)):
      for j, clip in enumerate(stream_clips(c, split, stream)):  # each stream generated once
        i = stream * k + j
        if i < n:
          yield i, {**clip, "index": i}


def video_qa_builder(config: VideoQAConfig | None = None, data_dir: str | os.PathLike | None = None) -> JstreamVideoQA:
  """The prepared video-QA builder for ``config`` (default config if ``None``), built on first use."""
  return JstreamVideoQA.prepare(config, data_dir)


@dataclasses.dataclass(frozen=True)
class _Extract:
  """Frames as ``dtype`` (uint8, or float in [0, 1]), text, targets as bool, qtype, objects, start (picklable for
  workers)."""

  dtype: Any

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    frames = example["frames"]
    if np.dtype(self.dtype) != np.uint8:
      frames = frames.astype(self.dtype) / np.asarray(255, self.dtype)
    return {
      "frames": frames,
      "text": example["text"],
      "targets": example["targets"].astype(bool),
      "qtype": example["qtype"],
      "objects": example["objects"],
      "start": np.int32(example["start"]),
    }


def video_qa_dataset(
  split: str = "train",
  *,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  dtype: Any = np.float32,
  worker_count: int = 0,
  read_options: grain.ReadOptions | None = None,
  config: VideoQAConfig | None = None,
  data_dir: str | os.PathLike | None = None,
) -> grain.IterDataset:
  """Batches of video-QA training clips: dicts of ``frames [b, T, H, W]``, ``text [b, T, L]`` int32,
  ``targets [b, T, L]`` bool, ``qtype [b, T]`` int32, ``objects [b, T, max_on_screen, 5]`` int32 (the digits
  drawn in each frame, as ``Chunk.objects``) and ``start [b]`` int32 (each clip's first tick in its stream).
  Resumable like ``jstream.data.digits.digits_dataset`` (``get_state`` / ``set_state``); only full batches.
  """
  check_split(split, SPLITS)
  return frames_dataset(
    lambda: video_qa_builder(config, data_dir),
    split,
    _Extract(dtype),
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    dtype=dtype,
    worker_count=worker_count,
    read_options=read_options,
  )
