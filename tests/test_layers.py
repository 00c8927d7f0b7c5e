"""The model's building blocks: single-row projections split across CPU cores equal the plain product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_step, random_tokens, stream, tiny_model, tol
from jstream import cache as C
from jstream.nn import layers


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (1, 1)])
def test_split_dot_general_equals_the_plain_product(lead, dtype, monkeypatch):
  monkeypatch.setattr(layers, "_cores", lambda: 4)
  x = jax.random.normal(jax.random.key(0), (*lead, 256), jnp.float32).astype(dtype)
  w = jax.random.normal(jax.random.key(1), (256, 96), jnp.float32).astype(dtype)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  assert layers.split_parts(1, 256, "cpu") == 4
  got = layers.dot_general(x, w, dims)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert got.shape == (*lead, 96) and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol(dtype))


def test_split_parts():
  assert layers.split_parts(1, 256, "gpu") == 1  # other platforms: the plain product
  assert layers.split_parts(2, 256, "cpu") == 1  # several rows: the plain product
  cores = layers._cores()
  want = max(p for p in range(1, cores + 1) if 96 % p == 0 and 96 // p >= 32)
  assert layers.split_parts(1, 96, "cpu") == want


def test_single_token_steps_with_split_projections_equal_the_offline_forward(monkeypatch):
  """Decode steps of a model whose projections split over four cores give the offline forward's logits."""
  monkeypatch.setattr(layers, "_cores", lambda: 4)
  model = tiny_model(seed=3, embed_dim=128, mlp_dim=256, head_dim=32)
  assert layers.split_parts(1, 128) == 4
  tokens = random_tokens(2, 12, seed=4)
  got, _ = stream(jit_step(model), tokens, model.init_cache(C.Dense(16), 2), [1] * 12)
  np.testing.assert_allclose(got, model.forward(tokens), **tol(jnp.float32))
