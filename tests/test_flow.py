"""Rectified flow (jstream.flow) against the closed-form Gaussian case.

For data ``x0 ~ N(mu, s^2)`` and noise ``e ~ N(0, 1)``, ``x_t = (1 - t) x0 + t e`` is Gaussian jointly with ``x0``
and ``e``, so the optimal velocity ``E[e - x0 | x_t]`` and the loss it leaves are closed-form (written out below,
independently of the library), and the probability-flow ODE carries noise ``z`` to ``mu + s z`` exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jstream import flow

MU, STD = 1.5, 0.4


def optimal_velocity(x, t):
  a = 1.0 - t
  var = a * a * STD * STD + t * t  # Var(x_t)
  centred = x - a * MU
  e_noise = t * centred / var  # E[e | x_t] = Cov(e, x_t) / Var(x_t) * (x_t - E x_t)
  e_data = MU + a * STD * STD * centred / var
  return e_noise - e_data


def residual_variance(t):
  """Var(e - x0 | x_t): the flow-matching loss the optimal velocity leaves at time t."""
  a = 1.0 - t
  var = a * a * STD * STD + t * t
  cov = t - a * STD * STD  # Cov(e - x0, x_t)
  return 1.0 + STD * STD - cov * cov / var


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_loss_of_the_optimal_velocity_is_the_residual_variance_and_any_other_is_worse(t):
  rng = np.random.default_rng(0)
  n = 200_000
  x0 = jnp.asarray(MU + STD * rng.standard_normal((n, 1)), jnp.float32)
  e = jnp.asarray(rng.standard_normal((n, 1)), jnp.float32)
  ts = jnp.full((n,), t)
  xt = flow.noised(x0, e, ts)
  np.testing.assert_allclose(np.asarray(xt), (1 - t) * np.asarray(x0) + t * np.asarray(e), rtol=1e-6, atol=1e-6)
  best = flow.loss(optimal_velocity(xt, t), x0, e)
  assert abs(float(best) - residual_variance(t)) < 0.02 * residual_variance(t)
  for delta in (0.1, -0.1):
    assert float(flow.loss(optimal_velocity(xt, t) + delta, x0, e)) > float(best) + 0.5 * delta * delta


def test_loss_weights_leading_axes():
  rng = np.random.default_rng(1)
  x0, e, v = (jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32) for _ in range(3))
  w = jnp.asarray([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
  per = np.mean((np.asarray(v) - (np.asarray(e) - np.asarray(x0))) ** 2, axis=(2, 3))
  want = (per * np.asarray(w)).sum() / np.asarray(w).sum()
  np.testing.assert_allclose(float(flow.loss(v, x0, e, weight=w)), want, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_with_the_optimal_velocity_carries_noise_to_the_data_distribution(shift):
  z = jnp.asarray(np.random.default_rng(2).standard_normal((4096,)), jnp.float32)
  times = flow.schedule(400, shift)
  assert float(times[0]) == 1.0 and float(times[-1]) == 0.0
  assert bool(jnp.all(jnp.diff(times) < 0))
  x = jax.jit(lambda z: flow.euler(optimal_velocity, z, times))(z)
  # The flow map of a Gaussian to a Gaussian is affine: each sample lands at mu + s z.
  np.testing.assert_allclose(np.asarray(x), MU + STD * np.asarray(z), atol=0.02)


def test_schedule_shift_and_time_sampling():
  np.testing.assert_allclose(np.asarray(flow.schedule(4)), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
  s = 3.0
  want = [s * u / (1 + (s - 1) * u) for u in (1.0, 0.75, 0.5, 0.25, 0.0)]
  np.testing.assert_allclose(np.asarray(flow.schedule(4, s)), want, rtol=1e-6)
  t = flow.sample_times(jax.random.key(0), (20_000,))
  assert float(t.min()) > 0 and float(t.max()) < 1
  assert abs(float(jnp.median(t)) - 0.5) < 0.02  # sigmoid of a standard normal: median 0.5
  tu = flow.sample_times(jax.random.key(0), (20_000,), kind="uniform", shift=s)
  assert abs(float(jnp.mean(tu < 0.5)) - 0.25) < 0.02  # P(s u / (1 + (s - 1) u) < 1/2) = P(u < 1/(s + 1))
  with pytest.raises(ValueError, match="steps"):
    flow.schedule(0)
  with pytest.raises(ValueError, match="kind"):
    flow.sample_times(jax.random.key(0), (2,), kind="beta")
  with pytest.raises(ValueError, match="shift"):
    flow.shift_time(0.5, 0.0)
