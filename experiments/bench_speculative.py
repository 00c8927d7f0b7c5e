"""Speculative decoding: acceptance, tokens per target call against the formula, and wall-clock speed-up.

  python -m experiments.bench_speculative [--quick] [--out DIR] [--ks 1,2,4,8] [--temperatures 0,1]
      [--batches 1,8] [--tokens 128]
  (also: jstream bench speculative ...)

The target / draft pair of ``configs/speculative.py`` (byte-level LMs on the local text corpus; trained here if a
checkpoint is missing, resumed otherwise) continues prompts of held-out text. For each batch size and temperature,
plain decoding of the target (``rollout.generate``) and ``speculative.generate`` at each ``K`` run on the same
prompts and the same ``SinkWindow(4, 252, max_rollback=K_max)`` cache policy, each timed after compiling (median
of 3 calls). Reported per row: acceptance rate ``a`` (accepted / proposed drafts), tokens per target call against
Leviathan et al.'s ``(1 - a^(K+1)) / (1 - a)``, the speed-up over plain decoding, and the speed-up the paper's cost
model predicts from ``a`` and the measured cost ratio ``c`` of a draft step to a target step (each model's plain
decode time per token): ``(1 - a^(K+1)) / ((1 - a) (K c + 1))``. Prints a table, writes ``results.json`` and
``speculative.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np


def _timed(fn, repeats: int = 3):
  """``(result, median seconds)`` of ``fn()`` after one compiling call."""
  import jax

  jax.block_until_ready(fn())
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return out, float(np.median(times))


def predicted_speedup(a: float, k: int, c: float) -> float:
  """Leviathan et al.'s expected wall-time improvement for acceptance ``a``, ``K = k`` drafts and cost ratio ``c``."""
  from jstream.speculative import expected_tokens_per_call

  return expected_tokens_per_call(a, k) / (k * c + 1)


def run(args) -> dict:
  import jax
  import jax.numpy as jnp

  from jstream import cache, rollout, speculative
  from jstream.train import heldout_tokens, load_config, train

  suffix = ",quick" if args.quick else ""
  models = {}
  for role in ("target", "draft"):
    cfg = load_config(f"{args.config}:{role}{suffix}")
    t0 = time.time()
    res = train(cfg, progress=args.progress)
    models[role] = (res.model, cfg, res.step, time.time() - t0)
    print(f"{role}: {cfg.workdir} step {res.step} ({models[role][3]:.0f} s)")
  target, draft = models["target"][0], models["draft"][0]
  ks = [int(k) for k in args.ks.split(",")]
  policy = cache.SinkWindow(4, 252, max_rollback=max(ks), positions="cache_relative")

  def plain(model, prompts, temp, key):
    return rollout.generate(model, prompts, max_new_tokens=args.tokens, policy=policy, temperature=temp, rng=key).tokens

  def spec(k, prompts, temp, key):
    return speculative.generate(
      target, draft, prompts, max_new_tokens=args.tokens, num_draft=k, policy=policy, temperature=temp, rng=key
    )

  stream, _ = heldout_tokens(models["target"][1], 64 * args.prompt_len + 1)
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = jnp.asarray(stream[: batch * args.prompt_len].reshape(batch, args.prompt_len), jnp.int32)
    for temp in [float(t) for t in args.temperatures.split(",")]:
      key = jax.random.key(0)
      base = {}
      for role, m in (("target", target), ("draft", draft)):
        _, base[role] = _timed(functools.partial(plain, m, prompts, temp, key))
      c = base["draft"] / base["target"]
      row0 = dict(batch=batch, temperature=temp, plain_tokens_per_s=batch * args.tokens / base["target"], cost_ratio=c)
      print(f"batch {batch}, temperature {temp}: plain {row0['plain_tokens_per_s']:.0f} tokens/s, cost ratio {c:.3f}")
      for k in ks:
        out, sec = _timed(functools.partial(spec, k, prompts, temp, key))
        a = float(jnp.sum(out.accepted) / jnp.sum(out.proposed))
        measured = float(jnp.sum(out.emitted) / jnp.sum(out.rounds))
        formula = speculative.expected_tokens_per_call(a, k)
        row = dict(
          row0,
          k=k,
          acceptance=a,
          tokens_per_call=measured,
          formula_tokens_per_call=formula,
          speedup=base["target"] / sec,
          predicted_speedup=predicted_speedup(a, k, c),
          tokens_per_s=batch * args.tokens / sec,
        )
        rows.append(row)
        print(
          f"  K={k}: acceptance {a:.3f}, tokens/call {measured:.2f} (formula {formula:.2f}), speed-up "
          f"{row['speedup']:.2f}x (cost model {row['predicted_speedup']:.2f}x)"
        )
  info = {
    r: dict(workdir=m[1].workdir, steps=m[2], layers=m[1].model.num_layers, width=m[1].model.embed_dim)
    for r, m in models.items()
  }
  return dict(models=info, policy=str(policy), prompt_len=args.prompt_len, new_tokens=args.tokens, rows=rows)


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  groups = sorted({(r["batch"], r["temperature"]) for r in result["rows"]})
  for b, t in groups:
    rs = [r for r in result["rows"] if (r["batch"], r["temperature"]) == (b, t)]
    ks = [r["k"] for r in rs]
    axes[0].plot(ks, [r["speedup"] for r in rs], "o-", label=f"batch {b}, T={t:g}")
    axes[1].plot(ks, [r["tokens_per_call"] for r in rs], "o-", label=f"measured, batch {b}, T={t:g}")
    axes[1].plot(ks, [r["formula_tokens_per_call"] for r in rs], "k:", alpha=0.5)
  axes[0].axhline(1.0, color="grey", lw=0.8)
  axes[0].set(xlabel="drafts per round K", ylabel="speed-up over plain decoding", title="wall clock")
  axes[1].set(xlabel="drafts per round K", ylabel="tokens per target call", title="measured vs (1-a^(K+1))/(1-a)")
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench speculative", description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny models, a few tokens (seconds)")
  parser.add_argument("--out", default="runs/bench_speculative")
  parser.add_argument("--config", default="configs/speculative.py", help="the pair's config file (target / draft)")
  parser.add_argument("--ks", default="1,2,4,8")
  parser.add_argument("--temperatures", default="0,1")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--tokens", type=int, default=128, help="new tokens per row")
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args = parser.parse_args(argv)
  if args.quick:
    args.ks, args.temperatures, args.batches, args.tokens, args.prompt_len = "2", "1", "2", 16, 16
  if not pathlib.Path(args.config).exists():
    root = pathlib.Path(__file__).resolve().parent.parent
    args.config = str(root / args.config)
  t0 = time.time()
  result = run(args)
  result.update(
    seconds=time.time() - t0,
    quick=args.quick,
    machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
  )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  plot(result, out / "speculative.png")
  print(f"wrote {out / 'results.json'} and {out / 'speculative.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
