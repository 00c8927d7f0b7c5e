"""Where single-token decode time goes: a per-op profile of the compiled decode loop, against the memory floor.

  python -m experiments.profile_decode [--out DIR] [--modes absolute cache_relative] [--medium] [--batch B]

For each position mode of ``SinkWindow(4, 1024)`` on the benchmark's model (``experiments.bench_stream``), this

1. fills a cache with ``--prefill`` real tokens and times ``--steps`` greedy decode steps (one compiled
   ``lax.scan``, ``--rounds`` rounds, the best counts), next to the copy time of an array as large as the weights
   + cache (the bandwidth floor, measured in the same run);
2. records one more decode call under ``jax.profiler`` (a Perfetto trace) and adds up, per step, the time of every
   XLA:CPU thunk (a fusion, a dot, a copy) of the loop body, grouped by the jstream function that emitted it
   (read from the HLO's stack frames: the innermost frame that matches a category below);
3. counts the operations of the compiled loop body (thunks per step, of which copies).

Thunks can run two at a time on two cores, so the busy time of the categories may add up to more than the wall
time of a step; the profiler's own overhead makes the traced step slower than the timed one. Prints a table per
mode and writes ``profile.json`` (and the loop's HLO text) to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import platform
import re
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import jstream
from experiments import bench_stream
from jstream import cache as C
from jstream import rollout

# The innermost jstream stack frame of an op (file suffix, function name prefix) decides its category.
CATEGORIES = (
  ("cache/planner.py", "", "write plan (planner.plan, rebase)"),
  ("positions.py", "rope_cos_sin", "RoPE tables (cos/sin gathers)"),
  ("positions.py", "apply_rope", "RoPE rotation of q and k"),
  ("cache/kv.py", "", "cache writes (k, v)"),
  ("ops/attention.py", "merge", "merge of partial attentions"),
  ("ops/attention.py", "", "attention: mask, softmax"),
  ("nn/cached_attention.py", "attend", "cache read: segment slices, value mask"),
  ("nn/cached_attention.py", "", "segments, masks (cached_attention.build)"),
  ("nn/layers.py", "RMSNorm", "RMSNorm"),
  ("nn/layers.py", "MLP", "MLP activation (SwiGLU)"),
  ("nn/layers.py", "Attention", "q/k/v split"),
  ("nn/layers.py", "Block", "residual adds"),
  ("models/lm.py", "StreamingTransformer._head", "final norm, LM head"),
  ("models/lm.py", "StreamingTransformer._embed", "embedding"),
  ("models/lm.py", "", "model step (outputs, poison)"),
  ("rollout.py", "sample", "sampling"),
  ("rollout.py", "", "decode loop (counters, tokens)"),
)
ATTENTION_DOTS = "attention dots (q.k, p.v)"
WEIGHT_DOTS = "weight matmuls (q/k/v/out, MLP, LM head)"
COPIES = "copies inserted by XLA"
_NOT_THUNKS = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "opt-barrier")


# ----------------------------------------------------------------------------------------------- HLO parsing


def _stack_tables(hlo: str):
  """The HLO text's stack-frame tables: frame id -> list of (file, function), innermost first."""

  def table(name):
    m = re.search(rf"^{name}\n(.*?)\n\n", hlo, re.S | re.M)
    return m.group(1).splitlines() if m else []

  files = {int(a): b.strip('"') for a, b in (ln.split(" ", 1) for ln in table("FileNames"))}
  funcs = {int(a): b.strip('"') for a, b in (ln.split(" ", 1) for ln in table("FunctionNames"))}
  locs, frames = {}, {}
  for ln in table("FileLocations"):
    i, rest = ln.split(" ", 1)
    f = re.search(r"file_name_id=(\d+)", rest)
    fn = re.search(r"function_name_id=(\d+)", rest)
    locs[int(i)] = (files.get(int(f.group(1)), "?"), funcs.get(int(fn.group(1)), "?"))
  for ln in table("StackFrames"):
    i, rest = ln.split(" ", 1)
    loc = int(re.search(r"file_location_id=(\d+)", rest).group(1))
    parent = int(re.search(r"parent_frame_id=(\d+)", rest).group(1))
    frames[int(i)] = (loc, parent)

  def chain(frame_id):  # the printed parent_frame_id is the parent's id + 1 (1: no parent)
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc, parent = frames[frame_id]
      out.append(locs.get(loc, ("?", "?")))
      frame_id = parent - 1
    return out

  return chain


