"""Streaming video question answering: a whole stream of ticks as jit-compiled scans, the model speaking for itself.

At every tick the model (``jstream.models.video_lm.VideoLM``) sees the frame, decides ``<silent>`` or ``<speak>`` (the
higher of the two logits after the frame's last token; for a model with StreamBridge's activation model,
``VideoLMConfig.activation``, that model's probability where a request stands; an announcement answers the request
unless it was less certain than ``run``'s ``close_threshold``), announces a label when it speaks (the argmax word after
``<speak>``, then ``<eos>``), reads the question of the tick if there is one (``<q>`` words, and ``<a>`` when an answer
is due now) and answers with the argmax word after ``<a>`` (then ``<eos>``). Everything it says goes into its cache, as
in training; words that a row does not say this tick are padding (not cached, no position), so rows of a batch can have
questions at different ticks. One tick is two fixed-shape calls of the model inside one ``lax.scan`` step (three when a
row speaks: ``_tick``); ``run`` compiles once per (ticks per call, batch, question length) and donates the cache, so a
stream of any length runs at flat memory in calls of ``ticks`` ticks.

``answer_streams`` drives ``jstream.data.video_qa`` streams through ``run`` and scores what the model said against
the streams' ground truth (``score``).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jstream import cache as cache_lib
from jstream import reduce
from jstream.data import video_qa as vqa
from jstream.memory import MemoryPolicy
from jstream.models.video_lm import FRAME, TEXT, VISION, RequestState, VideoLM, request_words
from jstream.typing import Array, ArrayLike, Float, Int


@dataclasses.dataclass(frozen=True)
class TickOutputs:
  """What the model said at each tick, ``[b, n]`` int32 word ids each: ``decision`` (``SILENT`` / ``SPEAK``),
  ``announced`` (the label word when it spoke, else ``PAD``), ``answer`` (the answer word when an answer was due,
  else ``PAD``); ``kept``: ``[b, n]`` frame tokens that entered the cache (all of them without a token drop);
  ``drop_state``: the token drop's state after the last tick, for the next call (``None`` without a drop);
  ``speak_margin``: ``[b, n]`` float32 the ``<speak>`` logit minus the ``<silent>`` logit after the frame (the model
  speaks where it is above ``log(t / (1 - t))`` for the call's ``speak_threshold`` ``t``), or for a model with an
  activation model its log-odds, ``CLOSED`` where no request stands; ``last_frame``: ``[b, H, W]`` the last tick's
  frame, for the next call's ``previous_frame`` (what a ``frame_delta`` model's encoder subtracts);
  ``request_state``: the standing requests after the last tick, for the next call's ``request_state`` (a model
  with an activation model; a placeholder otherwise)."""

  decision: np.ndarray
  announced: np.ndarray
  answer: np.ndarray
  kept: np.ndarray | None = None
  drop_state: reduce.DropState | None = None
  speak_margin: np.ndarray | None = None
  last_frame: Array | None = None
  request_state: RequestState | None = None


QUESTION_LEN = vqa.MAX_QUESTION_WORDS + 2
"""Words of a tick's question slot by default: the longest question, ``<q>`` and ``<a>``."""

CLOSED = -1e4
"""The speak margin of a tick at which no request stands, for a model with an activation model (it cannot speak)."""


def question_ids(question: vqa.Question | None, length: int) -> np.ndarray:
  """The words a tick's question feeds the model, ``[length]`` int32: ``<q>`` and the question, plus ``<a>`` when an
  answer is due now (not for ``proactive``), padded with ``PAD``."""
  out = np.full((length,), vqa.PAD, np.int32)
  if question is None:
    return out
  ids = [vqa.QUESTION, *vqa.encode(question.words)] + ([] if question.qtype == "proactive" else [vqa.ANSWER])
  if len(ids) > length:
    raise ValueError(f"question of {len(ids)} words does not fit question_len {length}: {question.words!r}")
  out[: len(ids)] = ids
  return out


