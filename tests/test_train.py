"""Training: exact resume, checkpoint faults, config files and overrides, streaming-aligned examples."""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jstream import TransformerConfig
from jstream.train import (
  CheckpointError,
  ConfigMismatchError,
  DistillTask,
  DraftHeadsTask,
  TrainConfig,
  VideoTask,
  apply_overrides,
  forward_mask,
  forward_masks,
  load_config,
  load_model,
  make_example,
  train,
  train_iterator,
)

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "lm_tiny.py"


@pytest.fixture
def corpus(tmp_path, monkeypatch):
  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  root = tmp_path / "corpus"
  root.mkdir()
  rng = np.random.default_rng(0)
  words = ["stream", "cache", "token", "window", "sink", "attention", "position", "chunk", "model", "query"]
  for i in range(12):
    text = " ".join(rng.choice(words, size=400)) + "\n"
    (root / f"doc{i}.txt").write_text(text)
  return str(root)


def tiny_cfg(workdir, corpus, **kw) -> TrainConfig:
  model = TransformerConfig(vocab_size=257, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64)
  base = dict(model=model, corpus=(corpus,), seq_len=32, batch_size=4, steps=8, warmup_steps=2, log_every=2,
              checkpoint_every=2, workdir=str(workdir))  # fmt: skip
  base.update(kw)
  return TrainConfig(**base)


def _params(model):
  from flax import nnx

  return jax.tree.leaves(nnx.state(model))


@pytest.mark.parametrize("aligned", [{}, {"sink_token": True, "overlap": 8, "train_window": 12, "train_sinks": 2}])
def test_resume_is_bit_exact(tmp_path, corpus, aligned):
  full = train(tiny_cfg(tmp_path / "full", corpus, **aligned), progress=False)
  half = train(tiny_cfg(tmp_path / "half", corpus, **aligned), progress=False, stop_after=4)
  assert half.step == 4
  resumed = train(tiny_cfg(tmp_path / "half", corpus, **aligned), progress=False)
  assert resumed.resumed_from == 4 and resumed.step == 8
  for a, b in zip(_params(full.model), _params(resumed.model)):
    np.testing.assert_array_equal(a, b)
  losses = [m["loss"] for m in resumed.metrics]
  assert len(losses) == 4 and all(np.isfinite(losses))
  reloaded, step = load_model(tiny_cfg(tmp_path / "half", corpus, **aligned))
  assert step == 8
  for a, b in zip(_params(full.model), _params(reloaded)):
    np.testing.assert_array_equal(a, b)


def test_a_resumed_run_logs_each_step_once(tmp_path, corpus):
  """A run stopped after its last checkpoint logged steps past it; resumed from that checkpoint it logs them again,
  and ``metrics.jsonl`` then holds each step once, with the values of an uninterrupted run (exact resume), a
  half-written last line skipped; TensorBoard, read as it reads a purge marker (events at or after the marker's
  step in earlier files are hidden), shows the same."""
  pytest.importorskip("tensorboardX")
  cfg = tiny_cfg(tmp_path / "run", corpus, steps=6, log_every=1)
  first = [r["loss"] for r in train(cfg, progress=False).metrics]
  assert len(first) == 6
  for step in (4, 6):  # only the checkpoint of step 2 survived the "crash"
    shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step))
  with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
    f.write('{"step": 7, "lo')  # killed while writing
  resumed = train(cfg, progress=False)
  assert resumed.resumed_from == 2
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal([r["loss"] for r in rows], first)
  assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
  shown: list[tuple[int, float]] = []  # the loss curve TensorBoard draws, points in file order
  for path in sorted((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")):
    for event in _events(path):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        shown = [(k, v) for k, v in shown if k < event.step]
      shown += [(event.step, v.simple_value) for v in event.summary.value if v.tag == "loss"]
  assert [k for k, _ in shown] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([v for _, v in shown], first, rtol=1e-6)


def test_truncated_checkpoint_falls_back_with_a_warning(tmp_path, corpus):
  cfg = tiny_cfg(tmp_path / "run", corpus, steps=6)
  train(cfg, progress=False)
  ckpts = tmp_path / "run" / "checkpoints"
  newest = ckpts / "6" / "state"
  assert newest.is_dir()
  for f in sorted(p for p in newest.rglob("*") if p.is_file()):
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncate every file of the newest state
  with pytest.warns(RuntimeWarning, match="falling back to the previous one"):
    _, step = load_model(cfg)
  assert step == 4
  for f in (p for p in (ckpts / "4" / "config").rglob("*") if p.is_file()):
    f.write_bytes(f.read_bytes()[:5])  # now the config of the next one is truncated too
  with pytest.warns(RuntimeWarning, match="falling back to the previous one"):
    _, step = load_model(cfg)
  assert step == 2
  shutil.rmtree(ckpts / "2" / "state")
  with pytest.raises(CheckpointError, match="none of the checkpoints"):
    with pytest.warns(RuntimeWarning):
      load_model(cfg)


def test_checkpoint_from_another_config_is_refused(tmp_path, corpus):
  train(tiny_cfg(tmp_path / "run", corpus, steps=2), progress=False)
  other = tiny_cfg(tmp_path / "run", corpus, steps=4, lr=1e-2)
  with pytest.raises(ConfigMismatchError, match="lr: checkpoint"):
    train(other, progress=False)
  bigger = tiny_cfg(tmp_path / "run", corpus, steps=4)
  bigger = dataclasses.replace(bigger, model=bigger.model.replace(embed_dim=64))
  with pytest.raises(ConfigMismatchError, match=r"model\.embed_dim"):
    train(bigger, progress=False)
  train(tiny_cfg(tmp_path / "run", corpus, steps=4), progress=False)  # a longer run of the same config resumes


def test_checkpoint_without_a_newer_config_field_resumes_while_it_keeps_its_default(tmp_path, corpus):
  """A checkpoint written before a config field existed (simulated: the field removed from its saved config) is
  the same run while the field keeps its default, and a mismatch naming the field when it does not."""
  import json

  train(tiny_cfg(tmp_path / "run", corpus, steps=2), progress=False)
  saved = tmp_path / "run" / "checkpoints" / "2" / "config" / "metadata"
  old = json.loads(saved.read_text())
  assert old.pop("overlap") == 0 and old["model"].pop("learned_sink") == "none"
  saved.write_text(json.dumps(old))
  with pytest.raises(ConfigMismatchError, match=r"overlap: checkpoint 0 \(not recorded: the default\) vs config 4"):
    train(tiny_cfg(tmp_path / "run", corpus, steps=4, overlap=4), progress=False)
  assert train(tiny_cfg(tmp_path / "run", corpus, steps=4), progress=False).resumed_from == 2


def test_missing_or_empty_corpus(tmp_path, monkeypatch):
  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    train(tiny_cfg(tmp_path / "a", str(tmp_path / "does-not-exist")), progress=False)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"no bytes|no files|empty"):
    train(tiny_cfg(tmp_path / "b", str(empty)), progress=False)


def test_config_files_and_overrides():
  cfg = load_config(f"{CONFIG}:quick,sink,steps=7,model.embed_dim=48,lr=0.01,train_window=none")
  assert cfg.steps == 7 and cfg.model.embed_dim == 48 and cfg.lr == 0.01 and cfg.sink_token
  assert cfg.sink_id == 256 and cfg.train_window is None
  with pytest.raises(KeyError, match="unknown config key 'stpes'"):
    load_config(f"{CONFIG}:stpes=3")
  with pytest.raises(KeyError, match=r"model\.width"):
    load_config(f"{CONFIG}:model.width=3")
  with pytest.raises(TypeError, match="steps='many'"):
    load_config(f"{CONFIG}:steps=many")
  with pytest.raises(TypeError, match="expected a value of type bool"):
    load_config(f"{CONFIG}:sink_token=maybe")
  with pytest.raises(FileNotFoundError, match=r"nope\.py"):
    load_config("configs/nope.py")
  with pytest.raises(ValueError, match="unknown flags"):
    load_config(f"{CONFIG}:fast")
  base = load_config(str(CONFIG))
  assert apply_overrides(base, {"corpus": "a;b"}).corpus == ("a", "b")
  short = load_config(f"{CONFIG}:quick,window=512,sinks=4")  # aliases of train_window / train_sinks
  assert (short.train_window, short.train_sinks) == (512, 4)


def test_streaming_aligned_examples():
  model = TransformerConfig(vocab_size=10, num_layers=1, num_heads=1, embed_dim=8, mlp_dim=8)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 9
  plain = TrainConfig(model=model, seq_len=5)
  x, y, m = make_example(plain, tokens)
  np.testing.assert_array_equal(x, tokens[:, :-1])
  np.testing.assert_array_equal(y, tokens[:, 1:])
  assert bool(m.all())
  sink = TrainConfig(model=model, seq_len=5, sink_token=True, overlap=2, train_window=4, train_sinks=1)
  x, y, m = make_example(sink, tokens)
  assert x.shape == (2, 6) and bool(jnp.all(x[:, 0] == 9))
  np.testing.assert_array_equal(y[:, 0], tokens[:, 0])
  np.testing.assert_array_equal(m[0], [False, False, False, True, True, True])  # sink target + overlap excluded
  assert forward_mask(sink) == {"window": 4, "num_sinks": 2}  # the sink token is a sink too
  with pytest.raises(ValueError, match="overlap"):
    TrainConfig(model=model, seq_len=4, overlap=4)
  with pytest.raises(ValueError, match="train_window"):
    TrainConfig(model=model, train_window=2, train_sinks=3)
  with pytest.raises(ValueError, match="train_positions must be"):
    TrainConfig(model=model, data="video_qa", train_positions="relative")
  with pytest.raises(ValueError, match="even batch_size"):
    TrainConfig(model=model, data="video_qa", train_positions="mixed", batch_size=3)
  halves = forward_masks(TrainConfig(model=model, data="video_qa", train_positions="mixed", batch_size=4))
  assert halves[0] == {} and halves[1]["policy"].positions == "cache_relative"  # full attention, both halves
  with pytest.raises(ValueError, match="video_qa switch"):
    TrainConfig(model=model, train_positions="cache_relative")
  full = forward_mask(TrainConfig(model=model, data="video_qa", train_positions="cache_relative"))["policy"]
  assert full.positions == "cache_relative" and all(p.window is None for p in full.tracks())


def test_mixed_precision_step_runs(tmp_path, corpus):
  cfg = tiny_cfg(tmp_path / "bf16", corpus, steps=3)
  cfg = dataclasses.replace(cfg, model=cfg.model.replace(dtype="bfloat16"))
  res = train(cfg, progress=False)
  assert all(np.isfinite(m["loss"]) for m in res.metrics)
  assert all(x.dtype == jnp.float32 for x in _params(res.model))  # f32 master weights
  shutil.rmtree(tmp_path / "bf16")


def _events(path: pathlib.Path) -> list:
  """The events of one TensorBoard event file (TFRecord framing: length, crc, payload, crc)."""
  import struct

  from tensorboardX.proto import event_pb2

  data, at, events = path.read_bytes(), 0, []
  while at < len(data):
    (n,) = struct.unpack("<Q", data[at : at + 8])
    events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + n]))
    at += 12 + n + 4
  return events


