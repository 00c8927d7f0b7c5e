"""The ``jstream`` command: ``jstream <subcommand> ...``.

Subcommands dispatch to experiment scripts (each also runnable as ``python -m experiments.<name>``); every
experiment accepts ``--out DIR`` and ``--quick`` and writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
  "stream": ("experiments.bench_stream", "per-token decode latency and memory against stream position"),
  "attention": ("experiments.bench_attention", "attention kernels vs XLA and cuDNN (interpret-mode checks on CPU)"),
}


def _run_module(module: str, argv: list[str]) -> int:
  mod = importlib.import_module(module)
  return int(mod.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jstream",
    description="jstream: streaming causal models in JAX (bounded caches, constant time per chunk).",
  )
  sub = parser.add_subparsers(dest="command", metavar="<command>")
  bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes results.json and a plot)")
  bench.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
  bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (see --help)")
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 0
  if args.command == "bench":
    return _run_module(BENCHMARKS[args.name][0], args.args)
  parser.error(f"unknown command {args.command}")
  return 2


if __name__ == "__main__":
  sys.exit(main())