def _say(lm, ids: Array, say: Array, cache, cue: Array | None = None):
  """Feeds words ``ids [b, t]`` on the rows where ``say [b]``; ``PAD`` words and other rows are padding (not
  cached, no position). ``cue``: ``[b, t, d]`` added to the words' embeddings. Returns ``(logits, cache)``."""
  seg = jnp.where(say[:, None] & (ids != vqa.PAD), TEXT, -1).astype(jnp.int32)
  if cue is None:
    return lm.extend(ids, cache, segment_ids=seg)
  x = lm.embed(ids)
  return lm.extend_embeddings(x + cue.astype(x.dtype), cache, segment_ids=seg)


def _frame_tokens(model: VideoLM, frame: Float[Array, "b _ _"], previous: Float[Array, "b _ _"], drop, drop_state):
  """The frame's tokens for the cache ``[b, p, d]``, whether each is kept ``[b, p]``, the drop state, and the
  encoder's tokens of the whole frame ``[b, p, d]`` (what an activation model reads).

  With a token drop (``reduce.DifferentialDrop``, TimeChat-Online) the rule reads the frame encoder's tokens; the
  kept tokens move to the front in place order (their place is in their features: the encoder's and the
  ``frame_pos`` embeddings) and the dropped ones become padding. A frame keeps at least one token (its last place
  when the rule keeps none): the decision is read after the frame's last kept token. ``previous``: the frame
  before (a ``frame_delta`` encoder's reference)."""
  vis = model.encode(frame[:, None], previous)  # [b, 1, p, d]
  if drop is None:
    return model.placed(vis[:, 0]), jnp.ones(vis.shape[:1] + vis.shape[2:3], bool), drop_state, vis[:, 0]
  keep, drop_state = drop(vis, drop_state)
  keep = keep[:, 0]
  keep = keep.at[:, -1].set(keep[:, -1] | ~jnp.any(keep, axis=1))
  order = jnp.argsort(~keep, axis=1, stable=True)
  placed = jnp.take_along_axis(model.placed(vis[:, 0]), order[..., None], axis=1)
  return placed, jnp.take_along_axis(keep, order, axis=1), drop_state, vis[:, 0]


