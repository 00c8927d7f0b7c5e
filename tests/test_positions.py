"""RoPE tables: exact angles at any int32 position, single table == digit tables, relative property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jstream.positions import apply_rope, check_position_mode, rope, rope_cos_sin


def _exact(pos, head_dim, base=10_000.0):

  inv = np.power(np.longdouble(base), -np.arange(0, head_dim, 2, dtype=np.longdouble) / head_dim)
  ang = np.asarray(pos, np.longdouble)[..., None] * inv
  return np.cos(ang), np.sin(ang)


@pytest.mark.parametrize("bound", [None, 100])
def test_matches_extended_precision(bound):
  pos = np.array([0, 1, 7, 99, -5, -100])
  cos, sin = rope_cos_sin(jnp.asarray(pos), 16, bound=bound)
  c, s = _exact(pos, 16)
  np.testing.assert_allclose(cos, c, atol=1e-6)
  np.testing.assert_allclose(sin, s, atol=1e-6)


def test_exact_at_huge_positions():
  pos = np.array([2**31 - 1, 2**30 + 12345, 10**9 + 7])
  cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.int32), 64)
  c, s = _exact(pos, 64)
  # float32 pos * freq would be off by up to ~100 radians here; the digit tables are exact to ~1e-6.
  np.testing.assert_allclose(cos, c, atol=2e-6)
  np.testing.assert_allclose(sin, s, atol=2e-6)
  naive = np.float32(pos[0]) * np.float32(1.0)
  assert abs(np.cos(naive) - c[0, 0]) > 1e-3  # the naive float32 angle is wrong


def test_scores_depend_only_on_distance():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 32))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 32))

  def score(a, b):
    qa = rope(q, jnp.array([[a]], jnp.int32))
    kb = rope(k, jnp.array([[b]], jnp.int32))
    return float(jnp.sum(qa * kb))

  ref = score(17, 5)
  for shift in (0, 1000, 2**20, 2**31 - 100):
    assert abs(score(17 + shift, 5 + shift) - ref) < 1e-4


def test_rotation_preserves_norm_and_dtype():
  x = jax.random.normal(jax.random.key(2), (2, 3, 4, 16)).astype(jnp.bfloat16)
  y = rope(x, jnp.arange(6, dtype=jnp.int32).reshape(2, 3) * 1000)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    jnp.linalg.norm(y.astype(jnp.float32), axis=-1),
    jnp.linalg.norm(x.astype(jnp.float32), axis=-1),
    rtol=2e-2,
  )
  cos, sin = rope_cos_sin(jnp.zeros((2, 3), jnp.int32), 16)
  np.testing.assert_array_equal(apply_rope(x, cos[:, :, None], sin[:, :, None]), x)


def test_bad_inputs():
  with pytest.raises(ValueError, match="positions must be one of"):
    check_position_mode("relative")
  with pytest.raises(ValueError, match="even head_dim"):
    rope_cos_sin(jnp.zeros((1,), jnp.int32), 7)
