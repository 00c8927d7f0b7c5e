"""Sharded vs unsharded runs of every entry point, on 8 simulated CPU devices (run as a script by
``test_sharding.py``: the device count must be set before jax is imported). Prints one JSON object."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jstream
from jstream import cache, rollout, sharding
from jstream.config import TransformerConfig


def diff(a, b) -> float:
  return float(max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max() for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))  # fmt: skip


def model_pair(scan_layers: bool, mesh):
  cfg = TransformerConfig(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64,
                          tie_embeddings=False, qkv_bias=True, scan_layers=scan_layers)  # fmt: skip
  plain = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(plain)  # random biases, so that a misplaced bias shows
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(plain, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  sharded = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(0))
  nnx.update(sharded, jax.tree.map(jnp.copy, nnx.state(plain)))
  return plain, sharding.shard_model(sharded, mesh)


def main() -> dict:
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh(data=4, model=2)
  out: dict = {"devices": jax.device_count()}
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 96, (4, 40)), jnp.int32)
  for scan_layers in (True, False):
    tag = "stacked" if scan_layers else "per_layer"
    plain, sharded = model_pair(scan_layers, mesh)
    qkv = sharded.blocks.attn.qkv_proj.kernel if scan_layers else sharded.blocks[0].attn.qkv_proj.kernel
    out[f"{tag}_qkv_spec"] = str(qkv[...].sharding.spec)
    policy = cache.SinkWindow(2, 12, positions="cache_relative", max_rollback=0)
    # prefill (a chunk through the cache) and the cache it leaves
    kv_p = plain.init_cache(policy, 4)
    kv_s = sharding.shard_cache(sharded.init_cache(policy, 4), mesh)
    out[f"{tag}_cache_k_spec"] = str((kv_s.k if scan_layers else kv_s.k[0]).sharding.spec)
    per_dev = sharding.bytes_per_device(kv_s.k)
    out[f"{tag}_cache_bytes_per_device"] = sorted(set(per_dev.values()))
    out[f"{tag}_cache_bytes_total"] = int(sum(x.nbytes for x in jax.tree.leaves(kv_s.k)))
    last_p, kv_p = rollout.prefill(plain, tokens[:, :10], kv_p, chunk_size=10)
    last_s, kv_s = rollout.prefill(sharded, sharding.shard_batch(tokens[:, :10], mesh), kv_s, chunk_size=10)
    out[f"{tag}_prefill"] = max(diff(last_p, last_s), diff(kv_p.k, kv_s.k), diff(kv_p.v, kv_s.v))
    # decode: greedy tokens and the logits after them
    dec_p = rollout.decode(plain, kv_p, last_p, steps=12, rng=jax.random.key(0), sampling=rollout.Sampling(0.0))
    dec_s = rollout.decode(sharded, kv_s, last_s, steps=12, rng=jax.random.key(0), sampling=rollout.Sampling(0.0))
    out[f"{tag}_decode"] = diff(dec_p.last_logits, dec_s.last_logits)
    out[f"{tag}_decode_tokens_equal"] = bool(np.array_equal(dec_p.tokens, dec_s.tokens))
    if not scan_layers:  # per-layer weights: prefill and decode suffice (the same jitted code as stacked)
      continue
    # generate with sampling (same keys)
    kw = dict(max_new_tokens=10, policy=policy, temperature=0.9, top_p=0.95, rng=jax.random.key(3))
    gen_p = rollout.generate(plain, tokens[:, :6], **kw)
    gen_s = rollout.generate(sharded, sharding.shard_batch(tokens[:, :6], mesh), **kw)
    out[f"{tag}_generate"] = diff(gen_p.last_logits, gen_s.last_logits)
    out[f"{tag}_generate_tokens_equal"] = bool(np.array_equal(gen_p.tokens, gen_s.tokens))
    # stream_nll over a stream longer than the cache
    nll_p = rollout.stream_nll(plain, tokens, policy, chunk_size=8)
    nll_s = rollout.stream_nll(sharded, sharding.shard_batch(tokens, mesh), policy, chunk_size=8)
    out[f"{tag}_stream_nll"] = diff(jnp.nan_to_num(nll_p), jnp.nan_to_num(nll_s))
  out.update(train_step(mesh))
  out.update(train_loop())
  return out


class Batches:
  """Random text batches ``[8, 33]`` with the iterator state ``train`` checkpoints."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return np.random.default_rng(self.i).integers(0, 256, (8, 33)).astype(np.int32)

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = int(state["i"])


def train_loop() -> dict:
  """``jstream.train.train`` with ``TrainConfig.mesh = (4, 2)`` against the same run on one device."""
  import tempfile

  from jstream.train.loop import train

  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for mesh in (None, (4, 2)):
      cfg = _train_config(checkpoint_every=3, workdir=f"{tmp}/{mesh}", mesh=mesh)
      res = train(cfg, data=Batches(), progress=False)
      results[mesh] = (nnx.state(res.model), [m["loss"] for m in res.metrics])
  (p_plain, l_plain), (p_mesh, l_mesh) = results[None], results[(4, 2)]
  leaf = jax.tree.leaves(p_mesh)[0]
  return {
    "loop_params": diff(p_plain, p_mesh),
    "loop_losses": float(np.abs(np.subtract(l_plain, l_mesh)).max()),
    "loop_steps": len(l_mesh),
    "loop_param_devices": len(leaf.sharding.device_set),
  }


def _train_config(**kw):
  """The small text run that both training checks use (3 steps of batch 8 x 32 tokens)."""
  from jstream.train.config import TrainConfig

  model = TransformerConfig(vocab_size=257, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64)
  return TrainConfig(model=model, batch_size=8, seq_len=32, steps=3, warmup_steps=1, **{"workdir": "unused", **kw})


def train_step(mesh) -> dict:
  from jstream.train.loop import init_state, make_train_step

  cfg = _train_config()
  graphdef, optimizer, state = init_state(cfg)
  step = make_train_step(graphdef, optimizer, cfg)
  batches = [jnp.asarray(np.random.default_rng(i).integers(0, 256, (8, 33)), jnp.int32) for i in range(3)]
  copy = jax.tree.map(jnp.copy, state)
  sharded = sharding.shard_train_state(copy, mesh)
  spec = {
    str(kp): str(x.sharding.spec)
    for kp, x in jax.tree_util.tree_flatten_with_path(sharded.opt_state)[0]
    if "gate_up" in str(kp)
  }
  losses_p, losses_s = [], []
  for b in batches:
    state, m = step(state, b)
    losses_p.append(float(m["loss"]))
    sharded, m = step(sharded, sharding.shard_batch(b, mesh))
    losses_s.append(float(m["loss"]))
  return {
    "train_loss": float(np.abs(np.subtract(losses_p, losses_s)).max()),
    "train_params": diff(state.params, sharded.params),
    "train_param_spec": str(jax.tree.leaves(sharded.params)[0].sharding.spec),
    "train_moment_specs": sorted(set(spec.values())),
    "train_loss_changes": losses_p[0] != losses_p[-1],
  }


if __name__ == "__main__":
  print(json.dumps(main(), default=str))
