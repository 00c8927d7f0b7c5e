"""The streaming QA runner: what it says equals the argmax of feeding back the slots it produced, and its cache
holds exactly those; batched ragged streams equal each stream alone; one compilation for a long stream; scoring;
bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jstream
from conftest import compilations, library_checks_only
from jstream import cache as C
from jstream import qa_stream as Q
from jstream.data import video_qa as V
from jstream.models import video_lm as VL

CONFIG = V.video_qa_config(frame_size=16, digit_size=8, question_prob=0.6)
POLICY = C.Segmented((C.Dense(400), C.Dense(400)))


def tiny_video_lm(seed=0, **kw):
  lm = jstream.TransformerConfig(
    vocab_size=len(V.WORDS), num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64, scan_layers=False
  )
  config = VL.VideoLMConfig(lm, frame_size=(16, 16), patch_size=8, **kw)
  return VL.VideoLM(config, rngs=nnx.Rngs(seed))


def slots_said(record, n, length):
  """The text slots ``[n, length]`` of what the runner said: the training layout (``jstream.data.video_qa``)."""
  text = np.full((n, length), V.PAD, np.int32)
  questions = {q.frame: q for q in record.questions}
  for f in range(n):
    words = [int(record.decision[f])]
    if record.decision[f] == V.SPEAK:
      words += [int(record.announced[f]), V.EOS]
    if f in questions:
      q = questions[f]
      words += [V.QUESTION, *V.encode(q.words)]
      if q.qtype != "proactive":
        words += [V.ANSWER, int(record.answer[f]), V.EOS]
    text[f, : len(words)] = words
  return text


def standing_requests(record, n):
  """``[n]`` whether a proactive request stands at each tick's decision, from the record alone: from the tick after
  it is asked through the first tick the model speaks."""
  asked = {q.frame for q in record.questions if q.qtype == "proactive"}
  out, pending = np.zeros(n, bool), False
  for f in range(n):
    out[f] = pending
    pending = (pending and record.decision[f] != V.SPEAK) or f in asked
  return out


@pytest.mark.parametrize("case", ["proactive", "asked", "activation"])
def test_the_runner_says_what_it_decides_and_caches_exactly_what_it_said(case):
  """Feeding the runner's own slots back (frames and the training layout, ``VideoLM.__call__`` on a fresh cache
  that keeps everything) gives, at every tick, the decision, the announced label and the answer it produced; and
  the cache after ``run`` equals the one that feeding builds: no word fed twice, none missing, the same
  positions. ``proactive=False``: every decision is ``<silent>`` (the same model speaks at some ticks otherwise),
  and the slots fed back are ``video_lm.answers_only`` of the training layout; that case's model has a place
  embedding on its frame tokens (``frame_pos``) and its quadrant's words (``place_words``), which the runner must
  add as the offline forward does, and the other's has carrier tokens (``carrier``: the decision is read after the
  carrier, the patches go to the frame track) and its frame tokens carry their patch labels' word embeddings
  (``label_words``), its encoder reads each frame minus the one before (``frame_delta``, the runner carrying the
  last frame from tick to tick), and it speaks at a ``speak_threshold`` other than 0.5: where ``<speak>``'s share
  of the two probabilities exceeds it (``TickOutputs.speak_margin`` is the logit difference it compares).
  ``activation``: a model with StreamBridge's activation model decides instead: its log-odds on the frame (offline:
  ``Activation.logits`` of the fed-back slots' standing request) where a request stands by the record's own
  account (asked, not yet answered by speaking), ``CLOSED`` elsewhere (it also reads the frame heads,
  ``activation_heads``, which read the frame difference the runner carries, through a pooled convolutional stem,
  and its frame tokens pass the ``projector`` and its norm); its announced labels are those of the offline forward whose
  ``<speak>`` carries the request's prompt; the language model neither reads nor caches the standing requests'
  words (``hide_requests``), in the runner as offline."""
  proactive = case != "asked"
  labels = V.LABEL_WORDS if case == "proactive" else ()
  places = () if proactive else V.PLACE_WORDS
  if case == "activation":
    model = tiny_video_lm(
      seed=4,
      frame_delta=True,
      activation=8,
      activation_heads=True,
      stem_channels=(3,),
      stem_pool=True,
      projector=True,
      projector_norm=True,
      hide_requests=True,
    )
  else:
    model = tiny_video_lm(
      seed=4, frame_pos=not proactive, carrier=proactive, label_words=labels, place_words=places, frame_delta=proactive
    )
  qlen = V.MAX_QUESTION_WORDS + 2
  chunk = V.VideoQAStream(CONFIG, "test", 0 if case == "activation" else 6).take(20)
  n = 1 + max(q.frame for q in chunk.questions if q.qtype != "proactive")  # the last tick answers a question
  asked = [q for q in chunk.questions if q.frame < n]
  frames = chunk.frames[:n].astype(np.float32)[None] / 255.0
  questions = np.zeros((1, n, qlen), np.int32)
  for q in asked:
    questions[0, q.frame] = Q.question_ids(q, qlen)
  threshold = 0.35 if case == "proactive" else 0.5
  if case == "activation":  # a threshold at which the untrained model speaks at some of the standing ticks
    _, mute = Q.run(model, model.init_cache(POLICY, 1), frames, questions, speak_threshold=0.999)
    margins = mute.speak_margin[0][mute.speak_margin[0] > Q.CLOSED]
    threshold = float(jax.nn.sigmoid(np.sort(margins)[-2] - 1e-3))  # speaks at the second highest, if it stands
  cache, out = Q.run(
    model, model.init_cache(POLICY, 1), frames, questions, proactive=proactive, speak_threshold=threshold
  )
  rec = Q.StreamRecord(asked, [], out.decision[0], out.announced[0], out.answer[0])
  assert any(q.qtype != "proactive" for q in rec.questions)
  if proactive:
    assert 0 < np.sum(rec.decision == V.SPEAK) < n
  else:
    assert np.all(rec.decision == V.SILENT) and np.all(rec.announced == V.PAD)
  text = slots_said(rec, n, 20)
  if not proactive:
    targets = np.zeros(text.shape, bool)
    text = np.asarray(VL.answers_only(jnp.asarray(text[None]), jnp.asarray(targets[None]))[0][0])
  logits, want = model(jnp.asarray(frames), jnp.asarray(text[None]), model.init_cache(POLICY, 1))
  logits = np.asarray(VL.slot_logits(logits, n, model.config.frame_len)[0])
  by_frame = {q.frame: q for q in asked}
  margin = logits[:, 0, V.SPEAK] - logits[:, 0, V.SILENT]
  if case == "activation":
    stands = standing_requests(rec, n)
    offline, _ = model.activation.standing(jnp.asarray(text[None]))
    act = model.activation_logits(model.encode(jnp.asarray(frames)), offline.vector)[0]
    margin = np.where(stands, np.asarray(act), Q.CLOSED)
    assert stands.any() and (~stands).any() and np.any(stands & (rec.decision == V.SILENT))
  np.testing.assert_allclose(out.speak_margin[0], margin, atol=1e-4)
  for f in range(n):
    dec = V.SPEAK if margin[f] > np.log(threshold / (1 - threshold)) and proactive else V.SILENT
    assert rec.decision[f] == dec
    j = 1
    if dec == V.SPEAK:
      assert rec.announced[f] == np.argmax(logits[f, j])
      j += 2
    if f in by_frame and by_frame[f].qtype != "proactive":
      j += 1 + len(by_frame[f].words.split()) + 1  # <q> words <a>: slot word j is the answer
      assert rec.answer[f] == np.argmax(logits[f, j])
    else:
      assert rec.answer[f] == V.PAD
  for name in ("idx", "pos", "count", "next_pos"):
    np.testing.assert_array_equal(getattr(cache, name), getattr(want, name), err_msg=name)
  for got, ref in zip(jax.tree.leaves((cache.k, cache.v)), jax.tree.leaves((want.k, want.v))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_batched_ragged_streams_equal_each_stream_alone():
  model = tiny_video_lm(seed=3)
  policy = C.Segmented((C.SinkWindow(2, 24), C.Window(48)), positions="cache_relative")
  streams = [V.VideoQAStream(CONFIG, "test", i) for i in (4, 5)]
  together = Q.answer_streams(model, policy, streams, 10, ticks_per_call=5)
  assert len({tuple(q.frame for q in r.questions) for r in together}) == 2  # questions at different ticks
  for i, rec in zip((4, 5), together):
    (alone,) = Q.answer_streams(model, policy, [V.VideoQAStream(CONFIG, "test", i)], 10, ticks_per_call=5)
    for name in ("decision", "announced", "answer"):
      np.testing.assert_array_equal(getattr(rec, name), getattr(alone, name))


def test_token_drop_caches_what_the_rule_keeps_across_calls():
  """TimeChat-Online's drop in the runner: per tick, the frame tokens cached are those one call of
  ``reduce.differential_drop`` over the whole stream keeps (at least one), with the state carried across the
  runner's calls; the cache's vision track holds exactly them; the drop removes a share of these mostly-black
  frames' tokens."""
  from jstream import reduce as R

  model = tiny_video_lm(seed=7)
  policy = C.Segmented((C.Dense(400), C.Dense(400)))
  n, p = 8, model.config.tokens_per_frame
  streams = lambda: [V.VideoQAStream(CONFIG, "test", i) for i in (8, 9)]
  drop = R.DifferentialDrop(threshold=0.95)
  got = Q.answer_streams(model, policy, streams(), n, ticks_per_call=4, drop=drop)
  frames = np.stack([s.take(n).frames for s in streams()]).astype(np.float32) / 255.0
  state = R.init_drop_state(2, p, 32)
  keep, _ = jax.jit(lambda f: R.differential_drop(model.encode(f), state, threshold=0.95))(jnp.asarray(frames))
  want = np.maximum(np.asarray(keep).sum(-1), 1)
  np.testing.assert_array_equal(np.stack([r.kept for r in got]), want)
  assert 0.2 < want.mean() / p < 0.9  # this rule drops a share of the tokens, not all or none
  # the cache holds the kept tokens only
  qs = np.zeros((2, 4, V.MAX_QUESTION_WORDS + 2), np.int32)  # the shapes above: no new compilation
  cache, out = Q.run(model, model.init_cache(policy, 2), jnp.asarray(frames[:, :4]), qs, drop=drop)
  np.testing.assert_array_equal(np.asarray(cache.count)[:, 1], out.kept.sum(axis=1))


