"""The model takes its attention implementation from its config: streaming with the kernels (interpret mode on
CPU) equals streaming with the XLA reference, for decode and chunked prefill, in both position modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_step, random_tokens, stream, tiny_model  # tests/conftest.py (on sys.path)
from jstream import cache as C


@pytest.mark.parametrize("positions", [pytest.param("absolute", marks=pytest.mark.slow), "cache_relative"])
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


def _random_sink(model, seed):
  """Random learned-sink parameters (``sink_logit`` starts at zero, which would hide a per-head indexing bug)."""
  params = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  sink = [path for path in flat if any(str(p).startswith("sink") for p in path)]
  assert sink, "the model has no learned-sink parameters"
  for key, path in zip(jax.random.split(jax.random.key(seed), len(sink)), sink):
    var = flat[path]
    var.set_value(jax.random.normal(key, var.get_value().shape, var.get_value().dtype))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


@pytest.mark.parametrize(
  "learned_sink,positions", [("logit", "absolute"), pytest.param("kv", "cache_relative", marks=pytest.mark.slow)]
)
def test_tpu_prefill_kernel_with_a_learned_sink_equals_xla(learned_sink, positions, monkeypatch):
  """The TPU prefill kernel (TPU interpret mode) in the model, with a learned sink merged into its partials:
  chunks of 9+ tokens (18+ query rows) go to ``pallas_tpu``, decode steps fall back to XLA; streaming and the
  offline forward equal the XLA model's."""
  import pallas_kernels

  served = []
  kernel = pallas_kernels.flash_attention_tpu

  def counting(q, *args, **kwargs):
    served.append(q.shape[1])
    return kernel(q, *args, **kwargs)

  monkeypatch.setattr(pallas_kernels, "flash_attention_tpu", counting)
  policy = C.SinkWindow(2, 8, positions=positions, max_rollback=2)
  tokens = random_tokens(2, 33, seed=5)
  sizes = [10, 1, 9, 3, 10]
  ref = _random_sink(tiny_model(seed=6, learned_sink=learned_sink), seed=7)
  ker = _random_sink(tiny_model(seed=6, learned_sink=learned_sink, attention_impl=("pallas_tpu", "xla")), seed=7)
  want, _ = stream(jit_step(ref), tokens, ref.init_cache(policy, 2), sizes)
  got, _ = stream(jit_step(ker), tokens, ker.init_cache(policy, 2), sizes)
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=3e-5)
  assert set(served) >= {9, 10}  # the chunks went through the TPU kernel
  np.testing.assert_allclose(ker.forward(tokens, window=8, num_sinks=2), ref.forward(tokens, window=8, num_sinks=2),
                             atol=3e-5, rtol=3e-5)  # fmt: skip
  assert 33 in served
