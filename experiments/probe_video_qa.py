"""Teacher-forced answer statistics of a video-QA model, per question type, on held-out clips.

  python -m experiments.probe_video_qa [--quick] [--flags F] [--workdir W] [--batches 4] --out DIR

``jstream bench video-qa`` scores what the model says; where a type sits exactly at chance it cannot tell a model
that learnt nothing from one that learnt something but not enough to beat the type's most common answer (``none``
for ``where``). This probe reads the model's distribution over the answer word instead, teacher-forced on clips of
the test split (unseen handwriting) of the run's own data: per type, accuracy, the majority answer's share (chance),
the mean probability of the right answer, and on the questions whose answer is *not* the majority one, how often
the right answer is the model's first choice once the majority answer is set aside (``minority_top``), with the
mean probability the model still gives the majority answer there. Writes ``DIR/results.json``.
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
  forward = jax.jit(lambda f, t: model.training_outputs(f, t)[0])
  it = train_iterator(cfg, "test")
  preds, texts, qtypes = [], [], []
  for _ in range(args.batches):
    batch = next(it)
    text = np.asarray(batch["text"])
    logits = forward(jnp.asarray(batch["frames"]), jnp.asarray(text))
    preds.append(np.asarray(video_lm.slot_logits(logits, text.shape[1], p)))
    texts.append(text)
    qtypes.append(np.asarray(batch["qtype"]))
  stats = answer_stats(np.concatenate(preds), np.concatenate(texts), np.concatenate(qtypes))
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
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  res = {
    "workdir": cfg.workdir,
    "step": step,
    "batches": args.batches,
    "types": stats,
    "seconds": time.perf_counter() - t0,
  }
  (out / "results.json").write_text(json.dumps(res, indent=2))
  print(f"wrote {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
