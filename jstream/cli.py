"""The ``jstream`` command: ``jstream <subcommand> ...``.

  jstream demo [--quick] [--out DIR]            the main job: StreamingLLM's ablations at small scale
  jstream train --config configs/lm_tiny.py[:flags,key=value]
  jstream eval-stream --config CONFIG --policy sinkwindow:4,128 [--positions cache_relative] [--tokens N]
  jstream bench {stream,attention} [--quick] [--out DIR]

Experiments accept ``--out DIR`` and ``--quick`` and write ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import time

BENCHMARKS = {
  "stream": ("experiments.bench_stream", "per-token decode latency and memory against stream position"),
  "attention": ("experiments.bench_attention", "attention kernels vs XLA and cuDNN (interpret-mode checks on CPU)"),
}


def _run_module(module: str, argv: list[str]) -> int:
  mod = importlib.import_module(module)
  return int(mod.main(argv) or 0)


def parse_policy(spec: str, positions: str):
  """``dense:N``, ``window:W``, ``sinkwindow:S,W``, ``recompute:W`` -> a cache policy."""
  from jstream import cache as C

  kind, _, args = spec.partition(":")
  try:
    nums = [int(x) for x in args.split(",") if x]
  except ValueError:
    raise ValueError(f"policy {spec!r}: arguments must be integers") from None
  makers = {
    "dense": (1, lambda n: C.Dense(n[0], positions=positions)),
    "window": (1, lambda n: C.Window(n[0], positions=positions)),
    "sinkwindow": (2, lambda n: C.SinkWindow(n[0], n[1], positions=positions)),
    "recompute": (1, lambda n: C.Recompute(n[0])),
  }
  if kind not in makers:
    raise ValueError(f"unknown policy {kind!r}; one of {sorted(makers)} (e.g. sinkwindow:4,1024)")
  arity, make = makers[kind]
  if len(nums) != arity:
    raise ValueError(f"policy {kind} takes {arity} integer argument(s), got {spec!r}")
  return make(nums)


def cmd_train(args) -> int:
  from jstream.train import load_config, train

  cfg = load_config(args.config)
  res = train(cfg, progress=not args.no_progress)
  last = res.metrics[-1] if res.metrics else {}
  print(
    f"trained {cfg.workdir} to step {res.step}"
    + (f" (resumed from {res.resumed_from})" if res.resumed_from is not None else "")
    + (f", loss {last['loss']:.4f}" if "loss" in last else "")
  )
  return 0


def cmd_eval_stream(args) -> int:

  from experiments.streaming_llm import StreamingLLMConfig, evaluate
  from jstream.train import heldout_tokens, load_config, load_model

  cfg = load_config(args.config)
  model, step = load_model(cfg)
  policy = parse_policy(args.policy, args.positions)
  stream, skip = heldout_tokens(cfg, args.tokens)
  chunk = min(args.chunk, policy.capacity)  # a chunk may not exceed the cache
  exp = StreamingLLMConfig(base=cfg, sink=cfg, chunk=chunk, segment=args.segment)
  t0 = time.time()
  res = evaluate(model, stream, policy, exp, skip)
  res.update(checkpoint_step=step, policy=str(policy), config=args.config, seconds=time.time() - t0)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(res, indent=2))
  print(
    f"{policy}: perplexity {res['ppl']:.3f} over {res['tokens']} tokens "
    f"({res['tokens_per_s']:.0f} tokens/s, cache {res['cache_mib']:.2f} MiB); wrote {out / 'results.json'}"
  )
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jstream", description="jstream: streaming causal models in JAX (bounded caches, constant time per chunk)."
  )
  sub = parser.add_subparsers(dest="command", metavar="<command>")
  sub.add_parser(
    "demo", help="the main job: train two tiny LMs, stream 100k bytes under every cache policy (--quick, --out)"
  )
  tr = sub.add_parser("train", help="train (or resume) a model from a config file")
  tr.add_argument("--config", required=True, help="configs/<file>.py[:flags,key=value,...]")
  tr.add_argument("--no-progress", action="store_true")
  ev = sub.add_parser("eval-stream", help="stream held-out text through a trained model under a cache policy")
  ev.add_argument("--config", required=True, help="the training config (its workdir holds the checkpoint)")
  ev.add_argument("--policy", default="sinkwindow:4,128", help="dense:N | window:W | sinkwindow:S,W | recompute:W")
  ev.add_argument("--positions", default="cache_relative", choices=["absolute", "cache_relative"])
  ev.add_argument("--tokens", type=int, default=100_000)
  ev.add_argument("--chunk", type=int, default=64)
  ev.add_argument("--segment", type=int, default=4096)
  ev.add_argument("--out", default="runs/eval_stream")
  sub.add_parser("bench", help="run a benchmark: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
  return parser


def report(prog: str, fn) -> int:
  """Runs ``fn()``; bad input (a missing file, an unknown key, a wrong type, an unusable checkpoint) becomes one
  clear line on stderr and exit status 2 instead of a traceback."""
  from jstream.errors import USER_ERRORS

  try:
    return int(fn() or 0)
  except USER_ERRORS as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  # demo and bench hand everything after their name to the experiment's own parser (and its --help)
  if argv[:1] == ["demo"]:
    from experiments import streaming_llm

    return report("jstream demo", lambda: streaming_llm.main(argv[1:], prog="jstream demo"))
  if argv[:1] == ["bench"]:
    if len(argv) < 2 or argv[1] not in BENCHMARKS:
      parser.error(f"jstream bench <name>: one of {sorted(BENCHMARKS)}")
    return report(f"jstream bench {argv[1]}", lambda: _run_module(BENCHMARKS[argv[1]][0], argv[2:]))
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 0
  commands = {"train": cmd_train, "eval-stream": cmd_eval_stream}
  if args.command not in commands:
    parser.error(f"unknown command {args.command}")
  return report(f"jstream {args.command}", lambda: commands[args.command](args))


if __name__ == "__main__":
  sys.exit(main())
