"""jstream.evaluation: the streamed evaluation against an offline forward pass, and the sink-ablation config."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from conftest import library_checks_only, random_tokens, tiny_model
from jstream import cache as C
from jstream.evaluation import SinkAblationConfig, evaluate_stream
from jstream.train import TrainConfig, load_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _offline_nll(model, tokens, window, sinks) -> np.ndarray:
  """``nll[p] = -log p(token p | tokens < p)`` from one offline forward pass under the sink + window mask, in
  float64 NumPy (``nll[0]`` is NaN)."""
  logits = np.asarray(model.forward(tokens[None], window=window, num_sinks=sinks)[0], np.float64)  # [t, v]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = np.full(len(tokens), np.nan)
  nll[1:] = -logp[np.arange(len(tokens) - 1), tokens[1:]]
  return nll


def test_evaluate_stream_matches_the_offline_nll():
  """Segments of 128 over a 300-token stream (the last one padded), chunks of 16, a skipped leading token: every
  perplexity equals the one computed from an offline forward pass with the mask the policy implies."""
  model = tiny_model()
  tokens = np.asarray(random_tokens(1, 300, seed=5)[0])
  res = evaluate_stream(
    model, tokens, C.SinkWindow(2, 32), chunk=16, segment=128, skip=1, bins=4, prefixes=(50, 299, 1000)
  )
  nll = _offline_nll(model, tokens, window=32, sinks=2)
  nll[:2] = np.nan  # token 0 and, with skip=1, token 1
  ppl = lambda x: np.exp(np.nanmean(x))
  assert res["tokens"] == 300
  np.testing.assert_allclose(res["ppl"], ppl(nll), rtol=1e-5)
  np.testing.assert_allclose(res["ppl_last_half"], ppl(nll[150:]), rtol=1e-5)
  assert set(res["ppl_first"]) == {"50", "299"}  # 1000 is longer than the stream
  np.testing.assert_allclose(res["ppl_first"]["50"], ppl(nll[:51]), rtol=1e-5)
  np.testing.assert_allclose(res["ppl_first"]["299"], ppl(nll), rtol=1e-5)
  assert res["curve"][0]["from"] == 3 and res["curve"][-1]["to"] == 300 and 1 <= len(res["curve"]) <= 4
  for part in res["curve"]:
    np.testing.assert_allclose(part["ppl"], ppl(nll[part["from"] : part["to"]]), rtol=1e-5)
  assert [s["from"] for s in res["latency"]] == [0, 128, 256]
  assert all(s["ms_per_token"] > 0 for s in res["latency"]) and res["tokens_per_s"] > 0 and res["compile_s"] >= 0
  cache = model.init_cache(C.SinkWindow(2, 32), 1)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if hasattr(x, "dtype"))
  assert res["cache_mib"] == cache_bytes / 2**20


def test_evaluate_stream_refuses_bad_arguments():
  model = tiny_model()
  tokens = np.asarray(random_tokens(1, 40)[0])
  with pytest.raises(ValueError, match="exceeds the capacity"):
    evaluate_stream(model, tokens, C.Window(8), chunk=16, segment=32)
  with pytest.raises(ValueError, match="1-D stream"):
    evaluate_stream(model, tokens[None], C.Window(8), chunk=8, segment=32)
  with pytest.raises(ValueError, match="1-D stream"):
    evaluate_stream(model, tokens[:3], C.Window(8), chunk=8, segment=32, skip=2)
  with pytest.raises(ValueError, match="segment must be an int >= 1"):
    evaluate_stream(model, tokens, C.Window(8), chunk=8, segment=0)


def test_sink_ablation_config():
  from jstream.config import TransformerConfig

  run = TrainConfig(model=TransformerConfig(vocab_size=10, num_layers=1, num_heads=1, embed_dim=8, mlp_dim=8))
  cfg = SinkAblationConfig(base=run, sink=dataclasses.replace(run, sink_token=True), window=16, sink_counts=(1, 3))
  policies = {name: (policy, n) for name, policy, n in cfg.policies()}
  assert policies["window 16, cache-relative"] == (C.Window(16, positions="cache_relative"), cfg.eval_tokens)
  assert policies["3 sinks + window 16, cache-relative"][0] == C.SinkWindow(3, 16, positions="cache_relative")
  assert policies["1 sinks + window 16, absolute"][0] == C.SinkWindow(1, 16)  # no 4 among the sink counts
  assert policies[f"dense (first {cfg.dense_tokens})"] == (C.Dense(cfg.dense_tokens + 1), cfg.dense_tokens)
  assert policies[f"recompute window 16 (first {cfg.recompute_tokens})"][0] == C.Recompute(16)
  assert len(policies) == 3 + 2 + 2
  with pytest.raises(ValueError, match=r"SinkAblationConfig\.window"):
    dataclasses.replace(cfg, window=0)
  with pytest.raises(ValueError, match="sink_counts"):
    dataclasses.replace(cfg, sink_counts=())
  with library_checks_only(), pytest.raises(TypeError, match=r"SinkAblationConfig\.sink must be a TrainConfig"):
    dataclasses.replace(cfg, sink=run.model)


def test_streaming_llm_config_file():
  """``configs/streaming_llm.py`` returns the library's config; flags and overrides apply; its models are
  ``configs/lm_tiny.py``'s (``jstream.presets``), quick or not."""
  cfg = load_config(f"{CONFIGS}/streaming_llm.py:quick,window=48,base.steps=7", expect=SinkAblationConfig)
  assert cfg.window == 48 and cfg.base.steps == 7 and cfg.sink.steps == 40 and cfg.eval_tokens == 6000
  assert cfg.sink.sink_token and not cfg.base.sink_token
  assert (
    cfg.base.workdir == "runs/streaming_llm_quick/plain" and cfg.sink.workdir == "runs/streaming_llm_quick/sink_token"
  )
  for flags in ("", "quick"):
    lm = load_config(f"{CONFIGS}/lm_tiny.py:{flags}")
    sllm = load_config(f"{CONFIGS}/streaming_llm.py:{flags}", expect=SinkAblationConfig)
    assert sllm.base.model == lm.model.replace(scan_layers=False)
    assert (sllm.base.seq_len, sllm.base.batch_size, sllm.base.lr) == (lm.seq_len, lm.batch_size, lm.lr)
  assert load_config(f"{CONFIGS}/streaming_llm.py:long", expect=SinkAblationConfig).sink.steps == 2000
  with pytest.raises(ValueError, match="unknown flags"):
    load_config(f"{CONFIGS}/streaming_llm.py:fast", expect=SinkAblationConfig)
  with pytest.raises(TypeError, match="must return a SinkAblationConfig"):
    load_config(f"{CONFIGS}/lm_tiny.py", expect=SinkAblationConfig)
