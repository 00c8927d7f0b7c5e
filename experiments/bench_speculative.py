"""Speculative decoding: acceptance, tokens per target call against the formula, and wall-clock speed-up.

  python -m experiments.bench_speculative [--quick] [--out DIR] [--ks 1,2,4,8] [--temperatures 0,1]
      [--batches 1,8] [--tokens 128] [--drafts draft,staged,heads] [--inner-draft 2]
  (also: jstream bench speculative ...)

The models of ``configs/speculative.py`` (byte-level LMs on the local text corpus, and four Medusa heads on the
frozen target; each trained here if its checkpoint is missing, resumed otherwise) continue prompts of held-out
text. Three ways to draft: ``draft`` (the 1-layer draft model), ``staged`` (the draft itself speculated by the
smaller ``inner`` model, ``--inner-draft`` tokens at a time) and ``heads`` (self-speculation: the heads read the
target's features; ``K <= 4``). For each batch size and temperature, plain decoding of the target
(``rollout.generate``) and ``speculative.generate`` at each ``K`` run on the same prompts and the same
``SinkWindow(4, 252, max_rollback=...)`` cache policy (``--positions``, cache-relative by default), each timed
after compiling (median of 3 calls). The verification cost ``v_K`` is measured under both position modes.

Reported per row: the acceptance rate ``a`` (accepted / tested drafts: a round tests its drafts up to the first
rejection) and ``sum min(p, q)`` averaged over the tested drafts (``a`` from the distributions); tokens per target
call against Leviathan et al.'s ``(1 - a^(K+1)) / (1 - a)``; the speed-up over plain decoding; the speed-up of the
paper's cost model, ``(1 - a^(K+1)) / ((1 - a) (K c + 1))`` with ``c`` the measured time of a draft step over a
target step (each model's plain decode time per token), and the same with the measured cost ``v_K`` of verifying
``K + 1`` tokens in one target call over one token, ``(1 - a^(K+1)) / ((1 - a) (K c + v_K))`` (the paper takes
``v_K = 1``: verification free on an accelerator with idle compute; on a CPU it is not). Prints a table, writes
``results.json`` and ``speculative.png``.
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

ROLES = {"draft": ("draft",), "staged": ("draft", "inner"), "heads": ("heads",)}


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


def predicted_speedup(a: float, k: int, c: float, verify: float = 1.0) -> float:
  """Leviathan et al.'s expected wall-time improvement for acceptance ``a``, ``K = k`` drafts, cost ratio ``c``
  and relative verification cost ``verify`` (1 in the paper)."""
  from jstream.speculative import expected_tokens_per_call

  return expected_tokens_per_call(a, k) / (k * c + verify)


def verify_costs(model, policy, batch: int, ks: list[int], calls: int = 32) -> dict[int, float]:
  """Seconds of one target call on ``K + 1`` tokens over one call on 1 token, for each ``K`` (a compiled scan of
  ``calls`` calls, each rolled back, so that the cache stays where it started)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jstream import cache as cache_lib

  graphdef, state = nnx.split(model)
  kv0 = model.init_cache(policy, batch)
  _, kv0 = model(jnp.zeros((batch, 64), jnp.int32), kv0)  # a context to attend

  @functools.partial(jax.jit, static_argnums=0)
  def run(t, state, kv):
    m = nnx.merge(graphdef, state)

    def step(kv, i):
      logits, kv = m(jnp.full((batch, t), i % 7, jnp.int32), kv)
      return cache_lib.rollback(kv, t), logits[:, -1, 0]

    return jax.lax.scan(step, kv, jnp.arange(calls))[1]

  sec = {t: _timed(lambda t=t: run(t, state, kv0))[1] for t in sorted({1, *(k + 1 for k in ks)})}
  return {k: sec[k + 1] / sec[1] for k in ks}


