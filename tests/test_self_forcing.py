"""Self-rollout training (jstream.models.self_forcing): the student's rollout is its own sampler, differentiable
through one denoising call per chunk and never through cache writes; DMD's direction and the optimizer's split."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_video_dit import TOL, frames, jitted, make

from jstream import flow, rollout
from jstream.models import self_forcing as sf
from jstream.models import video_dit as vd
from jstream.train import TrainConfig, VideoGenTask
from jstream.train.optim import make_optimizer

B, N, M = 2, 2, 3  # rows, chunks (one frame each), sampler steps


def _rollout_fn(model, labels=None):
  cfg = model.config

  @jax.jit
  def run(noise, exit_step):
    cache = model.init_cache(vd.rolling_policy(cfg, None, N), B)
    return sf.self_rollout(model, cache, noise, flow.schedule(M), exit_step, labels=labels)

  return run


def _noise(model, rng):
  """The noise of chunk i as ``rollout.VideoGenerator`` draws it: ``fold_in(rng, i)``."""
  c = model.config
  return jnp.concatenate(
    [jax.random.normal(jax.random.fold_in(rng, i), (B, 1, *c.frame_size, c.channels)) for i in range(N)], axis=1
  )


def test_rollout_exiting_at_the_last_step_is_the_inference_rollout():
  model = make(num_classes=3)
  labels = jnp.array([0, 2])
  rng = jax.random.key(5)
  got, cache = _rollout_fn(model, labels)(_noise(model, rng), jnp.full((B, N), M - 1))
  ref = rollout.generate_video(
    model, num_frames=N, policy=vd.rolling_policy(model.config, None, N), labels=labels, steps=M, rng=rng
  )
  np.testing.assert_allclose(np.asarray(vd.from_model(got)), np.asarray(ref.frames), **TOL)
  np.testing.assert_allclose(np.asarray(cache.k), np.asarray(ref.cache.k), **TOL)


def test_an_early_exit_is_the_sampler_stopped_there_and_jumped_to_zero():
  model = make()
  cfg = model.config
  noise = _noise(model, jax.random.key(1))
  exit_step = jnp.array([[0, 2], [1, 0]])
  got = _rollout_fn(model)(noise, exit_step)[0]
  # By hand: each row alone, chunk by chunk: Euler over [times[0], ..., times[s]], then one step to 0.
  vel, com = jitted(model)
  times = np.asarray(flow.schedule(M))
  for r in range(B):
    cache = model.init_cache(vd.rolling_policy(cfg, None, N), 1)
    for i in range(N):
      s = int(exit_step[r, i])
      x = noise[r : r + 1, i : i + 1]
      grid = [*times[: s + 1], 0.0]
      for t0, t1 in itertools.pairwise(grid):
        x = x + (t1 - t0) * vel(x, jnp.full((1, 1), t0), cache, None, None)
      cache = com(x, cache, None, None)
      np.testing.assert_allclose(np.asarray(got[r, i]), np.asarray(x[0, 0]), **TOL)


def test_gradients_flow_through_each_chunks_exit_call_only():
  """The rollout's gradient equals that of the exit calls alone, on inputs and caches computed without gradients:
  nothing flows through the sampler's earlier steps or through the cache the chunks were committed to."""
  model = make()
  cfg = model.config
  noise = _noise(model, jax.random.key(2))
  exit_step = jnp.array([[1, 2], [2, 0]])
  weights = jax.random.normal(jax.random.key(3), noise.shape)
  graphdef, params = nnx.split(model)
  times = flow.schedule(M)
  policy = vd.rolling_policy(cfg, None, N)

  def through_rollout(p):
    m = nnx.merge(graphdef, p)
    out, _ = sf.self_rollout(m, m.init_cache(policy, B), noise, times, exit_step)
    return jnp.sum(weights * out)

  # The exit calls' inputs and caches, computed concretely (no gradient can reach them).
  vel, com = jitted(model)
  inputs, caches = [], []
  cache = model.init_cache(policy, B)
  for i in range(N):
    x = noise[:, i : i + 1]
    states = []
    for j in range(M):
      states.append(x)
      x = x + (times[j + 1] - times[j]) * vel(x, jnp.full((B, 1), times[j]), cache, None, None)
    x_s = jnp.stack([states[int(exit_step[r, i])][r] for r in range(B)])
    t_s = times[exit_step[:, i]][:, None]
    inputs.append((x_s, t_s))
    caches.append(cache)
    cache = com(x_s - t_s[:, :, None, None, None] * vel(x_s, t_s, cache, None, None), cache, None, None)

  def through_exits(p):
    m = nnx.merge(graphdef, p)
    total = 0.0
    for i, ((x_s, t_s), c) in enumerate(zip(inputs, caches)):
      x0 = x_s - t_s[:, :, None, None, None] * m.velocity(x_s, t_s, c)[0]
      total = total + jnp.sum(weights[:, i : i + 1] * x0)
    return total

  got = jax.jit(jax.grad(through_rollout))(params)
  want = jax.jit(jax.grad(through_exits))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(got)) > 1e-3  # not vacuous


def test_dmd_direction_is_the_normalised_difference_of_clean_predictions():
  rng = np.random.default_rng(0)
  shape = (2, 3, 4, 4, 1)
  x0, x_t, v_r, v_f = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
  t = rng.uniform(0.1, 0.9, (2, 3)).astype(np.float32)
  weight = np.array([[0, 1, 1], [0, 0, 1]], np.float32)  # context frames do not count in the normalisation
  got = np.asarray(sf.dmd_direction(*map(jnp.asarray, (x0, x_t, t, v_r, v_f, weight))))
  for r in range(2):
    real = x_t[r] - t[r][:, None, None, None] * v_r[r]
    fake = x_t[r] - t[r][:, None, None, None] * v_f[r]
    kept = weight[r] > 0
    scale = np.mean(np.abs(x0[r][kept] - real[kept]))
    np.testing.assert_allclose(got[r], (fake - real) / scale, rtol=1e-5, atol=1e-6)


