"""StreamingLLM's attention-sink ablations at small scale, and jstream's main job (``jstream demo``).

  python -m experiments.streaming_llm [--config configs/streaming_llm.py[:quick,...]] [--out DIR] [--quick]

1. Trains two byte-level LMs on the local Python standard library (+ pydoc prose) for a few CPU minutes: one
   plain, one with a learned sink token prepended to every training sample (StreamingLLM section 3.3). Finished
   checkpoints are reused on a rerun (and an interrupted run resumes).
2. Streams held-out bytes through each model under: dense attention (on a prefix: it is O(n^2) and its cache
   grows), window only, sink + window with 1, 2, 4 and 8 sinks, absolute vs cache-relative positions, and the
   sliding-window-with-recomputation baseline (on a prefix: it re-encodes the window for every token).
3. Prints a table (perplexity, tokens/s, memory), writes ``results.json`` and plots of perplexity and latency
   against stream position.

Each stream is evaluated with ``jstream.evaluation.evaluate_stream``: in segments that carry the cache, so that the
latency of every part of the stream is measured; the first segment's compile time is reported separately. The
config (``configs/streaming_llm.py``) is a ``jstream.evaluation.SinkAblationConfig``, which also lists the policies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

from jstream.evaluation import SinkAblationConfig, evaluate_stream
from jstream.train import heldout_tokens, load_config, train


def run(cfg: SinkAblationConfig, out: pathlib.Path, progress: bool = True) -> dict:
  """Trains both models (or reuses their checkpoints), evaluates every policy, writes ``results.json`` and plots."""
  out.mkdir(parents=True, exist_ok=True)
  results = {"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), "models": {}, "rows": []}
  t_start = time.time()
  for name, tcfg in (("plain", cfg.base), ("sink token", cfg.sink)):
    t0 = time.time()
    trained = train(tcfg, progress=progress)
    last = trained.metrics[-1] if trained.metrics else {}
    results["models"][name] = {
      "workdir": tcfg.workdir, "steps": trained.step, "final_loss": last.get("loss"), "train_seconds": time.time() - t0,
      "resumed_from": trained.resumed_from,
    }  # fmt: skip
    print(
      f"[{name}] trained to step {trained.step} (loss {last.get('loss', float('nan')):.3f}) in {time.time() - t0:.0f} s"
    )
    stream, skip = heldout_tokens(tcfg, cfg.eval_tokens)
    for pname, policy, n in cfg.policies():
      res = evaluate_stream(
        trained.model, stream[: n + skip], policy, chunk=cfg.chunk, segment=cfg.segment, skip=skip, bins=cfg.bins,
        prefixes=(cfg.recompute_tokens, cfg.dense_tokens),
      )  # fmt: skip
      row = {"model": name, "policy": pname, **res}
      results["rows"].append(row)
      firsts = "  ".join(f"first {k}: {v:7.3f}" for k, v in res["ppl_first"].items())
      print(
        f"  {name:<10} {pname:<44} ppl {res['ppl']:8.3f} (last half {res['ppl_last_half']:8.3f}; {firsts})  "
        f"{res['tokens_per_s']:8.0f} tok/s  cache {res['cache_mib']:5.2f} MiB  "
        f"peak rss {res['peak_rss_mib']:6.0f} MiB (+{max(res['peak_rss_mib'] - res['rss_start_mib'], 0.0):.0f})",
        flush=True,
      )
  results["seconds"] = time.time() - t_start
  (out / "results.json").write_text(json.dumps(results, indent=2))
  plot(results, out)
  print(f"wrote {out / 'results.json'}, {out / 'perplexity.png'}, {out / 'latency.png'} ({results['seconds']:.0f} s)")
  return results


def plot(results: dict, out: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(results["models"])
  for kind, fname in (("curve", "perplexity.png"), ("latency", "latency.png")):
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
      for row in (r for r in results["rows"] if r["model"] == model):
        pts = row[kind]
        if kind == "curve":
          x, y = [math.sqrt(p["from"] * p["to"]) for p in pts], [p["ppl"] for p in pts]
        else:
          x, y = [max(p["from"], 1) for p in pts], [p["ms_per_token"] for p in pts]
        ax.plot(x, y, marker="o", ms=3, label=row["policy"])
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("stream position (bytes)")
      ax.set_ylabel("perplexity" if kind == "curve" else "ms / token")
      ax.set_title(f"model: {model}")
      ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)


def default_config_path() -> str:
  return str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "streaming_llm.py")


def main(argv: list[str] | None = None, *, prog: str = "jstream demo") -> int:
  """The ``jstream demo`` command (registered in the ``jstream.commands`` entry-point group)."""
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
  parser.add_argument(
    "--config", default=None, help="config file[:flags,key=value] (default: configs/streaming_llm.py)"
  )
  parser.add_argument("--out", default=None, help="output folder (default: runs/streaming_llm[_quick])")
  parser.add_argument("--quick", action="store_true", help="tiny models, short streams (15-20 s on 2 cores)")
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args = parser.parse_args(argv)
  spec = args.config or default_config_path()
  if args.quick:
    path, _, arg = spec.partition(":")
    spec = f"{path}:{'quick,' + arg if arg else 'quick'}"
  cfg = load_config(spec, expect=SinkAblationConfig)
  out = pathlib.Path(args.out or ("runs/streaming_llm_quick" if args.quick else "runs/streaming_llm"))
  run(cfg, out, progress=args.progress)
  return 0


__all__ = ["main", "plot", "run"]

if __name__ == "__main__":
  from jstream.cli import report

  prog = "python -m experiments.streaming_llm"
  raise SystemExit(report(prog, lambda: main(prog=prog)))
