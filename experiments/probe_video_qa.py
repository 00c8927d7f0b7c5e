"""Teacher-forced answer statistics of a video-QA model, per question type, on held-out clips.

  python -m experiments.probe_video_qa [--quick] [--flags F] [--workdir W] [--batches 4] --out DIR

``jstream bench video-qa`` scores what the model says; where a type sits exactly at chance it cannot tell a model
that learnt nothing from one that learnt something but not enough to beat the type's most common answer (``none``
for ``where``). This probe reads the model's distribution over the answer word instead, teacher-forced on clips of
the test split (unseen handwriting) of the run's own data: per type, accuracy, the majority answer's share (chance),
the mean probability of the right answer, and on the questions whose answer is *not* the majority one, how often
the right answer is the model's first choice once the majority answer is set aside (``minority_top``), with the
mean probability the model still gives the majority answer there. For a model with a scene-state head (``flags
state``) it also scores the head on the same clips, per group of ``video_lm.STATE_NAMES``: accuracy, the group's
majority share and the accuracy on the targets that are not the majority class (what the state holds beyond the
obvious guess). Writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_video_qa import add_model_arguments, run_config, trained_model
from jstream.data import video_qa
from jstream.models import video_lm
from jstream.train import train_iterator


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="probe_video_qa", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  add_model_arguments(parser, "the quick model (smoke test)")
  parser.add_argument("--batches", type=int, default=4, help="test-split batches of the run's batch size")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  cfg = run_config(args.quick, args.workdir, args.flags)
  model, step, _ = trained_model(cfg, progress=not args.no_progress)
  p = model.config.frame_len
  has_state = model.config.state_head

  @jax.jit
  def forward(frames, text):
    if not has_state:
      return model.training_outputs(frames, text)[0], None
    logits, feats, _, _ = model.training_outputs(frames, text, return_features=True)
    return logits, jnp.argmax(model.state_logits(feats, text.shape[1]), axis=-1)

  it = train_iterator(cfg, "test")
  preds, texts, qtypes, states, truths = [], [], [], [], []
  for _ in range(args.batches):
    batch = next(it)
    text = np.asarray(batch["text"])
    logits, state = forward(jnp.asarray(batch["frames"]), jnp.asarray(text))
    preds.append(np.asarray(video_lm.slot_logits(logits, text.shape[1], p)))
    texts.append(text)
    qtypes.append(np.asarray(batch["qtype"]))
    if has_state:
      states.append(np.asarray(state))
      truths.append(np.asarray(video_lm.scene_state(jnp.asarray(batch["objects"]), model.config, cfg.video.digit_size)))
  stats = answer_stats(np.concatenate(preds), np.concatenate(texts), np.concatenate(qtypes))
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
    "seconds": time.perf_counter() - t0,
  }
  (out / "results.json").write_text(json.dumps(res, indent=2))
  print(f"wrote {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
