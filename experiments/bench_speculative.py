"""Speculative decoding: acceptance, tokens per target call against the formula, and wall-clock speed-up.

  python -m experiments.bench_speculative [--quick] [--out DIR] [--ks 1,2,4,8] [--temperatures 0,1]
      [--batches 1,8] [--tokens 128] [--drafts draft,distilled,staged,heads] [--inner-draft 2]
      [--layers scan|unrolled] [--repeats 3] [--stat median|min]
  python -m experiments.bench_speculative --layout-costs [--alpha-from RESULTS_JSON] [--calls 64] [--best-of 7]
  (also: jstream bench speculative ...)

The models of ``configs/speculative.py`` (byte-level LMs on the local text corpus, and four Medusa heads on the
frozen target; each trained here if its checkpoint is missing, resumed otherwise) continue prompts of held-out
text. Ways to draft: ``draft`` (the 1-layer draft model, trained on the corpus), ``distilled`` (the same shape
trained on the target's next-byte distributions, DistillSpec; ``onpolicy`` and ``targetsamples``: the same on rows
continued by the draft's own samples or by the target's, ``configs/speculative.py``), ``staged`` (the draft itself
speculated by the smaller ``inner`` model, ``--inner-draft`` tokens at a time) and ``heads`` (self-speculation: the
heads read the target's features; ``K <= 4``). For each batch size and temperature, plain decoding of the target
(``rollout.generate``) and ``speculative.generate`` at each ``K`` run on the same prompts and the same
``SinkWindow(4, 252, max_rollback=...)`` cache policy (``--positions``, cache-relative by default), each timed
after compiling (median of 3 calls; ``--repeats``, and ``--stat min`` for the fastest). The verification cost
``v_K`` is measured under both position modes.

Reported per row: the acceptance rate ``a`` (accepted / tested drafts: a round tests its drafts up to the first
rejection) and ``sum min(p, q)`` averaged over the tested drafts (``a`` from the distributions); tokens per target
call against Leviathan et al.'s ``(1 - a^(K+1)) / (1 - a)``; the speed-up over plain decoding; the speed-up of the
paper's cost model, ``(1 - a^(K+1)) / ((1 - a) (K c + 1))`` with ``c`` the measured time of a draft step over a
target step (each model's plain decode time per token), and the same with the measured cost ``v_K`` of verifying
``K + 1`` tokens in one target call over one token, ``(1 - a^(K+1)) / ((1 - a) (K c + v_K))`` (the paper takes
``v_K = 1``: verification free on an accelerator with idle compute; on a CPU it is not). Prints a table, writes
``results.json`` and ``speculative.png``.

``--layers unrolled`` runs every model with one set of weights per layer (``scan_layers=False``) instead of the
layer scan its config trains. ``--layout-costs`` trains and generates nothing: it times single calls of untrained
models of the configs' shapes under both layouts (a target call on 1 and on ``K + 1`` tokens, a draft call on 1;
the fastest of ``--best-of`` timed scans, since this VM's run-to-run noise is larger than the effect) and
predicts the speed-up of the cost model with those costs for the acceptance rates of an earlier run's draft rows
(``--alpha-from``): what the baseline's layer layout does to the speed-up, in minutes. Writes ``layout_costs.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import numpy as np

from experiments.machine import machine

DRAFT_MODELS = ("draft", "distilled", "onpolicy", "targetsamples")  # drafts with one cost ratio: a model of their own
ROLES = {**{d: (d,) for d in DRAFT_MODELS}, "staged": ("draft", "inner"), "heads": ("heads",)}
STATS = {"median": np.median, "min": np.min}  # of the timed calls (--stat)
MODEL_ORDER = list(dict.fromkeys(r for roles in ROLES.values() for r in roles))  # training order after the target


def _timed(fn, repeats: int = 3, stat=np.median):
  """``(result, median seconds)`` (or another ``stat`` of the times) of ``fn()`` after one compiling call."""
  import jax

  jax.block_until_ready(fn())
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return out, float(stat(times))


def predicted_speedup(a: float, k: int, c: float, verify: float = 1.0) -> float:
  """Leviathan et al.'s expected wall-time improvement for acceptance ``a``, ``K = k`` drafts, cost ratio ``c``
  and relative verification cost ``verify`` (1 in the paper)."""
  from jstream.speculative import expected_tokens_per_call

  return expected_tokens_per_call(a, k) / (k * c + verify)


def verify_costs(model, policy, batch: int, ks: list[int], calls: int = 32) -> dict[int, float]:
  """Seconds of one target call on ``K + 1`` tokens over one call on 1 token, for each ``K``."""
  sec = call_seconds(model, policy, batch, sorted({1, *(k + 1 for k in ks)}), calls)
  return {k: sec[k + 1] / sec[1] for k in ks}


def call_seconds(model, policy, batch: int, sizes: list[int], calls: int = 32, best_of: int = 0) -> dict[int, float]:
  """Seconds of one call of ``model`` on ``t`` tokens per row, for each ``t`` in ``sizes`` (a compiled scan of
  ``calls`` calls after a 64-token context, each rolled back, so that the cache stays where it started): the median
  of 3 timed scans, or the fastest of ``best_of``."""
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

  timing = dict(repeats=best_of, stat=np.min) if best_of else {}
  return {t: _timed(lambda t=t: run(t, state, kv0), **timing)[1] / calls for t in sizes}


def bench_policy(args, positions: str | None = None):
  """The benchmark's cache policy: ``SinkWindow(4, 252)`` with rollback room for the largest ``K`` and a staged
  draft's inner round, in ``positions`` (default ``--positions``)."""
  from jstream import cache

  room = max(int(k) for k in args.ks.split(",")) + args.inner_draft
  return cache.SinkWindow(4, 252, max_rollback=room, positions=positions or args.positions)


