"""How well the video-QA model's frame encoder reads digits of unseen handwriting, trained alone.

  python -m experiments.encoder_reading [--quick] [--flags F] [--steps 3000] [--set KEY=VALUE ...] [--batches 32]
      --out DIR

The proactive announcements of ``configs/video_lm.py:...,activation`` are limited by how well the frame encoder
tells digits of held-out handwriting apart (issue 10): every other digit read as the requested one is a false alarm
that answers the request early. This experiment trains only the encoder-only phase of a run (``--steps`` steps of
``VideoTask.encoder_steps``: the patch-label loss, and the entry head's with ``delta``; the language model is not
run) in its own workdir, then scores the frame heads on clips of the training split and of the test split (the
split whose digits come from handwriting the training clips never show): the patch head at patches that hold a
digit's centre and at empty ones, and the entry head at the patch where a digit enters. The gap between the two
splits is what more data or augmented digits (``--set video.num_train=...``, ``--set video.augment=...``) should
close. Writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_video_qa import run_config, trained_model
from experiments.probe_video_qa import clip_batches, entry_hits
from jstream.models import video_lm

KINDS = ("digit_patch", "empty_patch", "entry")


def head_accuracy(model, cfg, split: str, batches: int) -> dict[str, float | int]:
  """The frame heads' accuracy on the first ``batches`` batches of ``split`` clips, in order, each clip once
  (without the training curriculum; ``probe_video_qa.clip_batches``)."""
  mc, size = model.config, cfg.video.digit_size

  @jax.jit
  def heads(frames):
    vis = model.encode(frames)
    out = {"patch": jnp.argmax(model.patch_logits(vis), axis=-1)}
    if mc.frame_delta:
      out["entry"] = jnp.argmax(model.entry_logits(vis), axis=-1)
    return out

  hits = {k: [] for k in KINDS}
  clips = 0
  for batch in clip_batches(cfg, batches, split):
    clips += len(batch["frames"])
    objects = jnp.asarray(batch["objects"])
    pred = jax.device_get(heads(jnp.asarray(batch["frames"])))
    want = np.asarray(video_lm.centre_labels(objects, mc, size))
    digit, empty = (want >= 0) & (want != video_lm.NO_DIGIT), want == video_lm.NO_DIGIT
    hits["digit_patch"].append(pred["patch"][digit] == want[digit])
    hits["empty_patch"].append(pred["patch"][empty] == want[empty])
    if "entry" in pred:
      hits["entry"].append(entry_hits(pred["entry"], batch["objects"], mc, size))
  out: dict[str, float | int] = {"clips": clips}
  for name, parts in hits.items():
    if parts:
      h = np.concatenate(parts)
      out[f"{name}_accuracy"], out[f"{name}_n"] = float(h.mean()) if h.size else float("nan"), int(h.size)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="encoder_reading", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--quick", action="store_true", help="the quick model (smoke test)")
  parser.add_argument("--flags", default="delta", help="flags of configs/video_lm.py (default: delta)")
  parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
  parser.add_argument("--steps", type=int, default=3000, help="encoder-only steps")
  parser.add_argument("--workdir", default=None, help="the run's workdir (default: runs/encoder_reading_<out name>)")
  parser.add_argument("--batches", type=int, default=64, help="batches of each split to score")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  workdir = args.workdir or f"runs/encoder_reading_{out.name}"
  steps = 2 if args.quick else args.steps
  flags = ",".join([args.flags, *args.set, f"video.encoder_steps={steps}", f"steps={steps}"])
  cfg = run_config(args.quick, workdir, flags)
  t0 = time.perf_counter()
  model, step, last = trained_model(cfg, progress=not args.no_progress)
  train_s = time.perf_counter() - t0
  rows = {split: head_accuracy(model, cfg, split, 1 if args.quick else args.batches) for split in ("train", "test")}
  result = {
    "flags": args.flags,
    "overrides": args.set,
    "workdir": workdir,
    "steps": step,
    "batch_size": cfg.batch_size,
    "num_train": cfg.video.num_train,
    "train_call_seconds": train_s,  # training, or only loading where the finished run was reused
    "last_training_metrics": {k: float(v) for k, v in last.items() if np.isscalar(v)},
    "splits": rows,
  }
  print(f"{'split':<6} {'digit patches':>14} {'empty patches':>14} {'entries':>10}")
  for split, r in rows.items():
    cells = [f"{r[k + '_accuracy']:.3f} ({r[k + '_n']})" if k + "_accuracy" in r else "-" for k in KINDS]
    print(f"{split:<6} {cells[0]:>14} {cells[1]:>14} {cells[2]:>10}")
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
