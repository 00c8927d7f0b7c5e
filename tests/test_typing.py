"""The suite runs with runtime shape checking on (jaxtyping's import hook + beartype, see ``pyproject.toml``): a
call with a shape that contradicts the annotations fails here, before any computation."""

import jax.numpy as jnp
import jaxtyping
import pytest

from conftest import library_checks_only, random_tokens, tiny_model
from jstream import cache as C
from jstream import rollout
from jstream.ops import attention as A


def test_shape_checks_are_on_in_the_suite():
  q = jnp.ones((2, 3, 4, 8))
  k = jnp.ones((2, 5, 2, 8))
  qp, kp = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 5), jnp.int32)
  A.attention(q, k, k, q_positions=qp, k_positions=kp)  # consistent shapes pass
  with pytest.raises(jaxtyping.TypeCheckError, match="q_positions"):
    A.attention(q, k, k, q_positions=jnp.zeros((2, 4), jnp.int32), k_positions=kp)  # t = 3 vs 4
  with pytest.raises(jaxtyping.TypeCheckError, match="'k'"):
    A.attention(q, jnp.ones((2, 5, 2, 16)), k, q_positions=qp, k_positions=kp)  # head dim 8 vs 16
  with library_checks_only(), pytest.raises(ValueError, match="head_dim"):  # what a user without the hook sees
    A.attention(q, jnp.ones((2, 5, 2, 16)), jnp.ones((2, 5, 2, 16)), q_positions=qp, k_positions=kp)


def test_cache_writes_the_model_call_and_the_rollouts_are_checked():
  model = tiny_model(seed=1)
  cache = model.init_cache(C.SinkWindow(1, 4), 2)
  _, kv_heads, _, head_dim = cache.layer_shape
  keys = jnp.ones((2, 4, kv_heads, head_dim))
  C.write(cache.k, 0, jnp.zeros((2, 4), jnp.int32), keys)  # consistent shapes pass
  with pytest.raises(jaxtyping.TypeCheckError, match="update"):
    C.write(cache.k, 0, jnp.zeros((2, 3), jnp.int32), keys)  # 3 slots for 4 tokens
  with pytest.raises(jaxtyping.TypeCheckError, match="update"):
    C.write(cache.k, 0, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4, kv_heads + 1, head_dim)))  # kv heads
  tokens = random_tokens(2, 3)
  with pytest.raises(jaxtyping.TypeCheckError, match="segment_ids"):
    model(tokens, cache, segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(jaxtyping.TypeCheckError, match="tokens"):
    model(tokens[0], cache)  # one row without its batch axis
  with pytest.raises(jaxtyping.TypeCheckError, match="lengths"):
    rollout.prefill(model, tokens, cache, lengths=jnp.full((3,), 3, jnp.int32))  # 3 lengths for 2 rows
  with pytest.raises(jaxtyping.TypeCheckError, match="last_logits"):
    rollout.decode(model, cache, jnp.zeros((2, 5, 7)), steps=1, rng=None)