def test_the_runner_carries_the_last_frame_across_calls():
  """A ``frame_delta`` model streamed in calls of 4 ticks (``TickOutputs.last_frame`` passed on as the next call's
  ``previous_frame``) says what one call over all 12 ticks says, speak margins included; starting a call from a
  blank previous frame instead changes its first tick (streams with digits on screen at the calls' boundaries)."""
  model = tiny_video_lm(seed=8, frame_delta=True)
  config = V.video_qa_config(frame_size=16, digit_size=8, question_prob=0.6, enter_prob=0.6)
  streams = lambda: [V.VideoQAStream(config, "test", i) for i in (10, 11)]
  frames = np.stack([s.take(12).frames for s in streams()]).astype(np.float32) / 255.0
  assert frames[:, 3].max() > 0 and frames[:, 7].max() > 0
  one, split = (Q.answer_streams(model, POLICY, streams(), 12, ticks_per_call=k) for k in (12, 4))
  for a, b in zip(one, split):
    np.testing.assert_allclose(b.speak_margin, a.speak_margin, atol=1e-4)
    for name in ("decision", "announced", "answer"):
      np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
  qs = np.zeros((2, 4, V.MAX_QUESTION_WORDS + 2), np.int32)
  margins = []
  for previous in (True, False):
    cache, first = Q.run(model, model.init_cache(POLICY, 2), frames[:, :4], qs)
    np.testing.assert_array_equal(first.last_frame, frames[:, 3])
    _, second = Q.run(model, cache, frames[:, 4:8], qs, previous_frame=first.last_frame if previous else None)
    margins.append(second.speak_margin[:, 0])
  assert np.abs(margins[0] - margins[1]).max() > 1e-4
  with library_checks_only(), pytest.raises(ValueError, match="previous_frame must be"):
    Q.run(model, model.init_cache(POLICY, 2), frames[:, :4], qs, previous_frame=np.zeros((1, 16, 16)))


