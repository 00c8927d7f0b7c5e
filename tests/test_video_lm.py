"""The video-language model: ticks streamed through a cache equal the offline forward where the policy keeps
everything; no look-ahead; the tick loss reads the right logits; bad input."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jstream
from conftest import library_checks_only
from jstream import cache as C
from jstream.data import video_qa as V
from jstream.models import video_lm as VL
from jstream.train import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_video_lm(seed=0, **kw):
  lm = jstream.TransformerConfig(
    vocab_size=len(V.WORDS), num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64, scan_layers=False
  )
  return VL.VideoLM(VL.VideoLMConfig(lm, frame_size=(16, 16), patch_size=8, **kw), rngs=nnx.Rngs(seed))


def ticks(b, n, seed, text_len=6):
  """Random frames and slots with a few <pad> words at the end of each slot."""
  rng = np.random.default_rng(seed)
  frames = rng.uniform(size=(b, n, 16, 16)).astype(np.float32)
  text = rng.integers(1, len(V.WORDS), size=(b, n, text_len)).astype(np.int32)
  fill = rng.integers(1, text_len + 1, size=(b, n))
  text = np.where(np.arange(text_len) < fill[..., None], text, V.PAD)
  return jnp.asarray(frames), jnp.asarray(text)


def tick_step(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, frames, text, cache):
    return nnx.merge(graphdef, state)(frames, text, cache)

  return lambda *a: step(state, *a)


def stream_ticks(model, frames, text, cache, sizes):
  step, out, i = tick_step(model), [], 0
  for s in sizes:
    logits, cache = step(frames[:, i : i + s], text[:, i : i + s], cache)
    out.append(np.asarray(logits))
    i += s
  return np.concatenate(out, axis=1), cache


def test_streamed_ticks_equal_the_offline_forward():
  model = tiny_video_lm(seed=1)
  frames, text = ticks(2, 7, seed=2)
  policy = C.Segmented((C.Dense(64), C.Dense(64)))
  got, _ = stream_ticks(model, frames, text, model.init_cache(policy, 2), [1, 3, 1, 2])
  want = np.asarray(model.forward(frames, text))
  p = model.config.tokens_per_frame
  real = np.concatenate([np.ones((2, 7, p), bool), np.asarray(text) != V.PAD], axis=2).reshape(2, -1)
  np.testing.assert_allclose(got[real], want[real], atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
@pytest.mark.parametrize("packed", [pytest.param(False, marks=pytest.mark.slow), True])
def test_offline_forward_with_a_policy_mask_equals_the_stream_under_it(packed, positions):
  """``forward(policy=...)`` / ``training_outputs(policy=...)``: the teacher-forced forward with the mask of a
  bounded ``Segmented`` policy (text sinks + text window + vision window, both windows biting) equals streaming the
  ticks through that policy's cache, in both position modes (``cache_relative``: each track's own contiguous
  positions, sinks just before the window); without the mask it does not, nor in the other position mode."""
  model = tiny_video_lm(seed=21)
  policy = C.Segmented((C.SinkWindow(2, 7), C.Window(12)), positions=positions)  # 3 frames of 4 tokens
  frames, text = ticks(2, 8, seed=22)
  got, _ = stream_ticks(model, frames, text, model.init_cache(policy, 2), [1, 2, 1, 2, 2])
  p = model.config.tokens_per_frame
  real = np.concatenate([np.ones((2, 8, p), bool), np.asarray(text) != V.PAD], axis=2).reshape(2, -1)
  assert int((np.asarray(text) != V.PAD).sum(axis=(1, 2)).min()) > 2 + 7  # the text sinks and window bite too
  if packed:
    budget = int(real.sum(axis=1).min())
    want, _, _ = model.training_outputs(frames, text, packed_len=budget, policy=policy)
    run = real & (np.cumsum(real, axis=1) <= budget)  # the first real tokens of each row
    assert run.sum() < real.sum()  # one row is cut
  else:
    want, run = model.forward(frames, text, policy=policy), real
  np.testing.assert_allclose(got[run], np.asarray(want)[run], atol=5e-5, rtol=5e-5)
  full = np.asarray(model.forward(frames, text))
  assert not np.allclose(got[real], full[real], atol=1e-3)
  other = dataclasses.replace(policy, positions="absolute" if positions == "cache_relative" else "cache_relative")
  assert not np.allclose(got[real], np.asarray(model.forward(frames, text, policy=other))[real], atol=1e-3)


def test_training_at_contiguous_positions_is_the_stream_under_dense_contiguous_tracks():
  """``train_positions="cache_relative"`` without a window (what ``configs/video_lm.py:contiguous`` trains with):
  the offline forward under ``aligned.forward_mask``'s policy equals streaming the ticks through a
  ``Segmented((Dense, Dense), positions="cache_relative")`` cache, and differs from the stream-position forward."""
  from jstream.train import TrainConfig, forward_mask

  model = tiny_video_lm(seed=27)
  frames, text = ticks(2, 6, seed=28)
  stream = C.Segmented((C.Dense(64), C.Dense(64)), positions="cache_relative")
  got, _ = stream_ticks(model, frames, text, model.init_cache(stream, 2), [2, 1, 3])
  cfg = TrainConfig(model=model.config.lm, data="video_qa", train_positions="cache_relative")
  want = np.asarray(model.forward(frames, text, **forward_mask(cfg)))
  p = model.config.tokens_per_frame
  real = np.concatenate([np.ones((2, 6, p), bool), np.asarray(text) != V.PAD], axis=2).reshape(2, -1)
  np.testing.assert_allclose(got[real], want[real], atol=5e-5, rtol=5e-5)
  assert not np.allclose(got[real], np.asarray(model.forward(frames, text))[real], atol=1e-3)


def test_carrier_tokens_stream_equals_the_offline_forward_and_only_carriers_stay():
  """VideoScan's carrier (``VideoLMConfig.carrier``): streamed ticks equal the offline forward, with full attention
  (everything but earlier frames' patches) and under a bounded policy; the cache keeps one vision token per frame
  and the latest frame's patches; later ticks do not see earlier patches (the output differs from a model whose
  patches stay)."""
  model = tiny_video_lm(seed=25, carrier=True)
  frames, text = ticks(2, 6, seed=26)
  p, f = model.config.tokens_per_frame, model.config.frame_len
  assert f == p + 1
  real = np.concatenate([np.ones((2, 6, f), bool), np.asarray(text) != V.PAD], axis=2).reshape(2, -1)
  full = C.Segmented((C.Dense(64), C.Dense(64)))
  got, cache = stream_ticks(model, frames, text, model.init_cache(full, 2), [1, 3, 2])
  np.testing.assert_allclose(got[real], np.asarray(model.forward(frames, text))[real], atol=5e-5, rtol=5e-5)
  np.testing.assert_array_equal(np.asarray(cache.count)[:, VL.VISION], 6)  # one carrier per frame
  np.testing.assert_array_equal(np.asarray(cache.count)[:, VL.FRAME], 6 * p)  # a window of one frame's patches
  bounded = C.Segmented((C.SinkWindow(1, 16), C.Window(3)))
  got_b, _ = stream_ticks(model, frames, text, model.init_cache(bounded, 2), [2, 1, 2, 1])
  want_b = np.asarray(model.forward(frames, text, policy=bounded))
  np.testing.assert_allclose(got_b[real], want_b[real], atol=5e-5, rtol=5e-5)
  kept_patches = model.forward(frames, text, policy=C.Segmented((C.Dense(99), C.Dense(99), C.Dense(99))))
  assert not np.allclose(got[real], np.asarray(kept_patches)[real], atol=1e-3)  # earlier patches are not seen
  with pytest.raises(ValueError, match=r"third \(frame\) track"):
    model.init_cache(C.Window(8), 1)


def test_offline_policy_mask_rejects_what_it_cannot_emulate():
  model = tiny_video_lm(seed=23)
  x = jnp.ones((1, 5, 32))
  with pytest.raises(TypeError, match="emulates Dense, Window, SinkWindow"):
    model.lm.forward_embeddings(x, policy=C.H2O(budget=8, recent=4))
  with pytest.raises(ValueError, match="needs segment_ids"):
    model.lm.forward_embeddings(x, policy=C.Segmented((C.Window(8), C.Window(8))))
  with pytest.raises(ValueError, match="either policy or window"):
    model.lm.forward_embeddings(x, policy=C.Window(8), window=4)


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_answers_do_not_look_ahead(positions):
  """Logits of ticks up to f do not change when frames and words after f change (bounded policy)."""
  model = tiny_video_lm(seed=3)
  policy = C.Segmented((C.SinkWindow(2, 8), C.Window(12)), positions=positions)
  frames, text = ticks(1, 8, seed=4)
  got, _ = stream_ticks(model, frames, text, model.init_cache(policy, 1), [2, 2, 2, 2])
  other_frames, other_text = ticks(1, 8, seed=5)
  frames2 = frames.at[:, 5:].set(other_frames[:, 5:])
  text2 = text.at[:, 5:].set(other_text[:, 5:])
  got2, _ = stream_ticks(model, frames2, text2, model.init_cache(policy, 1), [2, 2, 2, 2])
  per_tick = got.shape[1] // 8
  np.testing.assert_array_equal(got[:, : 5 * per_tick], got2[:, : 5 * per_tick])
  assert not np.allclose(got[:, 5 * per_tick :], got2[:, 5 * per_tick :])


def test_frame_tokens_see_their_whole_frame():
  """Changing the last patch of a frame changes the logits of the frame's first token (no encoder: the patches
  meet only in the language model), in the offline forward and streamed."""
  model = tiny_video_lm(seed=6, encoder_layers=0)
  frames, text = ticks(1, 1, seed=7)
  a = np.asarray(model.forward(frames, text))
  b = np.asarray(model.forward(frames.at[0, 0, 8:, 8:].set(0.0), text))
  assert not np.allclose(a[0, 0], b[0, 0], atol=1e-5)
  policy = C.Segmented((C.Window(8), C.Window(8)))
  c, _ = stream_ticks(model, frames.at[0, 0, 8:, 8:].set(0.0), text, model.init_cache(policy, 1), [1])
  np.testing.assert_allclose(c[0, 0], b[0, 0], atol=5e-5, rtol=5e-5)


def test_tick_loss_reads_the_logits_before_each_word():
  p, n, ln, v = 4, 2, 3, 5
  rng = np.random.default_rng(8)
  text = rng.integers(0, v, size=(1, n, ln)).astype(np.int32)
  targets = np.array([[[True, False, True], [False, True, True]]])
  logits = np.full((1, n * (p + ln), v), -30.0, np.float32)
  for t in range(n):
    for j in range(ln):
      logits[0, t * (p + ln) + p - 1 + j, text[0, t, j]] = 30.0  # perfect predictions at the right places
  loss, m = VL.tick_loss(jnp.asarray(logits), jnp.asarray(text), jnp.asarray(targets), p)
  assert float(loss) < 1e-6 and float(m["accuracy"]) == 1.0 and float(m["targets"]) == 4
  wrong_words = logits.copy()
  for t in range(n):
    for j in range(1, ln):
      wrong_words[0, t * (p + ln) + p - 1 + j] = -30.0
      wrong_words[0, t * (p + ln) + p - 1 + j, (text[0, t, j] + 1) % v] = 30.0
  _, m3 = VL.tick_loss(jnp.asarray(wrong_words), jnp.asarray(text), jnp.asarray(targets), p)
  assert float(m3["decision_accuracy"]) == 1.0 and float(m3["word_accuracy"]) == 0.0
  shifted = np.roll(logits, 1, axis=1)
  loss2, _ = VL.tick_loss(jnp.asarray(shifted), jnp.asarray(text), jnp.asarray(targets), p)
  assert float(loss2) > 1.0


def test_answers_only_keeps_the_answers_and_drops_decisions_and_announcements():
  """A slot with an announcement and a question, and a silent one: after ``answers_only`` both decide
  ``<silent>``, the announcement's words are padding and only the answer and its ``<eos>`` are targets."""
  w = V.WORD_ID
  spoke = [V.SPEAK, w["seven"], V.EOS, V.QUESTION, *V.encode("how many digits are on screen ?"), V.ANSWER, w["two"]]
  spoke += [V.EOS]
  quiet = [V.SILENT, V.QUESTION, *V.encode("tell me when a three appears"), V.PAD, V.PAD]
  ln = len(spoke)
  quiet += [V.PAD] * (ln - len(quiet))
  text = np.array([[spoke, quiet]], np.int32)
  targets = np.zeros(text.shape, bool)
  targets[0, 0, [0, 1, 2, ln - 2, ln - 1]] = True
  targets[0, 1, 0] = True
  got_text, got_targets = (np.asarray(x) for x in VL.answers_only(jnp.asarray(text), jnp.asarray(targets)))
  want = [V.SILENT, V.PAD, V.PAD, *spoke[3:]]
  np.testing.assert_array_equal(got_text[0, 0], want)
  np.testing.assert_array_equal(got_text[0, 1], quiet)
  np.testing.assert_array_equal(np.flatnonzero(got_targets[0, 0]), [ln - 2, ln - 1])
  assert not got_targets[0, 1].any()