def _read_events(folder: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Scalars of the TensorBoard event files in ``folder``."""
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    for event in _events(path):
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_metrics_are_mirrored_to_tensorboard(tmp_path, corpus):
  pytest.importorskip("tensorboardX")  # in the dev extra; optional for users
  cfg = tiny_cfg(tmp_path / "tb", corpus, steps=4, checkpoint_every=4)
  res = train(cfg, progress=False)
  events = _read_events(tmp_path / "tb" / "tensorboard")
  assert [m["step"] for m in res.metrics] == [2, 4]
  got = events["loss"]
  assert [s for s, _ in got] == [2, 4]
  np.testing.assert_allclose([v for _, v in got], [m["loss"] for m in res.metrics], rtol=1e-6)
  assert "tokens_per_s" in events


def test_aligned_training_loss_is_the_streaming_inference_nll():
  """A learned sink token + the training window mask: the per-token losses the train step optimises are exactly
  the NLL that streaming inference (the sink token first, ``SinkWindow(train_sinks + 1, train_window)``) sees."""
  from flax import nnx

  from jstream import StreamingTransformer, rollout
  from jstream import cache as C

  model_cfg = TransformerConfig(vocab_size=41, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, mlp_dim=64)
  cfg = TrainConfig(model=model_cfg, seq_len=30, sink_token=True, train_window=6, train_sinks=1)
  model = StreamingTransformer(model_cfg, rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(4), (2, 31), 0, 40, dtype=jnp.int32)  # [b, L + 1], no sink id
  inputs, targets, mask = make_example(cfg, tokens)
  logits = model.forward(inputs, **forward_mask(cfg))
  train_nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  stream = jnp.concatenate([jnp.full((2, 1), cfg.sink_id, jnp.int32), tokens], axis=1)
  policy = C.SinkWindow(cfg.train_sinks + 1, cfg.train_window)
  infer_nll = rollout.stream_nll(model, stream, policy, chunk_size=5)[:, 1:]
  np.testing.assert_allclose(train_nll, infer_nll, atol=2e-5)
  assert bool(jnp.all(mask))


VIDEO_CONFIG = CONFIG.parent / "video_lm.py"


def test_video_qa_training_from_the_config_file_resumes_exactly(tmp_path, monkeypatch):
  """``configs/video_lm.py:quick`` trains the video LM on video-QA clips; a run stopped and resumed ends with the
  parameters of an uninterrupted one, and the metrics report decisions and words apart. Its first steps train the
  frame encoder alone: after them the language model's parameters are still the initial ones, the encoder's not."""
  from flax import nnx

  from jstream.train.loop import init_state

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  full = train(load_config(f"{VIDEO_CONFIG}:quick,workdir={tmp_path / 'full'}"), progress=False)
  cfg = load_config(f"{VIDEO_CONFIG}:quick,workdir={tmp_path / 'half'}")
  assert cfg.data == "video_qa" and cfg.video.frame_size == 16 and 0 < cfg.video.encoder_steps < cfg.steps
  early = train(cfg, progress=False, stop_after=cfg.video.encoder_steps)
  graphdef, _, initial = init_state(cfg)
  before, after = nnx.merge(graphdef, initial.params), early.model
  for a, b in zip(_params(before.lm), _params(after.lm)):
    np.testing.assert_array_equal(a, b)
  for part in ("patch", "encoder", "patch_head"):
    assert any(np.any(a != b) for a, b in zip(_params(getattr(before, part)), _params(getattr(after, part)))), part
  assert set(early.metrics[-1]) >= {"patch_loss", "patch_accuracy"} and "answer_loss" not in early.metrics[-1]
  resumed = train(cfg, progress=False)
  assert resumed.resumed_from == cfg.video.encoder_steps and resumed.step == cfg.steps
  for a, b in zip(_params(full.model), _params(resumed.model)):
    np.testing.assert_array_equal(a, b)
  last = resumed.metrics[-1]
  assert np.isfinite(last["loss"]) and 0 <= last["word_accuracy"] <= 1 and last["tokens"] > 0
  reloaded, step = load_model(cfg)
  assert step == cfg.steps and type(reloaded).__name__ == "VideoLM"


@pytest.mark.parametrize("positions", ["absolute", "cache_relative", "mixed"])
def test_video_qa_training_mask_is_the_stream_under_the_bench_policy(tmp_path, monkeypatch, positions):
  """``train_window`` / ``train_sinks`` / ``train_positions`` on video QA: the first step's answer loss (initial
  parameters) equals the tick loss of the same clips streamed tick by tick through the ``sinks+window`` cache
  policy of the benchmark in that position mode (``mixed``: the first half of the rows in absolute positions, the
  second in cache-relative ones; text sinks + text window + vision window, both biting within a clip), and
  differs from the full-attention loss and from the stream in any other position mode."""
  from flax import nnx

  from jstream.models import video_lm
  from jstream.train.aligned import video_policy
  from jstream.train.loop import _device_batch, init_state, train_iterator

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  flags = f"quick,video.encoder_steps=0,steps=1,log_every=1,train_window=12,train_sinks=2,workdir={tmp_path / 'w'}"
  cfg = load_config(f"{VIDEO_CONFIG}:{flags},train_positions={positions}")
  loss = train(cfg, progress=False).metrics[-1]["answer_loss"]
  graphdef, _, state = init_state(cfg)
  model = nnx.merge(graphdef, state.params)
  batch = _device_batch(cfg, next(train_iterator(cfg)))
  frames, text, targets = batch["frames"], batch["text"], batch["targets"]
  p, half = model.config.tokens_per_frame, frames.shape[0] // 2
  assert 12 < cfg.video.clip_frames * p and 12 < int((text[0] != video_lm.PAD).sum())  # both windows bite

  def stream_logits(mode, rows):
    cache, logits = model.init_cache(video_policy(12, 2, mode), frames[rows].shape[0]), []
    for t in range(frames.shape[1]):
      out, cache = model(frames[rows, t : t + 1], text[rows, t : t + 1], cache)
      logits.append(out)
    return jnp.concatenate(logits, 1)

  def stream_loss(first, second):
    logits = jnp.concatenate([stream_logits(first, slice(0, half)), stream_logits(second, slice(half, None))])
    return float(video_lm.tick_loss(logits, text, targets, p, speak_weight=cfg.video.speak_weight)[0])

  modes = {"absolute": ("absolute",) * 2, "cache_relative": ("cache_relative",) * 2}
  modes["mixed"] = ("absolute", "cache_relative")
  np.testing.assert_allclose(loss, stream_loss(*modes.pop(positions)), rtol=1e-4)
  for other in modes.values():
    assert abs(stream_loss(*other) - loss) > 1e-3
  full, _ = video_lm.tick_loss(model.forward(frames, text), text, targets, p, speak_weight=cfg.video.speak_weight)
  assert abs(float(full) - loss) > 1e-3


def test_video_qa_without_the_streaming_objective_trains_on_answers_alone(tmp_path, monkeypatch):
  """``video.streaming_objective=False``: the first step's targets are the answers and their ``<eos>`` only
  (counted here from the clips: words after an ``<a>``), fewer than the clips' targets."""
  from jstream.data import video_qa as V
  from jstream.train.loop import train_iterator

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  flags = f"quick,video.encoder_steps=0,video.streaming_objective=False,steps=1,log_every=1,workdir={tmp_path}"
  cfg = load_config(f"{VIDEO_CONFIG}:{flags}")
  tokens = train(cfg, progress=False).metrics[-1]["tokens"]
  batch = next(train_iterator(cfg))
  text = np.asarray(batch["text"])
  after_answer = np.cumsum(text == V.ANSWER, axis=-1) > 0
  answers = int(np.sum(after_answer & (text != V.ANSWER) & (text != V.PAD)))
  assert 0 < answers == tokens < int(np.asarray(batch["targets"]).sum())


