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
import functools
import glob
import gzip
import json
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jstream
from experiments import bench_stream
from experiments.machine import device_line
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
  ("nn/layers.py", "dot_general", "sums of split projections"),
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
SPLIT_SUMS = "sums of split projections"
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
  ops, users, rank, sources = {}, collections.defaultdict(list), {}, {}
  for line in comps[body_name]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    operands = re.findall(r"%([\w.\-]+)", line[m.end() : line.find(")", m.end())])
    for operand in operands:
      users[operand].append(name)
    dims = re.match(r"\w+\[([\d,]*)\]", shape)
    rank[name] = len([d for d in dims.group(1).split(",") if d]) if dims else 0
    sources[name] = (opcode, operands)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    callee = "\n".join(comps.get(calls.group(1), [])) if calls else ""
    ops[name] = dict(
      opcode=opcode,
      frames=chain(int(frame.group(1))) if frame else [],
      is_dot=opcode == "dot" or " dot(" in callee,
      reads_weights=False,
    )

  def source_rank(name):  # the rank of the loop-carried array an operand is a view of (0: computed here)
    while name in sources and sources[name][0] in ("bitcast", "copy", "get-tuple-element"):
      if sources[name][0] == "get-tuple-element":
        return rank[name]
      name = sources[name][1][0]
    return 0

  for name, op in ops.items():  # a dot reads weights (2-D) or cache buffers (4-D)
    op["reads_weights"] = op["is_dot"] and any(source_rank(x) == 2 for x in sources[name][1])
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
  if op["is_dot"] and (op["reads_weights"] or not op["frames"]):
    return WEIGHT_DOTS if op["reads_weights"] else ATTENTION_DOTS
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

VARIANTS = {
  "shipped": {},
  "projections not split": {"split": False},
  "values masked by a copy": {"guard": "mask"},
  "single tokens through the chunk path": {"read_only": False},
  "before: chunk path, projections not split": {"read_only": False, "split": False},
}
"""Decode formulations timed side by side, each in a fresh process (the library's switches for measurements:
``jstream.nn.layers.SPLIT_PLATFORMS``, ``jstream.nn.cached_attention.VALUE_GUARD`` and ``READ_ONLY_TOKENS``).
The last is the formulation of single-token decode before issue 9."""


def _set_knobs(split: bool = True, guard: str | None = None, read_only: bool = True) -> None:
  from jstream.nn import cached_attention, layers

  if not split:
    layers.SPLIT_PLATFORMS = ()
  if guard:
    cached_attention.VALUE_GUARD[jax.default_backend()] = guard
  cached_attention.READ_ONLY_TOKENS = read_only


def _decode(decoder, cache, last):
  out = decoder(cache, last, jax.random.key(0))
  jax.block_until_ready(out.tokens)
  return out


def _setup(cfg, mode: str, args):
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(0))
  policy = C.SinkWindow(4, args.window, positions=mode)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(args.batch, args.prefill), dtype=np.int32)
  cache = model.init_cache(policy, args.batch)
  last, cache = rollout.prefill(model, tokens, cache, chunk_size=min(256, policy.capacity))
  decoder = rollout.Decoder(model, steps=args.steps, sampling=rollout.Sampling(temperature=0.0))
  return model, decoder, _decode(decoder, cache, last)  # compiled and warm


def _timed(call, rounds: int, meter, nbytes: int) -> float:
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - t0)
    meter.measure(nbytes)
  return best


def time_variant(cfg_name: str, mode: str, knobs: dict, args: dict) -> dict:
  """Seconds per decode step of one formulation, the copy floor measured between its rounds, and the loop's op
  counts (runs in a fresh process: the switches are read when the step is traced)."""
  _set_knobs(**knobs)
  args = argparse.Namespace(**args)
  model, decoder, out = _setup(bench_stream.model_config(cfg_name), mode, args)
  meter, nbytes = bench_stream.FloorMeter(), bench_stream.step_bytes(model, out.cache)
  state = {"out": out}

  def call():
    state["out"] = _decode(decoder, state["out"].cache, state["out"].last_logits)

  best = _timed(call, args.rounds, meter, nbytes)
  ops = loop_ops(decoder.lower(state["out"].cache, state["out"].last_logits).compile().as_text())
  return dict(
    step_s=best / args.steps,
    floor=meter.floor(nbytes),
    loop_ops=len(ops),
    loop_copies=sum(1 for op in ops.values() if op["opcode"] == "copy"),
  )


