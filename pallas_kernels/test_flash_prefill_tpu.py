"""The TPU (Mosaic) prefill kernel in TPU interpret mode on CPU, on the shared implementation tests."""

import jax.numpy as jnp
import numpy as np
import pytest
from attention_base import AttentionImplBase, make_inputs, reference
from jax.experimental.pallas import tpu as pltpu

from jstream.ops import attention as A
from pallas_kernels import common
from pallas_kernels.flash_prefill import BlockSizes
from pallas_kernels.flash_prefill_tpu import _resident_block, flash_attention_tpu

SMALL = BlockSizes(block_q=4, block_k=8)


class TestFlashPrefillTpuInterpret(AttentionImplBase):
  IMPL = "pallas_tpu"
  SUPPORTS_KEY_MASS = False
  QUERY_LENGTHS = (5,)

  def run(self, q, k, v, qp, kp, return_key_mass=False, **kw):
    out, lse = flash_attention_tpu(q, k, v, qp, kp, blocks=SMALL, interpret=pltpu.InterpretParams(), **kw)
    return A.AttentionResult(out, lse, None)


def test_skipped_steps_keep_the_resident_block():
  skipped = np.array([[[True, False, True, True, False, True]]])
  np.testing.assert_array_equal(np.asarray(_resident_block(skipped))[0, 0], [1, 1, 1, 1, 4, 4])
  # no new block is fetched on a skipped step: the index only changes where a block is computed
  eff = np.asarray(_resident_block(skipped))[0, 0]
  changes = np.nonzero(np.diff(eff))[0] + 1
  assert not skipped[0, 0, changes].any()


def test_long_window_prefill_matches_reference():
  t = 48
  q, k, v, _, _ = make_inputs(b=1, t=t, s=t, kvh=2, seed=13)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  got, _ = flash_attention_tpu(
    q, k, v, pos, pos, window=8, num_sinks=2, blocks=SMALL, interpret=pltpu.InterpretParams()
  )
  np.testing.assert_allclose(got, reference(q, k, v, pos, pos, window=8, num_sinks=2).out, atol=2e-5)
  assert common.block_skipped(0, 0, 5, 7, window=8, num_sinks=2)  # future block


def test_registered_for_tpu_and_runs_interpreted_by_name():
  assert "pallas_tpu" in A.implementations()
  assert A.resolve("auto", "tpu")[0] == "pallas_tpu"
  q, k, v, qp, kp = make_inputs(t=9, seed=14)  # 18 query rows: the decode kernel declines
  got = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=4, impl="pallas_tpu")
  np.testing.assert_allclose(got, reference(q, k, v, qp, kp, window=4).out, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("t,s", [(64, 200), (96, 333)])
def test_larger_sweep(t, s):
  for kvh, sinks, window in [(1, 4, 16), (2, 0, None), (4, 1, 100)]:
    q, k, v, qp, kp = make_inputs(t=t, s=s, kvh=kvh, seed=t + 1)
    got, lse = flash_attention_tpu(q, k, v, qp, kp, window=window, num_sinks=sinks, blocks=BlockSizes(16, 128),
                                   interpret=pltpu.InterpretParams())  # fmt: skip
    want = reference(q, k, v, qp, kp, window=window, num_sinks=sinks)
    np.testing.assert_allclose(got, want.out, atol=2e-5)
    np.testing.assert_allclose(lse, want.lse, atol=2e-5)
