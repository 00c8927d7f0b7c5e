"""The split-K decode kernel in interpret mode, on the shared implementation tests."""

import numpy as np
import pytest
from attention_base import AttentionImplBase, assert_matches, make_inputs, numpy_reference

from jstream.ops import attention as A
from pallas_kernels.decode import DecodeBlockSizes, decode_attention

SMALL = DecodeBlockSizes(block_k=4, num_splits=4)


class TestDecodeInterpret(AttentionImplBase):
  IMPL = "pallas_decode"
  QUERY_LENGTHS = (1, 3)

  def run(self, q, k, v, qp, kp, return_key_mass=False, **kw):
    spec = A.AttentionSpec(**kw)
    out, lse, mass = decode_attention(
      q, k, v, qp, kp, spec=spec, blocks=SMALL, interpret=True, return_key_mass=return_key_mass
    )
    return A.AttentionResult(out, lse, mass)


def test_dispatch_picks_decode_for_few_rows():
  q, k, v, qp, kp = make_inputs(t=1, seed=21)
  res = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=8, num_sinks=2, return_key_mass=True,
                    return_lse=True, impl="pallas")  # fmt: skip
  want = numpy_reference(q, k, v, qp, kp, window=8, num_sinks=2, return_key_mass=True)
  np.testing.assert_allclose(res.out, want.out, atol=2e-5)
  np.testing.assert_allclose(res.key_mass, want.key_mass, atol=2e-5)


def test_too_many_rows_is_rejected():
  q, k, v, qp, kp = make_inputs(t=40, kvh=1, seed=22)  # 160 rows
  with pytest.raises(NotImplementedError, match="more than the decode kernel"):
    A.attention(q, k, v, q_positions=qp, k_positions=kp, impl="pallas_decode")


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="power of two"):
    DecodeBlockSizes(num_splits=3)


def test_probe_accepts_working_kernels_and_rejects_broken_ones():
  import pallas_kernels

  assert pallas_kernels.probe("pallas") is None  # interpret mode on CPU
  assert pallas_kernels.probe("pallas_prefill") is None

  def broken(*args, **kwargs):
    raise RuntimeError("lowering failed: no such op")

  def wrong_for_decode(q, *args, **kwargs):  # right for chunks, wrong for a single query
    res = A.xla_attention(q, *args, **kwargs)
    return res._replace(out=res.out + (q.shape[1] == 1))

  A.register("broken_test", broken)
  A.register("wrong_decode_test", wrong_for_decode)
  try:
    assert "lowering failed" in pallas_kernels.probe("broken_test")
    assert "wrong result" in pallas_kernels.probe("wrong_decode_test")
  finally:
    A.unregister("broken_test")
    A.unregister("wrong_decode_test")


@pytest.mark.slow
@pytest.mark.parametrize("t,s", [(1, 1029), (4, 4099), (16, 777)])
def test_larger_sweep(t, s):
  """Ring-sized caches (slots not a multiple of the blocks), the default and a fine split, key mass included."""
  for kvh, sinks, window in [(1, 4, 1024), (4, 0, None), (2, 1, 100)]:
    if t * (4 // kvh) > 64:
      continue
    q, k, v, qp, kp = make_inputs(t=t, s=s, kvh=kvh, seed=s + t)
    want = numpy_reference(q, k, v, qp, kp, window=window, num_sinks=sinks, return_key_mass=True)
    spec = A.AttentionSpec(window=window, num_sinks=sinks)
    for blocks in (DecodeBlockSizes(), DecodeBlockSizes(block_k=32, num_splits=16)):
      got = decode_attention(q, k, v, qp, kp, spec=spec, blocks=blocks, interpret=True, return_key_mass=True)
      assert_matches(A.AttentionResult(*got), want, q.dtype, key_mass=True)
