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
BUILTIN = ("train", "eval-stream", "generate", "export", "bench")
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


def _load_hf(directory: str, dtype: str | None, scan_layers: bool = True):
  """A local Hugging Face checkpoint folder's model, info and tokenizer (None without ``tokenizer.json``)."""
  from jstream import weights

  model, info = weights.load(directory, dtype=dtype, scan_layers=scan_layers)
  tok = weights.Tokenizer(directory) if (pathlib.Path(directory) / "tokenizer.json").exists() else None
  return model, info, tok


def _hf_stream(args, tok):
  """The ``--text`` file's tokens (its first ``--tokens``) for ``eval-stream --hf``."""
  if not args.text:
    raise ValueError("eval-stream --hf needs --text FILE (the text to stream)")
  if tok is None:
    raise FileNotFoundError(f"{args.hf}: no tokenizer.json to encode --text with")
  text = pathlib.Path(args.text).read_text(encoding="utf-8")
  return tok.encode(text)[: args.tokens]


def cmd_eval_stream(args) -> int:
  from jstream.evaluation import evaluate_stream

  policy = parse_policy(args.policy, args.positions)
  if args.hf:
    model, info, tok = _load_hf(args.hf, args.dtype)
    stream, skip = _hf_stream(args, tok), 0
    source = dict(hf=args.hf, text=args.text, model_type=info.model_type)
    if info.sliding_window is not None and info.sliding_window < policy.capacity:
      print(f"note: the model was trained with a sliding window of {info.sliding_window} tokens", file=sys.stderr)
  else:
    from jstream.train import heldout_tokens, load_config, load_model

    cfg = load_config(args.config)
    model, step = load_model(cfg)
    stream, skip = heldout_tokens(cfg, args.tokens)
    source = dict(checkpoint_step=step, config=args.config)
  chunk = min(args.chunk, policy.capacity)  # a chunk may not exceed the cache
  t0 = time.time()
  res = evaluate_stream(model, stream, policy, chunk=chunk, segment=args.segment, skip=skip, prefixes=PREFIXES)
  res.update(source, policy=str(policy), seconds=time.time() - t0)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(res, indent=2))
  print(
    f"{policy}: perplexity {res['ppl']:.3f} over {res['tokens']} tokens "
    f"({res['tokens_per_s']:.0f} tokens/s, cache {res['cache_mib']:.2f} MiB); wrote {out / 'results.json'}"
  )
  return 0


def cmd_export(args) -> int:
  """A trained text run as a Hugging Face checkpoint folder (weights + config.json + a byte tokenizer)."""
  from jstream import weights
  from jstream.train import load_config, load_model
  from jstream.train.checkpoint import saved_config

  cfg = load_config(args.config) if args.config else saved_config(args.workdir)
  if cfg.data != "text":
    raise ValueError(f"export writes language models; {args.config or args.workdir} trains {cfg.data!r}")
  model, step = load_model(cfg)
  out = pathlib.Path(args.out)
  if not 256 <= cfg.model.vocab_size <= 260:
    raise ValueError(f"vocab_size {cfg.model.vocab_size}: not a byte-level model (256 bytes and a few specials)")
  files = weights.save(model, out, model_type=args.model_type, max_shard_bytes=args.max_shard_bytes)
  specials = ["<sink>" if i == cfg.sink_id else f"<extra_{i}>" for i in range(256, cfg.model.vocab_size)]
  weights.byte_tokenizer(out, specials=specials)
  print(f"exported {cfg.workdir} (step {step}) to {out}: {len(files)} weight file(s), config.json, tokenizer.json")
  return 0


