"""``reference.py`` against the dispatcher's XLA reference and the NumPy/float64 one, and each kernel against
``reference.py`` in the cache's layouts (keys heads-first, values slots-last: what the model passes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_base import CASES, TOL, assert_matches, make_inputs, numpy_reference

from jstream.ops import attention as A
from pallas_kernels import reference
from pallas_kernels.decode import DecodeBlockSizes, decode_attention
from pallas_kernels.flash_prefill import BlockSizes, flash_attention


def _cache_layouts(k, v):
  return jnp.swapaxes(k, 1, 2), jnp.transpose(v, (0, 2, 3, 1))  # bksh, bkhs


@pytest.mark.parametrize("kvh,num_sinks,window", CASES)
def test_reference_equals_the_dispatchers_reference(kvh, num_sinks, window):
  q, k, v, qp, kp = make_inputs(t=6, kvh=kvh, seed=31)
  spec = A.AttentionSpec(window=window, num_sinks=num_sinks)
  want = A.xla_attention(q, k, v, qp, kp, spec, return_key_mass=True)
  out, lse, mass = reference.decode(q, k, v, qp, kp, spec=spec, return_key_mass=True)
  np.testing.assert_allclose(out, want.out, **TOL[jnp.float32])
  np.testing.assert_allclose(lse, want.lse, **TOL[jnp.float32])
  np.testing.assert_allclose(mass, want.key_mass, **TOL[jnp.float32])
  want64 = numpy_reference(q, k, v, qp, kp, window=window, num_sinks=num_sinks, return_key_mass=True)
  assert_matches(A.AttentionResult(out, lse, mass), want64, jnp.float32, key_mass=True)
  kc, vc = _cache_layouts(k, v)
  out2, lse2 = reference.attention(q, kc, vc, qp, kp, spec=spec.replace(kv_layout="bksh", v_layout="bkhs"))
  np.testing.assert_array_equal(out2, out)
  np.testing.assert_array_equal(lse2, lse)


def test_reference_masks_nan_slots_and_empty_rows():
  q, k, v, qp, kp = make_inputs(t=4, seed=32)
  empty = np.asarray(kp) < 0
  k = jnp.where(empty[:, :, None, None], jnp.nan, k)
  v = jnp.where(empty[:, :, None, None], jnp.nan, v)
  qp = qp.at[0].set(-1)  # row 0 sees nothing
  out, lse = reference.attention(q, k, v, qp, kp, spec=A.AttentionSpec(window=3, num_sinks=1))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[0], 0.0)
  assert np.all(np.isneginf(lse[0])) and np.all(np.isneginf(lse[1, 0]))  # row 1's first query is padding
  assert np.all(np.isfinite(lse[1, 1:]))


@pytest.mark.parametrize("kvh,num_sinks,window", [(1, 4, 3), (2, 0, None), (4, 1, 40)])
def test_flash_prefill_kernel_matches_reference_in_cache_layout(kvh, num_sinks, window):
  q, k, v, qp, kp = make_inputs(t=7, kvh=kvh, seed=33)
  kc, vc = _cache_layouts(k, v)
  spec = A.AttentionSpec(window=window, num_sinks=num_sinks, kv_layout="bksh", v_layout="bkhs")
  got = flash_attention(q, kc, vc, qp, kp, spec=spec, blocks=BlockSizes(block_q=4, block_k=8), interpret=True)
  want = reference.attention(q, kc, vc, qp, kp, spec=spec)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **TOL[jnp.float32])


@pytest.mark.parametrize("kvh,num_sinks,window", [(1, 4, 3), (2, 0, None), (4, 1, 40)])
def test_decode_kernel_matches_reference_in_cache_layout(kvh, num_sinks, window):
  q, k, v, qp, kp = make_inputs(t=2, kvh=kvh, seed=34)
  kc, vc = _cache_layouts(k, v)
  spec = A.AttentionSpec(window=window, num_sinks=num_sinks, kv_layout="bksh", v_layout="bkhs")
  blocks = DecodeBlockSizes(block_k=4, num_splits=4)
  got = decode_attention(q, kc, vc, qp, kp, spec=spec, blocks=blocks, interpret=True, return_key_mass=True)
  want = reference.decode(q, kc, vc, qp, kp, spec=spec, return_key_mass=True)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **TOL[jnp.float32])


@pytest.mark.parametrize("kvh,num_sinks,window", [(1, 4, 3), (2, 0, None), (4, 1, 40)])
def test_flash_prefill_gradients_in_cache_layout(kvh, num_sinks, window):
  """The flash backward (dq; dk, dv through the slots-last value layout), over a ragged batch of 2 with key blocks
  skipped, against autodiff of the plain reference; through both ``out`` and ``lse``."""
  q, k, v, qp, kp = make_inputs(t=9, kvh=kvh, seed=35)
  kc, vc = _cache_layouts(k, v)
  spec = A.AttentionSpec(window=window, num_sinks=num_sinks, kv_layout="bksh", v_layout="bkhs")
  ct = jax.random.normal(jax.random.key(36), q.shape, jnp.float32)
  seen = np.isfinite(np.asarray(reference.attention(q, kc, vc, qp, kp, spec=spec)[1]))

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(out * ct) + jnp.sum(jnp.where(seen, lse, 0.0))

  kernel = lambda q, k, v: flash_attention(q, k, v, qp, kp, spec=spec, blocks=BlockSizes(4, 8), interpret=True)
  ref = lambda q, k, v: reference.attention(q, k, v, qp, kp, spec=spec)
  got = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2))(q, kc, vc)
  want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, kc, vc)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)