def _tick(
  model: VideoLM,
  carry,
  frame: Float[Array, "b _ _"],
  question: Int[Array, "b q"],
  proactive: bool = True,
  drop: reduce.DifferentialDrop | None = None,
  speak_bias: Float[Array, ""] | float = 0.0,
  close_bias: Float[Array, ""] | float = 0.0,
):
  """One tick in two calls of the model, three when a row speaks.

  1. The words left from the previous tick (its answer and ``<eos>``, where one was due) and the frame's tokens:
     the decision is read after the frame's last token.
  2. Only if some row speaks: the decisions, whose logits give the announced label.
  3. The rest of the slot: the decision (unless call 2 fed it), the label and ``<eos>`` where a row speaks, and
     the question; the answer is read after its last word and carried to the next tick's first call.

  ``proactive=False``: the decision is always ``<silent>`` (a model that speaks only when asked). ``drop``: a
  token drop before the cache (``_frame_tokens``). ``speak_bias``: the row speaks where its ``<speak>`` logit
  exceeds its ``<silent>`` logit by more than this (0: the likelier of the two). A model with an activation model
  (``VideoLMConfig.activation``) speaks where a request stands and the activation model's log-odds on the whole
  frame exceed ``speak_bias``; its ``<speak>`` carries the request's prompt, and the tick's question (a standing
  request if no ``<a>`` follows it) and decision update the standing request: speaking closes it where the log-odds
  also exceed ``close_bias`` (at most ``speak_bias``: every announcement closes it).
  """
  cache, left, drop_state, previous, request = carry
  lm = model.lm
  b = frame.shape[0]
  every = jnp.ones((b,), bool)
  activation = model.activation if model.config.activation else None
  vis, kept, drop_state, whole = _frame_tokens(model, frame, previous, drop, drop_state)
  carrier = model.config.carrier
  seg_f, group_f = jnp.where(kept, FRAME if carrier else VISION, -1), jnp.where(kept, 0, -1)
  last = left.shape[1] + jnp.sum(kept, axis=1) - 1  # the frame's last kept token ...
  if carrier:  # ... or its carrier, always there, after the patches (VideoLMConfig.carrier)
    vis = jnp.concatenate([vis, jnp.broadcast_to(model.carrier[...].astype(vis.dtype), (b, 1, vis.shape[-1]))], 1)
    seg_f = jnp.concatenate([seg_f, jnp.full((b, 1), VISION)], axis=1)
    group_f = jnp.concatenate([group_f, jnp.full((b, 1), -1)], axis=1)
    last = jnp.full((b,), left.shape[1] + vis.shape[1] - 1)
  x = jnp.concatenate([lm.embed(left).astype(vis.dtype), vis], axis=1)
  segs = jnp.concatenate([jnp.where(left != vqa.PAD, TEXT, -1), seg_f], axis=1).astype(jnp.int32)
  groups = jnp.concatenate([jnp.full(left.shape, -1), group_f], axis=1).astype(jnp.int32)
  logits, cache = lm.extend_embeddings(x, cache, segment_ids=segs, groups=groups)
  after = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  margin = (after[:, vqa.SPEAK] - after[:, vqa.SILENT]).astype(jnp.float32)
  if activation is not None:
    margin = jnp.where(request.open, model.activation_logits(whole, request.vector), CLOSED)
  speak = (margin > speak_bias) & proactive
  decision = jnp.where(speak, vqa.SPEAK, vqa.SILENT).astype(jnp.int32)

  def announce(cache):
    cue = None
    if activation is not None:  # the request re-posed at the <speak> (VideoLM.tick_inputs)
      cue = jnp.where(speak[:, None, None], activation.prompt(request.vector)[:, None], 0.0)
    logits, cache = _say(lm, decision[:, None], every, cache, cue)
    return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

  def keep_silent(cache):
    return cache, jnp.full((b,), vqa.PAD, jnp.int32)

  spoke = jnp.any(speak)
  cache, label = jax.lax.cond(spoke, announce, keep_silent, cache)
  pad = jnp.full((b,), vqa.PAD, jnp.int32)
  head = jnp.stack(
    [jnp.where(spoke, pad, decision), jnp.where(speak, label, pad), jnp.where(speak, vqa.EOS, pad)], axis=1
  )
  shown = jnp.where(request_words(question), vqa.PAD, question) if model.config.hide_requests else question
  logits, cache = _say(lm, jnp.concatenate([head, shown], axis=1), every, cache)
  n_q = jnp.sum(question != vqa.PAD, axis=1)
  last = jnp.take_along_axis(question, jnp.maximum(n_q - 1, 0)[:, None], axis=1)[:, 0]
  due = (n_q > 0) & (last == vqa.ANSWER)
  at = jnp.take_along_axis(logits, (head.shape[1] + jnp.maximum(n_q - 1, 0))[:, None, None], axis=1)[:, 0]
  answer = jnp.argmax(at, axis=-1).astype(jnp.int32)
  left = jnp.stack([jnp.where(due, answer, pad), jnp.where(due, vqa.EOS, pad)], axis=1)
  said = (decision, jnp.where(speak, label, pad), jnp.where(due, answer, pad))
  if activation is not None:
    request = activation.advance(request, question, speak & (margin > close_bias))
  return (cache, left, drop_state, frame, request), (*said, jnp.sum(kept, axis=1).astype(jnp.int32), margin)


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(2,))
def _run(graphdef, state, cache, frames, questions, proactive, drop, drop_state, bias, previous, request):
  model = nnx.merge(graphdef, state)

  def step(carry, xs):
    return _tick(model, carry, *xs, proactive=proactive, drop=drop, speak_bias=bias[0], close_bias=bias[1])

  b = frames.shape[0]
  left = jnp.full((b, 2), vqa.PAD, jnp.int32)
  xs = (jnp.swapaxes(frames, 0, 1), jnp.swapaxes(questions, 0, 1))
  carry = (cache, left, drop_state, previous, request)
  (cache, left, drop_state, previous, request), outs = jax.lax.scan(step, carry, xs)
  _, cache = _say(model.lm, left, jnp.ones((b,), bool), cache)  # the last tick's answer
  return cache, drop_state, previous, request, tuple(jnp.swapaxes(o, 0, 1) for o in outs)