def test_language_model_adam_state_starts_at_the_first_joint_step():
  """After encoder-only steps, the language model's updates are those of a fresh AdamW run on the joint steps'
  gradients alone (bias correction counted from its own first step, its own warmup), written out by hand here;
  the frame side's AdamW counts every step. No clipping at these gradient norms."""
  from jstream.train.optim import lm_schedule, make_optimizer, schedule

  model = TransformerConfig(vocab_size=257, num_layers=1, num_heads=1, embed_dim=8, mlp_dim=8)
  first, joint = 4, 3
  cfg = TrainConfig(
    model=model, data="video_qa", video=VideoTask(patch_loss=1.0, encoder_steps=first), steps=first + joint,
    warmup_steps=1, lr=0.1, b2=0.999, weight_decay=0.5, clip_norm=1e9,
  )  # fmt: skip
  rng = np.random.default_rng(0)
  start = {"lm": {"kernel": rng.normal(size=(3, 2))}, "patch": {"kernel": rng.normal(size=(2, 2))}}
  start = jax.tree.map(lambda x: x.astype(np.float32), start)
  opt = make_optimizer(cfg)
  params, state = start, opt.init(start)
  history = {"lm": [], "patch": []}
  for t in range(first + joint):
    grads = {side: {"kernel": rng.normal(size=start[side]["kernel"].shape).astype(np.float32)} for side in start}
    if t < first:
      grads["lm"]["kernel"] = np.zeros_like(grads["lm"]["kernel"])  # the encoder-only loss does not reach the LM
    updates, state = opt.update(grads, state, params)
    if t < first:
      np.testing.assert_array_equal(updates["lm"]["kernel"], 0.0)  # not even weight decay
    else:
      history["lm"].append(grads["lm"]["kernel"])
    history["patch"].append(grads["patch"]["kernel"])
    params = optax.apply_updates(params, updates)

  def adamw(p, grads, lrs):  # the textbook AdamW over a list of gradients, decay on the parameter
    p, m, v = np.float64(p), 0.0, 0.0
    for k, (g, lr) in enumerate(zip(grads, lrs), start=1):
      m, v = cfg.b1 * m + (1 - cfg.b1) * g, cfg.b2 * v + (1 - cfg.b2) * g * g
      step = (m / (1 - cfg.b1**k)) / (np.sqrt(v / (1 - cfg.b2**k)) + 1e-8)
      p = p - lr * (step + cfg.weight_decay * p)
    return p

  lm_lrs = [float(lm_schedule(cfg)(k)) for k in range(joint)]
  assert lm_lrs[0] == 0.0 and lm_lrs[1] == pytest.approx(cfg.lr)  # its own warmup, one step long
  patch_lrs = [float(schedule(cfg)(t)) for t in range(first + joint)]
  expect_lm = adamw(start["lm"]["kernel"], history["lm"], lm_lrs)
  expect_patch = adamw(start["patch"]["kernel"], history["patch"], patch_lrs)
  np.testing.assert_allclose(params["lm"]["kernel"], expect_lm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(params["patch"]["kernel"], expect_patch, rtol=1e-5, atol=1e-5)


def test_video_qa_state_loss_trains_the_state_head_and_the_language_model(tmp_path, monkeypatch):
  """``configs/video_lm.py:quick,state``: the joint steps add the scene-state loss to the answer and patch losses
  (the logged loss is their sum) and its gradient reaches the language model's blocks through the state head."""
  from flax import nnx

  from jstream.train.loop import init_state

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  cfg = load_config(f"{VIDEO_CONFIG}:quick,state,workdir={tmp_path / 'state'},log_every=1")
  assert cfg.video.state_loss == 1.0 and cfg.video.model_config(cfg.model).state_head
  result = train(cfg, progress=False)
  last = result.metrics[-1]
  assert {"state_loss", "state_accuracy", "state_where_accuracy", "state_history_accuracy"} <= set(last)
  np.testing.assert_allclose(last["loss"], last["answer_loss"] + last["patch_loss"] + last["state_loss"], rtol=1e-5)
  graphdef, _, initial = init_state(cfg)
  before = nnx.merge(graphdef, initial.params)
  for part in ("state_head", "lm"):
    assert any(np.any(a != b) for a, b in zip(_params(getattr(before, part)), _params(getattr(result.model, part))))


def test_video_qa_frame_delta_and_request_losses_train_their_heads(tmp_path, monkeypatch):
  """``configs/video_lm.py:quick,delta,request``: the encoder reads two channels (the frame and its difference from
  the one before); a step's ``entry_loss`` is the entry head's loss on ``video_lm.entry_labels``, weighted like the
  patch loss; its ``request_loss`` is the request head's loss on the pending request of each tick, recomputed here
  from the slots by the probe's own loop (``experiments.probe_video_qa.pending_requests``); the logged loss is
  answer + patch + entry + request; the entry and request heads and the first convolution learn."""
  from flax import nnx

  from experiments.probe_video_qa import pending_requests
  from jstream.models import video_lm
  from jstream.train.loop import init_state, make_train_step, train_iterator

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  cfg = load_config(f"{VIDEO_CONFIG}:quick,delta,request,workdir={tmp_path / 'dr'},log_every=1")
  mc = cfg.video.model_config(cfg.model)
  assert mc.frame_delta and mc.request_head and cfg.video.request_loss == 1.0
  graphdef, optimizer, state = init_state(cfg)
  before = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))
  assert before.patch.kernel.shape[2] == 2  # the frame and its difference
  batch = next(train_iterator(cfg))
  step = make_train_step(graphdef, optimizer, cfg)
  for _ in range(cfg.video.encoder_steps):
    state, _ = step(state, batch)
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))  # the step donates the state
  state, m = step(state, batch)
  text, n = np.asarray(batch["text"]), batch["text"].shape[1]
  vis = model.encode(jnp.asarray(batch["frames"]))
  entry = video_lm.entry_labels(jnp.asarray(batch["objects"]), mc, cfg.video.digit_size)
  want_entry, _ = video_lm.digit_loss(model.entry_logits(vis), entry)
  np.testing.assert_allclose(float(m["entry_loss"]), float(want_entry), rtol=1e-4)
  pending = pending_requests(text, np.asarray(batch["qtype"]))
  pending = np.where(pending < 0, video_lm.NO_DIGIT, pending)
  assert (pending != video_lm.NO_DIGIT).any()
  assert cfg.video.text_budget is None  # whole slots: every decision is run
  _, feats, _, _ = model.training_outputs(jnp.asarray(batch["frames"]), jnp.asarray(text), return_features=True)
  want, _ = video_lm.digit_loss(model.request_logits(feats, n), jnp.asarray(pending))
  np.testing.assert_allclose(float(m["request_loss"]), float(want), rtol=1e-4)
  total = m["answer_loss"] + m["patch_loss"] + m["entry_loss"] + m["request_loss"]
  np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-5)
  after = nnx.merge(graphdef, state.params)
  for part in ("entry_head", "request_head", "patch"):
    assert any(np.any(a != b) for a, b in zip(_params(getattr(before, part)), _params(getattr(after, part))))


