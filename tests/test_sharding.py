"""Sharding over a mesh (``jstream.sharding``): every entry point sharded over 8 simulated CPU devices (4 data x 2
model) gives the unsharded numbers within 1e-5 (f32). The multi-device runs happen in one subprocess
(``sharded_checks.py``): the device count must be set before jax is imported, and this process has imported it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import typing

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import library_checks_only
from jstream import sharding

HERE = pathlib.Path(__file__).resolve().parent
TOL = 1e-5


@pytest.fixture(scope="module")
def checks() -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, str(HERE / "sharded_checks.py")], capture_output=True, text=True, env=env, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parameters_and_caches_are_really_split(checks):
  assert checks["devices"] == 8
  assert checks["stacked_qkv_spec"] == str(P(None, None, "model"))  # [layers, d, (n + 2k) h]: features split
  assert checks["per_layer_qkv_spec"] == str(P(None, "model"))
  assert checks["stacked_cache_k_spec"] == str(P(None, "data", "model", None, None))  # rows and kv heads
  assert checks["per_layer_cache_k_spec"] == str(P("data", "model", None, None))
  for tag in ("stacked", "per_layer"):  # each device holds an eighth of the keys
    assert checks[f"{tag}_cache_bytes_per_device"] == [checks[f"{tag}_cache_bytes_total"] // 8]


@pytest.mark.parametrize("tag", ["stacked", "per_layer"])
def test_sharded_prefill_and_decode_equal_unsharded(checks, tag):
  assert checks[f"{tag}_prefill"] < TOL
  assert checks[f"{tag}_decode"] < TOL and checks[f"{tag}_decode_tokens_equal"]


def test_sharded_generate_and_stream_nll_equal_unsharded(checks):
  assert checks["stacked_generate"] < TOL and checks["stacked_generate_tokens_equal"]
  assert checks["stacked_stream_nll"] < TOL


def test_sharded_training_steps_equal_unsharded(checks):
  assert checks["train_loss_changes"]  # the steps train
  assert checks["train_loss"] < TOL and checks["train_params"] < TOL
  assert checks["train_moment_specs"] == [str(P(None, None, "model"))]  # AdamW moments split like gate_up


def test_the_training_loop_runs_sharded_from_the_config(checks):
  """``TrainConfig.mesh = (4, 2)``: ``jstream.train.train`` shards its state and batches; same numbers."""
  assert checks["loop_param_devices"] == 8
  assert checks["loop_params"] < TOL and checks["loop_losses"] < TOL


def test_specs_fall_back_to_replication_when_a_mesh_axis_does_not_divide():
  mesh = sharding.make_mesh(data=1, model=1)
  assert sharding.param_spec(("blocks", "mlp", "gate_up", "kernel"), (2, 8, 16), mesh) == P(None, None, "model")
  assert sharding.param_spec(("final_norm", "scale"), (8,), mesh) == P(None)

  class FakeMesh:  # a 3-wide model axis (more devices than this process has): 16 features do not split, 24 do
    shape: typing.ClassVar = {"data": 1, "model": 3}

  with library_checks_only():  # (the stand-in is not a Mesh)
    assert sharding.param_spec(("attn", "o", "kernel"), (16, 8), FakeMesh()) == P(None, None)
    assert sharding.param_spec(("attn", "o", "kernel"), (24, 8), FakeMesh()) == P("model", None)


def test_make_mesh_checks_the_device_count():
  n = jax.device_count()
  with pytest.raises(ValueError, match="divide"):
    sharding.make_mesh(model=n + 1)
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh(data=n + 1)
  assert sharding.make_mesh().devices.shape == (n, 1)
  assert np.asarray(sharding.make_mesh().axis_names).tolist() == ["data", "model"]


def test_train_config_mesh_parses_and_validates():
  from jstream.train import TrainConfig, load_config
  from jstream.train.checkpoint import RESUMABLE_FIELDS

  cfg = load_config(f"{HERE.parent}/configs/lm_tiny.py:quick,mesh=4;2")
  assert cfg.mesh == (4, 2)
  assert TrainConfig.from_dict(json.loads(cfg.to_json())).mesh == (4, 2)  # (JSON stores a list)
  assert "mesh" in RESUMABLE_FIELDS  # sharding does not change the numbers: a run may resume under another mesh
  with pytest.raises(ValueError, match="two positive ints"):
    load_config(f"{HERE.parent}/configs/lm_tiny.py:quick,mesh=4;2;1")
  with pytest.raises((TypeError, ValueError), match="mesh"):
    load_config(f"{HERE.parent}/configs/lm_tiny.py:quick,mesh=four;2")