def run(
  model: VideoLM,
  cache: cache_lib.Cache,
  frames: Float[ArrayLike, "b n _ _"],
  questions: Int[ArrayLike, "b n q"],
  *,
  proactive: bool = True,
  drop: reduce.DifferentialDrop | None = None,
  drop_state: reduce.DropState | None = None,
  speak_threshold: float = 0.5,
  close_threshold: float | None = None,
  previous_frame: Float[ArrayLike, "b _ _"] | None = None,
  request_state: RequestState | None = None,
) -> tuple[cache_lib.Cache, TickOutputs]:
  """Runs ``n`` ticks of ``b`` streams (frames in [0, 1], the question words of each tick from ``question_ids``) as
  one compiled scan; the cache is donated. Returns the cache and what the model said (``TickOutputs``).
  ``proactive=False``: the model never speaks unprompted (its decisions are all ``<silent>``), for a model trained to
  answer only when asked (``VideoTask.streaming_objective=False``). ``drop``: TimeChat-Online's differential token
  drop before the cache (dropped frame tokens are padding: not cached, no compute for a new shape); ``drop_state``:
  the previous call's ``TickOutputs.drop_state`` (default: a fresh stream's). ``speak_threshold``: the model speaks
  unprompted where ``<speak>``'s share of the ``<speak>`` / ``<silent>`` probabilities exceeds it (0.5: the likelier
  of the two; lower speaks more readily, VideoLLM-online's response threshold); a traced value, so changing it does
  not recompile. ``close_threshold`` (a model with an activation model only; default: the speak threshold): an
  announcement answers the standing request, which then no longer stands, only where the activation model's
  probability also exceeds this; a less certain one leaves the request standing, so that a false alarm does not use up
  a request whose event is still to come (a traced value too). ``previous_frame``: ``[b, H, W]`` the frame before
  ``frames[:, 0]``, the previous call's ``TickOutputs.last_frame`` (default zeros: streams that start here; set a row
  to zeros where it resets); only a ``VideoLMConfig.frame_delta`` model's encoder reads it. ``request_state``: the
  previous call's ``TickOutputs.request_state`` (default: no request standing; close a row's where it resets); only a
  model with an activation model (``VideoLMConfig.activation``) reads it.

  Raises:
    ValueError: frames not floats or not the model's frame size, frames and questions of different ``[b, n]``,
      ``previous_frame`` not ``[b, H, W]``, ``request_state`` not ``[b]`` rows of the model's activation width, or
      ``speak_threshold`` outside (0, 1), or ``close_threshold`` outside [``speak_threshold``, 1) or given for a
      model without an activation model."""
  if not jnp.issubdtype(jnp.asarray(frames).dtype, jnp.floating):
    raise ValueError(f"frames must be floats in [0, 1], got {jnp.asarray(frames).dtype} (divide uint8 frames by 255)")
  frames, questions = jnp.asarray(frames, jnp.float32), jnp.asarray(questions, jnp.int32)
  if frames.shape[:2] != questions.shape[:2]:
    raise ValueError(f"frames {frames.shape} and questions {questions.shape} must share [batch, ticks]")
  if frames.shape[2:] != model.config.frame_size:
    raise ValueError(f"frames must be {model.config.frame_size}, got {frames.shape[2:]}")
  if drop is not None and drop_state is None:
    drop_state = reduce.init_drop_state(frames.shape[0], model.config.tokens_per_frame, model.config.lm.embed_dim)
  if not 0.0 < float(speak_threshold) < 1.0:
    raise ValueError(f"speak_threshold must be in (0, 1), got {speak_threshold}")
  if close_threshold is not None:
    if not model.config.activation:
      raise ValueError("close_threshold needs a model with an activation model (VideoLMConfig.activation)")
    if not float(speak_threshold) <= float(close_threshold) < 1.0:
      raise ValueError(f"close_threshold must be in [speak_threshold {speak_threshold}, 1), got {close_threshold}")
  b = frames.shape[0]
  if previous_frame is None:  # committed, as the next call's (an output) will be: no second compilation
    previous_frame = jax.device_put(jnp.zeros((b, *model.config.frame_size), jnp.float32), jax.devices()[0])
  previous_frame = jnp.asarray(previous_frame, jnp.float32)
  if previous_frame.shape != (b, *model.config.frame_size):
    raise ValueError(f"previous_frame must be [{b}, *{model.config.frame_size}], got {previous_frame.shape}")
  if request_state is None:  # no request standing (a placeholder for a model without an activation model)
    empty = (
      model.activation.empty(b) if model.config.activation else RequestState(jnp.zeros((b, 1)), jnp.zeros(b, bool))
    )
    request_state = jax.device_put(empty, jax.devices()[0])
  elif request_state.vector.shape != (b, model.config.activation or 1) or request_state.open.shape != (b,):
    raise ValueError(
      f"request_state must be the previous call's TickOutputs.request_state for {b} rows, got vector "
      f"{request_state.vector.shape} and open {request_state.open.shape}"
    )
  close = speak_threshold if close_threshold is None else close_threshold
  bias = jnp.asarray([np.log(t) - np.log1p(-t) for t in (speak_threshold, close)], jnp.float32)
  graphdef, state = nnx.split(model)
  args = (frames, questions, bool(proactive), drop, drop_state, bias, previous_frame, request_state)
  cache, drop_state, last, request_state, outs = _run(graphdef, state, cache, *args)
  decision, announced, answer, kept, margin = (np.asarray(x) for x in outs)
  return cache, TickOutputs(
    decision,
    announced,
    answer,
    kept,
    drop_state=drop_state,
    speak_margin=margin,
    last_frame=last,
    request_state=request_state,
  )