def test_video_qa_activation_model_trains_from_the_encoder_only_steps(tmp_path, monkeypatch):
  """``configs/video_lm.py:quick,delta,activation,proj,match``: from the encoder-only steps on, a step's
  ``activation_loss`` is the binary cross-entropy of the activation model's log-odds at the ticks where a request
  is pending by the probe's own loop (``experiments.probe_video_qa.pending_requests``), ``<speak>`` ticks weighing
  ``speak_weight``, recomputed here in NumPy, and its ``match_loss`` that of the ten requests' log-odds at the frames
  where a digit enters (an object id not drawn in the frame before); both add to the logged loss (``match`` weighed
  by ``activation_match``); the encoder-only steps train the activation model and leave the language model and the
  projector into it as they were (no weight decay either)."""
  from flax import nnx

  from experiments.probe_video_qa import pending_requests
  from jstream.data import video_qa as V
  from jstream.models import video_lm
  from jstream.train.loop import init_state, make_train_step, train_iterator

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  cfg = load_config(f"{VIDEO_CONFIG}:quick,delta,activation,proj,match,workdir={tmp_path / 'act'},log_every=1")
  cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, speak_weight=4.0, activation_match=0.5))
  assert cfg.video.model_config(cfg.model).activation == 8
  graphdef, optimizer, state = init_state(cfg)
  before = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))
  it = train_iterator(cfg)
  batch = next(it)
  while not (pending_requests(np.asarray(batch["text"]), np.asarray(batch["qtype"])) >= 0).any():
    batch = next(it)
  steps = {only: make_train_step(graphdef, optimizer, cfg, encoder_only=only) for only in (True, False)}

  def want_loss(model):
    text = np.asarray(batch["text"])
    pending = pending_requests(text, np.asarray(batch["qtype"])) >= 0
    standing, _ = model.activation.standing(jnp.asarray(text))
    x = np.asarray(model.activation_logits(model.encode(jnp.asarray(batch["frames"])), standing.vector), np.float64)
    y = text[:, :, 0] == video_lm.SPEAK
    nll = np.where(y, np.log1p(np.exp(-x)), np.log1p(np.exp(x)))
    w = np.where(pending, np.where(y, cfg.video.speak_weight, 1.0), 0.0)
    return (nll * w).sum() / w.sum()

  objects = np.asarray(batch["objects"])
  entering = np.zeros((*objects.shape[:2], 10), bool)
  for b, n, row in np.ndindex(*objects.shape[:3]):
    obj, label = objects[b, n, row, :2]
    entering[b, n, label] |= obj >= 0 and (n == 0 or obj not in objects[b, n - 1, :, 0])
  assert entering.any()

  def want_match(model):
    slots = jnp.asarray(V.request_slots(batch["text"].shape[-1]))
    vis = model.encode(jnp.asarray(batch["frames"]))
    x = np.asarray(model.activation_match_logits(vis, model.activation.encode(slots)[0]), np.float64)
    nll = np.where(entering, np.log1p(np.exp(-x)), np.log1p(np.exp(x)))
    return nll[entering.any(-1)].mean()

  for only in (True, True, False):  # the first step's learning rate is 0 (warmup)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))  # the step donates the state
    state, m = steps[only](state, batch)
    np.testing.assert_allclose(float(m["activation_loss"]), want_loss(model), rtol=1e-4)
    np.testing.assert_allclose(float(m["match_loss"]), want_match(model), rtol=1e-4)
    parts = ("patch_loss", "entry_loss", "activation_loss") + (() if only else ("answer_loss",))
    total = sum(m[k] for k in parts) + 0.5 * m["match_loss"]
    np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-5)
    if only:
      after = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))
  assert any(np.any(a != b) for a, b in zip(_params(before.activation), _params(after.activation)))
  assert all(np.all(a == b) for a, b in zip(_params(before.lm), _params(after.lm)))
  assert np.all(np.asarray(before.projector.kernel[...]) == np.asarray(after.projector.kernel[...]))


