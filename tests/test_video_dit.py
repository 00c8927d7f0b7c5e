"""The block-causal video diffusion transformer (jstream.models.video_dit) and its rollout (jstream.rollout).

Streaming must equal offline: a noisy chunk denoised against the cache of committed clean chunks sees what the
offline block-causal forward over [clean chunks at t = 0, noisy chunk] sees; a rolling cache with sinks sees what
an offline forward over the frames it keeps sees (cache-relative positions re-index them contiguously). Parameters
are randomised (adaLN-Zero starts every block as the identity, which would make these comparisons vacuous).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compilations
from jstream import cache as cache_lib
from jstream import rollout
from jstream.models import video_dit as vd

TOL = dict(rtol=2e-5, atol=2e-5)


@functools.cache
def _make(seed, kw):
  return make_fresh(seed, **dict(kw))


def make(seed=0, **kw):
  """A small randomised model, built once per configuration (the tests do not change it)."""
  return _make(seed, tuple(sorted(kw.items())))


def make_fresh(seed=0, **kw):
  base = dict(frame_size=(8, 8), patch_size=4, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  cfg = vd.VideoDiTConfig(**{**base, **kw})
  model = vd.VideoDiT(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 100)
  state = nnx.state(model, nnx.Param)
  state = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype), state)
  nnx.update(model, state)
  return model


def jitted(model):
  """``(velocity, commit)`` of ``model`` as jitted functions of ``(x, t, cache, labels, actions)`` /
  ``(x, cache, labels, actions)`` (eager calls are slow under the suite's runtime type checks)."""
  vel = jax.jit(lambda x, t, cache, lab, act: model.velocity(x, t, cache, labels=lab, actions=act)[0])
  com = jax.jit(lambda x, cache, lab, act: model.commit(x, cache, labels=lab, actions=act))
  return vel, com


def frames(model, b, n, seed):
  c = model.config
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, n, *c.frame_size, c.channels)), jnp.float32)


@pytest.mark.parametrize(
  "kw",
  [
    dict(frames_per_chunk=2, num_classes=3),  # chunks of two frames, 8 tokens
    dict(patch_size=8, num_actions=4),  # one token per frame: the single-token (read-only) path
  ],
  ids=["chunk2-classes", "token-actions"],
)
@pytest.mark.parametrize(
  "window_frames, sink_frames", [(None, 0), (4, 0), (4, 2)], ids=["dense", "window4", "sinks2-window4"]
)
def test_cached_chunks_equal_the_offline_block_causal_forward(kw, window_frames, sink_frames):
  model = make(**kw)
  cfg = model.config
  k, b, n = cfg.frames_per_chunk, 2, 8
  x, noisy = frames(model, b, n, 1), frames(model, b, n, 2)
  t = jnp.asarray(np.random.default_rng(3).uniform(0.05, 1, (b, n)), jnp.float32)
  labels = jnp.array([0, 2]) if cfg.num_classes else None
  actions = jnp.asarray(np.random.default_rng(4).integers(0, 4, (b, n)), jnp.int32) if cfg.num_actions else None
  policy = vd.rolling_policy(cfg, window_frames, sink_frames=n if window_frames is None else sink_frames)
  # Offline references, one forward: sequence c is [clean chunks before c at t = 0, noisy chunk c, the clean rest]
  # (block-causal: what follows chunk c cannot change it), all stacked along the batch.
  m = n // k
  chunk_of = np.arange(n) // k
  seqs = jnp.concatenate([jnp.where((chunk_of == c)[None, :, None, None, None], noisy, x) for c in range(m)])
  times = jnp.concatenate([jnp.where(chunk_of == c, t, 0.0) for c in range(m)])
  tile = lambda a: None if a is None else jnp.concatenate([a] * m)
  mask = None if window_frames is None else policy
  offline = jax.jit(lambda x, t, lab, act: model.forward(x, t, labels=lab, actions=act, policy=mask))
  want = offline(seqs, times, tile(labels), tile(actions)).reshape(m, b, n, *x.shape[2:])
  vel, com = jitted(model)
  cache = model.init_cache(policy, b)
  for c in range(m):
    sl = slice(c * k, (c + 1) * k)
    act = None if actions is None else actions[:, sl]
    v = vel(noisy[:, sl], t[:, sl], cache, labels, act)
    np.testing.assert_allclose(np.asarray(v), np.asarray(want[c][:, sl]), **TOL)
    cache = com(x[:, sl], cache, labels, act)
  # The window really evicted: the last chunk's velocity differs from the one that sees every earlier frame.
  if window_frames is not None:
    full = jax.jit(model.forward)(seqs[-b:], times[-b:], labels=labels, actions=actions)[:, -k:]
    assert float(jnp.max(jnp.abs(full - v))) > 1e-3