LAYOUTS = {"scan": True, "unrolled": False}
"""``--layers``: the models' layer layout (``TransformerConfig.scan_layers``: stacked weights in one ``lax.scan``, or
one set of weights per layer). On CPU, XLA copies a layer's slice of stacked weights on every call."""


def layout_costs(args) -> dict:
  """What the cost model needs, per layer layout, from untrained models of ``configs/speculative.py``'s shapes (costs
  do not depend on the weights): one target call on 1 token and on ``K + 1`` tokens, one draft call on 1 token, and
  the speed-up the cost model predicts with those costs for the acceptance rates of ``--alpha-from`` (a results.json
  of this benchmark: its draft-model rows)."""
  from flax import nnx

  from jstream import StreamingTransformer
  from jstream.train import load_config

  suffix = ",quick" if args.quick else ""  # the quick runs' shapes
  ks = [int(k) for k in args.ks.split(",")]
  policy = bench_policy(args)
  alphas = json.loads(pathlib.Path(args.alpha_from).read_text())["rows"] if args.alpha_from else []
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    for layout, scan in LAYOUTS.items():
      target, draft = (
        StreamingTransformer(
          load_config(f"{args.config}:{role}{suffix}").model.replace(scan_layers=scan), rngs=nnx.Rngs(0)
        )
        for role in ("target", "draft")
      )
      timing = dict(calls=args.calls, best_of=args.best_of)
      sec = call_seconds(target, policy, batch, sorted({1, *(k + 1 for k in ks)}), **timing)
      c = call_seconds(draft, policy, batch, [1], **timing)[1] / sec[1]
      row = dict(batch=batch, layers=layout, target_ms=1e3 * sec[1], draft_ms=1e3 * sec[1] * c, cost_ratio=c)
      row["verify_cost"] = {k: sec[k + 1] / sec[1] for k in ks}
      row["predicted"] = [
        dict(
          temperature=r["temperature"],
          k=r["k"],
          acceptance=r["acceptance"],
          speedup=predicted_speedup(r["acceptance"], r["k"], c, row["verify_cost"][r["k"]]),
        )
        for r in alphas
        if r["draft"] == "draft" and r["batch"] == batch and r["k"] in ks
      ]
      rows.append(row)
      best = max(row["predicted"], key=lambda p: p["speedup"], default=None)
      print(
        f"batch {batch}, {layout:8s}: target {row['target_ms']:.3f} ms / call on 1 token, draft cost ratio {c:.3f}, "
        + ", ".join(f"v_{k} {v:.2f}" for k, v in row["verify_cost"].items())
        + (f"; best predicted {best['speedup']:.2f}x (K={best['k']}, T={best['temperature']:g})" if best else "")
      )
  ratio = {
    b: next(r["target_ms"] for r in rows if r["batch"] == b and r["layers"] == "scan")
    / next(r["target_ms"] for r in rows if r["batch"] == b and r["layers"] == "unrolled")
    for b in {r["batch"] for r in rows}
  }
  for b, x in sorted(ratio.items()):
    print(f"batch {b}: a target call on 1 token with scanned layers takes {x:.2f}x the unrolled one")
  return dict(policy=str(policy), alpha_from=args.alpha_from, rows=rows, scan_over_unrolled=ratio)