def test_video_qa_layout_loss_is_the_layout_heads_cross_entropy_in_the_frame_heads_loss(tmp_path, monkeypatch):
  """``configs/video_lm.py:quick,layout``: an encoder-only step's ``layout_loss`` is the mean cross-entropy of the
  layout head's logits against each frame's quadrant digits (recomputed here in NumPy from the drawn digits), and
  the step's loss is the patch loss plus it."""
  from flax import nnx

  from jstream.train.loop import init_state, make_train_step, train_iterator

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  cfg = load_config(f"{VIDEO_CONFIG}:quick,layout,workdir={tmp_path / 'layout'},video.layout_loss=0.5")
  graphdef, optimizer, state = init_state(cfg)
  batch = next(train_iterator(cfg))
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))  # the step donates the state
  _, m = make_train_step(graphdef, optimizer, cfg, encoder_only=True)(state, batch)
  logits = np.asarray(model.layout_logits(model.encode(jnp.asarray(batch["frames"]))), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  h = w = cfg.video.frame_size
  centre = np.asarray(batch["objects"])[..., 3:5] + cfg.video.digit_size / 2
  drawn = np.asarray(batch["objects"])[..., 0] >= 0
  nll = []
  for b, n in np.ndindex(*drawn.shape[:2]):
    for q, (top, left) in enumerate(((1, 1), (1, 0), (0, 1), (0, 0))):
      inside = drawn[b, n] & ((centre[b, n, :, 0] < h / 2) == top) & ((centre[b, n, :, 1] < w / 2) == left)
      if inside.sum() <= 1:
        label = int(np.asarray(batch["objects"])[b, n, inside.argmax(), 1]) if inside.any() else 10
        nll.append(-logp[b, n, q, label])
  np.testing.assert_allclose(float(m["layout_loss"]), np.mean(nll), rtol=1e-4)
  np.testing.assert_allclose(float(m["loss"]), float(m["patch_loss"] + 0.5 * m["layout_loss"]), rtol=1e-5)


def test_video_qa_state_loss_leaves_out_ticks_past_the_packing_budget(tmp_path, monkeypatch):
  """With clips packed to a budget that cuts their last ticks, a joint step's ``state_loss`` is the state loss of
  the ticks whose decision was run only: the ticks past the budget (zero features) are not scored."""
  from flax import nnx

  from jstream.models import video_lm
  from jstream.train.loop import init_state, make_train_step, train_iterator

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  cfg = load_config(f"{VIDEO_CONFIG}:quick,state,workdir={tmp_path / 'packed'},video.text_budget=1")
  graphdef, optimizer, state = init_state(cfg)
  batch = next(train_iterator(cfg))
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))  # the step donates the state
  _, metrics = make_train_step(graphdef, optimizer, cfg)(state, batch)
  n, p = batch["text"].shape[1], model.config.frame_len
  _, feats, _, kept = model.training_outputs(
    jnp.asarray(batch["frames"]), jnp.asarray(batch["text"]), packed_len=n * (p + 1), return_features=True
  )
  run = np.asarray(kept[:, :, 0])
  assert run.any() and not run.all()  # the budget cut some ticks
  truth = np.asarray(video_lm.scene_state(jnp.asarray(batch["objects"]), model.config, cfg.video.digit_size))
  logits = model.state_logits(feats, n)
  want, _ = video_lm.state_loss(logits, jnp.asarray(np.where(run[..., None], truth, -1)))
  unmasked, _ = video_lm.state_loss(logits, jnp.asarray(truth))
  np.testing.assert_allclose(float(metrics["state_loss"]), float(want), rtol=1e-4)
  assert abs(float(unmasked) - float(want)) > 1e-3


def test_video_qa_clips_cut_mid_stream_leave_their_unknown_targets_out_of_the_loss(tmp_path, monkeypatch):
  """``self_contained`` clips (``configs/video_lm.py:midstream``): a joint step's ``state_loss`` and ``entry_loss``
  score the rows whose clip starts mid-stream (``start > 0``) without their history groups and without what entered
  in their first frame, the other rows in full: recomputed here from the plain targets, masked by hand."""
  from flax import nnx

  from jstream.models import video_lm
  from jstream.train.loop import init_state, make_train_step, train_iterator

  monkeypatch.setenv("JSTREAM_DATA_DIR", str(tmp_path / "tfds"))
  cfg = load_config(f"{VIDEO_CONFIG}:quick,state,delta,midstream,workdir={tmp_path / 'cut'}")
  assert cfg.video.self_contained and cfg.video.clips_per_stream == 2
  graphdef, optimizer, state = init_state(cfg)
  batch = next(train_iterator(cfg))
  batch = {**batch, "start": np.array([0, 6, 0, 6], np.int32)}  # two rows cut mid-stream, whatever was drawn
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state.params))  # the step donates the state
  _, metrics = make_train_step(graphdef, optimizer, cfg)(state, batch)
  cut = batch["start"] > 0
  n, objects = batch["text"].shape[1], jnp.asarray(batch["objects"])
  truth = np.array(video_lm.scene_state(objects, model.config, cfg.video.digit_size))
  history = video_lm.STATE_NAMES.index("first_in")
  truth[cut, :, history:] = -1
  truth[cut, 0, video_lm.STATE_NAMES.index("entered")] = -1
  _, feats, _, _ = model.training_outputs(
    jnp.asarray(batch["frames"]), jnp.asarray(batch["text"]), return_features=True
  )
  want, _ = video_lm.state_loss(model.state_logits(feats, n), jnp.asarray(truth))
  np.testing.assert_allclose(float(metrics["state_loss"]), float(want), rtol=1e-4)
  entry = np.array(video_lm.entry_labels(objects, model.config, cfg.video.digit_size))
  entry[cut, 0] = -1
  want, _ = video_lm.digit_loss(model.entry_logits(model.encode(jnp.asarray(batch["frames"]))), jnp.asarray(entry))
  np.testing.assert_allclose(float(metrics["entry_loss"]), float(want), rtol=1e-4)
  _, _, state = init_state(cfg)
  with pytest.raises(ValueError, match=r"self_contained clips need each clip's first tick"):
    make_train_step(graphdef, optimizer, cfg)(state, {k: v for k, v in batch.items() if k != "start"})


