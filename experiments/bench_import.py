"""Checkpoint import cost: time and peak host memory to load a local Llama-family checkpoint into jstream.

  python -m experiments.bench_import [--quick] [--out DIR] [--size 1b] [--dtype bfloat16] [--shard-gb 1]
  (also: jstream bench import ...)

Writes a checkpoint of a Llama 3.2 1B-shaped model (16 layers, width 2048, 32 query / 8 kv heads, MLP 8192,
vocabulary 128,256, tied embeddings, Llama 3.1 RoPE scaling: 1.24 B parameters) with random weights in the
Hugging Face layout (``jstream.weights.write_checkpoint``: sharded safetensors + index), then imports it with
``jstream.weights.load`` in a fresh process for each layout (stacked layers, per-layer weights) and reports the
seconds of the import and the process's peak RSS against the checkpoint's size (and against the same process's
RSS after ``import jax, jstream``: what the import itself added). The imported model then runs one 8-token
forward as a check that it is usable (finite logits). ``--quick`` uses a 4-layer, width-256 model (CI smoke).
The target of issue 13: < 60 s and peak RSS < 2x the checkpoint on the 2-core CPU. Prints a table and writes
``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from experiments.machine import machine

SIZES = {
  # Llama 3.2 1B's shapes.
  "1b": dict(
    vocab_size=128_256,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    embed_dim=2048,
    mlp_dim=8192,
    rope_base=500_000.0,
  ),
  "quick": dict(vocab_size=4096, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, embed_dim=256, mlp_dim=768),
}

_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import jstream
from jstream import weights
from jstream.process_memory import rss_mib, tree_bytes
base = rss_mib()[1]  # /proc's VmHWM: this process's own peak (getrusage's survives exec: the parent's)
t0 = time.perf_counter()
model, info = weights.load(sys.argv[1], scan_layers=sys.argv[2] == "stacked")
from flax import nnx
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
seconds = time.perf_counter() - t0
peak = rss_mib()[1]
logits = model.forward(jnp.arange(8, dtype=jnp.int32)[None])
print(json.dumps(dict(seconds=seconds, rss_base_mib=base, peak_rss_mib=peak,
                      param_mib=tree_bytes(nnx.state(model, nnx.Param)) / 2**20,
                      finite=bool(np.isfinite(np.asarray(logits, np.float32)).all()))))
"""


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench import", description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="runs/bench_import")
  parser.add_argument("--size", default="1b", choices=sorted(SIZES))
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the written checkpoint")
  parser.add_argument("--keep", action="store_true", help="keep the written checkpoint in OUT/checkpoint")
  args = parser.parse_args(argv)
  from jstream import weights
  from jstream.config import TransformerConfig
  from jstream.positions import RopeScaling

  size = "quick" if args.quick else args.size
  scaling = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
  cfg = TransformerConfig(**SIZES[size], rope_scaling=scaling, param_dtype=args.dtype, dtype=args.dtype)
  out = pathlib.Path(args.out)
  ckpt = out / "checkpoint"
  t0 = time.perf_counter()
  files = weights.write_checkpoint(
    ckpt, cfg, max_shard_bytes=int(args.shard_gb * 2**30), bos_token_id=128_000, eos_token_id=128_001
  )
  write_s = time.perf_counter() - t0
  ckpt_mib = weights.hf.checkpoint_bytes(ckpt) / 2**20
  print(f"wrote {len(files)} shard(s), {ckpt_mib:.0f} MiB, in {write_s:.1f} s")
  rows = []
  for layout in ("stacked", "per_layer"):
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(
      [sys.executable, "-c", _CHILD, str(ckpt), layout], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
      raise RuntimeError(f"import in a child process failed:\n{proc.stderr[-3000:]}")
    row = dict(layout=layout, **json.loads(proc.stdout.strip().splitlines()[-1]))
    row["peak_over_checkpoint"] = row["peak_rss_mib"] / ckpt_mib
    row["added_over_checkpoint"] = (row["peak_rss_mib"] - row["rss_base_mib"]) / ckpt_mib
    rows.append(row)
  print("\n| layout | import s | peak RSS MiB | RSS before MiB | params MiB | peak / ckpt | added / ckpt | finite |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
  for r in rows:
    print(
      f"| {r['layout']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_base_mib']:.0f} | "
      f"{r['param_mib']:.0f} | {r['peak_over_checkpoint']:.2f} | {r['added_over_checkpoint']:.2f} | {r['finite']} |"
    )
  result = dict(
    size=size,
    dtype=args.dtype,
    parameters=sum(math.prod(s) for s in weights.hf.tensor_shapes(cfg).values()),
    config={k: v for k, v in SIZES[size].items()},
    checkpoint_mib=ckpt_mib,
    shards=len(files),
    write_s=write_s,
    rows=rows,
    machine=machine(),
  )
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  if not args.keep:
    for f in ckpt.iterdir():
      f.unlink()
    ckpt.rmdir()
  print(f"wrote {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