def run(args) -> dict:
  import jax
  import jax.numpy as jnp

  from jstream import rollout, speculative
  from jstream.train import heldout_tokens, load_config, train

  suffix = ",quick" if args.quick else ""
  drafts = [d for d in args.drafts.split(",") if d]
  unknown = set(drafts) - set(ROLES)
  if unknown:
    raise SystemExit(f"unknown drafts {sorted(unknown)}; choose from {sorted(ROLES)}")
  roles = ["target", *sorted({r for d in drafts for r in ROLES[d]}, key=MODEL_ORDER.index)]
  models = {}
  for role in roles:  # heads after the target: they load its checkpoint
    cfg = load_config(f"{args.config}:{role}{suffix}")
    t0 = time.time()
    res = train(cfg, progress=args.progress)
    models[role] = (res.model, cfg, res.step, time.time() - t0)
    print(f"{role}: {cfg.workdir} step {res.step} ({models[role][3]:.0f} s)")
  if not LAYOUTS[args.layers]:  # the same weights, one set per layer
    models = {r: (m.with_scan_layers(False) if r != "heads" else m, *rest) for r, (m, *rest) in models.items()}
  target = models["target"][0]
  ks = [int(k) for k in args.ks.split(",")]
  policy = bench_policy(args)
  proposers = {}
  for name in DRAFT_MODELS:
    if name in drafts:
      proposers[name] = models[name][0]
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
  timing = dict(repeats=args.repeats, stat=STATS[args.stat])
  rows, verify_by_positions = [], {}
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = jnp.asarray(stream[: batch * args.prompt_len].reshape(batch, args.prompt_len), jnp.int32)
    verify = verify_costs(target, policy, batch, ks)
    other = "absolute" if args.positions == "cache_relative" else "cache_relative"
    verify_other = verify_costs(target, bench_policy(args, other), batch, ks)
    verify_by_positions[batch] = {args.positions: verify, other: verify_other}
    for mode, costs in verify_by_positions[batch].items():
      print(f"batch {batch}, {mode} positions: verification cost of K + 1 tokens / 1 token: ", end="")
      print(", ".join(f"K={k} {v:.2f}" for k, v in costs.items()))
    for temp in [float(t) for t in args.temperatures.split(",")]:
      key = jax.random.key(0)
      base = {}
      for role in ("target", *DRAFT_MODELS, "inner"):
        if role in models:
          _, base[role] = _timed(functools.partial(plain, models[role][0], prompts, temp, key), **timing)
      ratios = {name: base[name] / base["target"] for name in DRAFT_MODELS if name in base}
      row0 = dict(batch=batch, temperature=temp, plain_tokens_per_s=batch * args.tokens / base["target"])
      print(
        f"batch {batch}, temperature {temp}: plain {row0['plain_tokens_per_s']:.0f} tokens/s"
        + "".join(f", {name} cost ratio {c:.3f}" for name, c in ratios.items())
      )
      for name, proposer in proposers.items():
        for k in ks:
          if name == "heads" and k > proposer.num_heads:
            continue
          out, sec = _timed(functools.partial(spec, proposer, k, prompts, temp, key), **timing)
          total = lambda x: float(jnp.sum(x))
          a = total(out.accepted) / max(total(out.tested), 1.0)
          beta = total(out.accept_prob) / max(total(out.tested), 1.0)
          measured = total(out.emitted) / total(out.rounds)
          formula = speculative.expected_tokens_per_call(a, k)
          cost = ratios.get(name, 0.0)  # staged / heads: no single cost ratio (the draft calls are reported)
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
    r: dict(
      workdir=m[1].workdir,
      steps=m[2],
      layers=m[1].model.num_layers,
      width=m[1].model.embed_dim,
      scan_layers=m[0].config.scan_layers if r != "heads" else None,
    )
    for r, m in models.items()
  }
  return dict(
    models=info,
    policy=str(policy),
    prompt_len=args.prompt_len,
    new_tokens=args.tokens,
    timing=dict(repeats=args.repeats, stat=args.stat),
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
  parser.add_argument("--drafts", default="draft,distilled,staged,heads", help=f"any of {', '.join(ROLES)}")
  parser.add_argument("--inner-draft", type=int, default=2, help="tokens the inner draft proposes (staged)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement, after compiling")
  parser.add_argument("--stat", default="median", choices=list(STATS), help="of the timed calls")
  parser.add_argument("--tokens", type=int, default=128, help="new tokens per row")
  parser.add_argument("--positions", default="cache_relative", choices=["cache_relative", "absolute"])
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--layers", default="scan", choices=list(LAYOUTS), help="the models' layer layout")
  parser.add_argument(
    "--layout-costs",
    action="store_true",
    help="only the call costs of untrained models under both layer layouts, and the cost model's speed-ups for the "
    "acceptance rates of --alpha-from (minutes; trains nothing)",
  )
  parser.add_argument("--calls", type=int, default=64, help="calls per timed scan (--layout-costs)")
  parser.add_argument(
    "--best-of", type=int, default=7, help="timed scans per cost, the fastest counts (--layout-costs)"
  )
  parser.add_argument("--alpha-from", default="", help="a results.json of this benchmark (--layout-costs)")
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.quick:
    args.ks, args.temperatures, args.batches, args.tokens, args.prompt_len = "2", "1", "2", 16, 16
    args.calls, args.best_of = min(args.calls, 8), min(args.best_of, 2)
  if not pathlib.Path(args.config).exists():
    root = pathlib.Path(__file__).resolve().parent.parent
    args.config = str(root / args.config)
  t0 = time.time()
  result = layout_costs(args) if args.layout_costs else run(args)
  result.update(
    seconds=time.time() - t0,
    quick=args.quick,
    layers=args.layers,
    machine=machine(),
  )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.layout_costs:
    (out / "layout_costs.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'layout_costs.json'}")
    return 0
  (out / "results.json").write_text(json.dumps(result, indent=2))
  plot(result, out / "speculative.png")
  print(f"wrote {out / 'results.json'} and {out / 'speculative.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