def test_the_runner_carries_the_standing_request_across_calls():
  """A model with an activation model streamed in calls of 4 ticks (``TickOutputs.request_state`` passed on as the
  next call's ``request_state``) says what one call over all 12 ticks says, speak margins included, whether it
  speaks or not; a call started without the request standing from the call before cannot speak until a new
  request comes (``CLOSED`` margins); a state of the wrong batch is a clear error."""
  model = tiny_video_lm(seed=9, frame_delta=True, activation=8)
  streams = lambda: [V.VideoQAStream(CONFIG, "test", i) for i in (0, 1)]
  spoke = {}
  for threshold in (0.999, 0.5):
    one, split = (
      Q.answer_streams(model, POLICY, streams(), 12, ticks_per_call=k, speak_threshold=threshold) for k in (12, 4)
    )
    for a, b in zip(one, split):
      np.testing.assert_allclose(b.speak_margin, a.speak_margin, atol=1e-4)
      for name in ("decision", "announced", "answer"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
    spoke[threshold] = [np.flatnonzero(r.decision == V.SPEAK) for r in one]
    if threshold == 0.999:  # stream 0's request (asked at tick 0) still stands at tick 4
      assert one[0].speak_margin[4] > Q.CLOSED
  assert not any(map(len, spoke[0.999])) and all(map(len, spoke[0.5])), spoke
  frames = np.stack([s.take(8).frames for s in streams()]).astype(np.float32) / 255.0
  qs = np.zeros((2, 4, V.MAX_QUESTION_WORDS + 2), np.int32)
  qs[0, 0] = Q.question_ids(V.VideoQAStream(CONFIG, "test", 0).take(1).questions[0], qs.shape[-1])
  cache, first = Q.run(model, model.init_cache(POLICY, 2), frames[:, :4], qs, speak_threshold=0.999)
  kw = dict(previous_frame=first.last_frame, speak_threshold=0.999)
  _, carried = Q.run(model, cache, frames[:, 4:8], 0 * qs, request_state=first.request_state, **kw)
  assert np.all(carried.speak_margin[0] > Q.CLOSED) and np.all(carried.speak_margin[1] == Q.CLOSED)
  _, fresh = Q.run(model, model.init_cache(POLICY, 2), frames[:, 4:8], 0 * qs, **kw)
  assert np.all(fresh.speak_margin == Q.CLOSED)
  with library_checks_only(), pytest.raises(ValueError, match="request_state must be"):
    Q.run(model, model.init_cache(POLICY, 1), frames[:1, :4], qs[:1], request_state=first.request_state)


def test_an_uncertain_announcement_leaves_the_request_standing():
  """``close_threshold``: the model speaks where its activation log-odds exceed the speak threshold's, and speaking
  answers the standing request only where they also exceed the close threshold's. Checked against an offline replay:
  each proactive question's request encoded alone (``Activation.encode``), the log-odds of every frame for the
  latest one asked (``VideoLM.activation_logits``), and the request's standing replayed by that rule; the runner's
  margins are those log-odds where it stands and ``CLOSED`` elsewhere, and it speaks where they pass the speak
  threshold. The thresholds make it speak at least once below the close threshold and go on to speak again for
  the same request; without a close threshold that request is closed by the first announcement."""
  model = tiny_video_lm(seed=9, frame_delta=True, activation=8)
  n, qlen = 24, V.MAX_QUESTION_WORDS + 2
  chunk = V.VideoQAStream(CONFIG, "test", 3).take(n)
  frames = chunk.frames.astype(np.float32)[None] / 255.0
  questions = np.zeros((1, n, qlen), np.int32)
  for q in chunk.questions:
    questions[0, q.frame] = Q.question_ids(q, qlen)
  asked = {q.frame: q for q in chunk.questions if q.qtype == "proactive"}
  assert asked and min(asked) < n // 2
  vis = model.encode(jnp.asarray(frames))[0]
  vectors = {f: model.activation.encode(jnp.asarray(questions[:, f]))[0][0] for f in asked}
  logit = lambda t: np.log(t / (1 - t))

  def replay(speak, close):
    margin, decision, vector, stands = np.full(n, Q.CLOSED), np.full(n, V.SILENT), None, False
    for f in range(n):
      if stands:
        margin[f] = float(model.activation_logits(vis[f], vector))
        decision[f] = V.SPEAK if margin[f] > logit(speak) else V.SILENT
        stands = not (margin[f] > logit(close if close is not None else speak))
      if f in asked:
        vector, stands = vectors[f], True
    return margin, decision

  mute, _ = replay(0.999999, None)
  standing = np.sort(mute[mute > Q.CLOSED])
  levels = np.unique(standing)  # thresholds halfway between margins: no tie within float tolerance
  speak, close = (float(jax.nn.sigmoid((levels[-k] + levels[-k - 1]) / 2)) for k in (len(levels) // 2, 1))
  for c in (close, None):
    _, out = Q.run(model, model.init_cache(POLICY, 1), frames, questions, speak_threshold=speak, close_threshold=c)
    margin, decision = replay(speak, c)
    np.testing.assert_allclose(out.speak_margin[0], margin, atol=1e-4)
    np.testing.assert_array_equal(out.decision[0], decision)
    spoke = np.flatnonzero(decision == V.SPEAK)
    if c is not None:  # an uncertain announcement, then another while the same request stands
      first = spoke[0]
      again = [f for f in spoke[1:] if not any(first <= a < f for a in asked)]
      assert margin[first] < logit(close) and again, (margin, spoke)
    else:  # the first announcement closed it
      assert margin[spoke[0] + 1] == Q.CLOSED or spoke[0] + 1 in asked


def test_a_stream_continues_from_what_answer_streams_carries():
  """``answer_streams(carry=)`` hands over what a next ``run`` continues from (cache, last frame, standing requests),
  and ``chunk_inputs`` builds that call's inputs from the streams' next chunk: 8 ticks, then one call of 4, say what
  one run of 12 ticks says in its last 4, margins included (a model with an activation model and a frame-difference
  encoder, so the cache, the last frame and the standing requests are all read; no token drop here)."""
  model = tiny_video_lm(seed=9, frame_delta=True, activation=8)
  speak = {"speak_threshold": 0.81, "close_threshold": 0.99}  # the requests stand across the calls; it speaks at some
  streams = lambda: [V.VideoQAStream(CONFIG, "test", i) for i in (0, 1)]
  whole = Q.answer_streams(model, POLICY, streams(), 12, ticks_per_call=4, **speak)
  carry, qs = [], streams()
  Q.answer_streams(model, POLICY, qs, 8, ticks_per_call=4, carry=carry, **speak)
  frames, questions = Q.chunk_inputs([s.take(4) for s in qs], V.MAX_QUESTION_WORDS + 2)
  st = carry[0]
  _, out = Q.run(
    model,
    st["cache"],
    frames,
    questions,
    **speak,
    previous_frame=st["previous_frame"],
    request_state=st["request_state"],
  )
  said = [r.decision[8:] == V.SPEAK for r in whole]
  assert any(map(np.any, said)) and not all(map(np.all, said)) and any(np.any(r.answer[8:] != V.PAD) for r in whole)
  assert all(np.all(r.speak_margin[8:] > Q.CLOSED) for r in whole)
  for row, rec in enumerate(whole):
    np.testing.assert_allclose(out.speak_margin[row], rec.speak_margin[8:], atol=1e-4)
    for name in ("decision", "announced", "answer"):
      np.testing.assert_array_equal(getattr(out, name)[row], getattr(rec, name)[8:])


def test_a_long_stream_compiles_once():
  """Also when the parameters are committed to a device (as a restored checkpoint's are) and the fresh cache
  would not be: the calls after the first then see a committed cache."""
  model = tiny_video_lm(seed=5)
  nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
  policy = C.Segmented((C.SinkWindow(2, 16), C.Window(32)))
  jax.clear_caches()
  with compilations() as n:
    (rec,) = Q.answer_streams(model, policy, [V.VideoQAStream(CONFIG, "test", 7)], 40, ticks_per_call=8)
  assert n["_run"] == 1 and len(rec.decision) == 40


def test_score_counts_answers_announcements_and_false_alarms():
  questions = [
    V.Question(0, "count_now", "how many digits are on screen ?", "two", 0),
    V.Question(1, "order", "did five appear before two ?", "yes", 1),
    V.Question(2, "proactive", "tell me when a seven appears", "seven", None),
  ]
  w = V.WORD_ID
  decision = np.full(12, V.SILENT)
  announced = np.full(12, V.PAD)
  decision[[6, 10]] = V.SPEAK  # event at 5: announced one frame late; 10: a false alarm
  announced[[6, 10]] = w["seven"]
  answer = np.full(12, V.PAD)
  answer[[0, 1]] = [w["two"], w["no"]]
  rec = Q.StreamRecord(questions, [(5, 2, 7)], decision, announced, answer)
  s = Q.score([rec])
  assert s["count_now"]["accuracy"] == 1.0 and s["order"]["accuracy"] == 0.0
  assert s["order"]["by_answer"] == {"yes": {"asked": 1, "accuracy": 0.0, "said": {"no": 1}}}
  p = s["proactive"]
  assert p["events"] == 1 and p["announced"] == 1.0 and p["spoke_in_time"] == 1.0 and p["timing"] == 1.0
  assert p["false_alarms"] == pytest.approx(1 / 9)  # 12 ticks, 3 within tolerance of the event
  assert p["preempted"] == 0.0
  assert p["precision"] == 0.5  # two announcements, one of them the event's
  rec.decision[5], rec.announced[5] = V.SPEAK, w["seven"]  # said at 5 too (an uncertain announcement, repeated)
  p = Q.score([rec])["proactive"]
  assert p["precision"] == pytest.approx(2 / 3) and p["announced"] == 1.0 and p["timing"] == 0.0
  rec.decision[5], rec.announced[5] = V.SILENT, V.PAD
  assert "margin_auc" not in p  # a record without margins
  assert p["by_wait"] == {"0-15": {"events": 1, "spoke_in_time": 1.0, "announced": 1.0}}  # asked at 2, due at 5
  rec.announced[6] = w["three"]  # the wrong label in time: spoke, not announced
  p = Q.score([rec])["proactive"]
  assert p["announced"] == 0.0 and p["spoke_in_time"] == 1.0 and p["timing"] is None
  assert p["wrong_label"] == {
    "events": 1,
    "said": {"seven": {"three": 1}},
  }  # a record without events: no on-screen share
  rec.events = [(1, V.ENTER, 0, 3), (5, V.ENTER, 1, 7)]  # the three said is on screen at tick 6
  assert Q.score([rec])["proactive"]["wrong_label"]["on_screen"] == 1.0
  rec.events = [(1, V.ENTER, 0, 3), (5, V.ENTER, 1, 7), (6, V.EXIT, 0, 3)]  # it left in frame 6: not drawn there
  assert Q.score([rec])["proactive"]["wrong_label"]["on_screen"] == 0.0
  rec.events = None
  # by wait: the event above (3 ticks), and in a longer record events after 20, 60 and 120 ticks (the last missed)
  due = [(50, 30, 1), (100, 40, 2), (130, 10, 3)]
  long = Q.StreamRecord([], due, np.full(140, V.SILENT), np.full(140, V.PAD), answer)
  long.decision[[51, 101]] = V.SPEAK
  long.announced[[51, 101]] = [w["one"], w["seven"]]
  # preempted: the announcement at 51 came while the requests of the events at 100 and 130 stood (asked at 40, 10)
  assert Q.score([rec, long])["proactive"]["preempted"] == 0.5
  assert Q.score([rec, long])["proactive"]["announced_after_early"] == 0.0  # the two preempted were not announced
  long.decision[45] = V.SPEAK  # and one at 45 while the request of the event at 50 stood (asked at 30)
  both = Q.score([rec, long])
  assert both["proactive"]["preempted"] == 0.75
  assert both["proactive"]["announced_after_early"] == 0.25  # the event at 50, announced at 51 all the same
  # answers per right word: in the record below, count_now asked twice more (one right), order once (right)
  more = [V.Question(3, "count_now", "how many digits are on screen ?", "three", 3)]
  more += [V.Question(4, "count_now", "how many digits are on screen ?", "two", 4)]
  more += [V.Question(5, "order", "did two appear before five ?", "no", 5)]
  more_answer = np.full(12, V.PAD)
  more_answer[[3, 4, 5]] = [w["one"], w["two"], w["no"]]
  by = Q.score([rec, Q.StreamRecord(more, [], np.full(12, V.SILENT), np.full(12, V.PAD), more_answer)])
  assert by["count_now"]["by_answer"] == {
    "three": {"asked": 1, "accuracy": 0.0, "said": {"one": 1}},
    "two": {"asked": 2, "accuracy": 1.0, "said": {"two": 2}},
  }
  assert by["count_now"]["accuracy"] == pytest.approx(2 / 3)
  assert by["order"]["by_answer"] == {
    "no": {"asked": 1, "accuracy": 1.0, "said": {"no": 1}},
    "yes": {"asked": 1, "accuracy": 0.0, "said": {"no": 1}},
  }
  got = both["proactive"]["by_wait"]
  assert got == {
    "0-15": {"events": 1, "spoke_in_time": 1.0, "announced": 0.0},
    "16-47": {"events": 1, "spoke_in_time": 1.0, "announced": 1.0},
    "48-95": {"events": 1, "spoke_in_time": 1.0, "announced": 0.0},
    "96+": {"events": 1, "spoke_in_time": 0.0, "announced": 0.0},
  }
  # With margins: the event's best margin within 2 frames (1.5 at tick 6) against the 9 silent ticks' margins, a
  # pair by pair count (one silent tick above it, two tied).
  rec.speak_margin = np.array([0.1, -1, -2, 1.5, 3.0, -0.5, 1.5, 0.2, -1, 0.0, 1.5, -3])
  silent = rec.speak_margin[[0, 1, 2, 3, 4, 8, 9, 10, 11]]
  want = sum(1.0 if 1.5 > m else 0.5 if 1.5 == m else 0.0 for m in silent) / len(silent)
  assert Q.score([rec])["proactive"]["margin_auc"] == pytest.approx(want) == pytest.approx(7 / 9)


@library_checks_only()
def test_bad_input_is_a_clear_error():
  model = tiny_video_lm()
  cache = model.init_cache(POLICY, 1)
  with pytest.raises(ValueError, match="share"):
    Q.run(model, cache, np.zeros((1, 3, 16, 16)), np.zeros((1, 2, 12), np.int32))
  with pytest.raises(ValueError, match="multiple of ticks_per_call"):
    Q.answer_streams(model, POLICY, [V.VideoQAStream(CONFIG)], 10, ticks_per_call=4)
  with pytest.raises(ValueError, match="speak_threshold must be in"):
    Q.run(model, cache, np.zeros((1, 2, 16, 16)), np.zeros((1, 2, 12), np.int32), speak_threshold=1.0)
  with pytest.raises(ValueError, match="close_threshold needs a model with an activation model"):
    Q.run(model, cache, np.zeros((1, 2, 16, 16)), np.zeros((1, 2, 12), np.int32), close_threshold=0.9)
  acting = tiny_video_lm(activation=8)
  with pytest.raises(ValueError, match="close_threshold must be in"):
    Q.run(
      acting, cache, np.zeros((1, 2, 16, 16)), np.zeros((1, 2, 12), np.int32), speak_threshold=0.9, close_threshold=0.5
    )
  with pytest.raises(ValueError, match="floats in"):
    Q.run(model, cache, np.zeros((1, 2, 16, 16), np.uint8), np.zeros((1, 2, 12), np.int32))
  with pytest.raises(ValueError, match="vision track, but its policy"):
    Q.answer_streams(model, C.Segmented((C.Dense(4000), C.Dense(400))), [V.VideoQAStream(CONFIG)], 200)
  with pytest.raises(ValueError, match="does not fit"):
    Q.question_ids(V.Question(0, "count_now", "how many digits are on screen ?", "two", 0), 4)


def test_the_probe_reads_the_answer_word_distribution_per_question_type():
  """``experiments.probe_video_qa.answer_stats`` on hand-made slots and logits: three where-questions (answers
  none, none, seven; the model says none, three, none-then-seven), a count_now one, a proactive request (no answer
  word: skipped) and a tick without a question; expected figures computed by hand."""
  from experiments.probe_video_qa import answer_stats

  w = V.WORD_ID
  q = [V.QUESTION, w["which"], w["digit"], V.ANSWER]
  slots = [
    [V.SILENT, *q, w["none"], V.EOS],
    [V.SILENT, *q, w["none"], V.EOS],
    [V.SILENT, *q, w["seven"], V.EOS],
    [V.SILENT, *q, w["two"], V.EOS],
    [V.SILENT, V.QUESTION, w["tell"], w["me"], V.PAD, V.PAD, V.PAD],
    [V.SILENT, *[V.PAD] * 6],
  ]
  text = np.array([slots], np.int32)
  qtype = np.array([[0, 0, 0, 1, 6, -1]], np.int32)
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(1, 6, 7, len(V.WORDS))).astype(np.float32)
  favour = {0: ["none"], 1: ["three"], 2: ["none", "seven"], 3: ["two"]}  # boosts at the answer word (index 5)
  for t, words in favour.items():
    for rank, word in enumerate(words):
      pred[0, t, 5, w[word]] += 20.0 - 5.0 * rank
  stats = answer_stats(pred, text, qtype)
  assert set(stats) == {"where", "count_now"}
  s = stats["where"]
  assert (s["questions"], s["majority_answer"], s["minority_questions"]) == (3, "none", 1)
  assert s["accuracy"] == pytest.approx(1 / 3) and s["chance"] == pytest.approx(2 / 3)
  assert s["minority_accuracy"] == 0.0 and s["minority_top"] == 1.0
  probs = np.exp(pred[0, :3, 5]) / np.exp(pred[0, :3, 5]).sum(-1, keepdims=True)
  right = [probs[0, w["none"]], probs[1, w["none"]], probs[2, w["seven"]]]
  assert s["p_right"] == pytest.approx(np.mean(right), rel=1e-5)
  assert s["minority_p_majority"] == pytest.approx(probs[2, w["none"]], rel=1e-5)
  c = stats["count_now"]
  assert (c["questions"], c["accuracy"], c["minority_questions"], c["minority_top"]) == (1, 1.0, 0, None)


def test_the_probe_sorts_speak_decisions_by_tick_kind():
  """``experiments.probe_video_qa.proactive_stats`` on a hand-made clip: a request for a seven asked in tick 0,
  nothing in tick 1, a three entering in tick 2, the seven entering (announced) in tick 3, a five entering with no
  request pending in tick 4, nothing in tick 5; the speak probabilities and the announced label set by hand."""
  from experiments.probe_video_qa import pending_requests, proactive_stats

  w = V.WORD_ID
  ask = [V.QUESTION, *V.encode("tell me when a seven appears")]
  slots = [[V.SILENT, *ask], [V.SILENT], [V.SILENT], [V.SPEAK, w["seven"], V.EOS], [V.SILENT], [V.SILENT]]
  text = np.zeros((1, 6, 10), np.int32)
  for t, slot in enumerate(slots):
    text[0, t, : len(slot)] = slot
  qtype = np.array([[V.QTYPES.index("proactive"), -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(pending_requests(text, qtype), [[-1, 7, 7, 7, -1, -1]])
  entered = np.array([[VL.NO_DIGIT, VL.NO_DIGIT, 3, 7, 5, VL.NO_DIGIT]])
  p_speak = np.array([0.1, 0.3, 0.6, 0.4, 0.25, 0.05])
  pred = np.zeros((1, 6, 10, len(V.WORDS)), np.float32)
  pred[0, :, 0, V.SPEAK] = np.log(p_speak / (1 - p_speak))  # two-way probability p_speak against <silent> at 0
  pred[0, 3, 1, w["three"]] = 5.0  # after <speak> it names a three
  got = proactive_stats(pred, text, qtype, entered)
  want = {"due": [3], "other_entry": [2], "pending": [1], "idle_entry": [4], "idle": [0, 5]}
  for kind, ticks in want.items():
    assert got[kind]["ticks"] == len(ticks), kind
    np.testing.assert_allclose(got[kind]["p_speak"], p_speak[ticks].mean(), rtol=1e-5)
    np.testing.assert_allclose(got[kind]["speak_0.5"], np.mean(p_speak[ticks] > 0.5))
    np.testing.assert_allclose(got[kind]["speak_0.2"], np.mean(p_speak[ticks] > 0.2))
  assert got["due"]["label_accuracy"] == 0.0 and got["due"]["label_other_digit"] == 1.0
  np.testing.assert_allclose(got["due"]["p_label"], 1 / (len(V.WORDS) - 1 + np.exp(5.0)), rtol=1e-5)


def test_the_probe_reads_each_test_clip_once_in_stream_order():
  """``experiments.probe_video_qa.clip_batches``: past the split's 200 clips it reads further test streams, never
  a clip twice; the clips are the first ticks of test streams 0, 1, ... without the training curriculum."""
  from experiments.bench_video_qa import run_config
  from experiments.probe_video_qa import clip_batches

  cfg = run_config(True, None, "fulfil")  # a curriculum in training that the test clips must not have
  batches = list(clip_batches(cfg, 51))  # 204 clips of 4
  assert len(batches) == 51
  frames = np.concatenate([b["frames"] for b in batches])
  text = np.concatenate([b["text"] for b in batches])
  assert len(frames) == 204
  config = cfg.video.data_config(curriculum=False)
  assert config.fulfil_prob == 0.0 and cfg.video.fulfil_prob > 0
  for i in range(204):  # clip i is stream i's start: each stream once, in order
    want = V.VideoQAStream(config, "test", i).take(cfg.video.clip_frames)
    np.testing.assert_array_equal(np.rint(frames[i] * 255), want.frames)
    np.testing.assert_array_equal(text[i], want.text)


def test_the_probes_frame_token_scales_are_the_rms_of_each_part_of_the_placed_tokens():
  """``experiments.probe_video_qa.frame_token_scales``: the parts of the frame tokens, recomputed in NumPy: the
  encoder's tokens, the projected and normalised features (``embed_dim ** -0.5`` with ``projector_norm``), the
  quadrant words and the patch head's soft label words; together they are ``placed``'s tokens."""
  from experiments.probe_video_qa import frame_token_scales

  model = tiny_video_lm(
    seed=41, projector=True, projector_norm=True, place_words=V.PLACE_WORDS, label_words=V.LABEL_WORDS
  )
  frames = jnp.asarray(np.random.default_rng(42).uniform(size=(2, 3, 16, 16)), jnp.float32)
  got = frame_token_scales(model, frames)
  vis = np.asarray(model.encode(frames), np.float64)
  feats = vis @ np.asarray(model.projector.kernel[...], np.float64)
  feats /= np.sqrt((feats**2).mean(-1, keepdims=True) * 32)
  table = np.asarray(model.lm.embed.embedding[...], np.float64)
  place = table[np.asarray(model.quadrant_words())].sum(-2)  # [4, 32]
  logits = vis @ np.asarray(model.patch_head.kernel[...], np.float64) + np.asarray(model.patch_head.bias[...])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  label = (probs / probs.sum(-1, keepdims=True)) @ table[list(V.LABEL_WORDS)]

  def rms(x):
    return np.sqrt(np.mean(np.square(x)))

  want = {"encoder": rms(vis), "word_embeddings": rms(table), "features": rms(feats), "place_words": rms(place)}
  want["label_words"] = rms(label)
  assert got.keys() == want.keys()
  np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4)
  assert abs(got["features"] - 32**-0.5) < 1e-4
  np.testing.assert_allclose(model.placed(model.encode(frames)), feats + place + label, rtol=1e-4, atol=1e-5)
