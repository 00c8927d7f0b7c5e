"""The TPU (Mosaic) prefill kernel in TPU interpret mode on CPU, on the shared implementation tests."""

import jax.numpy as jnp
import numpy as np
import pytest
from attention_base import AttentionImplBase, assert_matches, make_inputs, numpy_reference
from jax.experimental.pallas import tpu as pltpu

from jstream.ops import attention as A
from pallas_kernels.flash_prefill import BlockSizes
from pallas_kernels.flash_prefill_tpu import flash_attention_tpu, resident_block

SMALL = BlockSizes(block_q=4, block_k=8)


class TestFlashPrefillTpuInterpret(AttentionImplBase):
  IMPL = "pallas_tpu"
  SUPPORTS_KEY_MASS = False
  QUERY_LENGTHS = (5,)

  def run(self, q, k, v, qp, kp, return_key_mass=False, **kw):
    out, lse = flash_attention_tpu(
      q, k, v, qp, kp, spec=A.AttentionSpec(**kw), blocks=SMALL, interpret=pltpu.InterpretParams()
    )
    return A.AttentionResult(out, lse, None)


def test_skipped_steps_keep_theresident_block():
  skipped = np.array([[[True, False, True, True, False, True]]])
  np.testing.assert_array_equal(np.asarray(resident_block(skipped))[0, 0], [1, 1, 1, 1, 4, 4])
  # no new block is fetched on a skipped step: the index only changes where a block is computed
  eff = np.asarray(resident_block(skipped))[0, 0]
  changes = np.nonzero(np.diff(eff))[0] + 1
  assert not skipped[0, 0, changes].any()


def test_long_window_prefill_matches_reference():
  t = 48
  q, k, v, _, _ = make_inputs(b=1, t=t, s=t, kvh=2, seed=13)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  spec = A.AttentionSpec(window=8, num_sinks=2)
  got, _ = flash_attention_tpu(q, k, v, pos, pos, spec=spec, blocks=SMALL, interpret=pltpu.InterpretParams())
  np.testing.assert_allclose(got, numpy_reference(q, k, v, pos, pos, window=8, num_sinks=2).out, atol=2e-5)
  assert spec.excludes_all(0, 0, 5, 7)  # future block


def test_registered_for_tpu_and_runs_interpreted_by_name():
  assert "pallas_tpu" in A.implementations()
  assert A.resolve("auto", "tpu")[0] == "pallas_tpu"
  q, k, v, qp, kp = make_inputs(t=9, seed=14)  # 18 query rows: the decode kernel declines
  got = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=4, impl="pallas_tpu")
  np.testing.assert_allclose(got, numpy_reference(q, k, v, qp, kp, window=4).out, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("t,s", [(64, 200), (96, 333)])
def test_larger_sweep(t, s):
  for kvh, sinks, window in [(1, 4, 16), (2, 0, None), (4, 1, 100)]:
    q, k, v, qp, kp = make_inputs(t=t, s=s, kvh=kvh, seed=t + 1)
    spec = A.AttentionSpec(window=window, num_sinks=sinks)
    got = flash_attention_tpu(q, k, v, qp, kp, spec=spec, blocks=BlockSizes(16, 128), interpret=pltpu.InterpretParams())
    assert_matches(A.AttentionResult(*got), numpy_reference(q, k, v, qp, kp, window=window, num_sinks=sinks), q.dtype)
