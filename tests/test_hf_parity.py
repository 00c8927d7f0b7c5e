"""Parity of imported (and exported) checkpoints with transformers' own PyTorch models.

Tiny random Llama / Mistral / Qwen2 models are built with transformers, saved with ``save_pretrained`` and
imported; logits of a prefill and of step-by-step decode through a jstream cache are compared with transformers'
forward in float32 (max abs diff < 1e-4). The other direction: a jstream model exported with ``weights.save`` is
loaded by transformers and gives the same logits. StreamingLLM semantics on imported weights (sinks + window with
positions inside the cache) are checked against a small NumPy Llama written here from the transformers model's
state dict (itself checked against transformers' forward), which keeps every layer's keys before RoPE and lets
the policy pick the keys a query sees and their positions.

Needs the ``parity`` extra (``pip install torch==2.13.0 && pip install -e '.[parity]'``); skipped without it.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# torch's compiler cache would otherwise land in the run's temp dir (which must end empty).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "jstream-tests-torchinductor"))
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jstream import cache, rollout, weights  # noqa: E402

ATOL = 1e-4


def _randomize(model, seed: int) -> None:
  """Weights far from transformers' small init (std 0.02 makes every model nearly the same), norms around 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _hf_model(kind: str, tmp_path, *, tie=False, rope=None, dtype=torch.float32, seed=0):
  common = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=tie,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
  )
  if rope is not None:
    common["rope_scaling"] = rope
  cls = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[kind]
  extra = {"sliding_window": None} if kind == "mistral" else {}
  config = cls[0](**common, **extra, rope_theta=5000.0 if rope is None else 10000.0)
  torch.manual_seed(seed)
  model = cls[1](config).eval()
  _randomize(model, seed)
  model = model.to(dtype)
  path = tmp_path / kind
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
  return out.float().numpy()


