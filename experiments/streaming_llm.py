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

Each stream is evaluated in segments that carry the cache, so that the latency of every part of the stream is
measured; the first segment's compile time is reported separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import time

import jax
import numpy as np

from experiments.memory import reset_peak_rss, rss_mib
from jstream import cache as C
from jstream import rollout
from jstream.checks import check_int
from jstream.train import TrainConfig, heldout_tokens, load_config, train


@dataclasses.dataclass(frozen=True)
class StreamingLLMConfig:
  """The experiment.

  Attributes:
    base: the model trained without a sink token; ``sink``: the same with a learned sink token.
    window: recent tokens kept by the bounded caches (StreamingLLM's cache size minus sinks).
    sink_counts: numbers of initial tokens kept.
    eval_tokens: held-out bytes streamed per policy.
    segment: tokens per timed segment; ``chunk``: tokens per step inside a segment.
    dense_tokens / recompute_tokens: prefix lengths for the O(n^2) dense and the recompute baseline.
    bins: number of log-spaced position bins for the perplexity curves.
  """

  base: TrainConfig
  sink: TrainConfig
  window: int = 128
  sink_counts: tuple[int, ...] = (1, 2, 4, 8)
  eval_tokens: int = 100_000
  segment: int = 4096
  chunk: int = 64
  dense_tokens: int = 4096
  recompute_tokens: int = 1024
  bins: int = 12

  def __post_init__(self):  # bad values fail here, before minutes of training
    for name in ("window", "eval_tokens", "segment", "chunk", "dense_tokens", "recompute_tokens", "bins"):
      check_int(f"StreamingLLMConfig.{name}", getattr(self, name), 1)
    if not self.sink_counts:
      raise ValueError("StreamingLLMConfig.sink_counts must name at least one sink count")
    for s in self.sink_counts:
      check_int("StreamingLLMConfig.sink_counts[i]", s, 1)


def policies(cfg: StreamingLLMConfig) -> list[tuple[str, C.Policy, int]]:
  """``(name, policy, tokens)`` evaluated for one model."""
  w, n = cfg.window, cfg.eval_tokens
  out = [
    (f"dense (first {cfg.dense_tokens})", C.Dense(cfg.dense_tokens + 1), cfg.dense_tokens),
    (f"window {w}, absolute", C.Window(w), n),
    (f"window {w}, cache-relative", C.Window(w, positions="cache_relative"), n),
  ]
  for s in cfg.sink_counts:
    out.append((f"{s} sinks + window {w}, cache-relative", C.SinkWindow(s, w, positions="cache_relative"), n))
  s_abs = 4 if 4 in cfg.sink_counts else cfg.sink_counts[0]
  out.append((f"{s_abs} sinks + window {w}, absolute", C.SinkWindow(s_abs, w), n))
  out.append((f"recompute window {w} (first {cfg.recompute_tokens})", C.Recompute(w), cfg.recompute_tokens))
  return out


