"""Checkpoint import / export (``jstream.weights``) without torch: exact round trips, shards, clear errors, RoPE
scaling, tokenizers. Parity with transformers' models is in ``test_hf_parity.py``."""

from __future__ import annotations

import json
import math
import pydoc_data.topics

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jstream
from jstream import weights
from jstream.config import TransformerConfig
from jstream.positions import Rope, RopeScaling, rope_cos_sin


def _model(seed=0, **kw) -> jstream.StreamingTransformer:
  base = dict(vocab_size=61, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=48)
  model = jstream.StreamingTransformer(TransformerConfig(**{**base, **kw}), rngs=nnx.Rngs(seed))
  # Biases and norm scales start at 0 / 1: make every parameter random so that a misplaced one shows.
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  new = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) * 0.3 + 0.1 for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(tree, new))
  return model


def _params(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(tie_embeddings=False, qkv_bias=True),
    dict(scan_layers=False, tie_embeddings=False),
    dict(param_dtype="bfloat16", dtype="bfloat16", rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),
  ],
)
def test_save_then_load_is_exact(tmp_path, kw):
  model = _model(**kw)
  weights.save(model, tmp_path)
  back, info = weights.load(tmp_path, scan_layers=model.config.scan_layers)
  assert back.config == model.config
  assert info.model_type == ("qwen2" if model.config.qkv_bias else "llama")
  a, b = _params(model), _params(back)
  assert a.keys() == b.keys()
  for path in a:
    assert a[path].dtype == b[path].dtype, path
    np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_stacked_and_per_layer_imports_compute_the_same(tmp_path):
  model = _model(tie_embeddings=False)
  weights.save(model, tmp_path)
  per_layer, _ = weights.load(tmp_path, scan_layers=False)
  stacked = _params(model)
  for path, value in _params(per_layer).items():  # ("blocks", i, ...) is layer i of ("blocks", ...)
    want = stacked[("blocks", *path[2:])][path[1]] if path[0] == "blocks" else stacked[path]
    np.testing.assert_array_equal(value, want, err_msg=str(path))


def test_hf_tensor_layout(tmp_path):
  """Names, shapes and transposes of the Hugging Face layout, read back with safetensors directly."""
  model = _model(tie_embeddings=False, qkv_bias=True)
  weights.save(model, tmp_path)
  t = load_file(tmp_path / "model.safetensors")
  cfg = model.config
  p = _params(model)
  assert t["model.layers.1.self_attn.k_proj.weight"].shape == (cfg.num_kv_heads * cfg.head_dim, cfg.embed_dim)
  q = cfg.num_heads * cfg.head_dim
  kernel = p[("blocks", "attn", "qkv_proj", "kernel")][1]  # [d, q + 2 kv]
  np.testing.assert_array_equal(t["model.layers.1.self_attn.q_proj.weight"], kernel[:, :q].T)
  bias = p[("blocks", "attn", "qkv_proj", "bias")][1]
  np.testing.assert_array_equal(t["model.layers.1.self_attn.v_proj.bias"], bias[-16:])
  gate_up = p[("blocks", "mlp", "gate_up", "kernel")][2]  # [d, 2f]: gate then up
  np.testing.assert_array_equal(t["model.layers.2.mlp.up_proj.weight"], gate_up[:, 48:].T)
  np.testing.assert_array_equal(t["lm_head.weight"], p[("lm_head", "kernel")].T)
  assert len(t) == 2 + 1 + 3 * 12  # embed, norm, head; 9 weights + 3 biases per layer


def test_sharded_checkpoint_round_trip(tmp_path):
  model = _model(tie_embeddings=False)
  files = weights.save(model, tmp_path, max_shard_bytes=30_000)
  assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == {f.name for f in files}
  assert index["metadata"]["total_size"] == sum(v.nbytes for f in files for v in load_file(f).values())
  for f in files[:-1]:
    assert sum(v.nbytes for v in load_file(f).values()) <= 30_000
  back, _ = weights.load(tmp_path)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(back.forward(tokens)), np.asarray(model.forward(tokens)))


def test_write_checkpoint_builds_the_config_without_a_model(tmp_path):
  cfg = TransformerConfig(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=1, embed_dim=16, mlp_dim=24,
                          param_dtype="bfloat16", dtype="bfloat16", tie_embeddings=False)  # fmt: skip
  weights.write_checkpoint(tmp_path, cfg, seed=3, bos_token_id=0, eos_token_id=[1, 2])
  model, info = weights.load(tmp_path)
  assert model.config == cfg and info.eos_token_id == (1, 2) and info.bos_token_id == 0
  emb = np.asarray(model.embed.embedding[...], np.float32)
  assert emb.dtype == np.float32 and 0.01 < emb.std() < 0.03  # std 0.02 draws, stored as bf16
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  f32, _ = weights.load(tmp_path, dtype="float32")
  np.testing.assert_array_equal(np.asarray(f32.embed.embedding[...]), emb)  # bf16 -> f32 is exact


# ---------------------------------------------------------------------------------------------- errors


def _config(**kw) -> dict:
  base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2)  # fmt: skip
  return {**base, **kw}