def _stepper(model):
  """``logits, cache = step(tokens, cache)``, compiled once (eager calls would dominate the test's time)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda tokens, kv: nnx.merge(graphdef, state)(tokens, kv))


def _tokens(seed: int, shape=(2, 24), vocab=97) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


LLAMA3 = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize(
  "kind,tie,rope",
  [
    ("llama", False, None),
    ("llama", True, LLAMA3),
    ("llama", False, {"rope_type": "linear", "factor": 2.0}),
    ("mistral", False, None),
    ("qwen2", True, None),
  ],
)
def test_import_matches_transformers_prefill_and_decode(tmp_path, kind, tie, rope):
  hf, path = _hf_model(kind, tmp_path, tie=tie, rope=rope)
  model, info = weights.load(path)
  assert info.model_type == kind and model.config.tie_embeddings == tie
  assert model.config.qkv_bias == (kind == "qwen2")
  tokens = _tokens(1)
  want = _hf_logits(hf, tokens)
  got = np.asarray(model.forward(jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # Prefill 10 tokens, then decode the rest one at a time through a dense cache.
  kv = model.init_cache(cache.Dense(64), 2)
  first, kv = model(jnp.asarray(tokens[:, :10]), kv)
  steps, run = [first], _stepper(model)
  for i in range(10, tokens.shape[1]):
    step, kv = run(jnp.asarray(tokens[:, i : i + 1]), kv)
    steps.append(step)
  np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), want, atol=ATOL, rtol=0)


def test_import_unrolled_layers_and_bf16(tmp_path):
  hf, path = _hf_model("llama", tmp_path, seed=3)
  tokens = _tokens(4)
  want = _hf_logits(hf, tokens)
  per_layer, _ = weights.load(path, scan_layers=False)
  assert not per_layer.config.scan_layers
  np.testing.assert_allclose(np.asarray(per_layer.forward(jnp.asarray(tokens))), want, atol=ATOL, rtol=0)
  bf16, _ = weights.load(path, dtype="bfloat16")
  assert bf16.embed.embedding[...].dtype == jnp.bfloat16
  got = np.asarray(bf16.forward(jnp.asarray(tokens)))
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 0.1 * scale  # bf16 weights: close, not equal
  assert np.abs(got - want).max() > 1e-6  # ... and really rounded


def test_bf16_checkpoint_imports_as_bf16(tmp_path):
  hf, path = _hf_model("qwen2", tmp_path, dtype=torch.bfloat16, seed=5)
  model, info = weights.load(path)
  assert info.dtype == "bfloat16" and model.config.param_dtype == "bfloat16"
  want = hf.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...], np.float32), want)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, kind):
  hf, path = _hf_model(kind, tmp_path, seed=7)
  model, _ = weights.load(path)
  out = tmp_path / "exported"
  weights.save(model, out, model_type=kind, max_shard_bytes=40_000, bos_token_id=1, eos_token_id=2)
  assert (out / "model.safetensors.index.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = _tokens(8)
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(hf, tokens), atol=ATOL, rtol=0)
  # ... and the exported tensors are the original ones, bit for bit.
  for name, p in hf.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[name].numpy(), p.numpy(), err_msg=name)


class _NumpyLlama:
  """Llama written out in NumPy from transformers' state dict, one token at a time, keeping every layer's keys
  *before* RoPE, so that a cache policy can choose which keys a query sees and at which positions."""

  def __init__(self, hf):
    self.cfg = hf.config
    self.p = {k: v.detach().double().numpy() for k, v in hf.state_dict().items()}
    c = self.cfg
    self.h = c.hidden_size // c.num_attention_heads
    self.inv = 1.0 / c.rope_parameters["rope_theta"] ** (np.arange(0, self.h, 2) / self.h)
    self.keys = [[] for _ in range(c.num_hidden_layers)]  # per layer: (pre-RoPE k [kv, h], v [kv, h]) per token

  def _norm(self, x, w):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.cfg.rms_norm_eps)

  def _rope(self, x, pos):
    a = pos * self.inv
    x1, x2 = x[..., : self.h // 2], x[..., self.h // 2 :]
    return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1)

  def step(self, token: int, visible) -> np.ndarray:
    """Logits after ``token``; ``visible(n) -> [(index, position)]`` picks, from the ``n`` tokens so far (this one
    last), the keys the query sees and their RoPE positions; the query's position is the last one listed."""
    c, p = self.cfg, self.p
    n_h, kv_h = c.num_attention_heads, c.num_key_value_heads
    x = p["model.embed_tokens.weight"][token]
    for li in range(c.num_hidden_layers):
      pre = f"model.layers.{li}."
      y = self._norm(x, p[pre + "input_layernorm.weight"])
      q, k, v = (p[pre + f"self_attn.{n}_proj.weight"] @ y for n in "qkv")
      self.keys[li].append((k.reshape(kv_h, self.h), v.reshape(kv_h, self.h)))
      seen = visible(len(self.keys[li]))
      qpos = seen[-1][1]
      q = self._rope(q.reshape(n_h, self.h), qpos)
      ks = np.stack([self._rope(self.keys[li][i][0], pos) for i, pos in seen])  # [s, kv, h]
      vs = np.stack([self.keys[li][i][1] for i, _ in seen])
      g = n_h // kv_h
      scores = np.einsum("nh,snh->ns", q, np.repeat(ks, g, axis=1)) / np.sqrt(self.h)
      w = np.exp(scores - scores.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      o = np.einsum("ns,snh->nh", w, np.repeat(vs, g, axis=1)).reshape(-1)
      x = x + p[pre + "self_attn.o_proj.weight"] @ o
      y = self._norm(x, p[pre + "post_attention_layernorm.weight"])
      gate, up = p[pre + "mlp.gate_proj.weight"] @ y, p[pre + "mlp.up_proj.weight"] @ y
      x = x + p[pre + "mlp.down_proj.weight"] @ (gate / (1 + np.exp(-gate)) * up)
    head = p.get("lm_head.weight", p["model.embed_tokens.weight"])
    return head @ self._norm(x, p["model.norm.weight"])


def _dense(n):
  return [(i, i) for i in range(n)]


def _sink_window(sinks, window):
  """StreamingLLM's cache: the first ``sinks`` tokens and the last ``window`` (the query included), re-indexed
  0.. in stream order (positions inside the cache)."""

  def visible(n):
    keep = [i for i in range(n) if i < sinks or n - 1 - i < window]
    return [(i, pos) for pos, i in enumerate(keep)]

  return visible


def _reference(hf, tokens: np.ndarray, visible) -> np.ndarray:
  out = []
  for row in tokens:
    ref = _NumpyLlama(hf)
    out.append([ref.step(int(t), visible) for t in row])
  return np.asarray(out)


def test_numpy_reference_is_transformers_llama(tmp_path):
  """The reference below is only as good as its dense case: it must be transformers' forward."""
  hf, _ = _hf_model("llama", tmp_path, seed=11)
  tokens = _tokens(12, (1, 16))
  np.testing.assert_allclose(_reference(hf, tokens, _dense), _hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_sink_window_streaming_on_imported_weights(tmp_path):
  hf, path = _hf_model("llama", tmp_path, seed=11)
  model, _ = weights.load(path)
  tokens = _tokens(12, (2, 40))
  sinks, window = 2, 10
  want = _reference(hf, tokens, _sink_window(sinks, window))
  assert np.abs(want - _reference(hf, tokens, _dense)).max() > 0.1  # the window changes the logits
  policy = cache.SinkWindow(sinks, window, positions="cache_relative")
  kv = model.init_cache(policy, 2)
  got, run = [], _stepper(model)
  for i in range(tokens.shape[1]):
    step, kv = run(jnp.asarray(tokens[:, i : i + 1]), kv)
    got.append(np.asarray(step[:, 0]))
  np.testing.assert_allclose(np.stack(got, axis=1), want, atol=ATOL, rtol=0)
  # stream_nll (chunked scan) agrees with the same reference.
  nll = np.asarray(rollout.stream_nll(model, jnp.asarray(tokens), policy, chunk_size=1))
  logp = want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) - want.max(-1, keepdims=True)
  ref = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(nll[:, 1:], ref, atol=1e-4, rtol=0)


def test_config_json_written_by_transformers_is_understood(tmp_path):
  _, path = _hf_model("mistral", tmp_path)
  hf = json.loads((path / "config.json").read_text())
  cfg, info = weights.config_from_hf(hf)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_base) == (6, 2, 8, 5000.0)
  assert info.sliding_window is None and info.bos_token_id == 1
