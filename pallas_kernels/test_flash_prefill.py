"""The chunk / prefill flash kernel in interpret mode, on the shared implementation tests."""

import jax.numpy as jnp
import numpy as np
import pytest
from attention_base import AttentionImplBase, assert_matches, make_inputs, numpy_reference

from jstream.ops import attention as A
from pallas_kernels import common
from pallas_kernels.flash_prefill import BlockSizes, flash_attention

SMALL = BlockSizes(block_q=4, block_k=8)  # several blocks at test sizes, so skipping is exercised


class TestFlashPrefillInterpret(AttentionImplBase):
  IMPL = "pallas_prefill"
  SUPPORTS_KEY_MASS = False

  def run(self, q, k, v, qp, kp, return_key_mass=False, **kw):
    out, lse = flash_attention(q, k, v, qp, kp, spec=A.AttentionSpec(**kw), blocks=SMALL, interpret=True)
    return A.AttentionResult(out, lse, None)


def test_registered_and_dispatched():
  assert "pallas_prefill" in A.implementations() and "pallas" in A.implementations()
  q, k, v, qp, kp = make_inputs(t=6, seed=11)
  got = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=4, num_sinks=1, impl="pallas_prefill")
  want = numpy_reference(q, k, v, qp, kp, window=4, num_sinks=1).out
  np.testing.assert_allclose(got, want, atol=2e-5)
  # key mass is not this kernel's job: "pallas" then falls back, an explicit name says so
  with pytest.raises(NotImplementedError, match="key mass"):
    A.attention(q, k, v, q_positions=qp, k_positions=kp, return_key_mass=True, impl="pallas_prefill")
  res = A.attention(q, k, v, q_positions=qp, k_positions=kp, return_key_mass=True, impl=["pallas_prefill", "xla"])
  assert res.key_mass.shape == (2, 37, 2)


def test_block_skipping_matches_the_mask():
  # A long chunk with a short window: most (query block, key block) pairs are skipped.
  t = 64
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  spec = A.AttentionSpec(window=8, num_sinks=4)
  qmin, qmax = common.block_summaries(pos, 4)
  kmin, kmax = common.block_summaries(pos, 8)
  skipped = spec.excludes_all(qmin[0][:, None], qmax[0][:, None], kmin[0][None], kmax[0][None])
  # a pair is computed iff some (query, key) in it is visible
  mask = np.asarray(common.tile_mask(pos[0], pos[0], spec)).reshape(16, 4, 8, 8)
  visible = mask.any(axis=(1, 3))
  np.testing.assert_array_equal(~np.asarray(skipped), visible)
  assert np.asarray(skipped).mean() > 0.6
  q, k, v, _, _ = make_inputs(b=1, t=t, s=t, kvh=2, seed=12)
  got, _ = flash_attention(q, k, v, pos, pos, spec=spec, blocks=SMALL, interpret=True)
  np.testing.assert_allclose(got, numpy_reference(q, k, v, pos, pos, window=8, num_sinks=4).out, atol=2e-5)


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=6)
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_k=0)


@pytest.mark.slow
@pytest.mark.parametrize("t,s", [(64, 200), (128, 333)])
def test_larger_sweep(t, s):
  for kvh, sinks, window in [(1, 4, 16), (2, 0, None), (4, 1, 100)]:
    q, k, v, qp, kp = make_inputs(t=t, s=s, kvh=kvh, seed=t)
    spec = A.AttentionSpec(window=window, num_sinks=sinks)
    got = flash_attention(q, k, v, qp, kp, spec=spec, blocks=BlockSizes(16, 32), interpret=True)
    assert_matches(A.AttentionResult(*got), numpy_reference(q, k, v, qp, kp, window=window, num_sinks=sinks), q.dtype)