@pytest.mark.parametrize(
  "kw,field",
  [
    (dict(model_type="gpt2"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["sliding_attention"]), "layer_types"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (dict(dtype="float8_e4m3fn"), "dtype"),
  ],
)
def test_unsupported_fields_are_named(kw, field):
  with pytest.raises(ValueError, match=field):
    weights.config_from_hf(_config(**kw))


def test_rope_config_forms():
  old = weights.config_from_hf(_config(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0}))[0]
  new = weights.config_from_hf(_config(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}))[0]
  assert old == new and old.rope == Rope(5e5, RopeScaling("linear", 4.0))
  mistral = weights.config_from_hf(_config(model_type="mistral", sliding_window=4096))[1]
  assert mistral.sliding_window == 4096


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
  model = _model()
  weights.save(model, tmp_path)
  file = tmp_path / "model.safetensors"
  tensors = load_file(file)
  save_file({k: v for k, v in tensors.items() if k != "model.layers.2.mlp.down_proj.weight"}, file)
  with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
    weights.load(tmp_path)
  save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}, file)
  with pytest.raises(ValueError, match=r"does not explain.*o_proj\.bias"):
    weights.load(tmp_path)
  save_file({**tensors, "model.norm.weight": np.ones(31, np.float32)}, file)
  with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(31,\).*\(32,\)"):
    weights.load(tmp_path)
  save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}, file)
  weights.load(tmp_path)  # an old export's RoPE buffer is ignored
  (tmp_path / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    weights.load(tmp_path)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
  with pytest.raises(ValueError, match="learned_sink"):
    weights.save(_model(learned_sink="logit"), tmp_path)
  with pytest.raises(ValueError, match="qkv_bias"):
    weights.save(_model(qkv_bias=True), tmp_path, model_type="llama")


# ------------------------------------------------------------------------------------------------ rope


def _llama3_by_hand(head_dim, theta, factor, low, high, old_len):
  """Llama 3.1's published recipe, written as its three cases."""
  out = []
  for i in range(0, head_dim, 2):
    f = 1.0 / theta ** (i / head_dim)
    wavelength = 2 * math.pi / f
    if wavelength < old_len / high:
      out.append(f)
    elif wavelength > old_len / low:
      out.append(f / factor)
    else:
      smooth = (old_len / wavelength - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.asarray(out)


def test_llama3_rope_scaling_matches_the_recipe():
  h, theta = 64, 500_000.0
  rope = Rope(theta, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
  inv = _llama3_by_hand(h, theta, 8.0, 1.0, 4.0, 8192)
  assert (inv < 1.0 / theta ** (np.arange(0, h, 2) / h)).any()  # the test covers the scaled band
  pos = np.array([0, 1, 7, 1000, 123_456])
  cos, sin = (np.asarray(x) for x in rope_cos_sin(pos, h, rope))
  angles = pos[:, None] * inv[None]
  np.testing.assert_allclose(cos, np.cos(angles), atol=2e-6)
  np.testing.assert_allclose(sin, np.sin(angles), atol=2e-6)
  lin = np.asarray(rope_cos_sin(pos, h, Rope(theta, RopeScaling("linear", 4.0)))[0])
  plain = 1.0 / theta ** (np.arange(0, h, 2) / h)
  np.testing.assert_allclose(lin, np.cos(pos[:, None] / 4.0 * plain[None]), atol=2e-6)


def test_rope_scaling_validation():
  with pytest.raises(ValueError, match="kind"):
    RopeScaling("yarn", 2.0)
  with pytest.raises(ValueError, match="low_freq_factor"):
    RopeScaling("llama3", 8.0, 4.0, 1.0)
  with pytest.raises(TypeError, match="rope_scaling"):
    TransformerConfig(vocab_size=4, num_layers=1, num_heads=1, embed_dim=8, mlp_dim=8, rope_scaling=("linear", 2))


# ------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  text = pydoc_data.topics.topics
  return weights.train_bpe(list(text.values())[:60], tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_tokenizer_round_trip_and_bos(tokenizer):
  text = "def stream(x):\n    return x  # naïve — ünïcode ✓"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids[0] == tokenizer.bos_id == 0 and tokenizer.eos_id == 1
  assert len(ids) < len(text.encode())  # merges learned from the corpus
  assert tokenizer.decode(ids) == text
  assert tokenizer.encode(text, add_special_tokens=False).tolist() == ids[1:].tolist()
  assert tokenizer.vocab_size == 400


def test_stream_decoder_equals_decode(tokenizer):
  text = "Streaming ✓ text — déjà vu, 日本語"
  ids = tokenizer.encode(text, add_special_tokens=False)
  dec = tokenizer.stream()
  pieces = [dec.step(i) for i in ids]
  assert "".join(pieces) == text
  assert any(p == "" for p in pieces)  # a multi-byte character split across tokens is held back
  assert dec.flush() == ""
  cut = tokenizer.encode("✓", add_special_tokens=False)
  assert len(cut) > 1 and dec.step(cut[0]) == ""  # half a character ...
  assert dec.flush() == "\ufffd"  # ... is replaced at the end of the stream


def test_tokenizer_reads_ids_from_a_checkpoint_folder(tmp_path, tokenizer):
  tokenizer.save(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [7, 8]}))
  tok = weights.Tokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id) == (5, 7)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    weights.Tokenizer(tmp_path / "nowhere")


def test_bf16_tensors_are_stored_as_bf16(tmp_path):
  weights.save(_model(param_dtype="bfloat16", dtype="bfloat16"), tmp_path)
  t = load_file(tmp_path / "model.safetensors")
  assert all(v.dtype == ml_dtypes.bfloat16 for v in t.values())