def cmd_generate(args) -> int:
  """Streams generated text to stdout as it is sampled: ``--block`` tokens per compiled decode call, for ever with
  a sinks + window cache (``--max-new-tokens 0``) or up to a count; stops at EOS unless ``--ignore-eos``."""
  import jax
  import numpy as np

  from jstream import rollout

  policy = parse_policy(args.policy, args.positions)
  model, _, tok = _load_hf(args.hf, args.dtype, scan_layers=False)  # per-layer weights: faster decode on CPU
  if tok is None:
    raise FileNotFoundError(f"{args.hf}: no tokenizer.json to encode --prompt with")
  prompt = tok.encode(args.prompt)
  if prompt.size == 0:
    raise ValueError("the prompt encodes to no tokens")
  sampling = rollout.Sampling(args.temperature, args.top_k, args.top_p)
  kv = model.init_cache(policy, 1)
  chunk = min(prompt.size, policy.capacity, 256)
  t0 = time.perf_counter()
  last, kv = rollout.prefill(model, prompt[None], kv, chunk_size=chunk)
  decoder = rollout.Decoder(model, steps=args.block, sampling=sampling)
  rng = jax.random.key(args.seed)
  text = tok.stream()
  sys.stdout.write(args.prompt)
  sys.stdout.flush()
  done, call, t1 = 0, 0, time.perf_counter()
  while args.max_new_tokens == 0 or done < args.max_new_tokens:
    out = decoder(kv, last, jax.random.fold_in(rng, call))
    kv, last, call = out.cache, out.last_logits, call + 1
    ids = np.asarray(out.tokens[0])
    if args.max_new_tokens:
      ids = ids[: args.max_new_tokens - done]
    stop = not args.ignore_eos and tok.eos_id is not None and tok.eos_id in ids
    if stop:
      ids = ids[: list(ids).index(tok.eos_id)]
    done += len(ids)
    sys.stdout.write("".join(text.step(i) for i in ids))
    sys.stdout.flush()
    if stop:
      break
  sys.stdout.write(text.flush() + "\n")
  elapsed = time.perf_counter() - t1
  print(
    f"[{prompt.size} prompt tokens in {t1 - t0:.2f} s; {done} new tokens in {elapsed:.2f} s, "
    f"{done / max(elapsed, 1e-9):.1f} tokens/s (first call includes compilation); cache {policy}]",
    file=sys.stderr,
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
  ev = sub.add_parser(
    "eval-stream", help="stream text through a trained model or a local checkpoint (--hf) under a cache policy"
  )
  src = ev.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="the training config (its workdir holds the checkpoint)")
  src.add_argument("--hf", metavar="DIR", help="a local Hugging Face checkpoint folder (Llama / Mistral / Qwen2)")
  ev.add_argument("--text", metavar="FILE", help="with --hf: the text file to stream (its first --tokens tokens)")
  ev.add_argument("--dtype", choices=["float32", "bfloat16"], help="with --hf: weights' dtype (default: stored)")
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
  ex = sub.add_parser("export", help="write a trained byte-level LM as a Hugging Face checkpoint folder (--out)")
  run = ex.add_mutually_exclusive_group(required=True)
  run.add_argument("--config", help="the training config (its workdir holds the checkpoint)")
  run.add_argument("--workdir", help="a run's folder (the config saved with its checkpoints is used)")
  ex.add_argument("--out", required=True, help="the checkpoint folder to write")
  ex.add_argument("--model-type", default="llama", choices=["llama", "mistral", "qwen2"])
  ex.add_argument("--max-shard-bytes", type=int, default=None, help="split the weights into shards of this size")
  gen = sub.add_parser("generate", help="stream generated text from a local checkpoint (--hf), printed as it comes")
  gen.add_argument("--hf", metavar="DIR", required=True, help="a local Hugging Face checkpoint folder")
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--policy", default="sinkwindow:4,1020", help="the cache policy (as eval-stream's)")
  gen.add_argument("--positions", default="cache_relative", choices=["absolute", "cache_relative"])
  gen.add_argument("--max-new-tokens", type=int, default=256, help="0: for ever (Ctrl-C to stop)")
  gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
  gen.add_argument("--top-k", type=int, default=None)
  gen.add_argument("--top-p", type=float, default=None)
  gen.add_argument("--block", type=int, default=8, help="tokens per compiled decode call (printed together)")
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights' dtype (default: stored)")
  gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")
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
  commands = {"train": cmd_train, "eval-stream": cmd_eval_stream, "generate": cmd_generate, "export": cmd_export}
  if args.command not in commands:
    parser.error(f"unknown command {args.command}")
  return report(f"jstream {args.command}", lambda: commands[args.command](args))


if __name__ == "__main__":
  sys.exit(main())