def test_tick_loss_weighs_speak_decisions():
  """With ``speak_weight`` w the loss is the mean of the target words' NLL with each ``<speak>`` decision counted w
  times (recomputed here word by word), and ``speak_recall`` counts the decisions whose <speak> beats <silent>."""
  p, n, ln = 4, 3, 3
  rng = np.random.default_rng(11)
  v = len(V.WORDS)
  text = np.array([[[V.SPEAK, 5, V.EOS], [V.SILENT, 0, 0], [V.SPEAK, 6, V.EOS]]], np.int32)
  targets = text != V.PAD
  logits = rng.normal(size=(1, n * (p + ln), v)).astype(np.float32)
  logits[0, 0 * (p + ln) + p - 1, V.SPEAK] = 9.0  # the first <speak> is predicted, the second is not
  logits[0, 2 * (p + ln) + p - 1, V.SILENT] = 9.0
  w = 7.0
  loss, m = VL.tick_loss(jnp.asarray(logits), jnp.asarray(text), jnp.asarray(targets), p, speak_weight=w)
  total = count = 0.0
  for t in range(n):
    for j in range(ln):
      if targets[0, t, j]:
        row = logits[0, t * (p + ln) + p - 1 + j].astype(np.float64)
        nll = np.log(np.exp(row - row.max()).sum()) + row.max() - row[text[0, t, j]]
        weight = w if j == 0 and text[0, t, j] == V.SPEAK else 1.0
        total, count = total + weight * nll, count + weight
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
  assert float(m["speak_recall"]) == 0.5