def test_commit_equals_recomputing_the_committed_frames():
  model = make(frames_per_chunk=2)
  cfg, b, n = model.config, 2, 6
  x = frames(model, b, n, 5)
  policy = vd.rolling_policy(cfg, None, sink_frames=n)
  cache = model.init_cache(policy, b)
  _, com = jitted(model)
  for c in range(0, n, 2):
    cache = com(x[:, c : c + 2], cache, None, None)
  # Recompute: every clean frame run at noise level 0 in one call, straight through the transformer.
  h, cond, groups = model.tokens(x, jnp.zeros((b, n)))
  _, again = model.dit.extend_embeddings(h, model.init_cache(policy, b), groups=groups, cond=cond)
  assert np.array_equal(np.asarray(cache.idx), np.asarray(again.idx))
  assert np.array_equal(np.asarray(cache.pos), np.asarray(again.pos))
  held = np.asarray(cache.idx[0] >= 0)
  assert held.sum() == n * cfg.tokens_per_frame
  k, k_again = np.asarray(cache.k), np.asarray(again.k)  # [l, b, kv heads, slots, h]
  v, v_again = np.asarray(cache.v), np.asarray(again.v)  # [l, b, kv heads, h, slots]
  np.testing.assert_allclose(k[:, :, :, held], k_again[:, :, :, held], **TOL)
  np.testing.assert_allclose(v[..., held], v_again[..., held], **TOL)


def test_frame_sinks_and_rolling_window_see_the_frames_they_keep_reindexed():
  """After evictions, a SinkWindow cache (cache-relative) computes what the offline forward computes on the
  frames it keeps, numbered afresh: sinks, then the window, then the noisy chunk. One layer, so that a cached
  frame's keys depend on that frame alone (deeper, they carry the context it was committed with, which the
  fresh offline sequence lacks): this checks the positions the cache gives its keys."""
  model = make(frames_per_chunk=1, num_layers=1)
  cfg, b, n, sinks, window = model.config, 2, 9, 2, 3
  x, noisy = frames(model, b, n, 6), frames(model, b, 1, 7)
  t = jnp.full((b, 1), 0.7)
  cache = model.init_cache(vd.rolling_policy(cfg, window, sink_frames=sinks), b)
  vel, com = jitted(model)
  fwd = jax.jit(model.forward)
  for c in range(n - 1):
    cache = com(x[:, c : c + 1], cache, None, None)
  v = vel(noisy, t, cache, None, None)
  kept = jnp.concatenate([x[:, :sinks], x[:, n - window : n - 1], noisy], axis=1)  # the window holds the chunk
  want = fwd(kept, jnp.concatenate([jnp.zeros((b, kept.shape[1] - 1)), t], 1))[:, -1:]
  np.testing.assert_allclose(np.asarray(v), np.asarray(want), **TOL)
  # Without the sinks' frames the answer differs (the sinks are read).
  other = fwd(kept[:, sinks:], jnp.concatenate([jnp.zeros((b, window - 1)), t], 1))[:, -1:]
  assert float(jnp.max(jnp.abs(other - v))) > 1e-3