def test_video_qa_config_errors_name_the_problem(tmp_path):
  model = TransformerConfig(vocab_size=257, num_layers=1, num_heads=1, embed_dim=8, mlp_dim=8)
  with pytest.raises(ValueError, match="text-only switches"):
    TrainConfig(model=model, data="video_qa", sink_token=True)
  with pytest.raises(ValueError, match="the text track's recent window"):
    TrainConfig(model=model, data="video_qa", train_window=8, train_sinks=5)
  with pytest.raises(ValueError, match="must be 'text', 'video_qa' or 'video_gen'"):
    TrainConfig(model=model, data="audio")
  with pytest.raises(ValueError, match="needs patch_loss > 0"):
    VideoTask(encoder_steps=10)
  with pytest.raises(ValueError, match="clip_overlap needs clips_per_stream > 1"):
    VideoTask(clip_overlap=4)
  with pytest.raises(ValueError, match="state_loss and request_loss must be >= 0"):
    VideoTask(state_loss=-1.0)
  with pytest.raises(ValueError, match="state_loss needs clips that start"):
    VideoTask(state_loss=1.0, clips_per_stream=2)
  with pytest.raises(ValueError, match="frame_delta needs clips that start"):
    VideoTask(frame_delta=True, patch_loss=1.0, clips_per_stream=2)
  VideoTask(state_loss=1.0, frame_delta=True, patch_loss=1.0, activation=8, clips_per_stream=2, self_contained=True)
  with pytest.raises(ValueError, match="self_contained needs clips_per_stream > 1"):
    VideoTask(self_contained=True)
  with pytest.raises(ValueError, match="activation needs clips"):
    VideoTask(activation=8, clips_per_stream=2)
  with pytest.raises(ValueError, match="frame_delta trains its entry head"):
    VideoTask(frame_delta=True)
  with pytest.raises(ValueError, match="request_loss needs clips"):
    VideoTask(request_loss=1.0, streaming_objective=False)
  with pytest.raises(ValueError, match="vocab_size =="):
    train(TrainConfig(model=model, data="video_qa", workdir=str(tmp_path / "bad")), progress=False)


def test_video_gen_training_from_the_config_file_resumes_exactly(tmp_path):
  """``configs/video_gen.py:quick``: the video diffusion model trains (noise drawn from the seed and the step), and a
  run stopped halfway and resumed ends bit-identical to the uninterrupted one."""
  from jstream.models.video_dit import VideoDiT

  def cfg(name):
    return load_config(f"{CONFIG.parent / 'video_gen.py'}:quick,workdir={tmp_path / name}")

  full = train(cfg("full"), progress=False)
  assert isinstance(full.model, VideoDiT) and full.step == 6
  half = train(cfg("half"), progress=False, stop_after=3)
  resumed = train(cfg("half"), progress=False)
  assert half.step == 3 and resumed.resumed_from == 3
  for a, b in zip(_params(full.model), _params(resumed.model)):
    np.testing.assert_array_equal(a, b)
  losses = [m["loss"] for m in full.metrics]
  assert all(np.isfinite(losses)) and full.metrics[-1]["tokens"] == 4 * 4 * 4  # batch x frames x tokens per frame


def _teacher_run(tmp_path):
  """A video_gen run's checkpoint (fresh weights: its content does not matter here), without training it."""
  from jstream.train.checkpoint import Checkpointer
  from jstream.train.loop import init_state

  cfg = load_config(f"{CONFIG.parent / 'video_gen.py'}:quick,workdir={tmp_path / 'teacher'}")
  _, _, state = init_state(cfg)
  ckpt = Checkpointer(cfg.workdir, cfg)
  ckpt.save(0, state, {})
  ckpt.close()
  return cfg, state


def _self_forcing_cfg(tmp_path, name, **over):
  extra = "".join(f",{k}={v}" for k, v in over.items())
  teacher = tmp_path / "teacher"
  return load_config(
    f"{CONFIG.parent / 'video_gen.py'}:quick,self_forcing,workdir={tmp_path / name},generation.teacher={teacher}{extra}"
  )


def test_self_forcing_run_starts_student_critic_and_teacher_from_the_teacher_run(tmp_path):
  from flax import nnx

  from jstream.train.checkpoint import saved_config
  from jstream.train.loop import build_model

  teacher_cfg, teacher_state = _teacher_run(tmp_path)
  saved = saved_config(tmp_path / "teacher")
  assert saved.to_dict() == dataclasses.replace(teacher_cfg, workdir=str(tmp_path / "teacher")).to_dict()
  model = build_model(_self_forcing_cfg(tmp_path, "sf"))
  want = jax.tree.leaves(teacher_state.params)
  for part in ("generator", "critic", "teacher"):
    got = jax.tree.leaves(nnx.state(getattr(model, part)))
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    saved_config(tmp_path / "nowhere")


@pytest.mark.slow
def test_self_forcing_training_resumes_exactly_and_never_moves_the_teacher(tmp_path):
  from flax import nnx

  _, teacher_state = _teacher_run(tmp_path)
  full = train(_self_forcing_cfg(tmp_path, "full", **{"generation.critic_steps": 3}), progress=False)
  half_cfg = _self_forcing_cfg(tmp_path, "half", **{"generation.critic_steps": 3})
  half = train(half_cfg, progress=False, stop_after=2)
  # After two steps (the first at warmup's lr 0) the critic moved and the student did not (it updates every third).
  for a, b in zip(jax.tree.leaves(nnx.state(half.model.generator)), jax.tree.leaves(teacher_state.params)):
    np.testing.assert_array_equal(a, b)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(nnx.state(half.model.critic)), jax.tree.leaves(teacher_state.params))
  )
  resumed = train(half_cfg, progress=False)
  assert resumed.resumed_from == 2 and resumed.step == full.step == 6
  for a, b in zip(_params(full.model), _params(resumed.model)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(nnx.state(full.model.teacher)), jax.tree.leaves(teacher_state.params)):
    np.testing.assert_array_equal(a, b)
  assert np.isfinite([m["loss"] for m in full.metrics]).all()