def _computations(hlo: str) -> dict[str, list[str]]:
  """Instruction lines of every computation of an HLO text, by computation name."""
  comps, name, body = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name, body = m.group(1), []
      continue
    if line.startswith("}") and name:
      comps[name] = body
      name = None
      continue
    if name and line.strip():
      body.append(line.strip())
  return comps


_INSTR = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")


def loop_ops(hlo: str) -> dict:
  """The thunks of the decode loop's body: name -> dict(opcode, category)."""
  comps = _computations(hlo)
  chain = _stack_tables(hlo)
  body_name = None
  for line in comps.get(next(k for k in comps if k.startswith("main")), []):
    m = re.search(r" while\(.*body=%([\w.\-]+)", line)
    if m:
      body_name = m.group(1)
  if body_name is None:
    raise RuntimeError("no while loop found in the compiled decode program")
  ops, users = {}, collections.defaultdict(list)
  for line in comps[body_name]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, _, opcode = m.groups()
    operands = line[m.end() : line.find(")", m.end())]
    for operand in re.findall(r"%([\w.\-]+)", operands):
      users[operand].append(name)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    callee = "\n".join(comps.get(calls.group(1), [])) if calls else ""
    ops[name] = dict(
      opcode=opcode,
      frames=chain(int(frame.group(1))) if frame else [],
      is_dot=opcode == "dot" or " dot(" in callee,
      batched_dot="lhs_batch_dims" in line or "lhs_batch_dims" in callee,
    )
  for op in ops.values():
    op["category"] = _category(op)
  for name, op in ops.items():  # ops the compiler left without a source location: the category of a user
    seen, todo = set(), list(users[name])
    while op["category"] is None and todo:
      user = todo.pop(0)
      if user in seen or user not in ops:
        continue
      seen.add(user)
      op["category"] = ops[user]["category"]
      todo.extend(users[user])
  for op in ops.values():
    op["category"] = op["category"] or "other"
    del op["frames"]
  return {k: v for k, v in ops.items() if v["opcode"] not in _NOT_THUNKS}


def _category(op: dict) -> str | None:
  if op["opcode"] == "copy":
    return COPIES
  if op["is_dot"]:
    return ATTENTION_DOTS if op["batched_dot"] else WEIGHT_DOTS
  ours = [(f, fn) for f, fn in op["frames"] if "/jstream/" in f]
  if not ours:
    return None
  file, func = ours[0]
  for suffix, prefix, label in CATEGORIES:
    if file.endswith(suffix) and func.startswith(prefix):
      return label
  return f"{file.rsplit('/', 1)[-1]}:{func}"


# ----------------------------------------------------------------------------------------------- trace parsing


def trace_ops(trace_dir: str, module: str) -> tuple[dict, float]:
  """Per-op busy time (s) of one traced call of ``module``, and the wall time from its first op to its last."""
  files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
  if not files:
    raise RuntimeError(f"no trace written under {trace_dir}")
  with gzip.open(files[0]) as f:
    events = json.load(f)["traceEvents"]
  busy = collections.defaultdict(float)
  first, last = float("inf"), 0.0
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") != "X" or args.get("hlo_module") != module:
      continue
    first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
    name = e["name"].removeprefix("end: ")
    busy[name] += e["dur"] * 1e-6
  return busy, max(last - first, 0.0) * 1e-6


# ----------------------------------------------------------------------------------------------- the run


def _decode(decoder, cache, last):
  out = decoder(cache, last, jax.random.key(0))
  jax.block_until_ready(out.tokens)
  return out