def evaluate(model, tokens: np.ndarray, policy: C.Policy, cfg: StreamingLLMConfig, skip: int) -> dict:
  """Streams ``tokens [n]`` in timed segments; NLL of every token after the first ``skip`` + 1."""
  n = len(tokens)
  seg = min(cfg.segment, n)
  seg = max(cfg.chunk, seg // cfg.chunk * cfg.chunk)
  if isinstance(policy, C.Recompute):
    seg = min(seg, 256)
  padded = int(math.ceil(n / seg) * seg)
  toks = np.zeros((1, padded), np.int32)
  toks[0, :n] = tokens
  segs = np.full((1, padded), -1, np.int32)
  segs[0, :n] = 0
  targets = np.full((1, padded), -1, np.int32)
  targets[0, : n - 1] = tokens[1:]
  import gc

  gc.collect()
  scoped = reset_peak_rss()  # the peak below is this evaluation's (compilation included), not the process's
  rss_start = rss_mib()[0]
  cache = model.init_cache(policy, 1)
  pred = np.full(padded, np.nan)  # pred[p] = -log p(token p + 1 | tokens <= p)
  times = []
  compile_s = None
  for i in range(0, padded, seg):
    sl = slice(i, i + seg)
    t0 = time.perf_counter()
    out, cache = rollout.nll_segment(
      model, toks[:, sl], targets[:, sl], cache, chunk_size=cfg.chunk, segment_ids=segs[:, sl]
    )
    pred[sl] = np.asarray(out)[0]
    dt = time.perf_counter() - t0
    if compile_s is None:  # the first segment compiled: run it again on a fresh cache for its steady-state time
      fresh = model.init_cache(policy, 1)
      t1 = time.perf_counter()
      _, fresh = rollout.nll_segment(model, toks[:, sl], targets[:, sl], fresh, chunk_size=cfg.chunk,
                                     segment_ids=segs[:, sl])  # fmt: skip
      jax.block_until_ready(fresh)
      steady = time.perf_counter() - t1
      compile_s, dt = max(dt - steady, 0.0), steady
      del fresh
    times.append((i, min(seg, n - i), dt))
  nll = np.concatenate([[np.nan], pred[: n - 1]])
  nll[: skip + 1] = np.nan  # the first token (and a sink token's successor) has no comparable prediction
  valid = np.isfinite(nll)
  edges = np.unique(np.geomspace(max(skip + 2, 2), n, cfg.bins + 1).astype(int))
  curve = []
  for lo, hi in itertools.pairwise(edges):
    part = nll[lo:hi][np.isfinite(nll[lo:hi])]
    if part.size:
      curve.append({"from": int(lo), "to": int(hi), "ppl": float(np.exp(part.mean()))})
  # Perplexity over common prefixes, so that the prefix-only baselines (dense, recompute) compare like for like.
  ppl_first = {}
  for k in sorted({cfg.recompute_tokens, cfg.dense_tokens}):
    part = nll[: k + skip][np.isfinite(nll[: k + skip])]
    if k + skip <= n and part.size:
      ppl_first[str(k)] = float(np.exp(part.mean()))
  seconds = sum(t for _, _, t in times)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if hasattr(x, "dtype"))
  return {
    "tokens": int(n),
    "ppl": float(np.exp(np.mean(nll[valid]))),
    "ppl_last_half": float(np.exp(np.mean(nll[n // 2 :][np.isfinite(nll[n // 2 :])]))),
    "ppl_first": ppl_first,
    "curve": curve,
    "tokens_per_s": float(n / seconds),
    "latency": [{"from": int(i), "ms_per_token": 1e3 * t / max(c, 1)} for i, c, t in times],
    "compile_s": float(compile_s or 0.0),
    "cache_mib": cache_bytes / 2**20,
    "rss_start_mib": rss_start,
    "peak_rss_mib": rss_mib()[1],
    "peak_rss_scope": "evaluation" if scoped else "process",
  }


def run(cfg: StreamingLLMConfig, out: pathlib.Path, progress: bool = True) -> dict:

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
    for pname, policy, n in policies(cfg):
      res = evaluate(trained.model, stream[: n + skip], policy, cfg, skip)
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


def main(argv=None, *, prog="python -m experiments.streaming_llm") -> int:
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
  # The class as the config file sees it (under `python -m`, this module is also loaded as __main__).
  from experiments.streaming_llm import StreamingLLMConfig as expected

  cfg = load_config(spec, expect=expected)
  out = pathlib.Path(args.out or ("runs/streaming_llm_quick" if args.quick else "runs/streaming_llm"))
  run(cfg, out, progress=args.progress)
  return 0


__all__ = ["StreamingLLMConfig", "evaluate", "main", "policies", "run"]

if __name__ == "__main__":
  from jstream.cli import report

  raise SystemExit(report("python -m experiments.streaming_llm", main))