def test_rolling_rollout_with_a_window_covering_the_video_equals_dense():
  model = make(frames_per_chunk=2, num_classes=3)
  cfg, b, n = model.config, 2, 8
  labels = jnp.array([1, 2])
  rng = jax.random.key(3)
  dense = rollout.generate_video(
    model, num_frames=n, policy=vd.rolling_policy(cfg, None, n), batch_size=b, labels=labels, steps=3, rng=rng
  )
  rolling = rollout.generate_video(
    model, num_frames=n, policy=vd.rolling_policy(cfg, n, 2), batch_size=b, labels=labels, steps=3, rng=rng
  )
  assert dense.frames.shape == (b, n, *cfg.frame_size, 1)
  np.testing.assert_allclose(np.asarray(rolling.frames), np.asarray(dense.frames), **TOL)
  assert 0.0 <= float(dense.frames.min()) and float(dense.frames.max()) <= 1.0
  # A shorter window is a different rollout (the window matters).
  short = rollout.generate_video(
    model, num_frames=n, policy=vd.rolling_policy(cfg, 2), batch_size=b, labels=labels, steps=3, rng=rng
  )
  assert float(jnp.max(jnp.abs(short.frames[:, 4:] - dense.frames[:, 4:]))) > 1e-3


def test_rollout_is_euler_sampling_chunk_by_chunk_and_compiles_once():
  model = make_fresh(frames_per_chunk=1)
  # Parameters committed to a device, as a model restored from a checkpoint has them: a new cache must be too, or
  # the second call (fed the first call's committed cache) compiles again.
  nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
  cfg, b = model.config, 2
  policy = vd.rolling_policy(cfg, 2)
  rng = jax.random.key(0)
  gen = rollout.VideoGenerator(model, chunks=3, steps=2)
  jax.clear_caches()
  with compilations() as count:
    first = gen(model.init_cache(policy, b), rng)
    second = gen(first.cache, rng, start=3)
    jax.block_until_ready(second.frames)
  assert count["_video"] == 1
  # By hand: chunk i from fold_in(rng, i), two Euler steps (t = 1 -> 0.5 -> 0), then the commit.
  cache = model.init_cache(policy, b)
  vel, com = jitted(model)
  frames_by_hand = []
  for i in range(6):
    x = jax.random.normal(jax.random.fold_in(rng, i), (b, 1, *cfg.frame_size, 1))
    for t0, t1 in ((1.0, 0.5), (0.5, 0.0)):
      x = x + (t1 - t0) * vel(x, jnp.full((b, 1), t0), cache, None, None)
    cache = com(x, cache, None, None)
    frames_by_hand.append(np.clip((np.asarray(x) + 1) / 2, 0, 1))
  got = np.concatenate([np.asarray(first.frames), np.asarray(second.frames)], axis=1)
  np.testing.assert_allclose(got, np.concatenate(frames_by_hand, axis=1), **TOL)


def test_context_frames_are_committed_before_the_rollout():
  model = make(frames_per_chunk=2)
  cfg, b = model.config, 1
  policy = vd.rolling_policy(cfg, None, 8)
  ctx = (frames(model, b, 4, 8) + 1) / 2
  out = rollout.generate_video(model, num_frames=2, policy=policy, context=ctx, steps=2, rng=jax.random.key(1))
  cache = model.init_cache(policy, b)
  _, com = jitted(model)
  for c in (0, 2):
    cache = com(vd.to_model(ctx[:, c : c + 2]), cache, None, None)
  want = rollout.generate_video(model, num_frames=2, cache=cache, steps=2, rng=jax.random.key(1))
  np.testing.assert_allclose(np.asarray(out.frames), np.asarray(want.frames), **TOL)
  assert int(out.cache.count[0, 0]) == 6 * cfg.tokens_per_frame