def test_draft_heads_train_on_a_frozen_lm_and_resume(tmp_path, corpus):
  """``TrainConfig.draft_heads``: the base run's LM is loaded and never changes, the heads' loss falls, a resumed
  run ends where an uninterrupted one does, ``load_model`` restores the pair; a model that is not the base's is
  refused."""
  from flax import nnx

  from jstream.speculative import TargetWithHeads

  base = tiny_cfg(tmp_path / "base", corpus, steps=4)
  lm = train(base, progress=False).model
  task = DraftHeadsTask(str(tmp_path / "base"), num_heads=2)
  cfg = tiny_cfg(tmp_path / "heads", corpus, steps=16, lr=1e-2, log_every=4, checkpoint_every=8, draft_heads=task)
  res = train(cfg, progress=False)
  assert isinstance(res.model, TargetWithHeads)
  leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  for a, b in zip(leaves(lm), leaves(res.model.target), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = [m["loss"] for m in res.metrics]
  assert losses[-1] < losses[0] - 0.2, losses
  assert {"head1_accuracy", "head2_accuracy"} <= set(res.metrics[-1])
  assert np.abs(np.asarray(res.model.heads.w[...])).max() > 0  # the residual blocks moved off their zero init
  again = dataclasses.replace(cfg, workdir=str(tmp_path / "again"))
  train(again, progress=False, stop_after=8)
  resumed = train(again, progress=False).model
  assert resumed is not None
  for a, b in zip(leaves(res.model.heads), leaves(resumed.heads), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  loaded, step = load_model(cfg)
  assert step == 16
  for a, b in zip(leaves(res.model), leaves(loaded), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = dataclasses.replace(cfg, model=cfg.model.replace(embed_dim=48), workdir=str(tmp_path / "other"))
  with pytest.raises(ValueError, match="the base run's"):
    train(other, progress=False)
  with pytest.raises(ValueError, match="plain causal"):
    dataclasses.replace(cfg, sink_token=True)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_distill_loss_against_numpy(divergence, temperature):
  """Each divergence and the acceptance rate ``sum min(p, q)``, both at ``temperature``, averaged over the mask, as
  NumPy computes them from the definitions; no gradient reaches the teacher's logits."""
  from scipy.special import log_softmax

  from jstream.train.losses import distill_loss

  rng = np.random.default_rng(3)
  s, t = (rng.normal(size=(2, 5, 7)).astype(np.float32) * 2 for _ in range(2))
  mask = rng.random((2, 5)) < 0.7
  logq, logp = log_softmax(s / temperature, axis=-1), log_softmax(t / temperature, axis=-1)
  p, q = np.exp(logp), np.exp(logq)
  m = (p + q) / 2
  per = {
    "fkl": (p * (logp - logq)).sum(-1),
    "rkl": (q * (logq - logp)).sum(-1),
    "jsd": 0.5 * (p * np.log(p / m) + q * np.log(q / m)).sum(-1),
    "tvd": 0.5 * np.abs(p - q).sum(-1),
  }[divergence]
  loss, metrics = distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), divergence=divergence,
                               temperature=temperature)  # fmt: skip
  np.testing.assert_allclose(float(loss), per[mask].mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["acceptance"]), np.minimum(p, q).sum(-1)[mask].mean(), rtol=1e-5)
  assert int(metrics["tokens"]) == mask.sum()
  grad_t = jax.grad(lambda t: distill_loss(jnp.asarray(s), t, divergence=divergence, temperature=temperature)[0])
  assert not np.any(np.asarray(grad_t(jnp.asarray(t))))
  if divergence == "tvd":  # one minus the acceptance rate
    np.testing.assert_allclose(float(loss), 1 - float(metrics["acceptance"]), rtol=1e-5)


def test_distilled_student_learns_the_teachers_distributions_not_the_data(tmp_path, corpus):
  """``TrainConfig.distill``: a teacher trained on other text (digits and punctuation), a student reading the usual
  corpus. Distilled, the student's KL from the teacher on the corpus falls far below both its start and a student
  trained on the corpus' own bytes for as many steps; the run's checkpoints hold the student alone
  (``load_model``); a resumed run ends where an uninterrupted one does."""
  from flax import nnx

  from jstream import StreamingTransformer

  other = tmp_path / "other"
  other.mkdir()
  rng = np.random.default_rng(1)
  for i in range(12):
    (other / f"n{i}.txt").write_text(" ".join(rng.choice(["0,1;", "22.", "3-4!", "(5)"], size=300)) + "\n")
  teacher_cfg = tiny_cfg(tmp_path / "teacher", str(other), steps=30, lr=1e-2, checkpoint_every=10)
  teacher = train(teacher_cfg, progress=False).model
  task = DistillTask(str(tmp_path / "teacher"))
  kw = dict(steps=16, lr=1e-2, log_every=4, checkpoint_every=8)
  student_cfg = tiny_cfg(tmp_path / "student", corpus, distill=task, **kw)
  distilled = train(student_cfg, progress=False)
  on_data = train(tiny_cfg(tmp_path / "plain", corpus, **kw), progress=False).model
  fresh = StreamingTransformer(student_cfg.model, rngs=nnx.Rngs(student_cfg.seed))

  batch = jnp.asarray(np.asarray(next(train_iterator(student_cfg))), jnp.int32)[:, :-1]
  logp = jax.nn.log_softmax(teacher.forward(batch), -1)

  def kl(model):
    logq = jax.nn.log_softmax(model.forward(batch), -1)
    return float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1)))

  k_distilled, k_data, k_fresh = kl(distilled.model), kl(on_data), kl(fresh)
  assert k_distilled < 0.5 * k_fresh and k_distilled < 0.5 * k_data, (k_distilled, k_data, k_fresh)
  rows = distilled.metrics
  assert {"fkl", "acceptance", "data_loss"} <= set(rows[-1]) and rows[-1]["acceptance"] > rows[0]["acceptance"]
  np.testing.assert_allclose([r["loss"] for r in rows], [r["fkl"] for r in rows], rtol=1e-6)  # data_weight 0

  loaded, step = load_model(student_cfg)
  assert isinstance(loaded, StreamingTransformer) and step == 16
  for a, b in zip(_params(distilled.model), _params(loaded), strict=True):
    np.testing.assert_array_equal(a, b)
  # Resumed after the teacher run trained on: still exact (the run keeps the teacher step it started from).
  again = dataclasses.replace(student_cfg, workdir=str(tmp_path / "again"))
  train(again, progress=False, stop_after=8)
  train(dataclasses.replace(teacher_cfg, steps=40), progress=False)  # the teacher's checkpoints: 20, 30, 40
  resumed = train(again, progress=False)
  assert resumed.resumed_from == 8
  for a, b in zip(_params(distilled.model), _params(resumed.model), strict=True):
    np.testing.assert_array_equal(a, b)
  late = dataclasses.replace(student_cfg, workdir=str(tmp_path / "late"))
  train(late, progress=False, stop_after=4)
  train(dataclasses.replace(teacher_cfg, steps=70), progress=False)  # step 40 gone
  with pytest.raises(FileNotFoundError, match="started from step 40"):
    train(late, progress=False)
  with pytest.raises(ConfigMismatchError):
    train(dataclasses.replace(again, distill=DistillTask(task.teacher, divergence="tvd")), progress=False)