def test_generator_loss_is_zero_where_critic_equals_teacher_and_moves_the_clip_against_the_direction():
  cfg = make().config
  model = sf.SelfForcing(cfg, rngs=nnx.Rngs(0))
  model.load_teacher(make())
  graphdef, state = nnx.split(model)

  def losses(state, rng):
    return sf.dmd_losses(nnx.merge(graphdef, state), rng, B, N, steps=M)

  gen, critic, metrics = jax.jit(losses)(state, jax.random.key(0))
  assert float(gen) == 0.0 and float(metrics["dmd_direction_rms"]) == 0.0  # fake score == real score: at rest
  assert float(critic) > 0.0
  # A different critic: the generator's loss is half the mean squared direction (the surrogate's value).
  critic_state = nnx.state(model.critic, nnx.Param)
  nnx.update(model.critic, jax.tree.map(lambda p: p + 0.05, critic_state))
  gen, _, metrics = jax.jit(losses)(nnx.state(model), jax.random.key(0))
  assert float(gen) > 0.0
  np.testing.assert_allclose(float(gen), 0.5 * float(metrics["dmd_direction_rms"]) ** 2, rtol=1e-4)


def test_a_guided_teacher_is_the_real_score():
  """With the critic equal to the teacher the generator is at rest unguided; a guided teacher (classifier-free,
  ``teacher_guidance``) moves the real score away from the critic's."""
  cfg = make(num_classes=3).config
  model = sf.SelfForcing(cfg, rngs=nnx.Rngs(0))
  model.load_teacher(make(num_classes=3))
  graphdef, state = nnx.split(model)
  labels = jnp.array([0, 2])

  def losses(state, rng, w):
    return sf.dmd_losses(nnx.merge(graphdef, state), rng, B, N, steps=M, labels=labels, teacher_guidance=w)

  run = jax.jit(losses, static_argnums=2)
  gen, _, metrics = run(state, jax.random.key(0), 1.0)
  assert float(gen) == 0.0
  gen, _, metrics = run(state, jax.random.key(0), 3.0)
  assert float(gen) > 0.0
  np.testing.assert_allclose(float(gen), 0.5 * float(metrics["dmd_direction_rms"]) ** 2, rtol=1e-4)


def test_load_teacher_refuses_another_model():
  model = sf.SelfForcing(make().config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="teacher's model differs"):
    model.load_teacher(make(num_classes=3))


def test_optimizer_leaves_the_teacher_and_updates_the_student_every_critic_steps():
  task = VideoGenTask(frame_size=8, patch_size=4, objective="self_forcing", teacher="somewhere", critic_steps=3)
  from jstream.config import TransformerConfig

  lm = TransformerConfig(vocab_size=16, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32)
  cfg = TrainConfig(model=lm, data="video_gen", generation=task, steps=30, warmup_steps=0)
  params = {part: {"w": {"kernel": jnp.ones((3, 3))}} for part in ("generator", "critic", "teacher")}
  opt = make_optimizer(cfg)
  state = opt.init(params)
  moved = []
  for _ in range(6):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    moved.append({p: bool(jnp.any(new[p]["w"]["kernel"] != params[p]["w"]["kernel"])) for p in params})
    params = new
  assert [m["teacher"] for m in moved] == [False] * 6
  assert [m["critic"] for m in moved] == [True] * 6
  assert [m["generator"] for m in moved] == [False, False, True, False, False, True]


def test_self_forcing_task_errors_name_the_problem():
  with pytest.raises(ValueError, match="needs teacher="):
    VideoGenTask(objective="self_forcing")
  with pytest.raises(ValueError, match="rollout_steps"):
    VideoGenTask(objective="self_forcing", teacher="x", rollout_steps=0)
  with pytest.raises(ValueError, match="context_frames"):
    VideoGenTask(context_frames=8, clip_frames=8)
  with pytest.raises(ValueError, match="dmd_time_range"):
    VideoGenTask(objective="self_forcing", teacher="x", dmd_time_range=(0.5, 0.5))
  with pytest.raises(ValueError, match="label_dropout must be in"):
    VideoGenTask(label_dropout=1.0)
  with pytest.raises(ValueError, match="teacher_guidance is self forcing's"):
    VideoGenTask(teacher_guidance=3.0)
  for field in ("label_dropout", "teacher_guidance"):
    with pytest.raises(ValueError, match=f"{field} = .* needs class_conditioned=True"):
      VideoGenTask(dataset="cartpole", frame_size=(8, 16), class_conditioned=False, **{field: 0.5})


def test_context_frames_are_committed_before_the_students_rollout():
  """With real context frames, the student's first chunk continues them: the rollout equals the inference rollout
  after ``context_frames`` of the same frames."""
  model = make()
  cfg = model.config
  ctx = frames(model, B, 2, 7)
  rng = jax.random.key(4)
  policy = vd.rolling_policy(cfg, None, N + 2)
  cache = rollout.context_frames(model, vd.from_model(ctx), model.init_cache(policy, B))
  noise = _noise(model, rng)
  got = jax.jit(lambda c, z: sf.self_rollout(model, c, z, flow.schedule(M), jnp.full((B, N), M - 1))[0])(cache, noise)
  ref = rollout.generate_video(
    model, num_frames=N, policy=policy, batch_size=B, context=vd.from_model(ctx), steps=M, rng=rng
  )
  np.testing.assert_allclose(np.asarray(vd.from_model(got)), np.asarray(ref.frames), **TOL)