def test_overlapping_patches_embed_the_window_around_each_patch():
  """``patch_window=16`` on 8-pixel patches: token (i, j) embeds pixels ``[8i - 4, 8i + 12) x [8j - 4, 8j + 12)``
  (zeros outside the frame), recomputed here by slicing a padded frame."""
  model = tiny_video_lm(seed=13, patch_window=16, encoder_layers=0)
  frames, _ = ticks(2, 3, seed=14)
  got = np.asarray(model.encode(frames))
  padded = np.pad(np.asarray(frames), ((0, 0), (0, 0), (4, 4), (4, 4)))
  kernel, bias = np.asarray(model.patch.kernel[...]).reshape(256, -1), np.asarray(model.patch.bias[...])
  pos = np.asarray(model.patch_pos[...])
  windows = np.stack([padded[:, :, 8 * i : 8 * i + 16, 8 * j : 8 * j + 16] for i in (0, 1) for j in (0, 1)], axis=2)
  x = windows.reshape(2, 3, 4, 256) @ kernel + bias + pos
  want = np.asarray(model.encoder_norm(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="patch_window"):
    VL.VideoLMConfig(model.config.lm, frame_size=(16, 16), patch_size=8, patch_window=11)


def test_the_convolutional_stem_runs_before_the_patches():
  """``stem_channels=(3,)``: a 3x3 convolution (zero padding) and GELU, then each 8x8x3 block embedded linearly,
  recomputed here with NumPy loops over the kernel's offsets."""
  model = tiny_video_lm(seed=17, stem_channels=(3,), encoder_layers=0)
  frames, _ = ticks(1, 2, seed=18)
  got = np.asarray(model.encode(frames))
  conv = model.stem[0]
  k3, b3 = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])  # [3, 3, 1, 3]
  padded = np.pad(np.asarray(frames, np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
  maps = sum(padded[:, :, dy : dy + 16, dx : dx + 16, None] * k3[dy, dx, 0] for dy in range(3) for dx in range(3))
  maps = np.asarray(jax.nn.gelu(jnp.asarray(maps + b3, jnp.float32)))  # [1, 2, 16, 16, 3]
  kernel = np.asarray(model.patch.kernel[...]).reshape(8 * 8 * 3, -1)
  blocks = np.stack([maps[:, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8] for i in (0, 1) for j in (0, 1)], axis=2)
  x = blocks.reshape(1, 2, 4, -1) @ kernel + np.asarray(model.patch.bias[...]) + np.asarray(model.patch_pos[...])
  want = np.asarray(model.encoder_norm(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_pooled_stem_takes_the_patches_from_the_max_pooled_map():
  """``stem_channels=(3, 2), stem_pool=True`` with 16-pixel windows around 8-pixel patches: two 3x3 convolutions,
  each followed by GELU and 2x2 max pooling (16x16 -> 8x8 -> 4x4 cells), then each patch's window (2 cells plus a
  1-cell margin, zeros outside) embedded linearly; recomputed here with NumPy."""
  model = tiny_video_lm(seed=19, stem_channels=(3, 2), stem_pool=True, patch_window=16, encoder_layers=0)
  frames, _ = ticks(1, 2, seed=20)

  def conv_gelu_pool(x, conv):  # x [b, n, h, w, c_in]
    k, bias = np.asarray(conv.kernel[...], np.float64), np.asarray(conv.bias[...])
    h, w = x.shape[2:4]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(padded[:, :, dy : dy + h, dx : dx + w] @ k[dy, dx] for dy in range(3) for dx in range(3)) + bias
    y = np.asarray(jax.nn.gelu(jnp.asarray(y, jnp.float32)), np.float64)
    return y.reshape(*y.shape[:2], h // 2, 2, w // 2, 2, -1).max(axis=(3, 5))

  maps = np.asarray(frames, np.float64)[..., None]
  for conv in model.stem:
    maps = conv_gelu_pool(maps, conv)
  assert maps.shape == (1, 2, 4, 4, 2)
  padded = np.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  blocks = np.stack([padded[:, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4] for i in (0, 1) for j in (0, 1)], axis=2)
  kernel = np.asarray(model.patch.kernel[...]).reshape(4 * 4 * 2, -1)
  x = blocks.reshape(1, 2, 4, -1) @ kernel + np.asarray(model.patch.bias[...]) + np.asarray(model.patch_pos[...])
  want = np.asarray(model.encoder_norm(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(np.asarray(model.encode(frames)), want, rtol=1e-4, atol=1e-4)
  lm = model.config.lm
  with pytest.raises(ValueError, match="stem_pool needs stem_channels"):
    VL.VideoLMConfig(lm, frame_size=(16, 16), patch_size=8, stem_pool=True)
  with pytest.raises(ValueError, match="margin"):  # a 2-pixel margin is half a cell after two poolings
    VL.VideoLMConfig(lm, frame_size=(16, 16), patch_size=8, patch_window=12, stem_channels=(3, 2), stem_pool=True)
  cnn = load_config(f"{ROOT}/configs/video_lm.py:delta,cnn")
  assert cnn.video.model_config(cnn.model).stem_pool and cnn.video.stem_channels == (16, 32)
  assert cnn.workdir.endswith("_delta_cnn")
  assert load_config(f"{ROOT}/configs/video_lm.py:cnn,quick").video.model_config(cnn.model).stem_pool


def test_frame_pos_adds_a_place_embedding_to_the_frame_tokens_the_language_model_reads():
  """``frame_pos=True``: each frame token the language model reads is the encoder's token plus a learned embedding
  of its patch's place (not the encoder's ``patch_pos``); the patch-label logits do not see it, and with the
  embedding at zero the model is the one without it."""
  model = tiny_video_lm(seed=21, frame_pos=True)
  frames, text = ticks(2, 3, seed=22)
  vis = np.asarray(model.encode(frames))
  place = np.asarray(model.frame_pos[...])
  assert place.shape == (4, 32) and np.abs(place - np.asarray(model.patch_pos[...])).max() > 0.1
  x, _, _ = model.tick_inputs(frames, text)
  got = np.asarray(x).reshape(2, 3, -1, 32)[:, :, :4]
  np.testing.assert_allclose(got, vis + place, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.training_outputs(frames, text)[1], model.patch_logits(jnp.asarray(vis)))
  plain = tiny_video_lm(seed=23)
  nnx.update(model, nnx.state(plain))  # every other parameter from the model without the embedding
  model.frame_pos[...] = jnp.zeros_like(model.frame_pos[...])
  np.testing.assert_allclose(model.forward(frames, text), plain.forward(frames, text), rtol=1e-6, atol=1e-6)


LABEL_WORDS = V.LABEL_WORDS


def head_words_added(model, head, frames):
  """NumPy float64: the encoder's tokens, a frame head's logits on them, and the tokens plus the head's softmax
  times the input embeddings of ``LABEL_WORDS`` (what ``label_words`` / ``entry_words`` add)."""
  vis = np.asarray(model.encode(frames), np.float64)
  logits = vis @ np.asarray(head.kernel[...], np.float64) + np.asarray(head.bias[...])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  table = np.asarray(model.lm.embed.embedding[...], np.float64)
  return vis, logits, vis + probs @ table[list(LABEL_WORDS)]


def test_label_words_add_the_patch_labels_word_embedding_to_the_frame_tokens():
  """``label_words``: each frame token the language model reads is the encoder's token plus the patch head's
  softmax over the eleven labels times the input embeddings of the words naming them (``zero`` .. ``nine``,
  ``none``), recomputed here in NumPy; the patch logits themselves are unchanged."""
  model = tiny_video_lm(seed=24, label_words=LABEL_WORDS)
  frames, text = ticks(2, 3, seed=25)
  assert [V.WORDS[i] for i in LABEL_WORDS] == [*V.NUMBERS, "none"] and VL.NO_DIGIT == 10  # label c is word c
  vis, logits, want = head_words_added(model, model.patch_head, frames)
  x, _, _ = model.tick_inputs(frames, text)
  got = np.asarray(x).reshape(2, 3, -1, 32)[:, :, :4]
  assert np.abs(want - vis).max() > 0.05  # the words move the tokens
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.training_outputs(frames, text)[1], logits, rtol=1e-5, atol=1e-5)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:labels")  # the config flag names the same words
  assert cfg.video.model_config(cfg.model).label_words == LABEL_WORDS and cfg.workdir.endswith("_labels")
  quick = load_config(f"{ROOT}/configs/video_lm.py:labels,quick")  # a quick run of its own, not the plain quick one's
  assert quick.video.label_words and quick.workdir == cfg.workdir + "_quick"
  with pytest.raises(ValueError, match="label_words must be 11 word ids"):
    VL.VideoLMConfig(model.config.lm, frame_size=(16, 16), patch_size=8, label_words=LABEL_WORDS[:10])
  with pytest.raises(ValueError, match="label_words must be 11 word ids"):
    VL.VideoLMConfig(model.config.lm, frame_size=(16, 16), patch_size=8, label_words=(*LABEL_WORDS[:10], 999))


def test_packed_training_forward_runs_the_first_real_tokens_exactly():
  """``training_outputs(packed_len=...)``: the logits of the first ``packed_len`` real tokens of each row (frame
  tokens and non-<pad> words, in stream order, counted here in a loop) equal ``forward``'s; the rest are 0 and
  their words are reported not kept."""
  model = tiny_video_lm(seed=15)
  frames, text = ticks(2, 3, seed=16)
  p, ln = 4, text.shape[-1]
  full = np.asarray(model.forward(frames, text))
  budget = 3 * p + 6
  logits, _, kept = model.training_outputs(frames, text, packed_len=budget)
  logits, kept, words = np.asarray(logits), np.asarray(kept), np.asarray(text)
  for row in range(2):
    seen = 0
    for t in range(3):
      for i in range(p + ln):
        real = i < p or words[row, t, i - p] != V.PAD
        run = real and seen < budget
        seen += real
        at = t * (p + ln) + i
        if run:
          np.testing.assert_allclose(logits[row, at], full[row, at], rtol=2e-5, atol=2e-5)
        else:
          assert not logits[row, at].any()
        if i >= p:
          assert kept[row, t, i - p] == run
  assert kept.any() and not kept[words != V.PAD].all()  # the budget cut some words


def test_constants_match_the_data():
  assert (VL.PAD, VL.SILENT, VL.SPEAK, VL.QUESTION, VL.ANSWER) == (V.PAD, V.SILENT, V.SPEAK, V.QUESTION, V.ANSWER)
  assert VL.NO_DIGIT == len(V.NUMBERS)


def test_centre_labels_name_the_digit_whose_centre_lies_in_each_patch():
  """Against a loop over the drawn digits of real stream frames (8-pixel patches of 16x16 frames, 8-pixel
  digits), including patches that hold two centres (-1) and frames with none."""
  config = V.video_qa_config(frame_size=16, digit_size=8, max_on_screen=4, enter_prob=0.6)
  chunk = V.VideoQAStream(config, "train", 3).take(40)
  model_config = tiny_video_lm().config
  got = np.asarray(VL.centre_labels(jnp.asarray(chunk.objects[None]), model_config, 8))[0]
  seen = set()
  for f in range(40):
    want = np.full(4, VL.NO_DIGIT)
    centres = {}
    for obj, label, _, y, x in chunk.objects[f]:
      if obj >= 0:
        cell = min(int((y + 4) // 8), 1) * 2 + min(int((x + 4) // 8), 1)
        centres.setdefault(cell, []).append(label)
    for cell, labels in centres.items():
      want[cell] = labels[0] if len(labels) == 1 else -1
    np.testing.assert_array_equal(got[f], want)
    seen.update(int(x) for x in want)
  assert {-1, VL.NO_DIGIT} <= seen and len(seen) > 3


def test_patch_loss_ignores_ambiguous_patches_and_scores_digit_patches():
  rng = np.random.default_rng(12)
  logits = rng.normal(size=(1, 2, 3, VL.NO_DIGIT + 1)).astype(np.float32)
  labels = np.array([[[4, VL.NO_DIGIT, -1], [-1, 7, VL.NO_DIGIT]]], np.int32)
  logits[0, 0, 0, 4] = 20.0  # right; patch (1, 1) holds a 7 and is predicted wrong
  logits[0, 1, 1, 7] = -20.0
  loss, m = VL.patch_loss(jnp.asarray(logits), jnp.asarray(labels))
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  known = [(0, 0, 4), (0, 1, VL.NO_DIGIT), (1, 1, 7), (1, 2, VL.NO_DIGIT)]
  np.testing.assert_allclose(float(loss), -np.mean([float(logp[0, t, i, c]) for t, i, c in known]), rtol=1e-6)
  assert float(m["patch_accuracy"]) == 0.5


@library_checks_only()
def test_bad_input_is_a_clear_error():
  model = tiny_video_lm()
  frames, text = ticks(1, 2, seed=9)
  with pytest.raises(ValueError, match="frames must be"):
    model.forward(jnp.ones((1, 2, 8, 8)), text)
  with pytest.raises(ValueError, match="same \\[batch, ticks\\]"):
    model.forward(frames[:, :1], text)
  with pytest.raises(ValueError, match="multiples of patch_size"):
    VL.VideoLMConfig(model.config.lm, frame_size=(16, 12), patch_size=8)


def test_the_projector_maps_the_encoder_tokens_to_the_word_scale_before_the_words_are_added():
  """``projector=True``: each frame token the language model reads is the encoder's token times the projector's
  kernel, plus the label words' term (recomputed here in NumPy); at initialisation the projected tokens have about
  the word embeddings' scale, where the encoder's own are about ``sqrt(embed_dim)`` times larger; the patch head
  reads the encoder's tokens, not the projected ones."""
  model = tiny_video_lm(seed=28, label_words=LABEL_WORDS, projector=True)
  frames, text = ticks(2, 3, seed=29)
  vis, logits, labelled = head_words_added(model, model.patch_head, frames)
  kernel = np.asarray(model.projector.kernel[...], np.float64)
  want = vis @ kernel + (labelled - vis)
  x, _, _ = model.tick_inputs(frames, text)
  got = np.asarray(x).reshape(2, 3, -1, 32)[:, :, :4]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  words = np.linalg.norm(np.asarray(model.lm.embed.embedding[...]), axis=-1).mean()
  assert np.linalg.norm(vis, axis=-1).mean() > 4 * words  # the encoder's tokens: about sqrt(32) times the words
  assert 0.5 * words < np.linalg.norm(vis @ kernel, axis=-1).mean() < 2 * words
  np.testing.assert_allclose(model.training_outputs(frames, text)[1], logits, rtol=1e-5, atol=1e-5)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:labels,proj")
  assert cfg.video.model_config(cfg.model).projector and cfg.workdir.endswith("_labels_proj")
  assert load_config(f"{ROOT}/configs/video_lm.py:proj,quick").video.projector


def test_projector_norm_holds_the_projected_tokens_at_the_word_scale_however_the_projector_grows():
  """``projector_norm``: each frame token the language model reads is the projected encoder token rescaled to an
  RMS of ``embed_dim ** -0.5`` per coordinate, plus the label words' term (NumPy); scaling the projector's kernel
  100x (what free training does to it) leaves the tokens unchanged, where without the norm they grow 100x."""
  model = tiny_video_lm(seed=30, label_words=LABEL_WORDS, projector=True, projector_norm=True)
  plain = tiny_video_lm(seed=30, label_words=LABEL_WORDS, projector=True)
  frames, text = ticks(2, 3, seed=31)
  vis, _, labelled = head_words_added(model, model.patch_head, frames)
  projected = vis @ np.asarray(model.projector.kernel[...], np.float64)
  rms = np.sqrt((projected**2).mean(-1, keepdims=True))
  want = projected / rms * 32**-0.5 + (labelled - vis)
  for m in (model, plain):
    m.projector.kernel[...] = 100.0 * m.projector.kernel[...]
  got = np.asarray(model.tick_inputs(frames, text)[0]).reshape(2, 3, -1, 32)[:, :, :4]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  grown = np.asarray(plain.tick_inputs(frames, text)[0]).reshape(2, 3, -1, 32)[:, :, :4]
  np.testing.assert_allclose(grown, 100.0 * projected + (labelled - vis), rtol=1e-4, atol=1e-4)
  with library_checks_only(), pytest.raises(ValueError, match="projector_norm needs the projector"):
    VL.VideoLMConfig(model.config.lm, frame_size=(16, 16), patch_size=8, projector_norm=True)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:labels,pnorm")
  assert cfg.video.model_config(cfg.model).projector_norm and cfg.workdir.endswith("_labels_pnorm")
  quick = load_config(f"{ROOT}/configs/video_lm.py:pnorm,quick").video
  assert quick.projector and quick.projector_norm


def test_place_words_add_the_words_of_each_tokens_quadrant():
  """``place_words``: each frame token the language model reads gets the input embeddings of the two words naming
  its quadrant added, the quadrant of the pixel at the patch's centre by the rule the where-questions' answers use
  (``video_qa``: above the frame's middle is ``top``, left of it ``left``); on a 4 x 4 patch grid, beside
  ``label_words``, whose term it leaves as it is."""
  lm = jstream.TransformerConfig(
    vocab_size=len(V.WORDS), num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64, scan_layers=False
  )
  both = VL.VideoLMConfig(lm, frame_size=(32, 32), patch_size=8, label_words=LABEL_WORDS, place_words=V.PLACE_WORDS)
  model = VL.VideoLM(both, rngs=nnx.Rngs(26))
  rng = np.random.default_rng(27)
  frames = jnp.asarray(rng.uniform(size=(2, 3, 32, 32)), jnp.float32)
  vis = model.encode(frames)
  table = np.asarray(model.lm.embed.embedding[...], np.float64)
  place = np.zeros((16, 32))
  for i in range(16):
    y, x = 8 * (i // 4) + 4, 8 * (i % 4) + 4  # the patch's centre pixel
    (quadrant,) = [q for q in V.QUADRANTS if (y < 16) == (q[0] == "top") and (x < 16) == (q[1] == "left")]
    place[i] = table[V.WORD_ID[quadrant[0]]] + table[V.WORD_ID[quadrant[1]]]
  labels_only = VL.VideoLM(dataclasses.replace(both, place_words=()), rngs=nnx.Rngs(0))
  nnx.update(labels_only, nnx.state(model))
  want = np.asarray(labels_only.placed(vis), np.float64) + place
  got = np.asarray(model.placed(vis), np.float64)
  assert np.abs(place).max() > 0.05 and len({tuple(r) for r in place.round(6)}) == 4  # four distinct quadrants
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  x, _, _ = model.tick_inputs(frames, jnp.asarray(ticks(2, 3, seed=28)[1]))
  np.testing.assert_allclose(np.asarray(x).reshape(2, 3, -1, 32)[:, :, :16], got, rtol=1e-6, atol=1e-6)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:places")
  assert cfg.video.model_config(cfg.model).place_words == V.PLACE_WORDS and cfg.workdir.endswith("_places")
  assert load_config(f"{ROOT}/configs/video_lm.py:places,quick").video.place_words
  with pytest.raises(ValueError, match="place_words must be 4 word ids"):
    VL.VideoLMConfig(lm, frame_size=(16, 16), patch_size=8, place_words=V.PLACE_WORDS[:3])
  with pytest.raises(ValueError, match="even number of patch rows and columns"):
    VL.VideoLMConfig(lm, frame_size=(24, 16), patch_size=8, place_words=V.PLACE_WORDS)


def replayed_state(chunk, config) -> np.ndarray:
  """The scene state after each tick, replayed from the stream's event log and drawn digits with loops: the
  independent reference of ``scene_state``."""
  h, w = config.frame_size
  half = config.digit_size / 2
  first_in = first_out = VL.NO_DIGIT
  entries, first_seen, out = np.zeros(10, int), [], []
  for t in range(len(chunk.frames)):
    frame = chunk.start + t
    entering = VL.NO_DIGIT
    for f, kind, _, label in chunk.events:
      if f != frame:
        continue
      if kind == V.ENTER:
        entering, first_in = label, label if first_in == VL.NO_DIGIT else first_in
        entries[label] += 1
        if label not in first_seen:
          first_seen.append(label)
      elif first_out == VL.NO_DIGIT:
        first_out = label
    drawn = [(lab, y, x) for obj, lab, _, y, x in chunk.objects[t] if obj >= 0]
    quads = []
    for v, u in V.QUADRANTS:
      inside = [
        lab for lab, y, x in drawn if (y + half < h / 2) == (v == "top") and (x + half < w / 2) == (u == "left")
      ]
      quads.append(VL.NO_DIGIT if not inside else inside[0] if len(inside) == 1 else -1)
    ranks = [first_seen.index(d) if d in first_seen else VL.NO_DIGIT for d in range(10)]
    row = [*quads, len(drawn), entering, first_in, first_out, *np.minimum(entries, 10), *ranks]
    out.append(row)
  return np.array(out)


def test_scene_state_matches_a_replay_of_the_event_log():
  """``scene_state`` from the drawn digits alone equals the state replayed from the stream's event log (entries,
  exits) for crowded streams from their first frame, every group in ``STATE_NAMES`` order; the streams exercise
  two centres in a quadrant, exits and repeated entries."""
  config = V.video_qa_config(max_on_screen=4, enter_prob=0.5, stay=(4, 12))
  model_config = VL.VideoLMConfig(tiny_video_lm().config.lm, frame_size=config.frame_size)
  chunks = [V.VideoQAStream(config, "train", i).take(80) for i in range(3)]
  got = np.asarray(VL.scene_state(jnp.asarray(np.stack([c.objects for c in chunks])), model_config, 12))
  assert got.shape == (3, 80, VL.STATE_GROUPS) and VL.STATE_GROUPS == 28
  for row, chunk in enumerate(chunks):
    np.testing.assert_array_equal(got[row], replayed_state(chunk, config))
  assert (got[:, :, :4] == -1).any() and (got[:, :, VL.STATE_NAMES.index("first_out")] != VL.NO_DIGIT).any()
  assert (got[:, :, 8:18] >= 2).any() and (got[:, :, 18:] >= 3).any()


def test_targets_of_clips_cut_mid_stream_are_those_of_the_whole_stream_where_their_ticks_tell_them():
  """``midstream`` (``VideoTask.self_contained``): the scene state of a clip cut at tick 70 of a crowded stream (its
  objects' ids far above the clip's length) equals the whole stream's replayed state (``replayed_state``, from the
  event log) at the same ticks in the where / count_now groups and in ``entered`` after the first frame, -1 in
  ``entered`` at the first frame and in every history group; a clip from its stream's first tick is unchanged. The
  entry labels and entering digits equal the whole stream's at the same ticks, unknown (-1, none) at the first
  frame only."""
  config = V.video_qa_config(max_on_screen=4, enter_prob=0.5, stay=(4, 12))
  model_config = VL.VideoLMConfig(tiny_video_lm().config.lm, frame_size=config.frame_size)
  chunks = [V.VideoQAStream(config, "train", i).take(100) for i in range(3)]
  whole = jnp.asarray(np.stack([c.objects for c in chunks]))
  a, n = 70, 20
  objects = jnp.concatenate([whole[:2, a : a + n], whole[2:, :n]])  # two clips cut at tick 70, one from the start
  midstream = jnp.asarray([True, True, False])
  assert int(whole[:2, a, :, 0].max()) > n  # ids a clip's own length cannot hold
  got = np.asarray(VL.scene_state(objects, model_config, 12, midstream))
  entered, history = VL.STATE_NAMES.index("entered"), VL.STATE_NAMES.index("first_in")
  for row, chunk in enumerate(chunks):
    replay = replayed_state(chunk, config)
    if row == 2:
      np.testing.assert_array_equal(got[row], replay[:n])
      continue
    want = replay[a : a + n].copy()
    want[:, history:] = -1
    want[0, entered] = -1
    np.testing.assert_array_equal(got[row], want)
    assert (want[1:, entered] != VL.NO_DIGIT).any()
  labels = np.asarray(VL.entry_labels(objects, model_config, 12, midstream))
  full = np.asarray(VL.entry_labels(whole, model_config, 12))
  np.testing.assert_array_equal(labels[:2, 1:], full[:2, a + 1 : a + n])
  np.testing.assert_array_equal(labels[2], full[2, :n])
  assert (labels[:2, 0] == -1).all() and (full[:2, a + 1 : a + n] != VL.NO_DIGIT).any()
  digits = np.asarray(VL.entering_digits(objects, midstream))
  full = np.asarray(VL.entering_digits(whole))
  np.testing.assert_array_equal(digits[:2, 1:], full[:2, a + 1 : a + n])
  np.testing.assert_array_equal(digits[2], full[2, :n])
  assert (
    not digits[:2, 0].any() and full[:2, a + 1 : a + n].any() and np.asarray(VL.entering_digits(objects))[:2, 0].any()
  )


def test_the_layout_head_reads_each_quadrants_digit_off_the_mean_of_the_frame_tokens():
  """``layout_head=True``: ``layout_logits`` is a linear map of the mean of a frame's encoder tokens, four groups of
  ``NO_DIGIT + 1`` classes in the where-questions' quadrant order (recomputed here in NumPy); its targets are the
  scene state's four quadrant groups; a model without the head says so."""
  model = tiny_video_lm(seed=30, layout_head=True)
  frames, _ = ticks(2, 3, seed=31)
  vis = np.asarray(model.encode(frames), np.float64)
  kernel, bias = np.asarray(model.layout_head.kernel[...], np.float64), np.asarray(model.layout_head.bias[...])
  want = (vis.mean(axis=2) @ kernel + bias).reshape(2, 3, 4, VL.NO_DIGIT + 1)
  np.testing.assert_allclose(np.asarray(model.layout_logits(jnp.asarray(vis, jnp.float32))), want, rtol=1e-5, atol=1e-5)
  assert [("top" if t else "bottom", "left" if u else "right") for t, u in VL.QUADRANT_ORDER] == list(V.QUADRANTS)
  config = V.video_qa_config(max_on_screen=4, enter_prob=0.5, stay=(4, 12))
  objects = jnp.asarray(V.VideoQAStream(config, "train", 0).take(40).objects[None])
  layout = np.asarray(VL.layout_labels(objects, model.config, 12))
  np.testing.assert_array_equal(layout, np.asarray(VL.scene_state(objects, model.config, 12))[..., :4])
  assert (layout >= 0).any() and (layout < VL.NO_DIGIT).any()
  with library_checks_only(), pytest.raises(ValueError, match="layout_logits needs"):
    tiny_video_lm().layout_logits(jnp.asarray(vis, jnp.float32))
  from jstream.train import VideoTask

  with pytest.raises(ValueError, match="layout_loss must be >= 0 and needs patch_loss"):
    VideoTask(layout_loss=1.0)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:layout")
  assert cfg.video.model_config(cfg.model).layout_head and cfg.workdir.endswith("_layout")
  assert load_config(f"{ROOT}/configs/video_lm.py:layout,quick").video.layout_loss == 1.0


def test_scene_state_answers_every_question_of_the_streams():
  """What the questions of a stream ask is read off the scene state of their tick: the state holds each answer."""
  config = V.video_qa_config(question_prob=0.8)
  model_config = VL.VideoLMConfig(tiny_video_lm().config.lm, frame_size=config.frame_size)
  chunks = [V.VideoQAStream(config, "test", i).take(60) for i in range(3)]
  state = np.asarray(VL.scene_state(jnp.asarray(np.stack([c.objects for c in chunks])), model_config, 12))
  g = {name: i for i, name in enumerate(VL.STATE_NAMES)}

  def word(k):  # class 10 is "none" for a label, "many" for a count
    return V.NUMBERS[k] if k < 10 else "many" if q.qtype == "count" else "none"

  asked = set()
  for row, chunk in enumerate(chunks):
    for q in chunk.questions:
      s, w = state[row, q.frame - chunk.start], q.words.split()
      if q.qtype == "where":
        got = word(s[V.QUADRANTS.index((w[5], w[6]))])
      elif q.qtype == "count_now":
        got = word(s[g["count_now"]])
      elif q.qtype in ("first_in", "first_out"):
        got = word(s[g[q.qtype]])
      elif q.qtype == "count":
        got = word(s[g[f"count_{V.NUMBERS.index(w[5])}"]])
      elif q.qtype == "order":
        a, b = (s[g[f"rank_{V.NUMBERS.index(x)}"]] for x in (w[1], w[4]))
        got = "yes" if a < b else "no"
      else:
        continue
      assert got == q.answer, (q, got)
      asked.add(q.qtype)
  assert asked == set(V.QTYPES) - {"proactive"}


def test_state_head_reads_each_ticks_decision_position_and_packing_keeps_its_features():
  """``state_logits`` of tick ``t`` depend on frames up to ``t`` and not on tick ``t``'s words (they come after
  its decision position); ``training_outputs(return_features=True)`` packed gives the unpacked features at every
  token it ran."""
  model = tiny_video_lm(seed=21, state_head=True)
  frames, text = ticks(2, 3, seed=22)
  logits, feats, _, kept = model.training_outputs(frames, text, return_features=True)
  assert kept.all() and feats.shape == (*logits.shape[:2], 32)
  np.testing.assert_allclose(logits, model.forward(frames, text), rtol=1e-6, atol=1e-6)
  state = np.asarray(model.state_logits(feats, 3))
  assert state.shape == (2, 3, VL.STATE_GROUPS, VL.STATE_CLASSES)
  per_tick = feats.shape[1] // 3  # the frame's 4 tokens, then the slot: the decision is read at the 4th
  at = feats[:, 4 - 1 :: per_tick]
  want = model.state_head(at).reshape(2, 3, VL.STATE_GROUPS, VL.STATE_CLASSES)
  np.testing.assert_allclose(state, want, rtol=1e-6, atol=1e-6)
  words = text.at[:, 1, 0].set((text[:, 1, 0] % (len(V.WORDS) - 1)) + 1)  # tick 1's words (never <pad>)
  other = np.asarray(model.state_logits(model.training_outputs(frames, words, return_features=True)[1], 3))
  np.testing.assert_allclose(other[:, :2], state[:, :2], rtol=1e-6, atol=1e-6)
  assert np.abs(other[:, 2] - state[:, 2]).max() > 1e-4  # tick 2 saw the changed words
  moved = frames.at[:, 1].set(0.5)
  moved = np.asarray(model.state_logits(model.training_outputs(moved, text, return_features=True)[1], 3))
  np.testing.assert_allclose(moved[:, 0], state[:, 0], rtol=1e-6, atol=1e-6)
  assert np.abs(moved[:, 1] - state[:, 1]).max() > 1e-4
  p, budget = 4, 3 * 4 + 6
  packed = np.asarray(model.training_outputs(frames, text, packed_len=budget, return_features=True)[1])
  real = np.concatenate([np.ones((2, 3, p), bool), np.asarray(text) != V.PAD], -1).reshape(2, -1)
  ran = real & (np.cumsum(real, axis=1) <= budget)  # the first `budget` real tokens, in stream order
  np.testing.assert_allclose(packed[ran], np.asarray(feats)[ran], rtol=2e-5, atol=2e-5)
  assert not packed[~ran].any() and (~ran & real).any()
  with pytest.raises(ValueError, match="state_head=True"):
    tiny_video_lm().state_logits(feats, 3)


def test_state_loss_ignores_undefined_targets_and_scores_the_groups():
  rng = np.random.default_rng(23)
  logits = rng.normal(size=(1, 2, VL.STATE_GROUPS, VL.STATE_CLASSES)).astype(np.float32)
  state = rng.integers(0, VL.STATE_CLASSES, size=(1, 2, VL.STATE_GROUPS)).astype(np.int32)
  state[0, 0, 0], state[0, 1, 2] = -1, 4  # an undefined quadrant; a quadrant holding a four
  logits[0, 1, 2, 4] = 50.0
  loss, m = VL.state_loss(jnp.asarray(logits), jnp.asarray(state))
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  known = [(t, g) for t in range(2) for g in range(VL.STATE_GROUPS) if state[0, t, g] >= 0]
  np.testing.assert_allclose(float(loss), -np.mean([logp[0, t, g, state[0, t, g]] for t, g in known]), rtol=1e-5)
  hits = [logits[0, t, g].argmax() == state[0, t, g] for t, g in known]
  np.testing.assert_allclose(float(m["state_accuracy"]), np.mean(hits), rtol=1e-6)
  where = [(t, g) for t, g in known if g < 4 and state[0, t, g] != VL.NO_DIGIT]
  want = np.mean([logits[0, t, g].argmax() == state[0, t, g] for t, g in where])
  np.testing.assert_allclose(float(m["state_where_accuracy"]), want, rtol=1e-6)


# ------------------------------------------------------------------------ what changed: frame_delta and requests


def test_entry_labels_name_the_entering_digit_at_its_centre_patch_from_the_event_log():
  """``entry_labels``: per frame, the label of the digit whose entry the event log records in that frame, at the
  patch of its drawn centre, ``NO_DIGIT`` everywhere else; crowded streams from their first frame (entries beside
  digits on screen, repeated labels, exits)."""
  config = V.video_qa_config(max_on_screen=4, enter_prob=0.5, stay=(4, 12))
  model_config = VL.VideoLMConfig(tiny_video_lm().config.lm, frame_size=config.frame_size)
  chunks = [V.VideoQAStream(config, "train", i).take(60) for i in range(3)]
  got = np.asarray(VL.entry_labels(jnp.asarray(np.stack([c.objects for c in chunks])), model_config, 12))
  cols = config.frame_size[1] // model_config.patch_size
  entries = 0
  for row, chunk in enumerate(chunks):
    want = np.full(got.shape[1:], VL.NO_DIGIT)
    for frame, kind, obj, label in chunk.events:
      if kind != V.ENTER:
        continue
      (drawn,) = [r for r in chunk.objects[frame] if r[0] == obj]
      y, x = (int(v) + 6 for v in drawn[3:5])
      want[frame, (y // 8) * cols + x // 8] = label
      entries += 1
    np.testing.assert_array_equal(got[row], want)
  assert entries > 20


def test_pending_requests_follow_the_streams_requests_and_announcements():
  """``pending_requests``: from tick ``f + 1`` after a proactive request up to its announcement, the requested
  digit, else ``NO_DIGIT``; recomputed from the streams' question and announcement records (requests announced
  and requests still pending at the end)."""
  weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 6.0)  # requests often; entries often, so that some are fulfilled
  config = V.video_qa_config(question_prob=0.7, question_weights=weights, enter_prob=0.5, stay=(4, 12))
  chunks = [V.VideoQAStream(config, "test", i).take(80) for i in range(6)]
  text = np.stack([c.text for c in chunks])
  asked = np.stack([c.qtype for c in chunks]) == V.QTYPES.index("proactive")
  digits = [V.WORD_ID[w] for w in V.NUMBERS]
  got = np.asarray(VL.pending_requests(jnp.asarray(text), jnp.asarray(asked), digits))
  pending_ticks = open_requests = 0
  for row, chunk in enumerate(chunks):
    want = np.full(80, VL.NO_DIGIT)
    done = {qf: f for f, qf, _ in chunk.announcements}
    open_requests += sum(q.qtype == "proactive" and q.frame not in done for q in chunk.questions)
    for q in chunk.questions:
      if q.qtype == "proactive":
        want[q.frame + 1 : done.get(q.frame, 79) + 1] = V.NUMBERS.index(q.answer)
    np.testing.assert_array_equal(got[row], want)
    pending_ticks += int((want != VL.NO_DIGIT).sum())
  assert sum(len(c.announcements) for c in chunks) >= 3 and open_requests >= 2 and pending_ticks > 100


def test_frame_delta_encoder_reads_the_previous_frame_and_streams_in_chunks():
  """A ``frame_delta`` model's frame tokens depend on the frame before: encoding ticks in pieces, each given the
  last frame of the piece before, equals encoding them at once; a different previous frame changes the first
  tick's tokens only; a model without it ignores ``previous``; the streamed ticks (``__call__(previous=)``) equal
  the offline forward."""
  model = tiny_video_lm(seed=31, frame_delta=True)
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda f, p: nnx.merge(graphdef, state).encode(f, p))
  frames, text = ticks(2, 5, seed=32)
  blank = jnp.zeros((2, 16, 16))
  whole = np.asarray(encode(frames, blank))
  np.testing.assert_allclose(model.encode(frames[:, :1]), whole[:, :1], rtol=1e-5, atol=1e-5)  # none: a blank one
  parts = [whole[:, :2], encode(frames[:, 2:], frames[:, 1])]
  np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-5, atol=1e-5)
  other = np.asarray(encode(frames, frames[:, 3]))
  assert np.abs(other[:, 0] - whole[:, 0]).max() > 1e-3
  np.testing.assert_allclose(other[:, 1:], whole[:, 1:], rtol=1e-6, atol=1e-6)
  plain = tiny_video_lm(seed=31)
  np.testing.assert_array_equal(plain.encode(frames[:, :1], frames[:, 3]), plain.encode(frames[:, :1]))
  policy = C.Segmented((C.Dense(64), C.Dense(64)))
  step = jax.jit(lambda f, t, c, p: nnx.merge(graphdef, state)(f, t, c, p))
  cache, got = model.init_cache(policy, 2), []
  for a, b in ((0, 2), (2, 5)):
    logits, cache = step(frames[:, a:b], text[:, a:b], cache, blank if a == 0 else frames[:, a - 1])
    got.append(np.asarray(logits))
  want = np.asarray(jax.jit(lambda f, t: nnx.merge(graphdef, state).forward(f, t))(frames, text))
  p = model.config.tokens_per_frame
  real = np.concatenate([np.ones((2, 5, p), bool), np.asarray(text) != V.PAD], axis=2).reshape(2, -1)
  np.testing.assert_allclose(np.concatenate(got, axis=1)[real], want[real], atol=5e-5, rtol=5e-5)
  with library_checks_only(), pytest.raises(ValueError, match="previous must be the frame before"):
    model.encode(frames, frames[:1, 0])
  with pytest.raises(ValueError, match="frame_delta=True"):
    plain.entry_logits(jnp.asarray(whole))
  with pytest.raises(ValueError, match="request_head=True"):
    plain.request_logits(jnp.zeros((2, 5 * 10, 32)), 5)


def test_entry_words_add_the_entry_heads_word_embedding_to_the_frame_tokens():
  """``entry_words``: each frame token the language model reads is the encoder's token (of the frame and its
  difference from the one before) plus the entry head's softmax over the eleven classes times the input
  embeddings of the words naming them, recomputed here in NumPy; the config flag names the same words; without
  ``frame_delta`` it is an error."""
  model = tiny_video_lm(seed=26, frame_delta=True, entry_words=LABEL_WORDS)
  frames, text = ticks(2, 3, seed=27)
  vis, _, want = head_words_added(model, model.entry_head, frames)
  x, _, _ = model.tick_inputs(frames, text)
  got = np.asarray(x).reshape(2, 3, -1, 32)[:, :, :4]
  assert np.abs(want - vis).max() > 0.05
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:delta,entries")
  mc = cfg.video.model_config(cfg.model)
  assert mc.entry_words == LABEL_WORDS and mc.frame_delta and cfg.workdir.endswith("_delta_entries")
  with pytest.raises(ValueError, match="entry_words needs frame_delta"):
    VL.VideoLMConfig(model.config.lm, frame_size=(16, 16), patch_size=8, entry_words=LABEL_WORDS)


def test_the_activation_model_holds_the_standing_request_and_pools_its_words():
  """``Activation.standing``: a request stands from the tick after a proactive question up to its announcement
  (the streams' question and announcement records), and no other question stands; its vector is the attention pool
  of the question's words alone, recomputed in NumPy from the word table and the score layer (the slot's decision,
  announcement and ``<q>`` left out); ``tick_inputs`` adds the request's prompt to a ``<speak>`` that opens a slot
  and to nothing else."""
  weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 6.0)
  config = V.video_qa_config(frame_size=16, digit_size=8, question_prob=0.7, question_weights=weights, enter_prob=0.5)
  chunks = [V.VideoQAStream(config, "test", i).take(40) for i in range(3)]
  text = np.stack([c.text for c in chunks])
  model = tiny_video_lm(seed=2, activation=8)
  act = model.activation
  got, _ = act.standing(jnp.asarray(text))
  table, score = np.asarray(act.words.embedding[...]), np.asarray(act.score.kernel[...])[:, 0]

  def pooled(words):  # the question's words, without <q>
    e = table[[V.WORD_ID[w] for w in words.split()]]
    s = e @ score + float(act.score.bias[...][0])
    w = np.exp(s - s.max())
    return (w / w.sum()) @ e

  announced = 0
  for row, chunk in enumerate(chunks):
    want = np.zeros(40, bool)
    vectors = np.zeros((40, 8))
    done = {qf: f for f, qf, _ in chunk.announcements}
    announced += len(done)
    for q in chunk.questions:
      if q.qtype == "proactive":
        end = done.get(q.frame, 39) + 1
        want[q.frame + 1 : end] = True
        vectors[q.frame + 1 : end] = pooled(q.words)
    np.testing.assert_array_equal(np.asarray(got.open[row]), want)
    np.testing.assert_allclose(np.asarray(got.vector[row])[want], vectors[want], rtol=1e-5, atol=1e-6)
  assert announced >= 2 and np.asarray(got.open).mean() > 0.2
  frames = jnp.zeros((3, 40, 16, 16))
  x, _, _ = model.tick_inputs(frames, jnp.asarray(text))
  words = np.asarray(x).reshape(3, 40, -1, x.shape[-1])[:, :, model.config.frame_len :]
  embed = np.asarray(model.lm.embed(jnp.asarray(text)))
  cue = np.asarray(act.prompt(got.vector))
  speak = text[:, :, 0] == V.SPEAK
  assert speak.sum() >= 2
  np.testing.assert_allclose(words[:, :, 0][speak], (embed[:, :, 0] + cue)[speak], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(words[:, :, 0][~speak], embed[:, :, 0][~speak], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(words[:, :, 1:], embed[:, :, 1:], rtol=1e-5, atol=1e-6)


def test_activation_loss_is_a_weighted_cross_entropy_at_standing_ticks():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 9)).astype(np.float32) * 3
  stands = rng.uniform(size=(2, 9)) < 0.6
  speak = (rng.uniform(size=(2, 9)) < 0.3) & stands
  state = VL.RequestState(jnp.zeros((2, 9, 4)), jnp.asarray(stands))
  loss, m = VL.activation_loss(jnp.asarray(logits), state, jnp.asarray(speak), speak_weight=5.0)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  nll = np.where(speak, -np.log(p), -np.log1p(-p))
  w = np.where(stands, np.where(speak, 5.0, 1.0), 0.0)
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
  assert float(m["activation_recall"]) == pytest.approx((logits > 0)[speak].mean())
  assert float(m["activation_false"]) == pytest.approx((logits > 0)[stands & ~speak].mean())


def test_activation_config_errors():
  lm = tiny_video_lm().config.lm
  with pytest.raises(ValueError, match="activation must be a width"):
    VL.VideoLMConfig(lm, frame_size=(16, 16), patch_size=8, activation=-1)
  from jstream.train import VideoTask

  with pytest.raises(ValueError, match="activation must be a width"):
    VideoTask(activation=-2)
  with pytest.raises(ValueError, match="activation needs clips from their stream's start"):
    VideoTask(activation=8, clips_per_stream=2, clip_overlap=4)
  with pytest.raises(ValueError, match="activation needs clips from their stream's start"):
    VideoTask(activation=8, streaming_objective=False)


def test_activation_logits_read_the_frame_tokens_behind_a_stop_gradient():
  """``VideoLM.activation_logits`` reads the tokens the language model reads (``placed``: here with the entry
  head's digit words) and passes no gradient back to the frame encoder or the heads under it: the activation
  model's loss leaves them to their labels."""
  model = tiny_video_lm(seed=3, frame_delta=True, entry_words=V.LABEL_WORDS, activation=8)
  frames, _ = ticks(2, 3, seed=1)
  vector = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 8)), jnp.float32)
  vis = model.encode(frames)
  want = model.activation.logits(model.placed(vis), vector)
  np.testing.assert_allclose(np.asarray(model.activation_logits(vis, vector)), np.asarray(want), rtol=1e-6)
  assert np.abs(np.asarray(want) - np.asarray(model.activation.logits(vis, vector))).max() > 1e-4

  def total(m):
    return m.activation_logits(m.encode(frames), vector).sum()

  grads = nnx.grad(total)(model)
  for part in ("patch", "encoder", "entry_head", "lm"):
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(getattr(grads, part))), part
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads.activation))


def test_activation_heads_add_a_bilinear_match_of_the_request_with_the_frame_heads():
  """``activation_heads``: each token's score gains the frame heads' log-probabilities (patch head, then entry head)
  weighted by ``match(request)``; checked against a NumPy computation from the module's own weights, with the
  heads behind the stop-gradient; config errors."""
  model = tiny_video_lm(seed=4, frame_delta=True, activation=8, activation_heads=True)
  frames, _ = ticks(2, 3, seed=5)
  vector = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 8)), jnp.float32)
  vis = model.encode(frames)
  act = model.activation

  def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

  heads = np.concatenate([log_softmax(model.patch_logits(vis)), log_softmax(model.entry_logits(vis))], -1)
  assert heads.shape[-1] == 22
  np.testing.assert_allclose(np.asarray(model.frame_head_logprobs(vis)), heads, rtol=1e-5, atol=1e-5)
  tokens = np.asarray(model.placed(vis), np.float64)
  hidden = tokens @ np.asarray(act.key_in.kernel[...]) + np.asarray(act.key_in.bias[...])
  hidden = np.asarray(jax.nn.gelu(jnp.asarray(hidden)), np.float64)
  k = hidden @ np.asarray(act.key_out.kernel[...]) + np.asarray(act.key_out.bias[...])
  v = np.asarray(vector, np.float64)
  q = v @ np.asarray(act.query.kernel[...]) + np.asarray(act.query.bias[...])
  w = v @ np.asarray(act.match.kernel[...]) + np.asarray(act.match.bias[...])
  scores = np.einsum("bnpa,bna->bnp", k, q) / np.sqrt(8) + np.einsum("bnpc,bnc->bnp", heads, w)
  top = scores.max(-1)
  want = top + np.log(np.exp(scores - top[..., None]).sum(-1)) + float(act.bias[...])
  np.testing.assert_allclose(np.asarray(model.activation_logits(vis, vector)), want, rtol=1e-4, atol=1e-4)

  def total(m):
    return m.activation_logits(m.encode(frames), vector).sum()

  grads = nnx.grad(total)(model)
  for part in ("patch", "encoder", "patch_head", "entry_head"):
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(getattr(grads, part))), part
  assert np.abs(np.asarray(grads.activation.match.kernel[...])).max() > 0
  with library_checks_only():
    with pytest.raises(ValueError, match="heads must be"):
      act.logits(vis, vector)
    with pytest.raises(ValueError, match="activation_heads needs an activation model"):
      VL.VideoLMConfig(model.config.lm, frame_size=(16, 16), patch_size=8, activation_heads=True)
    from jstream.train import VideoTask

    with pytest.raises(ValueError, match="activation_heads needs"):
      VideoTask(activation_heads=True, patch_loss=1.0)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:delta,activation,heads,augment,data")
  mc = cfg.video.model_config(cfg.model)
  assert mc.activation_heads and cfg.video.data_config().augment == 9 and cfg.video.data_config().num_train == 16000
  assert cfg.workdir.endswith("_augment_data_heads")
  quick = load_config(f"{ROOT}/configs/video_lm.py:delta,activation,heads,augment,quick").video
  assert quick.activation_heads and quick.augment == 9  # the switches survive the quick shrink


