"""What score-based eviction costs per decoded token against recency at the same capacity (issue 11's target: the
bookkeeping adds at most 15% to ``SinkWindow``'s per-token decode time).

  python -m experiments.bench_eviction [--quick] [--capacity 256] [--batches 1,8] [--steps 64] [--rounds 7]
      [--config configs/lm_tiny.py] --out DIR

Each policy keeps ``capacity`` tokens per layer and kv head: ``SinkWindow(4, capacity - 4)`` (StreamingLLM),
``H2O``, ``SnapKV`` and ``AgeNormalized`` with 4 sinks and half the budget a recent window (``jstream.cache``),
cache-relative positions (``--positions`` for absolute). The model is the config's byte LM with fresh weights (what a
step costs does not depend on them). A batch of random prompts of ``2 * capacity`` tokens is prefilled, so every
cache is full and evicting, then greedy decode calls of ``--steps`` tokens (``bench_stream.decode_latency``: one
compiled scan, a warm-up call before each timed one) are timed in ``--rounds`` interleaved rounds (each round calls
every policy once, continuing its own stream) and each policy's time is the fastest round (on a shared VM the
median moves more than the policies differ). Prints ms per token and the ratio to ``SinkWindow`` per batch size, writes
``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from experiments.machine import device_line, machine

POLICIES = ("sinkwindow", "h2o", "snapkv", "agenorm")
SINKS = 4


def make_policy(name: str, capacity: int, positions: str):
  """The cache policy ``name`` (in ``POLICIES``) at ``capacity`` tokens per layer and kv head, built by the command
  line's ``jstream.cli.parse_policy``."""
  from jstream.cli import parse_policy

  if capacity < 2 * SINKS + 2:
    raise ValueError(f"capacity must be >= {2 * SINKS + 2} (sinks, a recent window, scored slots), got {capacity}")
  if name not in POLICIES:
    raise ValueError(f"unknown policy {name!r}; one of {POLICIES}")
  args = f"{SINKS},{capacity - SINKS}" if name == "sinkwindow" else f"{capacity},{capacity // 2},{SINKS}"
  return parse_policy(f"{name}:{args}", positions)


def time_policies(model, policies: dict, *, batch: int, prompt_len: int, steps: int, rounds: int, seed: int) -> dict:
  """Per policy: the fastest of ``rounds`` interleaved decode calls of ``steps`` tokens
  (``bench_stream.decode_latency``, one call a round, each continuing its policy's stream), in ms per token, after a
  prefill of ``prompt_len`` random tokens; ``first_call_s``: the first round's wall time (compilation included)."""
  import numpy as np

  from experiments.bench_stream import decode_latency
  from jstream import rollout

  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, model.config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
  state = {}
  for name, policy in policies.items():
    last, cache = rollout.prefill(model, prompt, model.init_cache(policy, batch), chunk_size=16)
    state[name] = {"cache": cache, "last": last, "times": []}
  for r in range(rounds):
    for s in state.values():
      t0 = time.perf_counter()
      per_step, s["cache"], s["last"] = decode_latency(model, s["cache"], s["last"], steps, repeats=1)
      s["times"].append(per_step)
      if r == 0:  # its warm-up call compiled the policy's decode loop
        s["first_call_s"] = time.perf_counter() - t0
  return {
    name: {
      "ms_per_token": 1e3 * min(s["times"]),
      "median_ms_per_token": 1e3 * float(np.median(s["times"])),
      "first_call_s": s["first_call_s"],
    }
    for name, s in state.items()
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_eviction", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/bench_eviction", help="output folder")
  parser.add_argument("--quick", action="store_true", help="a tiny model, capacity 32, few steps (smoke test)")
  parser.add_argument(
    "--config",
    default=str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "lm_tiny.py"),
    help="training config whose model is timed (default: configs/lm_tiny.py)",
  )
  parser.add_argument("--capacity", type=int, default=256, help="KV tokens kept per layer and kv head")
  parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--steps", type=int, default=64, help="tokens decoded per timed call")
  parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (the fastest is kept)")
  parser.add_argument("--positions", default="cache_relative", choices=("cache_relative", "absolute"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  import jax
  from flax import nnx

  from jstream import presets
  from jstream.models.lm import StreamingTransformer
  from jstream.train import load_config

  cfg = load_config(args.config)
  if args.quick:
    cfg = presets.quick(cfg)
    args.capacity, args.steps, args.rounds, args.batches = 32, 8, 2, "2"
  cfg_model = cfg.model
  batches = [int(b) for b in args.batches.split(",") if b]
  policies = {name: make_policy(name, args.capacity, args.positions) for name in POLICIES}
  model = StreamingTransformer(cfg_model, rngs=nnx.Rngs(args.seed))
  device = device_line()
  print(f"bench_eviction on {device}, jax {jax.__version__}; capacity {args.capacity}, {args.positions} positions")
  t0 = time.perf_counter()
  rows = []
  for batch in batches:
    timed = time_policies(
      model, policies, batch=batch, prompt_len=2 * args.capacity, steps=args.steps, rounds=args.rounds, seed=args.seed
    )
    base = timed["sinkwindow"]["ms_per_token"]
    for name, t in timed.items():
      rows.append({"batch": batch, "policy": name, **t, "vs_sinkwindow": t["ms_per_token"] / base})
      print(
        f"  batch {batch:3d}  {name:10s} {t['ms_per_token']:8.3f} ms/token (median {t['median_ms_per_token']:.3f})"
        f"  {t['ms_per_token'] / base:5.2f}x SinkWindow"
      )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = {
    "device": device,
    "jax": jax.__version__,
    "machine": machine(),
    "args": vars(args),
    "model": {k: getattr(cfg_model, k) for k in ("num_layers", "num_heads", "num_kv_heads", "embed_dim", "mlp_dim")},
    "rows": rows,
    "seconds": time.perf_counter() - t0,
  }
  (out / "results.json").write_text(json.dumps(result, indent=2))
  print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
