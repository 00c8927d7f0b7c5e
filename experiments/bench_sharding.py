"""Sharding overhead on simulated CPU devices: the same streaming workloads on meshes of 1 to 8 devices.

  python -m experiments.bench_sharding [--quick] [--out DIR] [--devices 8]
  (also: jstream bench sharding ...)

The host's CPU is split into ``--devices`` simulated XLA devices (``--xla_force_host_platform_device_count``, set
in a child process before jax starts), so the devices share the same cores: the figures measure what sharding
*costs* (partitioned programs, collectives between devices), not a speed-up, which needs real accelerators. For
each mesh ``data x model`` (1x1 on one device, then 8x1, 4x2, 2x4, 1x8 on eight) it runs, on a 4-layer width-256
model (8 heads, 4 kv heads) with a ``SinkWindow(4, 508)`` cache and 8 streams: ``stream_nll`` over 1,024 tokens
per stream (chunks of 64) and 64 steps of greedy decode; it reports tokens/s of each (median of 3 runs after
compiling), the largest difference from the 1x1 numbers, and the bytes each device holds of the parameters and of
the cache. Prints a table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from experiments.machine import machine

MESHES = ((1, 1), (8, 1), (4, 2), (2, 4), (1, 8))


def _child(quick: bool) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  import jstream
  from jstream import cache, rollout, sharding

  layers, width, tokens_n, steps = (2, 64, 128, 8) if quick else (4, 256, 1024, 64)
  cfg = jstream.TransformerConfig(
    vocab_size=256, num_layers=layers, num_heads=8, num_kv_heads=4, embed_dim=width, mlp_dim=4 * width
  )
  policy = cache.SinkWindow(4, 508 if not quick else 60, positions="cache_relative")
  batch = 8
  tokens = np.random.default_rng(0).integers(0, 256, (batch, tokens_n)).astype(np.int32)
  rows, ref = [], None
  for data, model_axis in MESHES:
    mesh = sharding.make_mesh(data, model_axis, devices=jax.devices()[: data * model_axis])
    model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(0))
    model = sharding.shard_model(model, mesh)
    x = sharding.shard_batch(tokens, mesh)

    def nll(model=model, x=x):
      return jax.block_until_ready(rollout.stream_nll(model, x, policy, chunk_size=64 if not quick else 16))

    def decode(model=model, x=x):
      kv = model.init_cache(policy, batch)
      last, kv = rollout.prefill(model, x[:, :16], kv, chunk_size=16)
      out = rollout.decode(model, kv, last, steps=steps, rng=jax.random.key(0), sampling=rollout.Sampling(0.0))
      return jax.block_until_ready(out)

    def timed(fn):
      fn()
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
      return out, float(np.median(times))

    out_nll, t_nll = timed(nll)
    out_dec, t_dec = timed(decode)
    res = (np.nan_to_num(np.asarray(out_nll)), np.asarray(out_dec.last_logits))
    if ref is None:
      ref = res
    kv = model.init_cache(policy, batch)
    params = sharding.bytes_per_device(nnx.state(model))
    cache_b = sharding.bytes_per_device(kv)
    rows.append(
      dict(
        mesh=f"{data}x{model_axis}",
        devices=data * model_axis,
        stream_tokens_per_s=batch * tokens_n / t_nll,
        decode_tokens_per_s=batch * steps / t_dec,
        max_diff_vs_1x1=float(max(np.abs(res[0] - ref[0]).max(), np.abs(res[1] - ref[1]).max())),
        param_mib_per_device=max(params.values()) / 2**20,
        cache_mib_per_device=max(cache_b.values()) / 2**20,
      )
    )
  model_info = dict(layers=layers, width=width, heads=8, kv_heads=4)
  return dict(rows=rows, model=model_info, batch=batch, stream_tokens=tokens_n, decode_steps=steps, policy=str(policy))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench sharding", description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="runs/bench_sharding")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args.quick)))
    return 0
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "experiments.bench_sharding", "--child"] + (["--quick"] if args.quick else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode:
    raise RuntimeError(f"the sharded runs failed:\n{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  print("| mesh | stream_nll tokens/s | decode tokens/s | max diff vs 1x1 | params MiB/device | cache MiB/device |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for r in result["rows"]:
    print(
      f"| {r['mesh']} | {r['stream_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
      f"{r['max_diff_vs_1x1']:.1e} | {r['param_mib_per_device']:.2f} | {r['cache_mib_per_device']:.2f} |"
    )
  result["machine"] = machine()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  print(f"wrote {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