def profile_mode(cfg, mode: str, args, out_dir: pathlib.Path) -> dict:
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(0))
  policy = C.SinkWindow(4, args.window, positions=mode)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(args.batch, args.prefill), dtype=np.int32)
  cache = model.init_cache(policy, args.batch)
  last, cache = rollout.prefill(model, tokens, cache, chunk_size=min(256, policy.capacity))
  decoder = rollout.Decoder(model, steps=args.steps, sampling=rollout.Sampling(temperature=0.0))
  out = _decode(decoder, cache, last)  # compile + warm up
  best = float("inf")
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    out = _decode(decoder, out.cache, out.last_logits)
    best = min(best, time.perf_counter() - t0)
  weights = bench_stream._nbytes(nnx.state(model, nnx.Param))
  cache_bytes = bench_stream._nbytes((out.cache.k, out.cache.v))
  floor = bench_stream.memory_floor(weights + cache_bytes)

  hlo = decoder.lower(out.cache, out.last_logits).compile().as_text()
  (out_dir / f"decode_{mode}.hlo.txt").write_text(hlo)
  thunks = loop_ops(hlo)

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      out = _decode(decoder, out.cache, out.last_logits)
    busy, loop_wall = trace_ops(trace_dir, "jit__decode")
  per_cat = collections.defaultdict(lambda: [0.0, 0])
  for name, op in thunks.items():
    cat = op["category"]
    per_cat[cat][0] += busy.get(name, 0.0) / args.steps
    per_cat[cat][1] += 1
  unmatched = sum(t for n, t in busy.items() if n not in thunks) / args.steps  # ops outside the loop body
  rows = sorted(
    ({"category": c, "us_per_step": t * 1e6, "ops": n} for c, (t, n) in per_cat.items()),
    key=lambda r: -r["us_per_step"],
  )
  return dict(
    mode=mode,
    ms_per_token=best / args.steps * 1e3,
    floor=floor,
    weights_bytes=weights,
    cache_bytes=cache_bytes,
    decode_over_floor=best / args.steps / floor["read_once_s"],
    loop_ops=len(thunks),
    loop_copies=sum(1 for op in thunks.values() if op["opcode"] == "copy"),
    loop_dots=sum(1 for op in thunks.values() if op["is_dot"]),
    traced_ms_per_step=loop_wall / args.steps * 1e3,
    traced_busy_ms_per_step=sum(r["us_per_step"] for r in rows) / 1e3,
    outside_loop_ms=unmatched * args.steps * 1e3,
    categories=rows,
  )


def print_profile(p: dict) -> None:
  print(
    f"\n{p['mode']}: {p['ms_per_token']:.3f} ms/token, floor {p['floor']['read_once_s'] * 1e3:.3f} ms "
    f"({(p['weights_bytes'] + p['cache_bytes']) / 2**20:.1f} MiB at {p['floor']['copy_bandwidth_gbs']:.1f} GB/s): "
    f"{p['decode_over_floor']:.2f}x the floor"
  )
  print(
    f"  loop body: {p['loop_ops']} thunks per step ({p['loop_dots']} dots, {p['loop_copies']} copies); traced "
    f"step {p['traced_ms_per_step']:.3f} ms wall, {p['traced_busy_ms_per_step']:.3f} ms busy"
  )
  print(f"  {'category':<48} {'us/step':>8} {'share':>6} {'ops':>4}")
  total = sum(r["us_per_step"] for r in p["categories"]) or 1.0
  for r in p["categories"]:
    print(f"  {r['category']:<48} {r['us_per_step']:8.1f} {r['us_per_step'] / total:6.1%} {r['ops']:4d}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.profile_decode", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/profile_decode", help="output folder")
  parser.add_argument("--modes", nargs="+", default=["absolute", "cache_relative"])
  parser.add_argument("--window", type=int, default=1024)
  parser.add_argument("--prefill", type=int, default=1280, help="tokens in the cache before decoding")
  parser.add_argument("--steps", type=int, default=256, help="decode steps per call")
  parser.add_argument("--rounds", type=int, default=5, help="timed calls (the best counts)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--medium", action="store_true", help="the medium model (8 layers, width 512)")
  parser.add_argument("--tiny", action="store_true", help="a tiny model and window (smoke test)")
  args = parser.parse_args(argv)
  if args.tiny:
    args.window, args.prefill, args.steps, args.rounds = 32, 48, 16, 1
  cfg = bench_stream.model_config("tiny" if args.tiny else "medium" if args.medium else "small")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, {platform.machine()}"
  print(f"profile_decode on {device}, jax {jax.__version__}; model {cfg}")
  res = dict(device=device, jax=jax.__version__, args=vars(args), model=str(cfg), profiles=[])
  for mode in args.modes:
    p = profile_mode(cfg, mode, args, out)
    print_profile(p)
    res["profiles"].append(p)
  (out / "profile.json").write_text(json.dumps(res, indent=2))
  print(f"\nwrote {out / 'profile.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
