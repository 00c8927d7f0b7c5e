"""Teacher-forced answer statistics of a video-QA model, per question type, on held-out clips.

  python -m experiments.probe_video_qa [--quick] [--flags F] [--workdir W] [--batches 4] --out DIR

``jstream bench video-qa`` scores what the model says; where a type sits exactly at chance it cannot tell a model
that learnt nothing from one that learnt something but not enough to beat the type's most common answer (``none``
for ``where``). This probe reads the model's distribution over the answer word instead, teacher-forced (with the
run's training mask and positions, ``train_window`` and ``train_positions``; absolute for a ``mixed`` run) on
clips of the test split (unseen handwriting) of the run's own data: per type, accuracy, the majority answer's share
(chance), the mean probability of the right answer, and on the questions whose answer is *not* the majority one, how
often the right answer is the model's first choice once the majority answer is set aside (``minority_top``), with the
mean probability the model still gives the majority answer there. For a model with a scene-state head (``flags
state``) it also scores the head on the same clips, per group of ``video_lm.STATE_NAMES``: accuracy, the group's
majority share and the accuracy on the targets that are not the majority class (what the state holds beyond the
obvious guess). With an entry head (``flags delta``) it also scores a speak decision read off that head alone
(``proactive_entry_head``: its largest probability, over the frame's patches, of the requested digit), beside the
model's own. Writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import pathlib
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_video_qa import add_model_arguments, run_config, trained_model
from jstream.data import video_qa
from jstream.models import video_lm
from jstream.train import aligned


def answer_stats(pred: np.ndarray, text: np.ndarray, qtype: np.ndarray) -> dict[str, dict]:
  """Statistics per question type of the answer words of teacher-forced clips.

  Args:
    pred: ``[b, n, L, v]`` logits that predict each slot word (``video_lm.slot_logits``).
    text: ``[b, n, L]`` the slots (a question's answer word follows its ``<answer>`` marker).
    qtype: ``[b, n]`` the index in ``video_qa.QTYPES`` of each tick's question (-1: none).
  """
  rows = collections.defaultdict(list)  # type -> (answer id, log-probabilities)
  for b, t in zip(*np.nonzero(qtype >= 0), strict=True):
    slot = list(text[b, t])
    if video_qa.ANSWER not in slot:
      continue  # a proactive request: its answer is an announcement, scored by the benchmark
    j = slot.index(video_qa.ANSWER) + 1
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(pred[b, t, j], jnp.float32)))
    rows[video_qa.QTYPES[qtype[b, t]]].append((int(slot[j]), logp))
  out = {}
  for name, items in sorted(rows.items()):
    answers = np.array([a for a, _ in items])
    logp = np.stack([lp for _, lp in items])
    ids, counts = np.unique(answers, return_counts=True)
    major = int(ids[np.argmax(counts)])
    right = np.argmax(logp, axis=-1) == answers
    minor = answers != major
    others = logp.copy()
    others[:, major] = -np.inf
    top = np.argmax(others, axis=-1) == answers
    out[name] = {
      "questions": len(items),
      "accuracy": float(right.mean()),
      "chance": float(counts.max() / counts.sum()),
      "majority_answer": video_qa.WORDS[major],
      "p_right": float(np.exp(logp[np.arange(len(items)), answers]).mean()),
      "minority_questions": int(minor.sum()),
      "minority_accuracy": float(right[minor].mean()) if minor.any() else None,
      "minority_top": float(top[minor].mean()) if minor.any() else None,
      "minority_p_majority": float(np.exp(logp[minor, major]).mean()) if minor.any() else None,
    }
  return out


def pending_requests(text: np.ndarray, qtype: np.ndarray) -> np.ndarray:
  """``[b, n]`` the label of the proactive request pending at each tick's decision (-1: none), from the slots of
  clips that start at their stream's first tick: a request asked in tick ``f`` is pending from tick ``f + 1`` up to
  and including the tick that announces it (whose slot starts with ``<speak>``)."""
  ask = video_qa.QTYPES.index("proactive")
  digit = {video_qa.WORD_ID[w]: d for d, w in enumerate(video_qa.NUMBERS)}
  out = np.full(qtype.shape, -1, np.int64)
  for b in range(qtype.shape[0]):
    pending = -1
    for t in range(qtype.shape[1]):
      out[b, t] = pending
      if text[b, t, 0] == video_qa.SPEAK:
        pending = -1
      if qtype[b, t] == ask:
        pending = next(digit[w] for w in text[b, t] if w in digit)
  return out


def proactive_stats(
  pred: np.ndarray, text: np.ndarray, qtype: np.ndarray, entered: np.ndarray, p_speak: np.ndarray | None = None
) -> dict[str, dict]:
  """Teacher-forced speak decisions and announced labels, by kind of tick: ``due`` (the requested digit enters:
  the model should speak), ``other_entry`` (a request is pending and another digit enters), ``pending`` (a request
  is pending, nothing enters), ``idle_entry`` (a digit enters, no request pending) and ``idle`` (neither). Per kind:
  ``ticks``, the mean two-way probability of ``<speak>`` against ``<silent>`` and how often it exceeds 0.5 and 0.2;
  for ``due`` ticks also the accuracy and mean probability of the announced label (``<speak>`` given), and how often
  the model's label names a digit other than the requested one.

  Args:
    pred: ``[b, n, L, v]`` logits that predict each slot word (``video_lm.slot_logits``).
    text, qtype: the clips' slots and question types.
    entered: ``[b, n]`` the label of the digit entering in each frame (``video_lm.NO_DIGIT``: none).
    p_speak: ``[b, n]`` the probability of speaking at each tick, if not the language model's (an activation
      model's, ``VideoLMConfig.activation``).
  """
  pending = pending_requests(text, qtype)
  if p_speak is None:
    two = jnp.asarray(pred[:, :, 0, [video_qa.SILENT, video_qa.SPEAK]], jnp.float32)
    p_speak = np.exp(np.asarray(jax.nn.log_softmax(two))[..., 1])
  due = text[:, :, 0] == video_qa.SPEAK
  enters = entered != video_lm.NO_DIGIT
  kinds = {
    "due": due,
    "other_entry": (pending >= 0) & enters & ~due,
    "pending": (pending >= 0) & ~enters,
    "idle_entry": (pending < 0) & enters,
    "idle": (pending < 0) & ~enters,
  }
  out = {}
  for name, m in kinds.items():
    out[name] = {
      "ticks": int(m.sum()),
      "p_speak": float(p_speak[m].mean()) if m.any() else None,
      "speak_0.5": float((p_speak[m] > 0.5).mean()) if m.any() else None,
      "speak_0.2": float((p_speak[m] > 0.2).mean()) if m.any() else None,
    }
  if due.any():
    labels = np.asarray(jax.nn.log_softmax(jnp.asarray(pred[:, :, 1][due], jnp.float32)))
    want = text[:, :, 1][due]
    got = np.argmax(labels, axis=-1)
    digits = set(video_qa.WORD_ID[w] for w in video_qa.NUMBERS)
    out["due"]["label_accuracy"] = float((got == want).mean())
    out["due"]["p_label"] = float(np.exp(labels[np.arange(len(want)), want]).mean())
    out["due"]["label_other_digit"] = float(np.mean([g != w and int(g) in digits for g, w in zip(got, want)]))
  return out


def state_stats(pred: np.ndarray, truth: np.ndarray) -> dict[str, dict]:
  """Per scene-state group (``video_lm.STATE_NAMES``): ``targets`` (defined ones), ``accuracy``, ``chance`` (the
  majority class's share) and ``minority_accuracy`` (on the targets that are not the majority class).

  Args:
    pred: ``[b, n, groups]`` the head's predicted classes.
    truth: ``[b, n, groups]`` ``video_lm.scene_state`` (-1: undefined).
  """
  out = {}
  for g, name in enumerate(video_lm.STATE_NAMES):
    y, p = truth[..., g].ravel(), pred[..., g].ravel()
    p, y = p[y >= 0], y[y >= 0]
    if not y.size:
      continue
    ids, counts = np.unique(y, return_counts=True)
    minor = y != ids[np.argmax(counts)]
    out[name] = {
      "targets": int(y.size),
      "accuracy": float((p == y).mean()),
      "chance": float(counts.max() / counts.sum()),
      "minority_targets": int(minor.sum()),
      "minority_accuracy": float((p == y)[minor].mean()) if minor.any() else None,
    }
  return out


def clip_batches(cfg, batches: int, split: str = "test") -> Iterator[dict]:
  """``batches`` batches of the run's batch size of distinct ``split`` clips: the first clips of the split's streams
  ``0, 1, ...`` in order, each once, as the benchmark evaluates them (without a training curriculum,
  ``VideoTask.fulfil_prob``). The test split is built with as many clips as asked for (at least its default 200),
  so asking for more reads more streams, never a clip twice."""
  params = cfg.video.data_config(curriculum=False).params()
  params["num_test"] = max(params["num_test"], batches * cfg.batch_size)
  config = video_qa.video_qa_config(**params)
  data = video_qa.video_qa_dataset(split, batch_size=cfg.batch_size, shuffle=False, num_epochs=1, config=config)
  return itertools.islice(iter(data), batches)


def entry_hits(entry: np.ndarray, objects: np.ndarray, config: video_lm.VideoLMConfig, digit_size: int) -> np.ndarray:
  """Whether the entry head's class ``entry [b, n, p]`` is right at each patch where a digit enters."""
  want = np.asarray(video_lm.entry_labels(jnp.asarray(objects), config, digit_size))
  entering = (want >= 0) & (want != video_lm.NO_DIGIT)
  return np.asarray(entry)[entering] == want[entering]


def frame_token_scales(model: video_lm.VideoLM, frames: jax.Array) -> dict[str, float]:
  """RMS per coordinate of the parts of the frame tokens the language model reads (``VideoLM.placed``), over
  ``frames``: the encoder's tokens, the features that reach the language model (through the projector and its
  norm, if any), the words added (place, label, entry) and the word embeddings themselves. The words are drowned
  when the features dwarf them (``experiments/where_routing.py``)."""
  c = model.config
  vis = model.encode(frames).astype(jnp.float32)

  def rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))

  out = {"encoder": rms(vis), "word_embeddings": rms(model.lm.embed.embedding[...])}
  out["features"] = rms(model.frame_features(vis))
  if c.place_words:
    out["place_words"] = rms(model.lm.embed(model.quadrant_words()).sum(-2))
  for name, head in (("label_words", "patch_logits"), ("entry_words", "entry_logits")):
    ids = getattr(c, name)
    if ids:
      probs = jax.nn.softmax(getattr(model, head)(vis).astype(jnp.float32), axis=-1)
      out[name] = rms(probs @ model.lm.embed(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="probe_video_qa", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  add_model_arguments(parser, "the quick model (smoke test)")
  parser.add_argument("--batches", type=int, default=4, help="batches of distinct test clips (the run's batch size)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  cfg = run_config(args.quick, args.workdir, args.flags)
  model, step, _ = trained_model(cfg, progress=not args.no_progress)
  p = model.config.frame_len
  mc = model.config
  has_state = mc.state_head
  mask = aligned.forward_masks(cfg)[0]  # the training's mask and positions (a mixed run's absolute half)

  @jax.jit
  def forward(frames, text):
    vis = model.encode(frames)
    logits, feats, _, _ = model.training_outputs(frames, text, return_features=True, vis=vis, **mask)
    heads = {}
    if has_state:
      heads["state"] = jnp.argmax(model.state_logits(feats, text.shape[1]), axis=-1)
    if mc.frame_delta:
      entry = jax.nn.softmax(model.entry_logits(vis).astype(jnp.float32), axis=-1)
      heads["entry"] = jnp.argmax(entry, axis=-1)
      heads["entry_probs"] = entry.max(axis=-2)  # [b, n, 11]: each class's largest probability over the patches
    if mc.request_head:
      heads["request"] = jnp.argmax(model.request_logits(feats, text.shape[1]), axis=-1)
    if mc.activation:  # the activation model's probability of speaking where a request stands, else 0
      standing, _ = model.activation.standing(text)
      heads["activation"] = jnp.where(standing.open, jax.nn.sigmoid(model.activation_logits(vis, standing.vector)), 0)
    return logits, heads

  scales = None
  preds, texts, qtypes, states, truths, entered = [], [], [], [], [], []
  entry_hit, request_hits, activation, entry_rule = [], [], [], []
  for batch in clip_batches(cfg, args.batches):
    text = np.asarray(batch["text"])
    logits, heads = forward(jnp.asarray(batch["frames"]), jnp.asarray(text))
    if scales is None:
      scales = frame_token_scales(model, jnp.asarray(batch["frames"]))
    state = heads.get("state")
    if "entry" in heads:  # the entry head at the patches where a digit enters
      entry_hit.append(entry_hits(heads["entry"], batch["objects"], mc, cfg.video.digit_size))
      pending = pending_requests(text, np.asarray(batch["qtype"]))  # the entry head's probability of the request
      probs = np.take_along_axis(np.asarray(heads["entry_probs"]), np.maximum(pending, 0)[..., None], -1)[..., 0]
      entry_rule.append(np.where(pending >= 0, probs, 0.0))
    if "request" in heads:  # the request head at the ticks where a request is pending
      want = pending_requests(text, np.asarray(batch["qtype"]))
      request_hits.append(np.asarray(heads["request"])[want >= 0] == want[want >= 0])
    if "activation" in heads:
      activation.append(np.asarray(heads["activation"]))
    preds.append(np.asarray(video_lm.slot_logits(logits, text.shape[1], p)))
    texts.append(text)
    qtypes.append(np.asarray(batch["qtype"]))
    truth = np.asarray(video_lm.scene_state(jnp.asarray(batch["objects"]), model.config, cfg.video.digit_size))
    entered.append(truth[..., video_lm.STATE_NAMES.index("entered")])
    if has_state:
      states.append(np.asarray(state))
      truths.append(truth)
  pred, text, qtype = np.concatenate(preds), np.concatenate(texts), np.concatenate(qtypes)
  stats = answer_stats(pred, text, qtype)
  proactive = entry_decision = None
  if cfg.video.streaming_objective:
    p_speak = np.concatenate(activation) if activation else None
    proactive = proactive_stats(pred, text, qtype, np.concatenate(entered), p_speak)
    if entry_rule:  # a decision that reads the entry head alone: its largest probability of the requested digit
      entry_decision = proactive_stats(pred, text, qtype, np.concatenate(entered), np.concatenate(entry_rule))
  state_scores = state_stats(np.concatenate(states), np.concatenate(truths)) if has_state else None
  print(f"probe_video_qa: {cfg.workdir} at step {step}, {sum(s['questions'] for s in stats.values())} questions")
  print(
    f"  {'type':10s} {'n':>5s} {'acc':>6s} {'chance':>7s} {'p(right)':>9s}   not-majority: {'n':>5s} "
    f"{'acc':>6s} {'top':>6s} {'p(maj)':>7s}"
  )
  for name, s in stats.items():
    m = (
      f"{s['minority_questions']:5d} {s['minority_accuracy']:6.2f} {s['minority_top']:6.2f} "
      f"{s['minority_p_majority']:7.2f}"
      if s["minority_questions"]
      else "    0"
    )
    print(f"  {name:10s} {s['questions']:5d} {s['accuracy']:6.2f} {s['chance']:7.2f} {s['p_right']:9.2f}   {m}")
  if proactive:
    head = f"{'tick kind':12s} {'ticks':>6s} {'p(speak)':>9s} {'>0.5':>6s} {'>0.2':>6s}"
    who = "activation model" if activation else "teacher-forced"
    print(f"  speak decisions ({who}): {head}")
    rows = [(name, r) for name, r in proactive.items() if r["ticks"]]
    if entry_decision:
      rows.append(("read off the entry head (its largest probability of the requested digit):", None))
      rows += [(name, entry_decision[name]) for name in ("due", "other_entry") if entry_decision[name]["ticks"]]
    for name, r in rows:
      if r is None:
        print(f"  speak decisions {name}")
        continue
      print(f"  {'':34s} {name:12s} {r['ticks']:6d} {r['p_speak']:9.3f} {r['speak_0.5']:6.2f} {r['speak_0.2']:6.2f}")
    if "label_accuracy" in proactive["due"]:
      d = proactive["due"]
      print(
        f"  announced label after <speak> at due ticks: accuracy {d['label_accuracy']:.2f}, p(label) "
        f"{d['p_label']:.2f}, another digit named {d['label_other_digit']:.2f}"
      )
  print("  frame tokens, RMS per coordinate: " + ", ".join(f"{k} {v:.3f}" for k, v in scales.items()))
  frame_heads = {}
  for name, hits in (("entry", entry_hit), ("request", request_hits)):
    if hits:
      h = np.concatenate(hits)
      frame_heads[name] = {"targets": int(h.size), "accuracy": float(h.mean()) if h.size else None}
      what = "patches where a digit enters" if name == "entry" else "ticks with a request pending"
      print(f"  {name} head: accuracy {frame_heads[name]['accuracy']:.2f} at {h.size} {what}")
  if state_scores:
    print(f"  scene state (head on the language model): {'group':18s} {'acc':>6s} {'chance':>7s} {'not-majority':>13s}")
    for name, r in state_scores.items():
      minor = "" if r["minority_accuracy"] is None else f"{r['minority_accuracy']:6.2f} of {r['minority_targets']}"
      print(f"  {'':42s} {name:18s} {r['accuracy']:6.2f} {r['chance']:7.2f} {minor:>13s}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  res = {
    "workdir": cfg.workdir,
    "step": step,
    "batches": args.batches,
    "types": stats,
    "state": state_scores,
    "proactive": proactive,
    "speak_decider": "activation" if activation else "language_model",
    "proactive_entry_head": entry_decision,
    "heads": frame_heads,
    "frame_token_rms": scales,
    "seconds": time.perf_counter() - t0,
  }
  (out / "results.json").write_text(json.dumps(res, indent=2))
  print(f"wrote {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
