"""The shared implementation tests, run for the XLA reference through the dispatcher; the NumPy reference they
compare with, checked on cases computed by hand."""

import numpy as np
from attention_base import AttentionImplBase, numpy_reference


class TestXla(AttentionImplBase):
  IMPL = "xla"


def test_numpy_reference_on_a_hand_computed_case():
  """Two kv groups of one query head each, a sink, a window of 2, three queries (the last one padded).

  The query at position 3 sees the sink (position 0) and positions 2, 3; not 1 (too old), not 4 (future), not the
  empty slot; its head 0 scores are 0, log 2, log 5 after the 1/sqrt(2) scale, head 1's are equal. The query at
  position 2 (a zero vector: equal scores) sees positions 0, 1, 2.
  """
  r2 = np.sqrt(2.0)
  q = np.zeros((1, 3, 2, 2))
  q[0, 0, 0] = [1.0, 0.0]  # head 0 reads key component 0
  q[0, 0, 1] = [0.0, 1.0]  # head 1 reads component 1
  k = np.zeros((1, 6, 2, 2))  # slots hold positions [2, 0, -1, 3, 1, 4]
  k[0, 0, 0] = [np.log(2.0) * r2, 0.0]  # position 2
  k[0, 3, 0] = [np.log(5.0) * r2, 0.0]  # position 3
  k[0, 4, 0] = [100.0, 0.0]  # position 1: outside the first query's window
  k[0, 5, 0] = [100.0, 0.0]  # position 4: in the future
  v = np.zeros((1, 6, 2, 2))
  v[0, :, 0, 0] = [10.0, 20.0, np.nan, 30.0, 40.0, 50.0]
  v[0, :, 1, 1] = [1.0, 2.0, np.nan, 3.0, 4.0, 5.0]
  qp = np.array([[3, 2, -1]])
  kp = np.array([[2, 0, -1, 3, 1, 4]])
  res = numpy_reference(q, k, v, qp, kp, window=2, num_sinks=1, return_key_mass=True)
  # position 3, head 0: weights 1 (sink, position 0), 2 (position 2), 5 (position 3) over 8; head 1: uniform
  np.testing.assert_allclose(res.out[0, 0, 0], [(20 + 2 * 10 + 5 * 30) / 8, 0.0])
  np.testing.assert_allclose(res.lse[0, 0, 0], np.log(8.0))
  np.testing.assert_allclose(res.out[0, 0, 1], [0.0, (2 + 1 + 3) / 3])
  np.testing.assert_allclose(res.lse[0, 0, 1], np.log(3.0))
  # position 2: uniform over positions 0, 1, 2 (slots 1, 4, 0) in both heads
  np.testing.assert_allclose(res.out[0, 1, 0], [(20 + 40 + 10) / 3, 0.0])
  np.testing.assert_allclose(res.out[0, 1, 1], [0.0, (2 + 4 + 1) / 3])
  np.testing.assert_allclose(res.lse[0, 1], np.log(3.0))
  # the padded query sees nothing
  np.testing.assert_array_equal(res.out[0, 2], 0.0)
  assert np.all(np.isneginf(res.lse[0, 2]))
  # key mass per slot, summed over both queries
  np.testing.assert_allclose(res.key_mass[0, :, 0], [2 / 8 + 1 / 3, 1 / 8 + 1 / 3, 0, 5 / 8, 1 / 3, 0])
  np.testing.assert_allclose(res.key_mass[0, :, 1], [2 / 3, 2 / 3, 0, 1 / 3, 1 / 3, 0])
