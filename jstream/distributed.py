"""More than one host: ``initialize()`` joins this process to a multi-process JAX run, then every device of every
process is in ``jax.devices()`` and a ``jstream.sharding`` mesh over them spans the hosts.

Where the settings come from, first found first:

1. the arguments (``coordinator_address="10.0.0.1:1234", num_processes=4, process_id=0``);
2. jstream's environment variables ``JSTREAM_COORDINATOR``, ``JSTREAM_NUM_PROCESSES``, ``JSTREAM_PROCESS_ID``;
3. JAX's own ones (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) and its cluster
   detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes), used when nothing above is set.

On CPU the cross-process collectives are gloo's (set before the runtime starts). ``jstream multihost-check``
runs a sharded ``stream_nll`` over all processes' devices and prints its result: the smoke test of a cluster
(``tests/test_distributed.py`` starts two processes on 127.0.0.1). README: "More than one device".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

_ENV = {
  "coordinator_address": "JSTREAM_COORDINATOR",
  "num_processes": "JSTREAM_NUM_PROCESSES",
  "process_id": "JSTREAM_PROCESS_ID",
}


def settings(
  coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> dict:
  """The arguments ``initialize`` passes to ``jax.distributed.initialize`` (None: left to JAX)."""
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  out = {}
  for key, value in given.items():
    if value is None and os.environ.get(_ENV[key]):
      value = os.environ[_ENV[key]]
    if value is not None and key != "coordinator_address":
      try:
        value = int(value)
      except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r} (from {_ENV[key]}?)") from None
    out[key] = value
  n, i = out["num_processes"], out["process_id"]
  if n is not None and n < 1:
    raise ValueError(f"num_processes must be >= 1, got {n}")
  if n is not None and i is not None and not 0 <= i < n:
    raise ValueError(f"process_id must be in [0, {n}), got {i}")
  return out


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_ids: list[int] | None = None,
) -> dict:
  """Joins this process to a multi-process JAX run (call once, before any computation); returns
  ``{"process_index", "process_count", "local_devices", "global_devices"}``."""
  kw = settings(coordinator_address, num_processes, process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU client's (GPU / TPU keep theirs)
  jax.distributed.initialize(**{k: v for k, v in kw.items() if v is not None}, local_device_ids=local_device_ids)
  return describe()


def describe() -> dict:
  return dict(
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    local_devices=jax.local_device_count(),
    global_devices=jax.device_count(),
  )


def check(seed: int = 0, rows_per_device: int = 1, length: int = 48) -> dict:
  """A sharded ``stream_nll`` over every device of every process: a fixed small model (``seed``), a batch of
  ``rows_per_device`` rows per device split over a ``data`` mesh axis spanning the processes; returns the per-row
  mean NLL gathered to every process, with the run's shape."""
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  from jstream import rollout, sharding

  mesh = sharding.make_mesh(model=1)  # every device of every process on the data axis
  model = sharding.shard_model(check_model(seed), mesh)
  rows = rows_per_device * jax.device_count()
  tokens = sharding.shard_batch(check_tokens(seed, rows, length), mesh)  # (the same rows in every process)
  nll = rollout.stream_nll(model, tokens, check_policy(), chunk_size=8)
  per_row = jnp.nanmean(nll, axis=1)
  gathered = multihost_utils.process_allgather(per_row, tiled=True)
  return dict(describe(), rows=rows, mean_nll=np.asarray(gathered, np.float64).tolist())


def check_model(seed: int):
  """The small model of ``check`` (the same in every process, and in a single-process reference)."""
  from flax import nnx

  import jstream

  cfg = jstream.TransformerConfig(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64)
  return jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(seed))


def check_policy():
  """The cache policy of ``check``: sinks + window, positions inside the cache."""
  from jstream import cache

  return cache.SinkWindow(2, 16, positions="cache_relative")


def check_tokens(seed: int, rows: int, length: int):
  """The token batch of ``check`` (the same in every process, and in a single-process reference)."""
  import numpy as np

  return np.random.default_rng(seed + 1).integers(0, 64, (rows, length)).astype(np.int32)


def main(argv: list[str] | None = None) -> int:
  """``jstream multihost-check``: initialize, run ``check`` across the processes, print its JSON (process 0)."""
  parser = argparse.ArgumentParser(prog="jstream multihost-check", description=__doc__.split("\n\n")[0])
  parser.add_argument("--coordinator", help="host:port of process 0 (or JSTREAM_COORDINATOR)")
  parser.add_argument("--num-processes", type=int, help="(or JSTREAM_NUM_PROCESSES)")
  parser.add_argument("--process-id", type=int, help="(or JSTREAM_PROCESS_ID)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rows-per-device", type=int, default=1)
  args = parser.parse_args(argv)
  initialize(args.coordinator, args.num_processes, args.process_id)
  out = check(args.seed, args.rows_per_device)
  if jax.process_index() == 0:
    print(json.dumps(out))
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
