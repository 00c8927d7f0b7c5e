"""``reference.py`` against the dispatcher's XLA reference, and each kernel against ``reference.py`` in the cache's
layouts (keys heads-first, values slots-last: what the model passes)."""

import jax.numpy as jnp
import numpy as np
import pytest
from attention_base import CASES, TOL, make_inputs
from attention_base import reference as xla_reference

from pallas_kernels import reference
from pallas_kernels.decode import DecodeBlockSizes, decode_attention
from pallas_kernels.flash_prefill import BlockSizes, flash_attention


def _cache_layouts(k, v):
  return jnp.swapaxes(k, 1, 2), jnp.transpose(v, (0, 2, 3, 1))  # bksh, bkhs


@pytest.mark.parametrize("kvh,num_sinks,window", CASES)
def test_reference_equals_the_dispatchers_reference(kvh, num_sinks, window):
  q, k, v, qp, kp = make_inputs(t=6, kvh=kvh, seed=31)
  want = xla_reference(q, k, v, qp, kp, window=window, num_sinks=num_sinks, return_key_mass=True)
  out, lse, mass = reference.decode(q, k, v, qp, kp, window=window, num_sinks=num_sinks, return_key_mass=True)
  np.testing.assert_allclose(out, want.out, **TOL[jnp.float32])
  np.testing.assert_allclose(lse, want.lse, **TOL[jnp.float32])
  np.testing.assert_allclose(mass, want.key_mass, **TOL[jnp.float32])
  kc, vc = _cache_layouts(k, v)
  out2, lse2 = reference.attention(q, kc, vc, qp, kp, window=window, num_sinks=num_sinks, kv_layout="bksh",
                                   v_layout="bkhs")  # fmt: skip
  np.testing.assert_array_equal(out2, out)
  np.testing.assert_array_equal(lse2, lse)


def test_reference_masks_nan_slots_and_empty_rows():
  q, k, v, qp, kp = make_inputs(t=4, seed=32)
  empty = np.asarray(kp) < 0
  k = jnp.where(empty[:, :, None, None], jnp.nan, k)
  v = jnp.where(empty[:, :, None, None], jnp.nan, v)
  qp = qp.at[0].set(-1)  # row 0 sees nothing
  out, lse = reference.attention(q, k, v, qp, kp, window=3, num_sinks=1)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[0], 0.0)
  assert np.all(np.isneginf(lse[0])) and np.all(np.isneginf(lse[1, 0]))  # row 1's first query is padding
  assert np.all(np.isfinite(lse[1, 1:]))


@pytest.mark.parametrize("kvh,num_sinks,window", [(1, 4, 3), (2, 0, None), (4, 1, 40)])
def test_flash_prefill_kernel_matches_reference_in_cache_layout(kvh, num_sinks, window):
  q, k, v, qp, kp = make_inputs(t=7, kvh=kvh, seed=33)
  kc, vc = _cache_layouts(k, v)
  kw = dict(window=window, num_sinks=num_sinks, kv_layout="bksh", v_layout="bkhs")
  got = flash_attention(q, kc, vc, qp, kp, blocks=BlockSizes(block_q=4, block_k=8), interpret=True, **kw)
  want = reference.attention(q, kc, vc, qp, kp, **kw)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **TOL[jnp.float32])


@pytest.mark.parametrize("kvh,num_sinks,window", [(1, 4, 3), (2, 0, None), (4, 1, 40)])
def test_decode_kernel_matches_reference_in_cache_layout(kvh, num_sinks, window):
  q, k, v, qp, kp = make_inputs(t=2, kvh=kvh, seed=34)
  kc, vc = _cache_layouts(k, v)
  kw = dict(window=window, num_sinks=num_sinks, kv_layout="bksh", v_layout="bkhs", return_key_mass=True)
  got = decode_attention(q, kc, vc, qp, kp, blocks=DecodeBlockSizes(block_k=4, num_splits=4), interpret=True, **kw)
  want = reference.decode(q, kc, vc, qp, kp, **kw)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **TOL[jnp.float32])