def test_conditioning_reaches_the_output_and_only_later_chunks_see_an_action():
  model = make(frames_per_chunk=1, num_classes=3, num_actions=4)
  b, n = 1, 4
  x = frames(model, b, n, 9)
  t = jnp.full((b, n), 0.5)
  acts = jnp.array([[0, 1, 2, 3]])
  fwd = jax.jit(model.forward)
  base = fwd(x, t, labels=jnp.array([0]), actions=acts)
  other_label = fwd(x, t, labels=jnp.array([1]), actions=acts)
  assert float(jnp.max(jnp.abs(other_label - base))) > 1e-3
  changed = fwd(x, t, labels=jnp.array([0]), actions=acts.at[0, 2].set(0))
  diff = np.asarray(jnp.max(jnp.abs(changed - base), axis=(2, 3, 4)))[0]
  assert np.all(diff[:2] == 0) and np.all(diff[2:] > 1e-4)  # block-causal: frames 0, 1 do not see action 2


def test_patchify_round_trip_and_patch_order():
  model = make(frames_per_chunk=1, channels=3)
  x = frames(model, 2, 1, 10)
  p = model.patchify(x)
  assert p.shape == (2, 1, 4, 48)
  np.testing.assert_array_equal(np.asarray(model.unpatchify(p)), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(p[0, 0, 1]), np.asarray(x[0, 0, 0:4, 4:8]).reshape(-1))  # top right


def test_bad_input_is_a_clear_error():
  model = make(frames_per_chunk=2, num_actions=3)
  cfg = model.config
  with pytest.raises(ValueError, match="multiple of frames_per_chunk"):
    vd.rolling_policy(cfg, 3)
  with pytest.raises(ValueError, match="whole number of chunks"):
    model.init_cache(cache_lib.Window(3 * cfg.tokens_per_frame, positions="cache_relative"), 1)
  with pytest.raises(ValueError, match="cache_relative"):
    model.init_cache(cache_lib.Window(2 * cfg.chunk_tokens), 1)
  cache = model.init_cache(vd.rolling_policy(cfg, 4), 1)
  good = jnp.zeros((1, 2, 8, 8, 1))
  with pytest.raises(ValueError, match=r"frames must be \[b, n, 8, 8, 1\]"):
    model.velocity(jnp.zeros((1, 2, 8, 6, 1)), 0.5, cache, actions=jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="action ids must be in"):
    model.velocity(good, 0.5, cache, actions=jnp.array([[0, 3]]))
  with pytest.raises(ValueError, match="actions"):
    model.velocity(good, 0.5, cache)
  with pytest.raises(ValueError, match="labels"):
    model.velocity(good, 0.5, cache, labels=jnp.array([0]), actions=jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="a chunk is 2 frames"):
    model.velocity(jnp.zeros((1, 4, 8, 8, 1)), 0.5, cache, actions=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="not a whole number of chunks"):
    model.forward(jnp.zeros((1, 3, 8, 8, 1)), jnp.zeros((1, 3)), actions=jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="needs positions='cache_relative'"):
    model.forward(good, jnp.zeros((1, 2)), actions=jnp.zeros((1, 2), jnp.int32), policy=cache_lib.Window(16))
  with pytest.raises(ValueError, match="num_frames"):
    rollout.generate_video(model, num_frames=3, cache=cache, actions=jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="cond"):  # the engine: a conditioned transformer needs its conditioning
    model.dit.extend_embeddings(jnp.zeros((1, 8, 32)), cache)


