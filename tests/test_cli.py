"""The command line and the experiments: `jstream --help`, the demo in --quick mode, train + eval-stream,
the streaming benchmark's smoke mode, and clear errors for bad input."""

import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from jstream import cache as C
from jstream import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  return tmp_path


def test_help_lists_the_subcommands():
  out = subprocess.run([sys.executable, "-m", "jstream.cli", "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0
  for name in ("demo", "train", "eval-stream", "bench"):
    assert name in out.stdout


def test_demo_quick_end_to_end(in_tmp):
  assert cli.main(["demo", "--quick", "--no-progress", "--out", "demo"]) == 0
  res = json.loads((in_tmp / "demo" / "results.json").read_text())
  assert set(res["models"]) == {"plain", "sink token"}
  policies = {r["policy"] for r in res["rows"]}
  assert any(p.startswith("dense") for p in policies) and any(p.startswith("recompute") for p in policies)
  assert {p for p in policies if "sinks" in p} >= {f"{s} sinks + window 32, cache-relative" for s in (1, 2, 4, 8)}
  for row in res["rows"]:
    assert row["ppl"] > 1 and row["tokens_per_s"] > 0 and row["curve"] and row["latency"]
  assert (in_tmp / "demo" / "perplexity.png").stat().st_size > 0 and (in_tmp / "demo" / "latency.png").exists()
  # (a rerun resumes from these checkpoints: the training loop's resume, tested in test_train.py)


def test_bench_needle_quick(in_tmp):
  """The needle benchmark end to end (its quick model trains in seconds)."""
  assert cli.main(["bench", "needle", "--quick", "--no-progress", "--out", "needle"]) == 0
  res = json.loads((in_tmp / "needle" / "results.json").read_text())
  assert {r["policy"] for r in res["rows"]} == {"dense", "sinkwindow", "h2o", "snapkv", "agenorm"}
  assert all(0 <= r["recall"] <= 1 and r["value_bits"] > 0 for r in res["rows"])
  assert all("tokens_per_s" in r for r in res["rows"] if r["policy"] != "dense")
  assert (in_tmp / "needle" / "recall.png").stat().st_size > 0
  assert [r["period"] for r in res["copy_probe"]] == [16, 32, 48]


def test_needle_copy_probe_scores_the_repeats():
  """``bench_needle.copy_probe``: bits per byte over a repeated string's first occurrence and its repeats, equal to
  the same strings streamed through a dense cache in chunks (``rollout.stream_nll``)."""
  import numpy as np

  from conftest import tiny_model
  from experiments import bench_needle as B
  from jstream import cache as C
  from jstream import rollout
  from jstream.data.text import VALUE_CHARS

  model = tiny_model(seed=3, vocab_size=256)
  got = B.copy_probe(model, periods=(8, 12), length=40, seed=5)
  rng = np.random.default_rng(5)
  rows = np.stack([np.resize(rng.choice(VALUE_CHARS, p), 40) for p in (8, 12)]).astype(np.int32)
  nll = np.asarray(rollout.stream_nll(model, rows, C.Dense(40), chunk_size=8)) / np.log(2)  # nll[:, i]: byte i
  for r, row in zip(got, nll):
    p = r["period"]
    np.testing.assert_allclose(r["first_bits"], row[1:p].mean(), rtol=1e-4)
    np.testing.assert_allclose(r["repeat_bits"], row[p:].mean(), rtol=1e-4)


def test_memory_sweep_store_holds_every_frame_or_the_latest_store_frames():
  """``bench_video_qa.memory_policies``: the retrieval store holds the stream's frames (one block a frame) unless
  ``--store-frames`` bounds it (a ring of the latest frames: what keeps the per-frame cost flat); bad input."""
  from experiments import bench_video_qa as B
  from jstream import cache as C

  text = C.SinkWindow(4, 60)
  assert B.memory_policies(64, text, 16, 1000)["retrieval"].store_blocks == 1000
  bounded = B.memory_policies(64, text, 16, 1000, store_frames=300)
  assert bounded["retrieval"].store_blocks == 300 and bounded["retrieval"].top_k == 2
  with pytest.raises(ValueError, match="store_frames must be >= 0"):
    B.memory_policies(64, text, 16, 1000, store_frames=-1)


def test_a_run_is_evaluated_under_its_eval_window_by_default():
  """``VideoTask.eval_window``: the window of the benchmark's and the show command's policies when ``--window`` is
  not given (``bench_video_qa.eval_window``): the ``midstream`` flag's 128 tokens, 256 for a run without one. It
  changes no training: a checkpoint written under another value is the same run, while a training field is not
  (``checkpoint._differences``); a negative value is refused."""
  import dataclasses

  from experiments import bench_video_qa as B
  from jstream.train import VideoTask
  from jstream.train.checkpoint import _differences

  plain, mid = B.run_config(False, None, "long"), B.run_config(False, None, "long,midstream")
  assert (B.eval_window(plain), B.eval_window(mid)) == (256, 128)
  saved = json.loads(dataclasses.replace(mid, video=dataclasses.replace(mid.video, eval_window=0)).to_json())
  assert _differences(json.loads(mid.to_json()), saved) == []
  other = dataclasses.replace(mid, video=dataclasses.replace(mid.video, clip_frames=12))
  assert _differences(json.loads(other.to_json()), saved) == ["video.clip_frames: checkpoint 24 vs config 12"]
  with pytest.raises(ValueError, match="eval_window must be >= 0"):
    VideoTask(eval_window=-1)


def test_bench_eviction_times_every_policy_at_the_same_capacity(in_tmp):
  """``experiments.bench_eviction``: every policy's cache holds the requested tokens per layer and kv head (the
  comparison is at equal capacity); the quick run times each against ``SinkWindow``; bad input is refused."""
  from flax import nnx

  from experiments import bench_eviction as B
  from jstream import presets
  from jstream.models.lm import StreamingTransformer
  from jstream.train import load_config

  model = StreamingTransformer(presets.quick(load_config(f"{ROOT}/configs/lm_tiny.py")).model, rngs=nnx.Rngs(0))
  for name in B.POLICIES:
    for positions in ("cache_relative", "absolute"):
      policy = B.make_policy(name, 48, positions)
      assert model.init_cache(policy, 1).capacity == 48 and policy.positions == positions
  with pytest.raises(ValueError, match="capacity must be >= 10"):
    B.make_policy("h2o", 8, "cache_relative")
  with pytest.raises(ValueError, match="unknown policy"):
    B.make_policy("lru", 48, "cache_relative")
  assert B.main(["--quick", "--out", "bev"]) == 0
  res = json.loads((in_tmp / "bev" / "results.json").read_text())
  assert [(r["batch"], r["policy"]) for r in res["rows"]] == [(2, p) for p in B.POLICIES]
  for r in res["rows"]:
    assert 0 < r["ms_per_token"] <= r["median_ms_per_token"] and r["first_call_s"] > 0
    assert r["vs_sinkwindow"] == pytest.approx(r["ms_per_token"] / res["rows"][0]["ms_per_token"])


def test_bench_import_quick(in_tmp):
  assert cli.main(["bench", "import", "--quick", "--out", "imp"]) == 0
  res = json.loads((in_tmp / "imp" / "results.json").read_text())
  assert [r["layout"] for r in res["rows"]] == ["stacked", "per_layer"] and res["parameters"] > 0
  for r in res["rows"]:
    assert r["finite"] and r["seconds"] > 0 and r["param_mib"] == pytest.approx(res["checkpoint_mib"], rel=1e-3)
    assert r["peak_rss_mib"] >= r["rss_base_mib"] + r["param_mib"] * 0.9  # the child's own peak holds the model
  assert not (in_tmp / "imp" / "checkpoint").exists()  # removed unless --keep


def test_bench_speculative_quick(in_tmp):
  """The benchmark end to end on the quick runs, with the models unrolled (one set of weights per layer), the
  draft distilled on its own samples among the drafts, each time the fastest of 2 calls."""
  cmd = ["bench", "speculative", "--quick", "--no-progress", "--out", "spec", "--layers", "unrolled"]
  with pytest.raises(SystemExit):
    cli.main([*cmd, "--repeats", "0"])
  assert cli.main([*cmd, "--drafts", "draft,onpolicy,staged,heads", "--repeats", "2", "--stat", "min"]) == 0
  res = json.loads((in_tmp / "spec" / "results.json").read_text())
  assert [r["draft"] for r in res["rows"]] == ["draft", "onpolicy", "staged", "heads"]
  assert res["timing"] == {"repeats": 2, "stat": "min"}
  for row in res["rows"]:
    a = row["acceptance"]
    assert row["k"] == 2 and row["batch"] == 2 and 0 <= a <= 1 and row["accepted_share"] <= a
    assert 1 <= row["tokens_per_call"] <= 3 and row["speedup"] > 0 and row["verify_cost"] > 0
    assert row["formula_tokens_per_call"] == pytest.approx(1 + a + a**2)
  draft, onpolicy, staged, heads = res["rows"]
  assert draft["cost_ratio"] > 0 and draft["draft_calls_per_round"] == 3 and heads["draft_calls_per_round"] == 0
  assert onpolicy["cost_ratio"] > 0 and onpolicy["draft_calls_per_round"] == 3
  assert staged["draft_calls_per_round"] >= 2  # at least one inner round and the call that caches the last draft
  steps = {m: r["steps"] for m, r in res["models"].items()}
  assert steps == {"target": 10, "draft": 10, "onpolicy": 10, "inner": 10, "heads": 10}
  assert res["layers"] == "unrolled"
  assert {m: r["scan_layers"] for m, r in res["models"].items()} == {
    "target": False,
    "draft": False,
    "onpolicy": False,
    "inner": False,
    "heads": None,
  }
  assert (in_tmp / "spec" / "speculative.png").exists()
  # experiments/draft_acceptance.py on the same quick runs: acceptance of each draft over rows of text
  from experiments import draft_acceptance

  assert draft_acceptance.main(["--quick", "--drafts", "draft,onpolicy", "--out", "acc"]) == 0
  acc = json.loads((in_tmp / "acc" / "acceptance.json").read_text())
  assert [(r["text"][:6], r["draft"]) for r in acc["rows"]] == [
    (t, d) for t in ("target", "target", "corpus") for d in ("draft", "onpolicy")
  ]
  assert all(0 < r["acceptance"] <= 1 and r["standard_error"] >= 0 for r in acc["rows"])
  greedy = [r["acceptance"] * 4 * 16 for r in acc["rows"] if r["temperature"] == 0]  # matches of 4 x 16 positions
  np.testing.assert_allclose(greedy, np.round(greedy), atol=1e-4)
  rng = np.random.default_rng(0)
  t, q = rng.normal(size=(2, 3, 5)) * 2
  p_, q_ = (np.exp(x / 0.7) / np.exp(x / 0.7).sum(-1, keepdims=True) for x in (t, q))
  np.testing.assert_allclose(draft_acceptance.sum_min(t, q, 0.7), np.minimum(p_, q_).sum(-1), rtol=1e-5)


def test_bench_speculative_layout_costs_quick(in_tmp):
  """--layout-costs: call costs of both layer layouts, and the cost model's speed-up for an earlier run's draft-model
  acceptance rates (only rows of the timed batch, draft model, K timed), by the formula written out here."""
  rows = [
    dict(draft="draft", batch=2, k=2, temperature=1.0, acceptance=0.6),
    dict(draft="draft", batch=2, k=2, temperature=0.0, acceptance=0.9),
    dict(draft="heads", batch=2, k=2, temperature=1.0, acceptance=0.5),  # not the draft model
    dict(draft="draft", batch=8, k=2, temperature=1.0, acceptance=0.7),  # another batch
  ]
  (in_tmp / "earlier.json").write_text(json.dumps({"rows": rows}))
  cmd = ["bench", "speculative", "--quick", "--layout-costs", "--alpha-from", "earlier.json", "--out", "lc"]
  assert cli.main(cmd) == 0
  res = json.loads((in_tmp / "lc" / "layout_costs.json").read_text())
  assert [(r["batch"], r["layers"]) for r in res["rows"]] == [(2, "scan"), (2, "unrolled")]
  for r in res["rows"]:
    c, v = r["cost_ratio"], r["verify_cost"]["2"]
    assert r["target_ms"] > 0 and c > 0 and v > 0
    assert [(p["temperature"], p["acceptance"]) for p in r["predicted"]] == [(1.0, 0.6), (0.0, 0.9)]
    for p in r["predicted"]:
      a = p["acceptance"]
      assert p["speedup"] == pytest.approx((1 + a + a * a) / (2 * c + v))
  scan, unrolled = res["rows"]
  assert res["scan_over_unrolled"]["2"] == pytest.approx(scan["target_ms"] / unrolled["target_ms"])


def test_bench_video_gen_quick(in_tmp):
  """The video generation benchmark end to end on the quick model: rollouts under both policies, the drift
  scores, the recompute comparison, the plot and the GIF."""
  assert cli.main(["bench", "video-gen", "--quick", "--no-progress", "--out", "gen"]) == 0
  res = json.loads((in_tmp / "gen" / "results.json").read_text())
  assert [r["policy"] for r in res["rows"]] == ["window", "sinks+window"] and res["model_step"] == 6
  for r in res["rows"]:
    assert r["frames"] == 12 and len(r["curves"]["identity"]) == 12 and r["ms_per_frame"] > 0
    assert all(0 <= v["identity"] <= 1 and 0 <= v["count"] <= 1 and v["ink"] > 0 for v in r["summary"].values())
  rec = res["recompute"]
  modes = ("rolling", "recompute", "no_cache")
  assert all(rec[f"{m}_ms_per_chunk"] > 0 and 0 <= rec[f"{m}_identity"] <= 1 for m in modes)
  assert rec["speedup_no_cache"] == pytest.approx(rec["no_cache_ms_per_chunk"] / rec["rolling_ms_per_chunk"])
  assert rec["recompute_ms_per_chunk"] > 0 and 0 <= res["classifier_test_accuracy"] <= 1
  from PIL import Image

  with Image.open(in_tmp / "gen" / "samples.gif") as gif:
    assert gif.n_frames == 12 and gif.size == (4 * 8, 2 * 4 * 8)  # two policies stacked, 4x upscaled 8x8 frames
  assert (in_tmp / "gen" / "drift.png").stat().st_size > 0


def test_bench_video_gen_cartpole_quick(in_tmp):
  """Action-conditioned generation on CartPole end to end (quick model): rollouts under random actions, and the
  comparison with the real simulator (PSNR / SSIM of the model and of holding the last real frame)."""
  args = ["bench", "video-gen", "--quick", "--flags", "cartpole", "--no-progress", "--out", "cp", "--horizon", "6"]
  assert cli.main(args) == 0
  res = json.loads((in_tmp / "cp" / "results.json").read_text())
  assert [r["policy"] for r in res["rows"]] == ["window", "sinks+window"] and res["model_step"] == 6
  ev = res["cartpole"]
  assert ev["context"] == 2 and ev["horizon"] == 6 and set(ev["curves"]) == {"model", "hold_last_frame"}
  assert all(len(c["psnr"]) == len(c["ssim"]) == 6 for c in ev["curves"].values())
  assert list(ev["summary"]) == ["0-2", "2-6"]  # the training clip's 4 frames: 2 context + 2 generated, then beyond
  assert (in_tmp / "cp" / "cartpole.png").stat().st_size > 0


def test_blob_count_counts_digits_not_specks():
  import numpy as np

  from experiments.bench_video_gen import blob_count

  frame = np.zeros((16, 16), np.float32)
  assert blob_count(frame) == 0
  frame[2:6, 2:5] = 0.8  # one digit-like blob
  frame[3, 5] = 0.4  # touching it diagonally or sideways: the same blob
  assert blob_count(frame) == 1
  frame[10:13, 10:12] = 0.5  # a second blob
  frame[0, 15] = frame[1, 15] = 0.9  # a 2-pixel speck: too small to count
  frame[8, 0] = 0.2  # below the threshold
  assert blob_count(frame) == 2


def test_image_metrics_are_psnr_and_ssim():
  import numpy as np

  from experiments.bench_video_gen import image_metrics

  rng = np.random.default_rng(0)
  real = rng.integers(0, 256, (2, 3, 16, 16)).astype(np.uint8)
  noisy = np.clip(real.astype(int) + rng.integers(-20, 21, real.shape), 0, 255).astype(np.uint8)
  m = image_metrics(noisy, real)
  mse = ((noisy.astype(float) - real.astype(float)) / 255.0) ** 2
  want = (10 * np.log10(1.0 / mse.mean(axis=(2, 3)))).mean(0)
  np.testing.assert_allclose(m["psnr"], want, rtol=1e-4)
  same = image_metrics(real, real)
  np.testing.assert_allclose(same["psnr"], 60.0)  # identical frames: capped
  np.testing.assert_allclose(same["ssim"], 1.0, atol=1e-5)
  assert all(s < 0.99 for s in m["ssim"])


def test_train_then_eval_stream(in_tmp):
  cfg = f"{ROOT}/configs/lm_tiny.py:quick,steps=4,workdir=run"
  assert cli.main(["train", "--config", cfg, "--no-progress"]) == 0
  args = ["eval-stream", "--config", cfg, "--policy", "sinkwindow:2,16", "--tokens", "500", "--out", "ev"]
  assert cli.main(args) == 0
  res = json.loads((in_tmp / "ev" / "results.json").read_text())
  assert res["tokens"] == 500 and res["checkpoint_step"] == 4 and res["ppl"] > 1


def test_bad_input_gets_one_clear_line(in_tmp, capsys):
  assert cli.main(["train", "--config", f"{ROOT}/configs/lm_tiny.py:stpes=3"]) == 2
  assert "unknown config key 'stpes'" in capsys.readouterr().err
  assert cli.main(["train", "--config", "nope.py"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["eval-stream", "--config", f"{ROOT}/configs/lm_tiny.py:quick,workdir=empty"]) == 2
  assert "no checkpoint" in capsys.readouterr().err
  assert cli.main(["demo", "--config", f"{ROOT}/configs/streaming_llm.py:quick,nosuchkey=1"]) == 2
  assert "unknown config key 'nosuchkey'" in capsys.readouterr().err
  assert cli.main(["demo", "--config", "missing.py"]) == 2
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown policy"):
    cli.parse_policy("ring:3", "absolute")
  with pytest.raises(ValueError, match="takes 2 integer"):
    cli.parse_policy("sinkwindow:4", "absolute")
  assert cli.parse_policy("sinkwindow:4,64", "cache_relative") == C.SinkWindow(4, 64, positions="cache_relative")
  assert cli.parse_policy("h2o:64,32,4", "absolute") == C.H2O(64, 32, 4)
  assert cli.parse_policy("snapkv:64,32,4", "cache_relative") == C.SnapKV(64, 32, 4, positions="cache_relative")
  assert cli.parse_policy("agenorm:64,32,0", "absolute") == C.AgeNormalized(64, 32, 0)


def test_bench_stream_smoke(in_tmp):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [
    sys.executable,
    "-m",
    "jstream.cli",
    "bench",
    "stream",
    "--quick",
    "--tiny",
    "--out",
    "bench",
    "--no-compare-scan",
    "--positions",
    "1000",
    "--modes",
    "absolute",
    "--steps",
    "16",
    "--rounds",
    "1",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=in_tmp, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  res = json.loads((in_tmp / "bench" / "results.json").read_text())
  names = {r["policy"] for r in res["rows"]}
  assert any(n.startswith("SinkWindow") for n in names) and "Dense" in names
  assert res["floor"]["copy_bandwidth_gbs"] > 0 and (in_tmp / "bench" / "latency.png").exists()
  sink_rows = [r for r in res["rows"] if r["policy"].startswith("SinkWindow")]
  assert all(r["decode_over_floor"] > 0 and r["decode_over_read"] > 0 for r in sink_rows)
  assert {(r["model"], r["batch"]) for r in sink_rows} >= {("tiny", 1), ("tiny_medium", 1), ("tiny", 8)}
  assert len(res["prefill"]) == 3 and all(p["tokens_per_s"] > 0 for p in res["prefill"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_runs_in_a_jupyter_kernel(name, tmp_path):
  """Every notebook runs top to bottom in a real Jupyter kernel (nbclient, small settings) and shows streaming ==
  offline: it prints ``max |streamed - offline| = X``, which must be small. Outputs are stripped in git."""
  import nbclient
  import nbformat

  raw = json.loads((ROOT / "notebooks" / name).read_text())
  assert all(c.get("id") for c in raw["cells"]), f"{name}: every cell needs an id (nbformat 4.5)"
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: strip its outputs"
  env_keys = {"JSTREAM_NOTEBOOK_QUICK": "1", "JAX_PLATFORMS": "cpu"}
  old = {k: os.environ.get(k) for k in env_keys}
  os.environ.update(env_keys)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  found = re.findall(r"max \|streamed - offline\| = ([0-9.e+-]+)", text)
  assert found, f"{name} must compare streamed with offline logits"
  assert all(float(x) < 1e-4 for x in found), found


def test_commands_come_from_entry_points_and_load_lazily():
  """demo and the benchmarks are registered entry points (pyproject.toml), listed by --help without importing the
  application; an unknown benchmark is one clear error that lists the registered ones."""
  assert set(cli.registered(cli.COMMANDS)) >= {"demo"}
  assert set(cli.registered(cli.BENCHMARKS)) >= {"stream", "attention"}
  script = (
    "import contextlib, io, json, sys\n"
    "from jstream import cli\n"
    "out = io.StringIO()\n"
    "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
    "  cli.main(['--help'])\n"
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('experiments', 'configs'))))\n"
    "print(out.getvalue())\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  loaded, _, shown = out.stdout.partition("\n")
  # Reading a module's docstring (find_spec) imports its package, the empty `experiments/__init__.py`, no more.
  assert not [m for m in json.loads(loaded) if m != "experiments"], loaded
  assert "StreamingLLM's attention-sink ablations" in shown and "Per-token decode latency" in shown


def test_bench_unknown_name_lists_the_registered_ones(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "nope"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "unknown benchmark 'nope'; one of: " in err
  assert set(err.split("one of: ")[1].strip().split(", ")) >= {"attention", "stream", "video-qa", "needle"}
  assert cli.main(["bench", "--help"]) == 0
  assert "stream" in capsys.readouterr().out


def test_bench_video_qa_and_show_smoke(in_tmp):
  """In this process (``jstream.cli.main``): the second and third commands reuse the first one's compiled
  programs, where separate processes would compile them again."""
  cmd = ["bench", "video-qa", "--quick", "--out", "bench", "--workdir", "run", "--no-progress"]
  assert cli.main(cmd) == 0
  res = json.loads((in_tmp / "bench" / "results.json").read_text())
  rows = [r for r in res["rows"] if "scores" in r]
  assert {r["policy"] for r in rows} == {"dense", "window", "sinks+window", "sinks+window, cache_relative"}
  for r in rows:
    assert r["ms_per_frame"] > 0 and r["cache_mib"] > 0 and "proactive" in r["scores"]
    assert all(0 <= v["accuracy"] <= 1 for t, v in r["scores"].items() if t != "proactive")
    assert set(r["chance"]) == {t for t in r["scores"] if t != "proactive"}
  assert (in_tmp / "bench" / "accuracy.png").exists() and res["model_step"] == 6
  assert [r["batch"] for r in res["speed"]] == [1, 2] and all(r["frames_per_s"] > 0 for r in res["speed"])
  # the memory and token drop sweeps (issue 11) on the same model: window, retrieval, compressed and scored
  # memories at one budget; no drop and a drop at one threshold
  sweep = ["bench", "video-qa", "--quick", "--out", "mem", "--workdir", "run", "--memory", "16", "--drop", "0.9"]
  sweep += ["--flat", "20,40", "--rounds", "2"]  # and the latency of calls continuing 20- and 40-tick streams
  sweep += ["--methods", "window,sinks,retrieval,offload,compressed,h2o,agenorm,tova"]  # offload: asked for only
  assert cli.main([*sweep, "--no-progress"]) == 0
  mem_res = json.loads((in_tmp / "mem" / "results.json").read_text())
  mem = mem_res["memory_rows"]
  assert [r["method"] for r in mem] == [
    "window",
    "sinks",
    "retrieval",
    "offload",
    "compressed",
    "h2o",
    "agenorm",
    "tova",
  ]
  retrieval, offload = mem[2], mem[3]  # the same store, in host memory: the same answers, less device memory
  assert offload["scores"] == retrieval["scores"] and retrieval["store_mib"] > 0
  # in device memory: the local cache and the retrieved segment (the cache less its store and block summaries) ...
  assert offload["device_mib"] == pytest.approx(retrieval["cache_mib"] - retrieval["index_mib"])
  # ... and, in device memory, the store too (the copy of the retrieved blocks beside it)
  assert retrieval["device_mib"] > retrieval["cache_mib"] + retrieval["store_mib"] > offload["device_mib"]
  assert {r["budget"] for r in mem} == {16}
  held = [r["memory_frames"] for r in mem if "memory_frames" in r]  # the scored memories' entries, by frame
  assert len(held) == 3 and all(0 <= h["q10"] <= h["median"] <= h["q90"] < 20 and h["entries"] > 0 for h in held)
  assert all(0 < r["kept_share"] <= 1 and r["ms_per_frame"] > 0 for r in mem)
  assert len({r["kept_share"] for r in mem}) == 1  # equal budgets: every method keeps as many vision tokens
  assert (
    next(r for r in mem if r["method"] == "retrieval")["store_mib"] > 0 and (in_tmp / "mem" / "memory.png").exists()
  )
  flat = mem_res["flat_rows"]
  assert [r["frames"] for r in flat] == [20, 40]
  for mode in ("speaking", "silent"):
    assert all(len(r[mode]["ms_per_tick"]) == 2 and r[mode]["ms_per_tick_min"] > 0 for r in flat)
  assert all(0 <= r["speaking_ticks"] <= 10 for r in flat)
  drop = mem_res["drop_rows"]  # and the token drop sweep: no drop, then threshold 0.9
  assert [r["threshold"] for r in drop] == [None, 0.9] and drop[0]["dropped"] == 0 and 0 < drop[1]["dropped"] < 1
  # the show command reuses the trained model and draws one stream
  show = ["video-qa", "show", "--quick", "--workdir", "run", "--out", "show", "--frames", "12", "--no-progress"]
  assert cli.main(show) == 0
  from PIL import Image

  with Image.open(in_tmp / "show" / "stream.gif") as gif:
    assert gif.n_frames == 12 and gif.size[0] > 256
  lines = (in_tmp / "show" / "transcript.txt").read_text().splitlines()
  assert len(lines) == 12 and lines[3].startswith("frame 3")
  # the proactive misses' breakdown on the same model: one row per event that score counts, binned by occlusion
  from experiments import proactive_misses

  assert proactive_misses.main(["--quick", "--workdir", "run", "--out", "miss"]) == 0
  miss = json.loads((in_tmp / "miss" / "results.json").read_text())
  assert len(miss["events"]) == miss["proactive"]["events"] == sum(b["events"] for b in miss["by_occlusion_at_entry"])
  assert len(miss["events"]) == 2  # one in each of the quick run's two streams of 100 frames
  assert all(len(e["occlusion"]) == 3 and 0 <= e["occlusion"][0] <= 1 for e in miss["events"])


def test_occlusion_is_the_share_of_a_digits_ink_where_another_digit_is_as_bright():
  """``proactive_misses.occlusion`` on hand-made frames of 4x4 digits: A (ink 200, its left column blank) at (0, 0),
  B (255) at (0, 2) and C (100) at (2, 0). B covers 8 of A's 12 ink pixels; C, darker, covers none of them; A covers
  6 of C's 16 (rows 2-3 of its columns 1-3). A second A two columns right of the first covers the first's column 3
  (as bright: the frame's pixel shows either), 4 of 12."""
  from experiments.proactive_misses import occlusion

  images = np.stack([np.full((4, 4), v, np.uint8) for v in (200, 255, 100)])
  images[0, :, 0] = 0
  objects = np.array([[0, 1, 0, 0, 0], [1, 2, 1, 0, 2], [2, 3, 2, 2, 0], [-1] * 5])
  assert occlusion(objects, 0, images, (8, 8)) == pytest.approx(8 / 12)
  assert occlusion(objects, 1, images, (8, 8)) == 0.0  # the brightest: nothing covers it
  assert occlusion(objects, 2, images, (8, 8)) == pytest.approx(6 / 16)
  assert occlusion(objects[[0, 2, 3]], 0, images, (8, 8)) == 0.0  # without B
  assert occlusion(objects, 5, images, (8, 8)) is None  # not drawn
  twins = np.array([[0, 1, 0, 0, 0], [3, 1, 0, 0, 2]])
  assert occlusion(twins, 0, images, (8, 8)) == pytest.approx(4 / 12)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "cartpole"])
def test_video_gen_reproductions_quick(in_tmp, data):
  """The objectives x policies reproduction end to end on the quick runs (trains all three, the teacher first)."""
  assert cli.main(["bench", "video-gen-repro", "--quick", "--no-progress", "--data", data, "--out", "repro"]) == 0
  res = json.loads((in_tmp / "repro" / "results.json").read_text())
  assert list(res["runs"]) == ["diffusion forcing", "teacher forcing", "self forcing"]
  for run in res["runs"].values():
    assert set(run["policies"]) == {"window", "sinks+window", "dense"} and run["model_step"] == 6
  assert (in_tmp / "repro" / "repro.png").stat().st_size > 0


def test_repro_summarize_averages_the_stored_curves_over_the_edges(in_tmp, capsys):
  """``video-gen-repro --summarize``: a results.json's per-frame curves averaged between the given edges (the
  last range clipped to the curve), computed here by hand; nothing is run."""
  from experiments import repro_video_gen

  ident = [i / 10 for i in range(10)]
  curves = {"identity": ident, "ink": [1 - x for x in ident]}
  res = {"train_frames": 4, "runs": {"diffusion forcing": {"policies": {"window": {"curves": curves}}}}}
  (in_tmp / "r.json").write_text(json.dumps(res))
  assert repro_video_gen.main(["--summarize", "r.json", "--edges", "0,1,4,20"]) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith("diffusion forcing  window")
  assert "0-1: identity 0.000, ink 1.000; 1-4: identity 0.200, ink 0.800; 4-10: identity 0.650, ink 0.350" in line


def test_recompute_baseline_recomputes_the_visible_context_each_chunk():
  """bench video-gen's baseline: each chunk runs against a fresh cache of the last ``window - 1`` frames (with their
  actions), by hand: those frames committed one by one to a new cache, then the Euler steps."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from test_video_dit import jitted, make

  from experiments.bench_video_gen import recompute_rollout
  from jstream import flow
  from jstream.models import video_dit as vd

  model = make(num_actions=3)
  cfg, b, window, n, steps = model.config, 2, 3, 4, 2
  rng = jax.random.key(7)
  gen = np.random.default_rng(0)
  context = gen.uniform(0, 1, (b, window - 1, *cfg.frame_size)).astype(np.float32)
  ctx_act = jnp.asarray(gen.integers(0, 3, (b, window - 1)), jnp.int32)
  acts = jnp.asarray(gen.integers(0, 3, (b, n)), jnp.int32)
  got, _ = recompute_rollout(model, context, None, n, steps=steps, window=window, rng=rng, context_actions=ctx_act,
                             actions=acts)  # fmt: skip
  vel, com = jitted(model)
  frames = list(vd.to_model(context[..., None]).transpose(1, 0, 2, 3, 4)[:, :, None])  # [b, 1, H, W, 1] each
  actions = [ctx_act[:, i : i + 1] for i in range(window - 1)]
  times = np.asarray(flow.schedule(steps))
  for i in range(n):
    cache = model.init_cache(vd.rolling_policy(cfg, None, window), b)
    for f, a in zip(frames[-(window - 1) :], actions[-(window - 1) :]):
      cache = com(f, cache, None, a)
    x = jax.random.normal(jax.random.fold_in(rng, i), (b, 1, *cfg.frame_size, 1))
    for t0, t1 in itertools.pairwise(times):
      x = x + (t1 - t0) * vel(x, jnp.full((b, 1), t0), cache, None, acts[:, i : i + 1])
    frames.append(x)
    actions.append(acts[:, i : i + 1])
  want = np.round(np.asarray(vd.from_model(jnp.concatenate(frames[window - 1 :], axis=1)))[..., 0] * 255)
  assert np.max(np.abs(got.astype(int) - want.astype(int))) <= 1  # uint8 rounding
  assert np.mean(got.astype(int) != want.astype(int)) < 0.01


def test_no_cache_baseline_equals_the_per_chunk_recompute_with_guidance():
  """The no-cache baseline (every denoising step one offline block-causal forward over the visible frames) computes
  what the per-chunk recompute does (a fresh cache of them, then the steps), here guided and action-conditioned:
  the offline mask is the cache's."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from test_video_dit import make

  from experiments.bench_video_gen import recompute_rollout

  model = make(num_classes=3, num_actions=3)
  cfg, b, window, n = model.config, 2, 3, 4
  gen = np.random.default_rng(1)
  context = gen.uniform(0, 1, (b, window - 1, *cfg.frame_size)).astype(np.float32)
  ctx_act = jnp.asarray(gen.integers(0, 3, (b, window - 1)), jnp.int32)
  acts = jnp.asarray(gen.integers(0, 3, (b, n)), jnp.int32)
  kw = dict(steps=2, window=window, rng=jax.random.key(3), context_actions=ctx_act, actions=acts, guidance=2.5)
  labels = jnp.array([2, 0])
  chunk, _ = recompute_rollout(model, context, labels, n, **kw)
  step, _ = recompute_rollout(model, context, labels, n, per_step=True, **kw)
  assert np.max(np.abs(chunk.astype(int) - step.astype(int))) <= 1  # uint8 rounding
  unguided, _ = recompute_rollout(model, context, labels, n, **{**kw, "guidance": 1.0})
  assert np.mean(unguided != chunk) > 0.1


def test_repro_set_overrides_only_the_named_run(in_tmp):
  """``video-gen-repro --set 'RUN:key=value,...'``: the overrides reach that run's config (another workdir and step
  count for the self-forcing student) and no other run's; a malformed one is refused before anything runs."""
  from experiments import repro_video_gen as R
  from jstream.train import load_config

  sets = ["self forcing:steps=1200,workdir=runs/sf1200", "teacher forcing:lr=0.0005"]
  config = pathlib.Path(R.__file__).parents[1] / "configs" / "video_gen.py"
  sf = load_config(f"{config}:{R.run_flags('self forcing', False, sets)}")
  assert (sf.steps, sf.workdir, sf.generation.objective) == (1200, "runs/sf1200", "self_forcing")
  tf = load_config(f"{config}:{R.run_flags('teacher forcing', True, sets)}")
  assert (tf.lr, tf.generation.objective, tf.generation.dataset) == (5e-4, "teacher_forcing", "cartpole")
  df = load_config(f"{config}:{R.run_flags('diffusion forcing', False, sets)}")
  assert df == load_config(str(config))
  for bad in ("self forcing", "selfforcing:steps=3", "self forcing:"):
    with pytest.raises(SystemExit, match="expected RUN:key=value"):
      R.main(["--no-train", "--out", "x", "--set", bad])
  assert not (in_tmp / "x").exists()


def test_where_routing_synthetic_ticks_and_smoke(in_tmp):
  """experiments/where_routing.py: each synthetic tick's answers are the labels in its quadrants, recomputed from
  the patch grid (at most one digit per quadrant, ``none`` elsewhere); a quick run writes its table."""
  from experiments import where_routing as W

  d = W.draw(np.random.default_rng(3), 6, 5)
  rows, cols = np.divmod(np.arange(16), 4)
  for i, t in np.ndindex(6, 5):
    for k, (top, left) in enumerate(((True, True), (True, False), (False, True), (False, False))):
      inside = d["labels"][i, t][((rows < 2) == top) & ((cols < 2) == left)]
      digits = inside[inside != W.NONE]
      assert len(digits) <= 1
      assert d["layout"][i, t, k] == (digits[0] if len(digits) else W.NONE)
    assert d["answer"][i, t] == d["layout"][i, t, d["q"][i, t]]
  assert (d["labels"] != W.NONE).any() and (d["answer"] != W.NONE).any()
  out = W.main(["--quick", "--arms", "word_scale_state", "--out", "wr"])
  (run,) = json.loads((in_tmp / "wr" / "results.json").read_text())["runs"]
  assert run["arm"] == "word_scale_state" and run["state_loss"] and run["questions"] == 64 * 2
  assert abs(run["token_scale"] - 128**-0.5) < 1e-6 and out["runs"][0]["digit_accuracy"] == run["digit_accuracy"]


def test_where_routing_noisy_label_words():
  """``with_word_labels``: about the asked share of the patches carries another label's word, each replaced label
  differs from the true one, and the other labels spread over all ten; a noiseless arm's data draws nothing."""
  from experiments import where_routing as W

  d = W.draw(np.random.default_rng(0), 64, 8)
  rng = np.random.default_rng(1)
  noisy = W.with_word_labels(d, 0.2, rng)["word_labels"]
  changed = noisy != d["labels"]
  assert abs(changed.mean() - 0.2) < 0.02  # 8,192 patches: a standard deviation of 0.0044
  assert set(np.unique((noisy[changed] - d["labels"][changed]) % 11)) == set(range(1, 11))  # every other label
  state = np.random.default_rng(1).bit_generator.state
  same = W.with_word_labels(d, 0.0, (r := np.random.default_rng(1)))["word_labels"]
  assert (same == d["labels"]).all() and r.bit_generator.state == state


def test_copy_probe_strings_repeat_and_smoke(in_tmp):
  """experiments/copy_probe.py: each row is one string repeated, of a length in the asked range (the shortest
  period found by brute force), bad ranges are refused, and a few steps run end to end."""
  from experiments import copy_probe as P

  rows = P.repeated_strings(np.random.default_rng(0), 32, 100, 8, (5, 20))
  assert rows.shape == (32, 100) and rows.dtype == np.int32 and 0 <= rows.min() and rows.max() < 8
  periods = [next(p for p in range(1, 100) if (row[p:] == row[:-p]).all()) for row in rows]
  assert 2 <= min(periods) and max(periods) <= 20 and len(set(periods)) > 3  # a string may itself repeat: min < 5
  with pytest.raises(ValueError, match="periods"):
    P.repeated_strings(np.random.default_rng(0), 2, 10, 8, (5, 10))
  assert P.main(["--quick", "--out", "probe"]) == 0
  res = json.loads((in_tmp / "probe" / "results.json").read_text())
  assert [r["step"] for r in res["curve"]] == [2, 4] and all(np.isfinite(r["repeat_nats"]) for r in res["curve"])