def test_activation_match_scores_every_request_at_the_entry_frames_of_the_event_log():
  """``VideoTask.activation_match``'s parts: ``entering_digits`` against the streams' event log (entries beside
  digits on screen, repeated labels); ``request_slots`` are the words the data asks a request with;
  ``activation_match_logits`` equals ``activation_logits`` run once per request; ``match_loss`` is the mean binary
  cross-entropy over the frames where a digit enters, recomputed in NumPy; config errors."""
  config = V.video_qa_config(frame_size=16, digit_size=8, max_on_screen=4, enter_prob=0.5, stay=(4, 12))
  chunks = [V.VideoQAStream(config, "train", i).take(40) for i in range(3)]
  got = np.asarray(VL.entering_digits(jnp.asarray(np.stack([c.objects for c in chunks]))))
  want = np.zeros((3, 40, 10), bool)
  for row, chunk in enumerate(chunks):
    for frame, kind, _, label in chunk.events:
      want[row, frame, label] |= kind == V.ENTER
  np.testing.assert_array_equal(got, want)
  assert want.sum() > 20 and (want.sum(-1) >= 1).sum() > 20
  slots = V.request_slots(10)
  for d, slot in zip(V.NUMBERS, slots):
    assert V.decode(slot) == f"<q> tell me when a {d} appears" and slot[-1] == V.PAD
  with pytest.raises(ValueError, match="does not fit a slot of 6"):
    V.request_slots(6)
  model = tiny_video_lm(seed=7, frame_delta=True, activation=8, activation_heads=True)
  frames = jnp.asarray(np.stack([c.frames for c in chunks])[:, :5].astype(np.float32) / 255.0)
  vis = model.encode(frames)
  vectors, standing = model.activation.encode(jnp.asarray(slots))
  assert bool(standing.all())
  logits = np.asarray(model.activation_match_logits(vis, vectors))
  assert logits.shape == (3, 5, 10)
  for k in range(10):
    one = model.activation_logits(vis, jnp.broadcast_to(vectors[k], (3, 5, 8)))
    np.testing.assert_allclose(logits[..., k], np.asarray(one), rtol=1e-5, atol=1e-5)
  x = np.random.default_rng(8).normal(size=(3, 40, 10)) * 3
  loss, m = VL.match_loss(jnp.asarray(x, jnp.float32), jnp.asarray(want))
  frames_in = want.any(-1)
  nll = np.where(want, np.log1p(np.exp(-x)), np.log1p(np.exp(x)))[frames_in]
  np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
  assert float(m["match_recall"]) == pytest.approx((x > 0)[want].mean())
  assert float(m["match_false"]) == pytest.approx((x > 0)[frames_in[..., None] & ~want].mean())
  with library_checks_only(), pytest.raises(ValueError, match="vectors must be"):
    model.activation_match_logits(vis, vectors[:, :4])
  from jstream.train import VideoTask

  with pytest.raises(ValueError, match="activation_match must be >= 0 and needs activation"):
    VideoTask(activation_match=1.0)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:delta,activation,match")
  assert cfg.video.activation_match == 1.0 and cfg.workdir.endswith("_match")
  assert load_config(f"{ROOT}/configs/video_lm.py:delta,activation,match,quick").video.activation_match == 1.0