def test_adaln_zero_conditioning_of_the_engine():
  """``TransformerConfig.cond_dim``: a new conditioned model's blocks are the identity (adaLN-Zero); with the
  modulation set to gate 1, shift 0, scale 0 it is the unconditioned model with the same weights; a final shift
  and scale act as ``norm(x) * (1 + scale) + shift`` before the head."""
  from jstream import StreamingTransformer, TransformerConfig

  cfg = TransformerConfig(vocab_size=12, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, tie_embeddings=False)
  cond_model = StreamingTransformer(cfg.replace(cond_dim=8), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  cond = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  head = np.asarray(cond_model.lm_head.kernel[...])
  norm = lambda a: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + cfg.norm_eps)  # the norm scales are 1
  np.testing.assert_allclose(
    np.asarray(cond_model.forward_embeddings(x, cond=cond)), norm(np.asarray(x)) @ head, rtol=1e-5, atol=1e-5
  )
  # Gate 1, shift 0, scale 0 in every block: the plain model with the same weights.
  plain = StreamingTransformer(cfg, rngs=nnx.Rngs(1))
  shared = {p: v for p, v in nnx.to_flat_state(nnx.state(plain))}
  for path, var in nnx.to_flat_state(nnx.state(cond_model)):
    if path in shared:
      var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape), jnp.float32) * 0.3)
      shared[path].set_value(var.get_value())
  d = 16
  gates = np.zeros(6 * d, np.float32)
  gates[2 * d : 3 * d] = gates[5 * d : 6 * d] = 1.0  # (shift, scale, gate) for attention, then for the MLP
  bias = cond_model.blocks.modulation.proj.bias
  bias.set_value(jnp.broadcast_to(jnp.asarray(gates), bias.get_value().shape))
  np.testing.assert_allclose(
    np.asarray(cond_model.forward_embeddings(x, cond=cond)),
    np.asarray(plain.forward_embeddings(x)),
    rtol=1e-5,
    atol=1e-5,
  )
  # Scale 0.5 before attention and before the MLP: the plain model with its norms' scales times 1.5.
  gates[d : 2 * d] = gates[4 * d : 5 * d] = 0.5
  bias.set_value(jnp.broadcast_to(jnp.asarray(gates), bias.get_value().shape))
  for norm_scale in (plain.blocks.attn_norm.scale, plain.blocks.mlp_norm.scale):
    norm_scale.set_value(norm_scale.get_value() * 1.5)
  np.testing.assert_allclose(
    np.asarray(cond_model.forward_embeddings(x, cond=cond)),
    np.asarray(plain.forward_embeddings(x)),
    rtol=1e-5,
    atol=1e-5,
  )
  # The final modulation: shift 0.5, scale -0.25 on every feature.
  fb = cond_model.final_modulation.proj.bias
  fb.set_value(jnp.concatenate([jnp.full((d,), 0.5), jnp.full((d,), -0.25)]))
  probe = StreamingTransformer(cfg, rngs=nnx.Rngs(2))
  nnx.update(probe, nnx.state(plain))
  probe.lm_head.kernel.set_value(jnp.eye(d, 12))  # the head reads the normed features' first 12 coordinates
  cond_model.lm_head.kernel.set_value(jnp.eye(d, 12))
  normed = np.asarray(probe.forward_embeddings(x))
  np.testing.assert_allclose(
    np.asarray(cond_model.forward_embeddings(x, cond=cond)), normed * 0.75 + 0.5, rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="no conditioning"):
    plain.forward_embeddings(x, cond=cond)
  with pytest.raises(ValueError, match=r"cond must be \[b, t, c\]"):
    cond_model.forward_embeddings(x, cond=cond[:, :, :4])


def test_teacher_forcing_loss_is_the_streamed_target_chunk_after_clean_context():
  """``training_loss(objective="teacher_forcing")``: per clip one chunk is noised and scored, the chunks before it
  clean; the loss equals the flow-matching error of the velocity the stream computes for that chunk after
  committing the clean ones (an independent path: the cache, not the offline forward)."""
  model = make(frames_per_chunk=2, num_classes=3)
  cfg, b, n = model.config, 3, 6
  frames01 = (frames(model, b, n, 11) + 1) / 2
  labels = jnp.array([0, 1, 2])
  rng = jax.random.key(5)
  xt, t, noise, weight = vd.training_inputs(vd.to_model(frames01), rng, 2, objective="teacher_forcing")
  w = np.asarray(weight)
  assert np.all(w.sum(1) == 2) and np.all(w[:, ::2] == w[:, 1::2])  # one whole chunk per clip
  assert np.all(np.asarray(t)[w == 0] == 0) and np.all(np.asarray(t)[w == 1] > 0)
  loss, _ = vd.training_loss(model, frames01, rng, labels=labels, objective="teacher_forcing")
  vel, com = jitted(model)
  errs = []
  for r in range(b):
    c = int(np.argmax(w[r]))  # the target's first frame
    cache = model.init_cache(vd.rolling_policy(cfg, None, n), 1)
    for j in range(0, c, 2):
      cache = com(vd.to_model(frames01[r : r + 1, j : j + 2]), cache, labels[r : r + 1], None)
    v = vel(xt[r : r + 1, c : c + 2], t[r : r + 1, c : c + 2], cache, labels[r : r + 1], None)
    target = noise[r : r + 1, c : c + 2] - vd.to_model(frames01[r : r + 1, c : c + 2])
    errs.append(float(jnp.mean((v - target) ** 2)))
  np.testing.assert_allclose(float(loss), np.mean(errs), rtol=1e-4)
  df, m = vd.training_loss(model, frames01, rng, labels=labels)  # diffusion forcing: every frame weighs
  assert float(m["tokens"]) == b * n * cfg.tokens_per_frame and np.isfinite(float(df))