def time_matmuls(cfg_name: str, mode: str, args: dict) -> dict:
  """The ablation: per step, only the decode's matrix products (the same split projections, the same attention
  dots over the same cache buffers, the softmax between them) and nothing else: what XLA:CPU's dot kernels cost
  for the bytes a step reads."""
  from jstream.nn import layers

  args = argparse.Namespace(**args)
  model, _, out = _setup(bench_stream.model_config(cfg_name), mode, args)
  cfg, cache = model.config, out.cache
  b, n, k, h = args.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  graphdef, state = nnx.split(model)
  dims = (((1,), (0,)), ((), ()))

  def proj(x, kernel):
    return layers.dot_general(x, kernel[...], dims)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def run(state, x):
    model = nnx.merge(graphdef, state)

    def step(x, _):
      for layer, block in enumerate(model.blocks):
        qkv = proj(x, block.attn.qkv_proj.kernel)
        q = qkv[:, : n * h].reshape(b, k, n // k, h)
        s = jnp.einsum("bkgh,bksh->bkgs", q, cache.k[layer]) * h**-0.5
        o = jnp.einsum("bkgs,bkhs->bkgh", jax.nn.softmax(s, axis=-1), cache.v[layer])
        x = x + proj(o.reshape(b, n * h), block.attn.o.kernel)
        gu = proj(x, block.mlp.gate_up.kernel)
        x = x + proj(jax.nn.silu(gu[:, : cfg.mlp_dim]) * gu[:, cfg.mlp_dim :], block.mlp.down.kernel)
        x = jnp.tanh(x)
      return x + 1e-6 * jnp.sum(x @ model.embed.embedding[...].T), None

    return jax.lax.scan(step, x, None, length=args.steps)[0]

  state_x = {"x": run(state, jnp.ones((b, cfg.embed_dim), jnp.float32))}

  def call():
    state_x["x"] = run(state, state_x["x"])
    state_x["x"].block_until_ready()

  meter, nbytes = bench_stream.FloorMeter(), bench_stream.step_bytes(model, cache)
  best = _timed(call, args.rounds, meter, nbytes)
  return dict(step_s=best / args.steps, floor=meter.floor(nbytes))


def profile_mode(cfg, mode: str, args, out_dir: pathlib.Path) -> dict:
  """Times the shipped decode and records one traced call: per-op busy time by category, and op counts."""
  model, decoder, out = _setup(cfg, mode, args)
  meter, nbytes = bench_stream.FloorMeter(), bench_stream.step_bytes(model, out.cache)
  state = {"out": out}

  def call():
    state["out"] = _decode(decoder, state["out"].cache, state["out"].last_logits)

  best = _timed(call, args.rounds, meter, nbytes)
  floor = meter.floor(nbytes)
  out = state["out"]
  hlo = decoder.lower(out.cache, out.last_logits).compile().as_text()
  (out_dir / f"decode_{mode}.hlo.txt").write_text(hlo)
  thunks = loop_ops(hlo)

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      out = _decode(decoder, out.cache, out.last_logits)
    busy, loop_wall = trace_ops(trace_dir, "jit__decode")
  per_cat = collections.defaultdict(lambda: [0.0, 0])
  for name, op in thunks.items():
    per_cat[op["category"]][0] += busy.get(name, 0.0) / args.steps
    per_cat[op["category"]][1] += 1
  rows = sorted(
    ({"category": c, "us_per_step": t * 1e6, "ops": n} for c, (t, n) in per_cat.items()),
    key=lambda r: -r["us_per_step"],
  )
  return dict(
    mode=mode,
    ms_per_token=best / args.steps / args.batch * 1e3,
    ms_per_step=best / args.steps * 1e3,
    floor=floor,
    read_bytes=nbytes,
    decode_over_floor=best / args.steps / floor["read_once_s"],
    loop_ops=len(thunks),
    loop_copies=sum(1 for op in thunks.values() if op["opcode"] == "copy"),
    loop_dots=sum(1 for op in thunks.values() if op["is_dot"]),
    traced_ms_per_step=loop_wall / args.steps * 1e3,
    traced_busy_ms_per_step=sum(r["us_per_step"] for r in rows) / 1e3,
    categories=rows,
  )


def compare_variants(cfg_name: str, mode: str, args) -> list:
  """Every ``VARIANTS`` entry and the matrix-products ablation, each in a fresh process, ``--repeats`` times in
  turn; the best time of each counts, against the best floor of the run."""
  import concurrent.futures
  import multiprocessing

  ctx = multiprocessing.get_context("spawn")
  best, floor = {}, None
  jobs = [(name, time_variant, (cfg_name, mode, knobs, vars(args))) for name, knobs in VARIANTS.items()]
  jobs.append(("matrix products alone", time_matmuls, (cfg_name, mode, vars(args))))
  for _ in range(args.repeats):
    for name, fn, fn_args in jobs:
      with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        r = pool.submit(fn, *fn_args).result()
      if name not in best or r["step_s"] < best[name]["step_s"]:
        best[name] = r
      if floor is None or r["floor"]["read_once_s"] < floor["read_once_s"]:
        floor = r["floor"]
  rows = []
  for name, r in best.items():
    rows.append(
      dict(
        variant=name,
        ms_per_step=r["step_s"] * 1e3,
        decode_over_floor=r["step_s"] / floor["read_once_s"],
        loop_ops=r.get("loop_ops"),
        loop_copies=r.get("loop_copies"),
      )
    )
  return dict(floor=floor, variants=rows)


def print_profile(p: dict) -> None:
  print(
    f"\n{p['mode']}: {p['ms_per_step']:.3f} ms/step, floor {p['floor']['read_once_s'] * 1e3:.3f} ms "
    f"({p['read_bytes'] / 2**20:.1f} MiB at {p['floor']['copy_bandwidth_gbs']:.1f} GB/s): "
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


def print_variants(mode: str, c: dict) -> None:
  fl = c["floor"]
  print(f"\n{mode}, formulations (best of the run; floor {fl['read_once_s'] * 1e3:.3f} ms):")
  print(f"  {'variant':<44} {'ms/step':>8} {'x floor':>8} {'thunks':>7} {'copies':>7}")
  for r in c["variants"]:
    ops = "" if r["loop_ops"] is None else r["loop_ops"]
    copies = "" if r["loop_copies"] is None else r["loop_copies"]
    print(f"  {r['variant']:<44} {r['ms_per_step']:8.3f} {r['decode_over_floor']:8.2f} {ops:>7} {copies:>7}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.profile_decode", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/profile_decode", help="output folder")
  parser.add_argument("--modes", nargs="+", default=["absolute", "cache_relative"])
  parser.add_argument("--window", type=int, default=1024)
  parser.add_argument("--prefill", type=int, default=1280, help="tokens in the cache before decoding")
  parser.add_argument("--steps", type=int, default=256, help="decode steps per call")
  parser.add_argument("--rounds", type=int, default=5, help="timed calls per process (the best counts)")
  parser.add_argument("--repeats", type=int, default=2, help="fresh processes per formulation, in turn")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--medium", action="store_true", help="the medium model (8 layers, width 512)")
  parser.add_argument("--tiny", action="store_true", help="a tiny model and window (smoke test)")
  parser.add_argument("--no-variants", dest="variants", action="store_false", help="only the per-op profile")
  args = parser.parse_args(argv)
  if args.tiny:
    args.window, args.prefill, args.steps, args.rounds, args.repeats = 32, 48, 16, 1, 1
  cfg_name = "tiny" if args.tiny else "medium" if args.medium else "small"
  cfg = bench_stream.model_config(cfg_name)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = device_line()
  print(f"profile_decode on {device}, jax {jax.__version__}; model {cfg_name}: {cfg}, batch {args.batch}")
  res = dict(device=device, jax=jax.__version__, args=vars(args), model=str(cfg), profiles=[], variants={})
  for mode in args.modes:
    p = profile_mode(cfg, mode, args, out)
    print_profile(p)
    res["profiles"].append(p)
    if args.variants:
      res["variants"][mode] = compare_variants(cfg_name, mode, args)
      print_variants(mode, res["variants"][mode])
  (out / "profile.json").write_text(json.dumps(res, indent=2))
  print(f"\nwrote {out / 'profile.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