def test_hidden_requests_reach_the_language_model_only_through_the_prompt():
  """``hide_requests``: ``request_words`` marks ``<q>`` and the words of each proactive question, by the streams'
  question records, and nothing else; the offline forward neither reads nor caches them: a request for another
  digit leaves every logit before its announcement's ``<speak>`` as it was, and changes the ``<speak>``'s (its
  prompt); without ``hide_requests`` the logits change right after the question; config errors."""
  weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 6.0)
  config = V.video_qa_config(frame_size=16, digit_size=8, question_prob=0.7, question_weights=weights, enter_prob=0.5)
  chunks = [V.VideoQAStream(config, "test", i).take(24) for i in range(4)]
  text = np.stack([c.text for c in chunks])
  got = np.asarray(VL.request_words(jnp.asarray(text)))
  want = np.zeros(text.shape, bool)
  for row, chunk in enumerate(chunks):
    for q in chunk.questions:
      if q.qtype == "proactive":
        start = list(text[row, q.frame]).index(V.QUESTION)
        want[row, q.frame, start : start + 1 + len(q.words.split())] = True
  np.testing.assert_array_equal(got, want)
  assert want.sum() > 30 and any(q.qtype != "proactive" for c in chunks for q in c.questions)
  row = next(i for i, c in enumerate(chunks) if any(f > qf for f, qf, _ in c.announcements))
  chunk = chunks[row]
  f, qf, label = next((f, qf, label) for f, qf, label in chunk.announcements if f > qf)
  other = chunk.text.copy()
  other[qf][other[qf] == V.WORD_ID[V.NUMBERS[label]]] = V.WORD_ID[V.NUMBERS[(label + 1) % 10]]
  frames = jnp.asarray(chunk.frames[None].astype(np.float32) / 255.0)
  slot = chunk.text.shape[1]
  for hide in (True, False):
    model = tiny_video_lm(seed=8, activation=8, hide_requests=hide)
    a, b = (np.asarray(model.forward(frames, jnp.asarray(t[None])))[0] for t in (chunk.text, other))
    speak = f * (model.config.frame_len + slot) + model.config.frame_len  # the announcement's <speak>
    after = (qf + 1) * (model.config.frame_len + slot)  # the next tick's first frame token
    if hide:  # every position the language model reads (frames, shown words), up to the <speak>
      p = model.config.frame_len
      real = np.concatenate([np.ones((24, p), bool), (chunk.text != V.PAD) & ~want[row]], axis=1).reshape(-1)
      np.testing.assert_array_equal(a[:speak][real[:speak]], b[:speak][real[:speak]])
      assert np.abs(a[speak] - b[speak]).max() > 1e-4
    else:
      assert np.abs(a[after] - b[after]).max() > 1e-4
  with pytest.raises(ValueError, match="hide_requests needs an activation model"):
    VL.VideoLMConfig(model.config.lm, frame_size=(16, 16), patch_size=8, hide_requests=True)
  from jstream.train import VideoTask

  with pytest.raises(ValueError, match="hide_requests needs an activation model"):
    VideoTask(hide_requests=True)
  with pytest.raises(ValueError, match="which hide_requests keeps from it"):
    VideoTask(activation=8, hide_requests=True, request_loss=1.0)
  cfg = load_config(f"{ROOT}/configs/video_lm.py:delta,activation,hide")
  assert cfg.video.model_config(cfg.model).hide_requests and cfg.workdir.endswith("_hide")
  assert load_config(f"{ROOT}/configs/video_lm.py:delta,activation,hide,quick").video.hide_requests


