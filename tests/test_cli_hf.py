"""The command line on local Hugging Face checkpoints: ``jstream export``, ``eval-stream --hf``, ``generate --hf``."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jstream
from jstream import cli, weights
from jstream.config import TransformerConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = "Streams of text, chunk by chunk: bounded memory, constant time per chunk. " * 6


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  return tmp_path


def _offline_ppl(model, ids: np.ndarray) -> float:
  """Perplexity of ``ids`` under one offline forward (every token after the first predicted)."""
  logits = np.asarray(model.forward(jnp.asarray(ids[None])), np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return float(np.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]])))


def test_export_a_trained_run_then_eval_stream_hf(in_tmp):
  from jstream.train import load_config, load_model

  cfg = f"{ROOT}/configs/lm_tiny.py:quick,steps=2,workdir=run"
  assert cli.main(["train", "--config", cfg, "--no-progress"]) == 0
  assert cli.main(["export", "--workdir", "run", "--out", "hf"]) == 0
  trained, _ = load_model(load_config(cfg))
  exported, info = weights.load(in_tmp / "hf")
  tokens = jnp.asarray(np.frombuffer(b"export me, exactly", np.uint8)[None].astype(np.int32))
  np.testing.assert_array_equal(np.asarray(exported.forward(tokens)), np.asarray(trained.forward(tokens)))
  tok = weights.Tokenizer(in_tmp / "hf")
  assert tok.encode(TEXT).tolist() == list(TEXT.encode())  # byte ids: the model's own vocabulary
  (in_tmp / "text.txt").write_text(TEXT)
  args = ["eval-stream", "--hf", "hf", "--text", "text.txt", "--policy", "dense:512", "--tokens", "300"]
  assert cli.main([*args, "--chunk", "32", "--out", "ev"]) == 0
  res = json.loads((in_tmp / "ev" / "results.json").read_text())
  assert res["tokens"] == 300 and res["model_type"] == info.model_type == "llama"
  want = _offline_ppl(exported, np.asarray(list(TEXT.encode()[:300]), np.int32))
  assert res["ppl"] == pytest.approx(want, rel=1e-4)


@pytest.fixture
def checkpoint(tmp_path):
  cfg = TransformerConfig(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64)
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(3))
  weights.save(model, tmp_path / "ck")
  weights.byte_tokenizer(tmp_path / "ck")
  return model, tmp_path / "ck"


def _greedy(model, prompt: list[int], n: int) -> list[int]:
  ids = list(prompt)
  for _ in range(n):  # offline forward of the whole sequence at every step: no cache involved
    ids.append(int(np.argmax(np.asarray(model.forward(jnp.asarray([ids], jnp.int32)))[0, -1])))
  return ids[len(prompt) :]


def _text(ids: list[int]) -> str:
  """The text of byte ids, invalid or incomplete characters replaced."""
  return bytes(ids).decode("utf-8", errors="replace")


def test_generate_greedy_prints_the_greedy_continuation(checkpoint, capsys):
  model, path = checkpoint
  prompt = "abc"
  want = _greedy(model, list(prompt.encode()), 10)
  args = ["generate", "--hf", str(path), "--prompt", prompt, "--temperature", "0", "--block", "4"]
  assert cli.main([*args, "--max-new-tokens", "10", "--policy", "dense:64", "--ignore-eos"]) == 0
  out = capsys.readouterr()
  assert out.out == prompt + _text(want) + "\n"
  assert "10 new tokens" in out.err
  # With the 4th greedy token as EOS, generation stops before it.
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "eos_token_id": want[3]}))
  if want[3] not in want[:3]:
    assert cli.main([*args, "--max-new-tokens", "10", "--policy", "dense:64"]) == 0
    assert capsys.readouterr().out == prompt + _text(want[:3]) + "\n"


def test_hf_commands_report_bad_input_in_one_line(checkpoint, tmp_path, capsys):
  _, path = checkpoint
  assert cli.main(["eval-stream", "--hf", str(path)]) == 2
  assert "needs --text" in capsys.readouterr().err
  assert cli.main(["generate", "--hf", str(tmp_path), "--prompt", "x"]) == 2
  assert "config.json" in capsys.readouterr().err
  (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), "mlp_bias": True}))
  assert cli.main(["generate", "--hf", str(path), "--prompt", "x"]) == 2
  assert "mlp_bias" in capsys.readouterr().err
