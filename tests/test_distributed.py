"""Two processes on 127.0.0.1 (CPU, two simulated devices each) joined by ``jstream.distributed.initialize`` run a
sharded ``stream_nll`` over all four devices; the result equals a single-process, unsharded computation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jstream import distributed, rollout

COMMAND = [sys.executable, "-m", "jstream.distributed"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "jstream.distributed",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        "--seed",
        "3",
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  reports = [[ln for ln in out.splitlines() if ln.startswith("{")] for out in outs]  # (gloo logs to stdout too)
  assert len(reports[0]) == 1 and not reports[1]  # only process 0 reports
  res = json.loads(reports[0][0])
  assert (res["process_count"], res["global_devices"], res["local_devices"], res["rows"]) == (2, 4, 2, 4)
  # The single-process reference: the same model and rows, no mesh.
  tokens = jnp.asarray(distributed.check_tokens(3, 4, 48))
  nll = rollout.stream_nll(distributed.check_model(3), tokens, distributed.check_policy(), chunk_size=8)
  want = np.nanmean(np.asarray(nll, np.float64), axis=1)
  np.testing.assert_allclose(res["mean_nll"], want, atol=1e-5, rtol=0)
  assert np.ptp(want) > 1e-3  # rows differ: a mix-up of rows across processes would show


def test_settings_come_from_arguments_then_environment(monkeypatch):
  monkeypatch.setenv("JSTREAM_COORDINATOR", "10.0.0.1:1234")
  monkeypatch.setenv("JSTREAM_NUM_PROCESSES", "4")
  monkeypatch.delenv("JSTREAM_PROCESS_ID", raising=False)
  assert distributed.settings(process_id=2) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
  assert distributed.settings("h:1", 2, 1)["coordinator_address"] == "h:1"
  with pytest.raises(ValueError, match="process_id must be in"):
    distributed.settings(process_id=4)
  monkeypatch.setenv("JSTREAM_NUM_PROCESSES", "four")
  with pytest.raises(ValueError, match="JSTREAM_NUM_PROCESSES"):
    distributed.settings()