def test_activation_model_ticks_streamed_in_chunks_equal_the_offline_forward():
  """A model with an activation model fed in two chunks, the second from the request standing after the first
  (``Activation.standing(first chunk)[1]`` as ``__call__(request=)``), gives the offline forward's logits over the
  whole stream; the second chunk started without it differs where a ``<speak>`` carries the request's prompt."""
  weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 6.0)
  config = V.video_qa_config(frame_size=16, digit_size=8, question_prob=0.7, question_weights=weights, enter_prob=0.5)
  model = tiny_video_lm(seed=6, activation=8)
  for i in range(20):  # a stream whose request, asked in the first chunk, is announced in the second
    chunk = V.VideoQAStream(config, "test", i).take(24)
    if any(f >= 12 > qf for f, qf, _ in chunk.announcements):
      break
  frames = jnp.asarray(chunk.frames[None].astype(np.float32) / 255.0)
  text = jnp.asarray(chunk.text[None])
  want = np.asarray(model.forward(frames, text))
  policy = C.Segmented((C.Dense(400), C.Dense(400)))
  first, cache = model(frames[:, :12], text[:, :12], model.init_cache(policy, 1))
  _, after = model.activation.standing(text[:, :12])
  assert bool(after.open[0])
  second, _ = model(frames[:, 12:], text[:, 12:], cache, request=after)
  np.testing.assert_allclose(np.concatenate([first, second], axis=1), want, rtol=2e-4, atol=2e-4)
  _, cache = model(frames[:, :12], text[:, :12], model.init_cache(policy, 1))
  fresh, _ = model(frames[:, 12:], text[:, 12:], cache)
  assert np.abs(np.asarray(fresh) - np.asarray(second)).max() > 1e-3