# ---------------------------------------------------------------------------------------------- guidance


def test_null_label_conditions_on_the_noise_level_alone():
  model = make(frames_per_chunk=1, num_classes=3)
  x = frames(model, 2, 2, 21)
  t = jnp.array([[0.3, 0.7], [0.5, 0.9]])
  _, cond, _ = model.tokens(x, t, jnp.array([vd.NULL_LABEL, 2]))
  time_only = model.time_out(jax.nn.silu(model.time_in(vd.timestep_features(t, model.config.embed_dim))))
  p = model.config.tokens_per_frame
  np.testing.assert_allclose(np.asarray(cond[0]), np.repeat(np.asarray(time_only[0]), p, axis=0), **TOL)
  want = np.asarray(time_only[1] + model.class_embed.embedding[...][2])
  np.testing.assert_allclose(np.asarray(cond[1]), np.repeat(want, p, axis=0), **TOL)


def test_guided_forward_combines_two_separate_forwards():
  model = make(frames_per_chunk=2, num_classes=3)
  b, n, w = 2, 4, 2.5
  x = frames(model, b, n, 22)
  t = jnp.asarray(np.random.default_rng(22).uniform(0, 1, (b, n)), jnp.float32)
  labels = jnp.array([0, 2])
  fwd = jax.jit(model.forward)
  v_c = fwd(x, t, labels=labels)
  v_u = fwd(x, t, labels=jnp.full((b,), vd.NULL_LABEL))
  got = jax.jit(functools.partial(model.forward, guidance=w))(x, t, labels=labels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(v_u + w * (v_c - v_u)), rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(v_c - v_u))) > 1e-3  # the label matters, so the check above is not vacuous


@pytest.mark.parametrize("window_frames", [None, 2], ids=["dense", "window2_with_context"])
def test_guided_rollout_equals_two_caches_stepped_by_hand(window_frames):
  """A guided rollout (one paired cache, one call per step on both branches; with the window, after two context
  frames) against two separate caches, one per branch, each given the context and stepped and committed on its
  own."""
  model = make_fresh(frames_per_chunk=1, num_classes=3)
  cfg, b, w, n = model.config, 2, 3.0, 4
  policy = vd.rolling_policy(cfg, window_frames, 0 if window_frames else n)
  labels = jnp.array([1, 0])
  null = jnp.full((b,), vd.NULL_LABEL)
  rng = jax.random.key(5)
  ctx = (frames(model, b, 2, 24) + 1) / 2 if window_frames else None
  out = rollout.generate_video(
    model, num_frames=n, policy=policy, labels=labels, steps=2, rng=rng, guidance=w, context=ctx
  )
  assert out.frames.shape == (b, n, *cfg.frame_size, 1) and out.cache.batch_size == 2 * b
  vel, com = jitted(model)
  cond, uncond = model.init_cache(policy, b), model.init_cache(policy, b)
  for c in range(0 if ctx is None else ctx.shape[1]):
    cond, uncond = (
      com(vd.to_model(ctx[:, c : c + 1]), cond, labels, None),
      com(vd.to_model(ctx[:, c : c + 1]), uncond, null, None),
    )
  by_hand = []
  for i in range(n):
    x = jax.random.normal(jax.random.fold_in(rng, i), (b, 1, *cfg.frame_size, 1))
    for t0, t1 in ((1.0, 0.5), (0.5, 0.0)):
      tt = jnp.full((b, 1), t0)
      v_c, v_u = vel(x, tt, cond, labels, None), vel(x, tt, uncond, null, None)
      x = x + (t1 - t0) * (v_u + w * (v_c - v_u))
    cond, uncond = com(x, cond, labels, None), com(x, uncond, null, None)
    by_hand.append(np.clip((np.asarray(x) + 1) / 2, 0, 1))
  np.testing.assert_allclose(np.asarray(out.frames), np.concatenate(by_hand, axis=1), rtol=1e-4, atol=1e-4)
  unguided = rollout.generate_video(model, num_frames=n, policy=policy, labels=labels, steps=2, rng=rng, context=ctx)
  assert float(jnp.max(jnp.abs(unguided.frames - out.frames))) > 1e-3