def run(args) -> dict:
  import jax
  import jax.numpy as jnp

  from jstream import cache, rollout, speculative
  from jstream.train import heldout_tokens, load_config, train

  suffix = ",quick" if args.quick else ""
  drafts = [d for d in args.drafts.split(",") if d]
  unknown = set(drafts) - set(ROLES)
  if unknown:
    raise SystemExit(f"unknown drafts {sorted(unknown)}; choose from {sorted(ROLES)}")
  roles = ["target", *sorted({r for d in drafts for r in ROLES[d]}, key=["draft", "inner", "heads"].index)]
  models = {}
  for role in roles:  # heads after the target: they load its checkpoint
    cfg = load_config(f"{args.config}:{role}{suffix}")
    t0 = time.time()
    res = train(cfg, progress=args.progress)
    models[role] = (res.model, cfg, res.step, time.time() - t0)
    print(f"{role}: {cfg.workdir} step {res.step} ({models[role][3]:.0f} s)")
  target = models["target"][0]
  ks = [int(k) for k in args.ks.split(",")]
  room = max(ks) + args.inner_draft
  policy = cache.SinkWindow(4, 252, max_rollback=room, positions=args.positions)
  proposers = {}
  if "draft" in drafts:
    proposers["draft"] = models["draft"][0]
  if "staged" in drafts:
    proposers["staged"] = speculative.Staged(models["draft"][0], models["inner"][0], inner_draft=args.inner_draft)
  if "heads" in drafts:
    proposers["heads"] = models["heads"][0].heads

  def plain(model, prompts, temp, key):
    return rollout.generate(model, prompts, max_new_tokens=args.tokens, policy=policy, temperature=temp, rng=key).tokens

  def spec(proposer, k, prompts, temp, key):
    return speculative.generate(
      target, proposer, prompts, max_new_tokens=args.tokens, num_draft=k, policy=policy, temperature=temp, rng=key
    )

  stream, _ = heldout_tokens(models["target"][1], 64 * args.prompt_len + 1)
  rows, verify_by_positions = [], {}
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = jnp.asarray(stream[: batch * args.prompt_len].reshape(batch, args.prompt_len), jnp.int32)
    verify = verify_costs(target, policy, batch, ks)
    other = "absolute" if args.positions == "cache_relative" else "cache_relative"
    verify_other = verify_costs(target, cache.SinkWindow(4, 252, max_rollback=room, positions=other), batch, ks)
    verify_by_positions[batch] = {args.positions: verify, other: verify_other}
    for mode, costs in verify_by_positions[batch].items():
      print(f"batch {batch}, {mode} positions: verification cost of K + 1 tokens / 1 token: ", end="")
      print(", ".join(f"K={k} {v:.2f}" for k, v in costs.items()))
    for temp in [float(t) for t in args.temperatures.split(",")]:
      key = jax.random.key(0)
      base = {}
      for role in ("target", "draft", "inner"):
        if role in models:
          _, base[role] = _timed(functools.partial(plain, models[role][0], prompts, temp, key))
      c = base["draft"] / base["target"] if "draft" in base else 0.0
      row0 = dict(batch=batch, temperature=temp, plain_tokens_per_s=batch * args.tokens / base["target"])
      print(
        f"batch {batch}, temperature {temp}: plain {row0['plain_tokens_per_s']:.0f} tokens/s, draft cost ratio {c:.3f}"
      )
      for name, proposer in proposers.items():
        for k in ks:
          if name == "heads" and k > proposer.num_heads:
            continue
          out, sec = _timed(functools.partial(spec, proposer, k, prompts, temp, key))
          total = lambda x: float(jnp.sum(x))
          a = total(out.accepted) / max(total(out.tested), 1.0)
          beta = total(out.accept_prob) / max(total(out.tested), 1.0)
          measured = total(out.emitted) / total(out.rounds)
          formula = speculative.expected_tokens_per_call(a, k)
          cost = c if name == "draft" else 0.0  # staged / heads: no single cost ratio (the draft calls are reported)
          row = dict(
            row0,
            draft=name,
            k=k,
            acceptance=a,
            accepted_share=total(out.accepted) / total(out.proposed),
            sum_min_pq=beta,
            tokens_per_call=measured,
            formula_tokens_per_call=formula,
            formula_error=measured / formula - 1.0,
            draft_calls_per_round=total(out.draft_calls) / total(out.rounds),
            cost_ratio=cost,
            verify_cost=verify[k],
            speedup=base["target"] / sec,
            predicted_speedup=predicted_speedup(a, k, cost),
            predicted_speedup_measured_verify=predicted_speedup(a, k, cost, verify[k]),
            tokens_per_s=batch * args.tokens / sec,
          )
          rows.append(row)
          print(
            f"  {name:6s} K={k}: a {a:.3f} (sum min(p,q) {beta:.3f}), tokens/call {measured:.2f} (formula "
            f"{formula:.2f}, {100 * row['formula_error']:+.1f}%), speed-up {row['speedup']:.2f}x (cost model "
            f"{row['predicted_speedup']:.2f}x, with v_K {row['predicted_speedup_measured_verify']:.2f}x)"
          )
  info = {
    r: dict(workdir=m[1].workdir, steps=m[2], layers=m[1].model.num_layers, width=m[1].model.embed_dim)
    for r, m in models.items()
  }
  return dict(
    models=info,
    policy=str(policy),
    prompt_len=args.prompt_len,
    new_tokens=args.tokens,
    inner_draft=args.inner_draft,
    verify_costs=verify_by_positions,
    rows=rows,
  )


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  groups = sorted({(r["draft"], r["batch"], r["temperature"]) for r in result["rows"]})
  for d, b, t in groups:
    rs = [r for r in result["rows"] if (r["draft"], r["batch"], r["temperature"]) == (d, b, t)]
    ks = [r["k"] for r in rs]
    (line,) = axes[0].plot(ks, [r["speedup"] for r in rs], "o-", label=f"{d}, batch {b}, T={t:g}")
    axes[1].plot(ks, [r["tokens_per_call"] for r in rs], "o-", color=line.get_color(), label=f"{d}, batch {b}, T={t:g}")
    axes[1].plot(ks, [r["formula_tokens_per_call"] for r in rs], ":", color=line.get_color(), alpha=0.7)
  axes[0].axhline(1.0, color="grey", lw=0.8)
  axes[0].set(xlabel="drafts per round K", ylabel="speed-up over plain decoding", title="wall clock")
  axes[1].set(xlabel="drafts per round K", ylabel="tokens per target call", title="measured (dotted: formula)")
  for ax in axes:
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench speculative", description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny models, a few tokens (seconds)")
  parser.add_argument("--out", default="runs/bench_speculative")
  parser.add_argument("--config", default="configs/speculative.py", help="the models' config file")
  parser.add_argument("--ks", default="1,2,4,8")
  parser.add_argument("--temperatures", default="0,1")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--drafts", default="draft,staged,heads", help="draft, staged and / or heads")
  parser.add_argument("--inner-draft", type=int, default=2, help="tokens the inner draft proposes (staged)")
  parser.add_argument("--tokens", type=int, default=128, help="new tokens per row")
  parser.add_argument("--positions", default="cache_relative", choices=["cache_relative", "absolute"])
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
