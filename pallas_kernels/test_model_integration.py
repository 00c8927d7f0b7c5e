"""The model takes its attention implementation from its config: streaming with the kernels (interpret mode on
CPU) equals streaming with the XLA reference, for decode and chunked prefill, in both position modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_step, random_tokens, stream, tiny_model  # tests/conftest.py (on sys.path)
from flax import nnx

from jstream import cache as C


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_streaming_with_kernels_equals_xla(positions):
  policy = C.SinkWindow(2, 8, positions=positions, max_rollback=2)
  tokens = random_tokens(2, 30, seed=1)
  sizes = [1, 1, 9, 3, 1, 10, 5]
  want, _ = stream(jit_step(tiny_model(seed=2)), tokens, tiny_model(seed=2).init_cache(policy, 2), sizes)
  model = tiny_model(seed=2, attention_impl="pallas")
  got, _ = stream(jit_step(model), tokens, model.init_cache(policy, 2), sizes)
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=3e-5)


def test_offline_forward_with_kernels_and_gradients():
  tokens = random_tokens(1, 24, seed=3)
  ref, ker = tiny_model(seed=4), tiny_model(seed=4, attention_impl="pallas_prefill")
  np.testing.assert_allclose(ker.forward(tokens, window=6, num_sinks=2), ref.forward(tokens, window=6, num_sinks=2),
                             atol=3e-5)  # fmt: skip

  def loss(m):
    return jnp.mean(m.forward(tokens, window=6, num_sinks=2) ** 2)

  g_ref = nnx.grad(loss)(ref)
  g_ker = nnx.grad(loss)(ker)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_ker)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
