"""Reproductions for streaming video generation (``jstream bench video-gen-repro``): training objectives and cache
policies, judged by drift at 10x the training horizon.

* **Self Forcing's claim** (Huang et al. 2025): a model trained on its own rollouts (self forcing) drifts less over
  a long rollout than the same model trained with teacher forcing or diffusion forcing, whose training contexts
  are always real frames. Here: the three runs of ``configs/video_gen.py`` (diffusion forcing, ``teacher_forcing``,
  ``self_forcing``; the last distilled from the first), each rolled out for ``--horizon`` frames (10x the training
  clip by default) under the same cache policy.
* **LongLive / Rolling Forcing's claim**: frame sinks (the first frames kept for ever, cache-relative positions)
  keep a long rollout anchored; a plain rolling window loses the start; a dense cache goes past the positions seen
  in training. Here: each run under ``window``, ``sinks+window`` and ``dense``.

Drift is measured as in ``jstream bench video-gen``: on moving digits, per frame, whether a digit classifier reads
the label the video was asked for (identity), whether it shows one blob as real frames do (count) and the frame's
ink against the data's (from scratch, or with ``--context N`` continuing the first N frames of real test clips,
which start with the right digit and can only lose it); on CartPole (``--data
cartpole``), the PSNR / SSIM of the model's continuation of real frames under the real actions against the real
simulator's frames, beside holding the last real frame. Runs that are missing or unfinished are trained first
(diffusion forcing before self forcing, its teacher), unless ``--no-train`` (each run's newest checkpoint as it
is; the step is recorded). Writes ``results.json`` and ``repro.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_video_gen as bench
from experiments.machine import device_line
from jstream import rollout
from jstream.data import digits
from jstream.models import video_dit
from jstream.train import load_model, train

RUNS = {"diffusion forcing": "", "teacher forcing": "teacher_forcing", "self forcing": "self_forcing"}
"""Run name -> flags of ``configs/video_gen.py`` (the order is the training order: self forcing's teacher first)."""


def run_flags(name: str, cartpole: bool, sets: list[str]) -> str:
  """The ``configs/video_gen.py`` flags of run ``name``: its objective's flag, ``cartpole``, then the ``key=value``
  overrides of every ``--set NAME:key=value,...`` naming it (e.g. another workdir and step count)."""
  extra = []
  for item in sets:
    run, sep, over = item.partition(":")
    if not sep or run not in RUNS or not over:
      raise SystemExit(f"--set {item!r}: expected RUN:key=value[,key=value...] with RUN one of {list(RUNS)}")
    if run == name:
      extra.append(over)
  return ",".join(f for f in (RUNS[name], "cartpole" if cartpole else "", *extra) if f)


def policies(config: video_dit.VideoDiTConfig, window: int, sinks: int, total: int) -> dict:
  return {
    "window": video_dit.rolling_policy(config, window),
    "sinks+window": video_dit.rolling_policy(config, window, sink_frames=sinks),
    "dense": video_dit.rolling_policy(config, None, total),
  }


def digits_drift(
  model, task, policy, *, predict, ink_ref: float, batch: int, horizon: int, steps: int, rng, guidance: float = 1.0,
  context: int = 0,
) -> dict:  # fmt: skip
  """Identity and ink per frame of ``batch`` videos generated from scratch (labels 0, 1, 2, ...), or, with
  ``context`` > 0, continuing the first ``context`` frames of the test split's first ``batch`` clips (their labels):
  a rollout that starts from real digits, whose identity can only be lost. ``guidance``: classifier-free (1: none)."""
  labels, real = np.arange(batch) % 10, None
  if context:
    clips = next(iter(digits.digits_dataset("test", batch_size=batch, shuffle=False, dtype=np.float32,
                                            with_metadata=True, config=task.data_config())))  # fmt: skip
    labels = np.asarray(clips["labels"])[:, 0]
    real = jnp.asarray(np.asarray(clips["frames"])[:, :context, ..., None])
  out = rollout.generate_video(
    model,
    num_frames=horizon,
    policy=policy,
    labels=jnp.asarray(labels, jnp.int32),
    steps=steps,
    guidance=guidance,
    context=real,
    rng=rng,
    out_dtype=jnp.uint8,
  )
  curves = bench.score(predict, np.asarray(out.frames)[..., 0], labels, ink_ref)
  return {"curves": curves, "summary": bench.summary(curves, horizon, task.clip_frames)}


def plot(result: dict, path: pathlib.Path) -> None:
  """One column per run, one row per metric (digits: identity, count, ink; CartPole: PSNR, SSIM), one line per
  policy."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cartpole = result["data"] == "cartpole"
  names = list(result["runs"])
  first = next(iter(result["runs"][names[0]]["policies"].values()))["curves"]
  metrics = ("psnr", "ssim") if cartpole else tuple(m for m in ("identity", "count", "ink") if m in first)
  fig, axes = plt.subplots(len(metrics), len(names), figsize=(4.2 * len(names), 3.2 * len(metrics)), sharey="row",
                           squeeze=False)  # fmt: skip
  context = result["args"]["context"]  # the curves start after the real context frames
  for col, name in enumerate(names):
    evals = result["runs"][name]["policies"]
    for row, metric in enumerate(metrics):
      ax = axes[row, col]
      for pol, ev in evals.items():
        c = ev["curves"]["model"][metric] if cartpole else ev["curves"][metric]
        w = max(1, len(c) // 40)
        smooth = np.convolve(c, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w // 2 + 1, smooth, label=pol)
      if cartpole:
        hold = next(iter(evals.values()))["curves"]["hold_last_frame"][metric]
        ax.plot(np.arange(1, len(hold) + 1), hold, color="grey", ls="--", label="hold last frame")
      ax.axvline(result["train_frames"] - context, color="grey", ls=":", label="training clip")
      ax.set_title(f"{name}: {metric}", fontsize=9)
      ax.set_xlabel("frame")
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize(result: dict, edges: list[int]) -> int:
  """Prints each run's and policy's per-frame curves (identity, count, ink) averaged between ``edges``."""
  for name, run in result["runs"].items():
    for pol_name, ev in run["policies"].items():
      n = len(next(iter(ev["curves"].values())))
      print_row(name, pol_name, bench.summary(ev["curves"], n, result["train_frames"], edges))
  return 0


def print_row(name: str, pol_name: str, summary: dict) -> None:
  """One line: a run's and policy's means per frame range (``bench_video_gen.summary``)."""
  cells = "; ".join(
    f"{span}: " + ", ".join(f"{m} {v:.3f}" for m, v in vals.items() if not m.startswith("hold"))
    for span, vals in summary.items()
  )
  print(f"  {name:<18} {pol_name:<13} {cells}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench video-gen-repro", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/repro_video_gen", help="output folder")
  parser.add_argument("--data", choices=("digits", "cartpole"), default="digits")
  parser.add_argument("--quick", action="store_true", help="the quick runs and short rollouts (smoke test)")
  parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
  parser.add_argument("--horizon", type=int, default=None, help="frames per rollout (default: 10x the clip)")
  parser.add_argument("--batch", type=int, default=20, help="videos per rollout")
  parser.add_argument("--steps", type=int, default=4, help="sampler steps (self forcing: its own rollout_steps)")
  parser.add_argument(
    "--guidance", type=float, default=1.0, help="classifier-free guidance scale (self forcing: always unguided)"
  )
  parser.add_argument("--window", type=int, default=None, help="frames in the window (default: the training clip)")
  parser.add_argument("--sinks", type=int, default=None, help="frame sinks (default: the context, or one chunk)")
  parser.add_argument(
    "--context", type=int, default=None, help="real frames each rollout continues (default: CartPole 2, digits 0)"
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="RUN:KEY=VALUE,...",
    help="config overrides of one run, e.g. 'self forcing:steps=1200,workdir=runs/sf1200' (repeatable)",
  )
  parser.add_argument("--classifier-steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-train", action="store_true", help="evaluate the runs' newest checkpoints as they are")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument(
    "--summarize", default=None, help="a results.json of this command: its curves' means over --edges, runs nothing"
  )
  parser.add_argument("--edges", default="0,1,8,20,40,80", help="--summarize: frame ranges' edges")
  args = parser.parse_args(argv)
  if args.summarize:
    return summarize(json.loads(pathlib.Path(args.summarize).read_text()), [int(e) for e in args.edges.split(",")])
  for name in RUNS:  # a malformed --set is refused before anything is run or written
    run_flags(name, False, args.set)
  names = [n for n in args.runs.split(",") if n]
  unknown = set(names) - set(RUNS)
  if unknown:
    raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")
  if args.quick:
    args.batch, args.classifier_steps = 2, 5
  cartpole = args.data == "cartpole"
  if args.context is None:
    args.context = 2 if cartpole else 0
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = device_line()
  print(f"repro_video_gen ({args.data}) on {device}, jax {jax.__version__}")
  t0 = time.time()
  rng = jax.random.key(args.seed)
  result = {"device": device, "jax": jax.__version__, "args": vars(args), "data": args.data, "runs": {}}
  predict = ink_ref = None
  for name in [n for n in RUNS if n in names or (n == "diffusion forcing" and "self forcing" in names)]:
    flags = run_flags(name, cartpole, args.set)
    cfg = bench.run_config(args.quick, None, flags)
    if name not in names and args.no_train:
      continue
    metrics = [] if args.no_train else train(cfg, progress=not args.no_progress).metrics
    if name not in names:  # trained only as self forcing's teacher
      continue
    model, step = load_model(cfg)
    model = getattr(model, "generator", model)  # a self-forcing run: its student
    task = cfg.generation
    steps = task.rollout_steps if task.objective == "self_forcing" else args.steps
    # A self-forcing student has its teacher's guidance distilled in (DMD): it samples unguided, as CausVid's does.
    guidance = 1.0 if task.objective == "self_forcing" else args.guidance
    clip = task.clip_frames
    horizon = args.horizon or (3 if args.quick else 10) * clip
    k = model.config.frames_per_chunk
    if not cartpole and (args.context >= clip or args.context % k):
      raise SystemExit(f"--context {args.context}: whole chunks of {k} frames, fewer than the {clip}-frame test clips")
    window = args.window or clip
    sinks = args.sinks if args.sinks is not None else (args.context or k)  # the real frames, or the first chunk
    if predict is None and not cartpole:
      predict, acc = bench.train_classifier(task.data_config(), steps=args.classifier_steps, seed=args.seed)
      result["classifier_test_accuracy"] = acc
      sample = next(iter(digits.digits_dataset("test", batch_size=32, shuffle=False, dtype=np.float32,
                                               config=task.data_config())))  # fmt: skip
      ink_ref = float(np.mean(sample))
      print(f"  digit classifier: {acc:.3f} on the test split's frames")
    total = horizon + args.context
    evals = {}
    for pol_name, policy in policies(model.config, window, sinks, total).items():
      if cartpole:
        ev = bench.cartpole_eval(model, task, policy, batch=args.batch, context=args.context, horizon=horizon,
                                 steps=steps, rng=rng)  # fmt: skip
        ev.pop("videos")
      else:
        ev = digits_drift(model, task, policy, predict=predict, ink_ref=ink_ref, batch=args.batch, horizon=horizon,
                          steps=steps, rng=rng, guidance=guidance, context=args.context)  # fmt: skip
      evals[pol_name] = ev
      print_row(name, pol_name, ev["summary"])
    result["runs"][name] = {
      "flags": flags,
      "model_step": step,
      "sampler_steps": steps,
      "train_last_metrics": metrics[-1] if metrics else {},
      "policies": evals,
    }
    result["train_frames"], result["window"], result["sinks"], result["horizon"] = clip, window, sinks, horizon
  result["seconds"] = time.time() - t0
  (out / "results.json").write_text(json.dumps(result, indent=2))
  plot(result, out / "repro.png")
  print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
