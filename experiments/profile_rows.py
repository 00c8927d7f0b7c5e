"""What a few rows cost in a projection on this machine: the matrix products of a verification chunk, alone.

  python -m experiments.profile_rows [--rows 1,2,5,9] [--width 384] [--hidden 2048] [--layers 6] [--out DIR]

Speculative decoding verifies ``K + 1`` tokens in one call; the cost model assumes that costs one token. This
times ``layers`` pairs of products ``[t, width] x [width, hidden]``, ``tanh``, ``[t, hidden] x [hidden, width]`` (the
weights passed as arguments, as a model's are, not folded as constants), for each row count ``t``, 32 times in one
compiled loop, the fastest of 5 calls, under several XLA:CPU settings, each in a fresh process (flags are read when
the backend starts): XLA's defaults, XNNPACK off, the YNN fusions off, both off, and the legacy (non-thunk) runtime.
Prints milliseconds per pass over the layers and the ratio to one row; writes ``profile_rows.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

from experiments.machine import machine

VARIANTS = {
  "XLA defaults": "",
  "XNNPACK off": "--xla_cpu_use_xnnpack=false",
  "YNN fusions off": "--xla_cpu_experimental_ynn_fusion_type=",
  "both off": "--xla_cpu_use_xnnpack=false --xla_cpu_experimental_ynn_fusion_type=",
  "legacy runtime": "--xla_cpu_use_thunk_runtime=false",
}

_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
rows, width, hidden, layers = json.loads(sys.argv[1])
up = [jax.random.normal(jax.random.key(i), (width, hidden)) * 0.05 for i in range(layers)]
down = [jax.random.normal(jax.random.key(100 + i), (hidden, width)) * 0.05 for i in range(layers)]

@jax.jit
def passes(up, down, x):
  def body(i, x):
    for a, b in zip(up, down):
      x = (jnp.tanh(x @ a) @ b) * 1e-2
    return x
  return jax.lax.fori_loop(0, 32, body, x)

out = {}
for t in rows:
  x = jax.random.normal(jax.random.key(7), (t, width))
  jax.block_until_ready(passes(up, down, x))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(passes(up, down, x))
    times.append(time.perf_counter() - t0)
  out[t] = min(times) / 32
print(json.dumps(out))
"""


def time_variant(flags: str, rows: list[int], width: int, hidden: int, layers: int) -> dict[int, float] | str:
  """Seconds per pass for each row count under ``XLA_FLAGS=flags`` (a fresh process), or the error it gave."""
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  arg = json.dumps([rows, width, hidden, layers])
  proc = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, env=env, timeout=900)
  if proc.returncode != 0:
    return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
  return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.profile_rows", description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="1,2,5,9")
  parser.add_argument("--width", type=int, default=384)
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--out", default="runs/profile_rows")
  args = parser.parse_args(argv)
  rows = [int(r) for r in args.rows.split(",")]
  print(f"{args.layers} x ([t, {args.width}] x [{args.width}, {args.hidden}], tanh, back), {os.cpu_count()} CPUs")
  print(f"{'variant':<18}" + "".join(f"{f't={t} ms':>11}" for t in rows) + "   ratio to t=1")
  results = {}
  for name, flags in VARIANTS.items():
    sec = time_variant(flags, rows, args.width, args.hidden, args.layers)
    results[name] = dict(flags=flags, seconds=sec)
    if isinstance(sec, str):
      print(f"{name:<18} {sec}")
      continue
    ratios = ", ".join(f"{sec[t] / sec[rows[0]]:.2f}" for t in rows[1:])
    print(f"{name:<18}" + "".join(f"{1e3 * sec[t]:11.3f}" for t in rows) + f"   {ratios}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = dict(args=vars(args), machine=machine(), variants=results)
  (out / "profile_rows.json").write_text(json.dumps(result, indent=2))
  print(f"wrote {out / 'profile_rows.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