def test_continue_rows_keeps_the_prompt_and_decodes_like_a_full_forward():
  """``continue_rows`` (the on-policy text of a distillation step), greedy and traced under ``jit``: the first
  ``prompt_len`` tokens stay, the rest equal a token-by-token argmax of full forwards over the growing rows; sampled
  at temperature 1, rows of one batch continue differently and another key gives other tokens."""
  from flax import nnx

  from jstream import StreamingTransformer
  from jstream.train.loop import continue_rows

  model = StreamingTransformer(
    TransformerConfig(vocab_size=53, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64),
    rngs=nnx.Rngs(4),
  )
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 53, (3, 14)), jnp.int32)
  out = jax.jit(lambda t: continue_rows(model, t, 5, jax.random.key(1), 0.0))(tokens)
  rows = np.asarray(tokens[:, :5])
  for _ in range(9):
    nxt = np.argmax(np.asarray(model.forward(jnp.asarray(rows)))[:, -1], -1)
    rows = np.concatenate([rows, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(np.asarray(out), rows)
  same = jnp.broadcast_to(tokens[:1], (4, 14))
  a, b = (np.asarray(continue_rows(model, same, 3, jax.random.key(k), 1.0)) for k in (0, 1))
  np.testing.assert_array_equal(a[:, :3], np.asarray(same[:, :3]))
  assert len({r.tobytes() for r in a[:, 3:]}) > 1 and not np.array_equal(a, b)
  with pytest.raises(ValueError, match="prompt_len"):
    continue_rows(model, tokens, 14, jax.random.key(0), 1.0)


def test_distill_on_teacher_samples_learns_the_teachers_own_text(tmp_path, corpus):
  """``DistillTask(samples=...)``: with a teacher trained on other text (digits and punctuation) and corpus prompts,
  a student distilled on the teacher's continuations is closer to the teacher on text the teacher writes (KL
  on its sampled continuations of held-out prompts) than one distilled on the corpus' own rows, the gap DistillSpec
  closes with on-policy data; a student-sampled run (``samples="student"``) resumes bit-exactly (the sampling
  noise is a function of the step)."""
  from jstream.train.loop import continue_rows

  other = tmp_path / "other"
  other.mkdir()
  rng = np.random.default_rng(1)
  for i in range(12):
    (other / f"n{i}.txt").write_text(" ".join(rng.choice(["0,1;", "22.", "3-4!", "(5)"], size=300)) + "\n")
  teacher = train(tiny_cfg(tmp_path / "teacher", str(other), steps=30, lr=1e-2, checkpoint_every=10), progress=False)
  kw = dict(steps=16, lr=1e-2, log_every=4, checkpoint_every=8)

  def student(name, samples):
    task = DistillTask(str(tmp_path / "teacher"), samples=samples, prompt_len=4)
    return tiny_cfg(tmp_path / name, corpus, distill=task, **kw)

  on_data = train(student("data", "data"), progress=False).model
  on_teacher = train(student("teacher_samples", "teacher"), progress=False).model
  prompts = jnp.asarray(np.asarray(next(train_iterator(student("x", "data"))))[:, :33], jnp.int32)
  text = continue_rows(teacher.model, prompts, 4, jax.random.key(99), 1.0)[:, :-1]
  logp = jax.nn.log_softmax(teacher.model.forward(text), -1)[:, 4:]

  def kl(model):
    logq = jax.nn.log_softmax(model.forward(text), -1)[:, 4:]
    return float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1)))

  assert kl(on_teacher) < 0.7 * kl(on_data), (kl(on_teacher), kl(on_data))  # 0.86 against 1.53 when written

  whole = train(student("student_samples", "student"), progress=False)
  split = student("split", "student")
  train(split, progress=False, stop_after=8)
  resumed = train(split, progress=False)
  assert resumed.resumed_from == 8
  for a, b in zip(_params(whole.model), _params(resumed.model), strict=True):
    np.testing.assert_array_equal(a, b)
  rows = whole.metrics
  assert rows[-1]["acceptance"] > rows[0]["acceptance"]


def test_distill_errors_name_the_problem(tmp_path, corpus):
  """Bad distillation settings are refused at construction; a teacher over another vocabulary when the run
  starts, before any step."""
  with pytest.raises(ValueError, match="divergence"):
    DistillTask("t", divergence="kl")
  with pytest.raises(ValueError, match="temperature"):
    DistillTask("t", temperature=0.0)
  with pytest.raises(ValueError, match="data_weight"):
    DistillTask("t", data_weight=-1.0)
  with pytest.raises(ValueError, match="samples must be one of"):
    DistillTask("t", samples="target")
  with pytest.raises(ValueError, match="own samples"):
    DistillTask("t", samples="student", data_weight=0.5)
  with pytest.raises(ValueError, match="prompt_len"):
    DistillTask("t", samples="teacher", prompt_len=0)
  with pytest.raises(ValueError, match=r"prompt_len \(32\) must be <= seq_len"):
    tiny_cfg(tmp_path / "s", corpus, distill=DistillTask("t", samples="teacher"), seq_len=16)
  with pytest.raises(ValueError, match="plain causal"):
    tiny_cfg(tmp_path / "s", corpus, distill=DistillTask("t"), sink_token=True)
  with pytest.raises(ValueError, match="pick one"):
    tiny_cfg(tmp_path / "s", corpus, distill=DistillTask("t"), draft_heads=DraftHeadsTask("t"))
  with pytest.raises(ValueError, match="text LM"):
    TrainConfig(model=tiny_cfg(tmp_path, corpus).model, data="video_gen", distill=DistillTask("t"))
  small = tiny_cfg(tmp_path / "t", corpus, steps=1)
  train(dataclasses.replace(small, model=small.model.replace(vocab_size=300)), progress=False)
  train(dataclasses.replace(small, workdir=str(tmp_path / "sink"), sink_token=True), progress=False)
  student = tiny_cfg(tmp_path / "s", corpus, distill=DistillTask(str(tmp_path / "t")))
  with pytest.raises(ValueError, match="vocabulary"):
    train(student, progress=False)
  with pytest.raises(ValueError, match="sink token or a window"):
    train(dataclasses.replace(student, distill=DistillTask(str(tmp_path / "sink"))), progress=False)
  with pytest.raises(ValueError, match="own workdir"):
    train(dataclasses.replace(student, distill=DistillTask(str(tmp_path / "s"))), progress=False)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    train(dataclasses.replace(student, distill=DistillTask(str(tmp_path / "none"))), progress=False)
  assert not (tmp_path / "s").exists()  # refused before anything is written
