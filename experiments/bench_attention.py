"""Attention kernels against the XLA reference and ``jax.nn.dot_product_attention``, on whatever device is present.

  python -m experiments.bench_attention [--out DIR] [--quick]      (also: jstream bench attention ...)

On a GPU or TPU it times, side by side in one run:

* sink + window prefill (``T`` = 4k..32k, window 4k, 4 sinks): the Pallas flash kernel (block skipping) vs the
  XLA masked dense path, and dense causal prefill vs ``jax.nn.dot_product_attention`` (cuDNN on GPU);
* decode (one query per row, GQA) against caches of 4k..128k slots: the split-K Pallas kernel vs XLA;

and reports achieved TFLOP/s and GB/s against the device's measured peak (a large bf16 matmul and the copy
bandwidth of a large array, measured in the same run). On CPU, where the kernels only run in interpret mode, it
checks every kernel against the reference on small shapes and reports the errors (no timings). Prints a table,
writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jstream.ops import attention as A


def _time(fn, *args, repeats=5):
  out = fn(*args)
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def device_peaks(repeats=5) -> dict:
  """Measured matmul throughput (bf16) and copy bandwidth of this device."""
  n = 8192 if jax.default_backend() != "cpu" else 1024
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  t = _time(mm, a, repeats=repeats)
  x = jnp.ones((256 * 2**20 // 4,) if jax.default_backend() != "cpu" else (16 * 2**20 // 4,), jnp.float32)
  cp = jax.jit(lambda x: x * 1.0001)
  tc = _time(cp, x, repeats=repeats)
  return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbs": 2 * x.size * 4 / tc / 1e9}


def _inputs(b, t, s, n, kvh, h, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  k = jax.random.normal(ks[1], (b, s, kvh, h), dtype)
  v = jax.random.normal(ks[2], (b, s, kvh, h), dtype)
  return q, k, v


def _visible_pairs(t, s, window, sinks):
  """Number of (query, key) pairs a sink + window causal mask keeps (queries at the last t of s positions)."""
  qpos = np.arange(s - t, s)
  w = s if window is None else window
  per_q = np.minimum(qpos + 1, w) + np.clip(np.minimum(sinks, qpos + 1 - w), 0, None)
  return int(per_q.sum())


def bench_accelerator(args) -> dict:
  peaks = device_peaks()
  rows = []
  n, kvh, h, dtype = 16, 4, 128, jnp.bfloat16

  def add(kind, name, t, s, seconds, flops=None, nbytes=None, note=""):
    row = dict(kind=kind, impl=name, t=t, s=s, ms=seconds * 1e3 if seconds else None, note=note)
    if seconds and flops:
      row["tflops"] = flops / seconds / 1e12
      row["of_peak_matmul"] = row["tflops"] / peaks["matmul_tflops"]
    if seconds and nbytes:
      row["gbs"] = nbytes / seconds / 1e9
      row["of_copy_bandwidth"] = row["gbs"] / peaks["copy_gbs"]
    rows.append(row)
    ms = "  failed" if seconds is None else f"{seconds * 1e3:9.3f}"
    extra = "".join(f"  {k} {row[k]:.3f}" for k in ("tflops", "of_peak_matmul", "gbs", "of_copy_bandwidth") if k in row)
    print(f"  {kind:<8} {name:<28} t {t:>6} s {s:>7} {ms} ms{extra} {note}", flush=True)

  def attempt(fn, *a):
    """``(seconds, "")``, or ``(None, reason)``: an OOM of the dense path is a result, not a crash."""
    try:
      return _time(fn, *a), ""
    except Exception as e:
      return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"

  window, sinks = 4096, 4
  for t in args.prefill_lengths:
    q, k, v = _inputs(1, t, t, n, kvh, h, dtype)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    flops = 4 * h * n * _visible_pairs(t, t, window, sinks)
    kernels = ("pallas_tpu", "pallas_prefill") if jax.default_backend() == "tpu" else ("pallas_prefill",)
    for name in (*kernels, "xla"):
      f = jax.jit(
        lambda q, k, v, name=name, pos=pos: A.attention(
          q, k, v, q_positions=pos, k_positions=pos, window=window, num_sinks=sinks, impl=name
        )
      )
      sec, note = attempt(f, q, k, v)
      add("window", name, t, t, sec, flops=flops, note=note)
    # The same masked dense XLA path over blocks of queries (every key, masked): its scores fit in memory at any T,
    # so the kernel's speedup stays measurable where the one-shot dense path runs out of memory.
    block = min(t, args.xla_query_block)
    if t % block == 0 and block < t:

      def blocked(q, k, v, pos=pos, block=block):
        qs = q.reshape(1, -1, block, *q.shape[2:]).swapaxes(0, 1)
        ps = pos.reshape(1, -1, block).swapaxes(0, 1)

        def one(x):
          qb, pb = x
          return A.attention(qb, k, v, q_positions=pb, k_positions=pos, window=window, num_sinks=sinks, impl="xla")

        return jax.lax.map(one, (qs, ps)).swapaxes(0, 1).reshape(q.shape)

      sec, note = attempt(jax.jit(blocked), q, k, v)
      add("window", f"xla (query blocks of {block})", t, t, sec, flops=flops, note=note)
    dense_flops = 4 * h * n * _visible_pairs(t, t, None, 0)
    f = jax.jit(lambda q, k, v, pos=pos: A.attention(q, k, v, q_positions=pos, k_positions=pos, impl="pallas_prefill"))
    sec, note = attempt(f, q, k, v)
    add("causal", "pallas_prefill", t, t, sec, flops=dense_flops, note=note)
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
    sec, note = attempt(f, q, k, v)
    add("causal", f"dot_product_attention({impl})", t, t, sec, flops=dense_flops, note=note)

  for s in args.decode_lengths:
    q, k, v = _inputs(1, 1, s, n, kvh, h, dtype)
    qp = jnp.full((1, 1), s - 1, jnp.int32)
    kp = jnp.arange(s, dtype=jnp.int32)[None]
    nbytes = 2 * s * kvh * h * jnp.dtype(dtype).itemsize
    for name in ("pallas_decode", "xla"):
      f = jax.jit(
        lambda q, k, v, name=name, qp=qp, kp=kp: A.attention(q, k, v, q_positions=qp, k_positions=kp, impl=name)
      )
      sec, note = attempt(f, q, k, v)
      add("decode", name, 1, s, sec, nbytes=nbytes, note=note)
  return {"peaks": peaks, "rows": rows}


def check_interpret(args) -> dict:
  """CPU: every kernel against the reference, in interpret mode, on small shapes."""
  rows = []
  cases = [(1, 8, 64, 4, 2, 32, 16, 4), (2, 37, 100, 4, 1, 16, None, 0), (2, 3, 77, 8, 2, 16, 24, 1)]
  for b, t, s, n, kvh, h, window, sinks in cases[: 2 if args.quick else None]:
    q, k, v = _inputs(b, t, s, n, kvh, h, jnp.float32, seed=t)
    qp = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
    kp = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    ref = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=window, num_sinks=sinks, impl="xla")
    for name in ("pallas_prefill", "pallas_decode", "pallas_tpu"):
      try:  # each kernel declines (NotImplementedError) the shapes another one serves
        got = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=window, num_sinks=sinks, impl=name)
      except NotImplementedError:
        continue
      err = float(jnp.max(jnp.abs(got - ref)))
      rows.append(dict(impl=name, b=b, t=t, s=s, n=n, kv_heads=kvh, window=window, sinks=sinks, max_abs_err=err))
      print(f"  {name:<16} b {b} t {t:>3} s {s:>4} n {n} kv {kvh} window {window!s:>4} sinks {sinks}  "
            f"max |err| {err:.2e} {'ok' if err < 1e-4 else 'FAIL'}")  # fmt: skip
  return {"rows": rows, "note": "CPU: interpret-mode correctness only; timings need a GPU or TPU"}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench attention", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/bench_attention")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  parser.add_argument("--decode-lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
  parser.add_argument("--xla-query-block", type=int, default=2048, help="query block of the blocked XLA baseline")
  args = parser.parse_args(argv)
  if args.quick:
    args.prefill_lengths, args.decode_lengths = args.prefill_lengths[:1], args.decode_lengths[:2]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  backend = jax.default_backend()
  device = f"{jax.devices()[0].device_kind} ({backend})"
  print(f"bench_attention on {device}, jax {jax.__version__}, implementations {A.implementations()}")
  res = bench_accelerator(args) if backend in ("gpu", "tpu") else check_interpret(args)
  res.update(device=device, jax=jax.__version__, args=vars(args))
  (out / "results.json").write_text(json.dumps(res, indent=2))
  print(f"wrote {out / 'results.json'}")
  if backend == "cpu" and any(r["max_abs_err"] >= 1e-4 for r in res["rows"]):
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