def track_tokens(num_ticks: int, tokens_per_frame: int, question_len: int | None = None) -> dict[str, int]:
  """The most tokens ``num_ticks`` ticks put in each track, ``{"text", "vision"}``: per tick ``tokens_per_frame``
  vision tokens and at most ``5 + question_len`` words (decision, label, ``<eos>``, the question, answer,
  ``<eos>``); ``question_len`` defaults to ``answer_streams``'."""
  qlen = question_len or QUESTION_LEN
  return {"text": num_ticks * (5 + qlen), "vision": num_ticks * tokens_per_frame}


def check_capacity(policy: cache_lib.Policy, num_ticks: int, tokens_per_frame: int, question_len: int) -> None:
  """Raises a clear error if a bounded (``Dense``) track of ``policy`` may overflow in ``num_ticks`` ticks
  (``track_tokens``)."""
  need = track_tokens(num_ticks, tokens_per_frame, question_len)
  if isinstance(policy, MemoryPolicy):
    policy = policy.local
  if isinstance(policy, cache_lib.Segmented):
    tracks = {"text": policy.segments[TEXT], "vision": policy.segments[VISION]}
  else:
    tracks, need = {"single": policy}, {"single": sum(need.values())}
  for name, track in tracks.items():
    if track.max_stream is not None and need[name] > track.max_stream:
      raise ValueError(
        f"a stream of {num_ticks} ticks may put {need[name]} tokens in the {name} track, but its policy {track} "
        f"holds {track.max_stream}: use a bounded policy (Window, SinkWindow) or a larger Dense"
      )


@dataclasses.dataclass
class StreamRecord:
  """A stream's ground truth (its questions and due announcements) and what the model said, tick by tick;
  ``kept``: the frame tokens cached at each tick (``TickOutputs.kept``); ``speak_margin``: the ``<speak>`` minus
  ``<silent>`` logit at each tick (``TickOutputs.speak_margin``); ``events``: the stream's entries and exits
  (``Chunk.events``), what was on screen when the model spoke."""

  questions: list[vqa.Question]
  announcements: list[tuple[int, int, int]]
  decision: np.ndarray
  announced: np.ndarray
  answer: np.ndarray
  kept: np.ndarray | None = None
  speak_margin: np.ndarray | None = None
  events: list[tuple[int, int, int, int]] | None = None