def test_label_dropout_trains_the_unconditional_velocity():
  model = make(frames_per_chunk=1, num_classes=3)
  x = (frames(model, 4, 2, 23) + 1) / 2
  labels = jnp.array([0, 1, 2, 1])

  def class_grad(p):
    def f(m):
      return vd.training_loss(m, x, jax.random.key(0), labels=labels, label_dropout=p)[0]

    return np.asarray(nnx.grad(f)(model).class_embed.embedding[...])

  assert np.abs(class_grad(0.0)).max() > 1e-6
  np.testing.assert_array_equal(class_grad(1.0 - 1e-7), 0.0)  # every label dropped: the embedding gets nothing
  drops = vd.drop_labels(jnp.arange(10_000) % 3, jax.random.key(1), 0.25)
  assert abs(float(jnp.mean(drops == vd.NULL_LABEL)) - 0.25) < 0.02
  kept = drops != vd.NULL_LABEL
  np.testing.assert_array_equal(np.asarray(drops)[np.asarray(kept)], (np.arange(10_000) % 3)[np.asarray(kept)])


def test_guidance_bad_input_is_a_clear_error():
  plain = make(frames_per_chunk=1)
  cond = make(frames_per_chunk=1, num_classes=3)
  policy = vd.rolling_policy(cond.config, 2)
  with pytest.raises(ValueError, match="class-conditioned"):
    rollout.VideoGenerator(plain, chunks=1, guidance=2.0)
  with pytest.raises(ValueError, match="class-conditioned"):
    plain.init_cache(policy, 1, guided=True)
  with pytest.raises(ValueError, match="finite float"):
    rollout.VideoGenerator(cond, chunks=1, guidance=float("nan"))
  with pytest.raises(ValueError, match="paired cache"):
    rollout.VideoGenerator(cond, chunks=1, guidance=2.0)(cond.init_cache(policy, 3), labels=jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match=r"guidance 2\.0 takes a paired cache"):  # an unguided cache of even rows
    rollout.VideoGenerator(cond, chunks=1, guidance=2.0)(cond.init_cache(policy, 2), labels=jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"guidance 1\.0 takes an unguided cache"):  # a paired cache, unguided
    rollout.VideoGenerator(cond, chunks=1)(cond.init_cache(policy, 2, guided=True), labels=jnp.array([0, 1]))
  with pytest.raises(ValueError, match="a real label per row"):
    rollout.generate_video(cond, num_frames=1, policy=policy, labels=jnp.array([0, vd.NULL_LABEL]), guidance=2.0)
  with pytest.raises(ValueError, match="needs labels"):
    cond.forward(jnp.zeros((1, 1, 8, 8, 1)), 0.5, guidance=2.0)
  with pytest.raises(ValueError, match="label ids must be in"):
    cond.forward(jnp.zeros((1, 1, 8, 8, 1)), jnp.zeros((1, 1)), labels=jnp.array([-2]))
  with pytest.raises(ValueError, match="label_dropout"):
    vd.training_loss(cond, jnp.zeros((1, 1, 8, 8, 1)), jax.random.key(0), labels=jnp.array([0]), label_dropout=1.0)
