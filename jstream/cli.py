"""The ``jstream`` command: ``jstream <subcommand> ...``.

  jstream train --config configs/lm_tiny.py[:flags,key=value]
  jstream eval-stream --config CONFIG --policy sinkwindow:4,128 [--positions cache_relative] [--tokens N]
  jstream demo [--quick] [--out DIR]            the main job: StreamingLLM's ablations at small scale
  jstream video-qa show [--quick] [--out DIR]   a video-QA stream with the model's answers, as a GIF
  jstream bench {stream,attention,video-qa} [--quick] [--out DIR]

``train`` and ``eval-stream`` are the library's own. The other commands belong to the application and are found
through entry points, never imported by name: each ``name = "module:function"`` of the ``jstream.commands`` group
(``demo``, ``video-qa``) is a subcommand, each of ``jstream.benchmarks`` (``stream``, ``attention``, ``video-qa``)
a ``jstream bench`` name (``pyproject.toml``; reinstall the package after changing them). The function is called
as ``function(argv)`` with the arguments after the command's name, and returns an exit status; it is loaded only
when its command runs, and ``--help`` shows the first line of its module's docstring, read without importing it.
Experiments accept ``--out DIR`` and ``--quick`` and write ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import pathlib
import sys
import time

COMMANDS = "jstream.commands"
BENCHMARKS = "jstream.benchmarks"
BUILTIN = ("train", "eval-stream", "bench")
PREFIXES = (1024, 4096)  # eval-stream also reports the perplexity of these prefixes


def registered(group: str) -> dict[str, importlib.metadata.EntryPoint]:
  """The entry points of ``group`` by name (none if the package is not installed)."""
  return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def summary(ep: importlib.metadata.EntryPoint) -> str:
  """The first line of the docstring of ``ep``'s module (without markup), read from its source without importing
  it; empty if it cannot be read."""
  try:
    spec = importlib.util.find_spec(ep.module)
    doc = ast.get_docstring(ast.parse(pathlib.Path(spec.origin).read_text())) or ""
  except (ImportError, AttributeError, TypeError, OSError, SyntaxError, ValueError):
    return ""
  return doc.strip().split("\n")[0].replace("``", "").rstrip(".")


def _run_entry_point(ep: importlib.metadata.EntryPoint, argv: list[str]) -> int:
  return int(ep.load()(argv) or 0)


def parse_policy(spec: str, positions: str):
  """``dense:N``, ``window:W``, ``sinkwindow:S,W``, ``recompute:W``, ``h2o:B,R,S``, ``snapkv:B,R,S``,
  ``agenorm:B,R,S`` (budget, recent window, sinks) -> a cache policy."""
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
    "h2o": (3, lambda n: C.H2O(n[0], n[1], n[2], positions=positions)),
    "snapkv": (3, lambda n: C.SnapKV(n[0], n[1], n[2], positions=positions)),
    "agenorm": (3, lambda n: C.AgeNormalized(n[0], n[1], n[2], positions=positions)),
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
  from jstream.evaluation import evaluate_stream
  from jstream.train import heldout_tokens, load_config, load_model

  cfg = load_config(args.config)
  model, step = load_model(cfg)
  policy = parse_policy(args.policy, args.positions)
  stream, skip = heldout_tokens(cfg, args.tokens)
  chunk = min(args.chunk, policy.capacity)  # a chunk may not exceed the cache
  t0 = time.time()
  res = evaluate_stream(model, stream, policy, chunk=chunk, segment=args.segment, skip=skip, prefixes=PREFIXES)
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
  for name, ep in registered(COMMANDS).items():
    if name not in BUILTIN:
      sub.add_parser(name, help=f"{summary(ep)}; options: jstream {name} --help", add_help=False)
  tr = sub.add_parser("train", help="train (or resume) a model from a config file")
  tr.add_argument("--config", required=True, help="configs/<file>.py[:flags,key=value,...]")
  tr.add_argument("--no-progress", action="store_true")
  ev = sub.add_parser("eval-stream", help="stream held-out text through a trained model under a cache policy")
  ev.add_argument("--config", required=True, help="the training config (its workdir holds the checkpoint)")
  ev.add_argument(
    "--policy",
    default="sinkwindow:4,128",
    help="dense:N | window:W | sinkwindow:S,W | recompute:W | h2o:B,R,S | snapkv:B,R,S | agenorm:B,R,S",
  )
  ev.add_argument("--positions", default="cache_relative", choices=["absolute", "cache_relative"])
  ev.add_argument("--tokens", type=int, default=100_000)
  ev.add_argument("--chunk", type=int, default=64)
  ev.add_argument("--segment", type=int, default=4096)
  ev.add_argument("--out", default="runs/eval_stream")
  benches = registered(BENCHMARKS)
  sub.add_parser("bench", help="run a benchmark: " + "; ".join(f"{k}: {summary(ep)}" for k, ep in benches.items()))
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


def run_bench(argv: list[str], parser: argparse.ArgumentParser) -> int:
  """``jstream bench <name> ...``: runs the benchmark registered as ``name`` with the arguments after it."""
  benches = registered(BENCHMARKS)
  name = argv[0] if argv else None
  if name in ("-h", "--help"):
    print("usage: jstream bench <name> [options]  (jstream bench <name> --help)\n\nbenchmarks:")
    for key, ep in sorted(benches.items()):
      print(f"  {key:<12} {summary(ep)}")
    return 0
  if name not in benches:
    known = ", ".join(sorted(benches)) or "none registered (is the package installed? pip install -e .)"
    problem = "a benchmark name is needed" if name is None else f"unknown benchmark {name!r}"
    parser.error(f"jstream bench: {problem}; one of: {known}")
  return report(f"jstream bench {name}", lambda: _run_entry_point(benches[name], argv[1:]))


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  # Registered commands and benchmarks get everything after their name (their own parser, their own --help).
  registered_commands = registered(COMMANDS)
  if argv and argv[0] in registered_commands and argv[0] not in BUILTIN:
    return report(f"jstream {argv[0]}", lambda: _run_entry_point(registered_commands[argv[0]], argv[1:]))
  if argv[:1] == ["bench"]:
    return run_bench(argv[1:], parser)
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