def answer_streams(
  model: VideoLM,
  policy: cache_lib.Policy,
  streams: list[vqa.VideoQAStream],
  num_ticks: int,
  *,
  ticks_per_call: int = 50,
  question_len: int | None = None,
  dtype=jnp.float32,
  call_seconds: list[float] | None = None,
  proactive: bool = True,
  drop: reduce.DifferentialDrop | None = None,
  speak_threshold: float = 0.5,
  close_threshold: float | None = None,
  carry: list | None = None,
) -> list[StreamRecord]:
  """Runs ``num_ticks`` ticks of each stream (a batch, one row per stream) through ``run`` in calls of
  ``ticks_per_call`` ticks (one compilation), generating the streams chunk by chunk; returns one ``StreamRecord`` per
  stream. ``num_ticks`` must be a multiple of ``ticks_per_call``. ``call_seconds``, if given, receives the wall time
  of each call of ``run`` (the first includes compilation); ``carry``, if given, receives what a next call of ``run``
  continues the streams from, ``{"cache", "previous_frame", "request_state", "drop_state"}`` (the cache: what a memory
  kept). ``proactive``, ``drop``, ``speak_threshold``, ``close_threshold``: see ``run``."""

  if num_ticks % ticks_per_call:
    raise ValueError(f"num_ticks {num_ticks} must be a multiple of ticks_per_call {ticks_per_call}")
  qlen = question_len or QUESTION_LEN
  check_capacity(policy, num_ticks, 1 if model.config.carrier else model.config.tokens_per_frame, qlen)
  cache = model.init_cache(policy, len(streams), dtype=dtype)  # committed, each array in its memory (cache.init)
  records = [
    StreamRecord(
      [], [], *(np.zeros((0,), np.int32) for _ in range(4)), speak_margin=np.zeros((0,), np.float32), events=[]
    )
    for _ in streams
  ]
  drop_state = last_frame = request_state = None
  for _ in range(num_ticks // ticks_per_call):
    chunks = [s.take(ticks_per_call) for s in streams]
    frames, questions = chunk_inputs(chunks, qlen)
    t0 = time.perf_counter()
    # NumPy outputs: the call has finished when it returns
    cache, out = run(
      model,
      cache,
      frames,
      questions,
      proactive=proactive,
      drop=drop,
      drop_state=drop_state,
      speak_threshold=speak_threshold,
      close_threshold=close_threshold,
      previous_frame=last_frame,
      request_state=request_state,
    )
    drop_state, last_frame, request_state = out.drop_state, out.last_frame, out.request_state
    if call_seconds is not None:
      call_seconds.append(time.perf_counter() - t0)
    for row, (c, rec) in enumerate(zip(chunks, records)):
      rec.questions += c.questions
      rec.announcements += c.announcements
      rec.events += c.events
      rec.decision = np.concatenate([rec.decision, out.decision[row]])
      rec.announced = np.concatenate([rec.announced, out.announced[row]])
      rec.answer = np.concatenate([rec.answer, out.answer[row]])
      rec.kept = np.concatenate([rec.kept, out.kept[row]])
      rec.speak_margin = np.concatenate([rec.speak_margin, out.speak_margin[row]])
  if carry is not None:
    carry.append(
      {"cache": cache, "previous_frame": last_frame, "request_state": request_state, "drop_state": drop_state}
    )
  return records


def chunk_inputs(chunks: list[vqa.Chunk], question_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``run``'s inputs for one chunk of each stream (a batch, the chunks of equal length ``n``): frames
  ``[b, n, H, W]`` float32 in [0, 1] and the question words of each tick ``[b, n, question_len]`` (default:
  ``answer_streams``', the longest question and its ``<q>`` / ``<a>``)."""
  question_len = question_len or QUESTION_LEN
  frames = np.stack([c.frames for c in chunks]).astype(np.float32) / 255.0
  questions = np.zeros((len(chunks), len(chunks[0].frames), question_len), np.int32)
  for row, c in enumerate(chunks):
    for q in c.questions:
      questions[row, q.frame - c.start] = question_ids(q, question_len)
  return frames, questions


def _on_screen(events: list[tuple[int, int, int, int]], frame: int) -> set[str]:
  """The words of the digits drawn in ``frame``, replayed from a stream's entry and exit events."""
  drawn = {}
  for f, kind, obj, label in events:
    if f <= frame:
      if kind == vqa.ENTER:
        drawn[obj] = label
      else:
        drawn.pop(obj, None)
  return {vqa.NUMBERS[label] for label in drawn.values()}


def event_outcomes(record: StreamRecord, *, tolerance: int = 2) -> list[dict]:
  """What the model did about each proactive event of a stream's ``record`` (``record.announcements``, one per
  frame): ``frame``, ``asked`` (the tick its request was asked), ``label``; ``early`` (the model spoke after the
  request was asked and before the event: a false alarm while it stood); ``late`` (frames after the event of the
  first tick within ``tolerance`` at which the model spoke, None if it did not), ``said`` (the word it announced
  then, None) and ``right`` (that word is the event's label). ``score`` counts these."""
  spoke = record.decision == vqa.SPEAK
  out = []
  for f, (asked, label) in {f: (asked, label) for f, asked, label in record.announcements}.items():
    late = next((d for d in range(tolerance + 1) if f + d < len(spoke) and spoke[f + d]), None)
    said = None if late is None else int(record.announced[f + late])
    early = bool(np.any(spoke[asked + 1 : f]))
    right = said == vqa.WORD_ID[vqa.NUMBERS[label]]
    out.append({"frame": f, "asked": asked, "label": label, "early": early, "late": late, "said": said, "right": right})
  return out


WAIT_BINS = (0, 16, 48, 96)
"""Lower edges (ticks) of ``score``'s ``by_wait`` bins: how long a proactive request stood before its event."""


def score(records: list[StreamRecord], *, tolerance: int = 2) -> dict:
  """Accuracy per question type and the proactive figures.

  Returns ``{qtype: {"correct", "asked", "accuracy", "by_answer"}}`` for the answered types (``by_answer``: per right
  answer word, the questions, the accuracy and what the model said, ``{"three": {"asked", "accuracy", "said": {"two":
  3, "three": 40}}}``; a word outside the vocabulary as ``"<id>"``), and ``"proactive"``: ``announced`` (events
  announced with the right label within ``tolerance`` frames after they happen, over events that came while a request
  was pending), ``false_alarms`` (speaking at a tick with no such event within ``tolerance`` frames before it, over
  the ticks where the model should be silent), ``timing`` (mean frames late of the announced events),
  ``spoke_in_time`` (events within ``tolerance`` frames of which the model spoke, right label or not: the decision
  without the label), ``preempted`` (events before which the model spoke while their request stood: a false alarm,
  which answered the request early unless it was less certain than ``run``'s ``close_threshold``),
  ``announced_after_early`` (events announced with the right label although the model had spoken early for them, after
  an early announcement that left the request standing), ``precision`` (of the ticks at which the model spoke, those
  whose label is that of an event due within ``tolerance`` frames before) and, when the records keep their speak
  margins, ``margin_auc``: how well the margin separates the events from those silent ticks whatever the threshold
  (the probability that an event's highest margin within ``tolerance`` frames exceeds a silent tick's, ties counting
  half; 0.5 is no separation; the margins are those of this run, whose own decisions shaped the context) and
  ``by_wait``: the events, ``spoke_in_time`` and ``announced`` per bin of ``WAIT_BINS`` of the ticks from the request
  to its event (``"16-47"``, ``"96+"``): a request that waits long may have left the text window, or the distances
  training saw, by the time it is due. ``wrong_label``: the events spoken at in time with another label than the
  request's, what was said instead per requested digit (``{"eight": {"six": 3}}``), and, when the records keep their
  events, the share of them whose label is that of a digit on screen at the tick the model spoke (one it saw rather
  than one it made up)."""
  out: dict = {}
  bins = {lo: {"events": 0, "spoke_in_time": 0, "announced": 0} for lo in WAIT_BINS}
  events = announced = in_time = preempted = after_early = alarms = silent_ticks = spoken = right_speaks = 0
  late, event_margins, silent_margins = [], [], []
  wrong = {"events": 0, "said": {}, "on_screen": 0}
  with_events = all(rec.events is not None for rec in records)
  with_margins = all(rec.speak_margin is not None for rec in records)
  for rec in records:
    for q in rec.questions:
      if q.qtype == "proactive":
        continue
      o = out.setdefault(q.qtype, {"correct": 0, "asked": 0, "by_answer": {}})
      a = o["by_answer"].setdefault(q.answer, {"correct": 0, "asked": 0, "said": {}})
      said = int(rec.answer[q.frame])
      right = int(said == vqa.WORD_ID[q.answer])
      for c in (o, a):
        c["asked"] += 1
        c["correct"] += right
      word = vqa.WORDS[said] if 0 <= said < len(vqa.WORDS) else f"<{said}>"
      a["said"][word] = a["said"].get(word, 0) + 1
    due = {f: (asked, label) for f, asked, label in rec.announcements}
    near = np.zeros(len(rec.decision), bool)
    for f in due:
      near[f : f + tolerance + 1] = True
    spoke = rec.decision == vqa.SPEAK
    spoken += int(np.sum(spoke))
    right_label = np.zeros(len(spoke), bool)
    for f, (_, label) in due.items():
      right_label[f : f + tolerance + 1] |= rec.announced[f : f + tolerance + 1] == vqa.WORD_ID[vqa.NUMBERS[label]]
    right_speaks += int(np.sum(spoke & right_label))
    for e in event_outcomes(rec, tolerance=tolerance):
      f, label, d = e["frame"], e["label"], e["late"]
      events += 1
      preempted += int(e["early"])
      b = bins[max(lo for lo in WAIT_BINS if lo <= f - e["asked"])]
      b["events"] += 1
      if d is None:
        continue
      in_time += 1
      b["spoke_in_time"] += 1
      if e["right"]:
        announced += 1
        after_early += int(e["early"])
        b["announced"] += 1
        late.append(d)
      else:
        said = e["said"]
        word = vqa.WORDS[said] if 0 <= said < len(vqa.WORDS) else f"<{said}>"
        wrong["events"] += 1
        said_for = wrong["said"].setdefault(vqa.NUMBERS[label], {})
        said_for[word] = said_for.get(word, 0) + 1
        if with_events:
          wrong["on_screen"] += int(word in _on_screen(rec.events, f + d))
    alarms += int(np.sum(spoke & ~near))
    silent_ticks += int(np.sum(~near))
    if with_margins:
      event_margins += [float(np.max(rec.speak_margin[f : f + tolerance + 1])) for f in due]
      silent_margins.append(rec.speak_margin[~near])
  for o in out.values():
    for c in (o, *o["by_answer"].values()):
      c["accuracy"] = c["correct"] / max(c["asked"], 1)
    o["by_answer"] = {
      k: {"asked": c["asked"], "accuracy": c["accuracy"], "said": dict(sorted(c["said"].items()))}
      for k, c in sorted(o["by_answer"].items())
    }
  out["proactive"] = {
    "events": events,
    "announced": announced / max(events, 1),
    "spoke_in_time": in_time / max(events, 1),
    "preempted": preempted / max(events, 1),
    "announced_after_early": after_early / max(events, 1),
    "precision": right_speaks / max(spoken, 1),
    "false_alarms": alarms / max(silent_ticks, 1),
    "timing": float(np.mean(late)) if late else None,
    "by_wait": {},
    "wrong_label": {
      "events": wrong["events"],
      "said": {k: dict(sorted(v.items())) for k, v in sorted(wrong["said"].items())},
    },
  }
  if with_events:
    out["proactive"]["wrong_label"]["on_screen"] = wrong["on_screen"] / max(wrong["events"], 1)
  edges = (*WAIT_BINS[1:], None)
  for (lo, b), hi in zip(bins.items(), edges):
    if b["events"]:
      name = f"{lo}-{hi - 1}" if hi else f"{lo}+"
      n = b["events"]
      out["proactive"]["by_wait"][name] = {"events": n, **{k: b[k] / n for k in ("spoke_in_time", "announced")}}
  silent = np.concatenate(silent_margins) if with_margins and silent_margins else np.zeros((0,))
  if event_margins and silent.size:  # the ROC AUC: P(event margin > silent margin), ties half (Mann-Whitney)
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.ones(len(event_margins)), np.zeros(silent.size)]
    out["proactive"]["margin_auc"] = float(roc_auc_score(truth, np.r_[event_margins, silent]))
  return out
