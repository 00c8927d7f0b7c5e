"""The suite runs with runtime shape checking on (jaxtyping's import hook + beartype, see ``pyproject.toml``): a
call with a shape that contradicts the annotations fails here, before any computation."""

import jax.numpy as jnp
import jaxtyping
import pytest
from conftest import library_checks_only

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
