"""A shared test base for attention implementations: every implementation (the XLA reference through the
dispatcher, each Pallas kernel in interpret mode) runs the same cases against ``numpy_reference``, an independent
NumPy/float64 computation written here from the definition of the mask (itself checked on a hand-computed case
in ``test_attention_impls.py``).

Subclass ``AttentionImplBase``, set ``IMPL`` and, if needed, override ``run`` (e.g. to pass small block sizes so
that the block-skipping paths are exercised at interpret-mode sizes) and ``QUERY_LENGTHS``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jstream.ops import attention as A

# Against the float64 reference, on the same (possibly bf16-rounded) input values.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# (kv heads of 4 query heads, num_sinks, window): GQA ratios 1, 2, 4; sinks 0, 1, 4; windows below and above t.
CASES = [(4, 0, None), (2, 1, 3), (1, 4, 3), (2, 0, 40), (4, 4, 40), (1, 1, 1)]


def make_inputs(b=2, t=5, s=37, n=4, kvh=2, h=16, dtype=jnp.float32, seed=0):
  """Random q/k/v and positions shaped like a ring cache: slots in rotated order, ragged rows, empty slots."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kvh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kvh, h), jnp.float32).astype(dtype)
  rng = np.random.default_rng(seed)
  kp = np.full((b, s), -1, np.int32)
  lengths = [s, max(3, s // 3)] + [s] * (b - 2)  # ragged per-row lengths
  for r in range(b):
    n_valid = lengths[r]
    start = rng.integers(0, s)
    slots = (start + np.arange(n_valid)) % s  # a ring that wrapped
    kp[r, slots] = np.arange(n_valid) + (0 if r else 100)  # row 0 starts at 100
  qp = np.stack([np.max(kp[r]) + 1 - t + np.arange(t) for r in range(b)]).astype(np.int32)
  qp[-1, 0] = -1  # a padded query
  return q, k, v, jnp.asarray(qp), jnp.asarray(kp)


def numpy_reference(q, k, v, qp, kp, *, window=None, num_sinks=0, scale=None, return_key_mass=False):
  """Attention in float64 NumPy, one query row and head at a time, with the mask written out from its definition.

  Args:
    q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` (the public layout); qp ``[b, t]``, kp ``[b, s]`` int positions.
    window, num_sinks, scale: as for ``jstream.ops.attention.attention``.
    return_key_mass: also sum each key's probability over queries and the query heads of its kv group.

  Returns:
    ``A.AttentionResult`` of float64 NumPy arrays: ``out [b, t, n, h]`` (zeros where nothing is visible),
    ``lse [b, t, n]`` (``-inf`` there) and ``key_mass [b, s, k]`` or None.
  """
  q, k, v = (np.asarray(x).astype(np.float64) for x in (q, k, v))  # bf16 values exactly
  qp, kp = np.asarray(qp), np.asarray(kp)
  b, t, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  g = n // kvh
  scale = h**-0.5 if scale is None else scale
  out = np.zeros((b, t, n, v.shape[-1]))
  lse = np.full((b, t, n), -np.inf)
  mass = np.zeros((b, s, kvh))
  for bi in range(b):
    for ti in range(t):
      i = qp[bi, ti]
      seen = [
        j
        for j in range(s)
        if i >= 0
        and kp[bi, j] >= 0
        and kp[bi, j] <= i
        and (window is None or i - kp[bi, j] < window or kp[bi, j] < num_sinks)
      ]
      if not seen:
        continue
      for ni in range(n):
        kh = ni // g
        scores = np.array([q[bi, ti, ni] @ k[bi, j, kh] for j in seen]) * scale
        top = scores.max()
        w = np.exp(scores - top)
        total = w.sum()
        out[bi, ti, ni] = (w[:, None] * v[bi, seen, kh]).sum(0) / total
        lse[bi, ti, ni] = top + np.log(total)
        mass[bi, seen, kh] += w / total
  return A.AttentionResult(out, lse, mass if return_key_mass else None)


def assert_matches(got, want, dtype, *, key_mass=False):
  """``got`` (an implementation's ``AttentionResult``) against ``numpy_reference``'s, with dtype tolerances;
  the lse must be ``-inf`` exactly where the reference's is."""
  tol = TOL[jnp.dtype(dtype).type]
  np.testing.assert_allclose(np.asarray(got.out, np.float64), want.out, **tol)
  finite = np.isfinite(want.lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(got.lse)), finite)
  np.testing.assert_allclose(np.asarray(got.lse, np.float64)[finite], want.lse[finite], **tol)
  if key_mass:
    np.testing.assert_allclose(np.asarray(got.key_mass, np.float64), want.key_mass, **tol)


class AttentionImplBase:
  IMPL = "xla"
  QUERY_LENGTHS = (5, 13)  # not multiples of the kernels' block sizes
  SUPPORTS_KEY_MASS = True

  def run(self, q, k, v, qp, kp, **kw):
    return A.attention(q, k, v, q_positions=qp, k_positions=kp, return_lse=True, impl=self.IMPL, **kw)

  @pytest.mark.parametrize("kvh,num_sinks,window", CASES)
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
  def test_matches_reference(self, kvh, num_sinks, window, dtype):
    for t in self.QUERY_LENGTHS:
      q, k, v, qp, kp = make_inputs(t=t, kvh=kvh, dtype=dtype, seed=t + kvh)
      got = self.run(q, k, v, qp, kp, window=window, num_sinks=num_sinks)
      assert got.out.dtype == dtype
      assert_matches(got, numpy_reference(q, k, v, qp, kp, window=window, num_sinks=num_sinks), dtype)

  def test_scale_and_out_dtype(self):
    q, k, v, qp, kp = make_inputs(t=self.QUERY_LENGTHS[0], seed=8)
    got = self.run(q, k, v, qp, kp, window=6, num_sinks=1, scale=0.7, out_dtype=jnp.bfloat16)
    assert got.out.dtype == jnp.bfloat16 and got.lse.dtype == jnp.float32
    assert_matches(got, numpy_reference(q, k, v, qp, kp, window=6, num_sinks=1, scale=0.7), jnp.bfloat16)

  def test_rows_with_nothing_to_attend(self):
    q, k, v, qp, kp = make_inputs(t=self.QUERY_LENGTHS[0])
    qp = qp.at[0].set(-1)  # every query of row 0 padded
    kp = kp.at[1].set(-1)  # row 1 has an empty cache
    got = self.run(q, k, v, qp, kp, window=4)
    assert np.all(np.asarray(got.out) == 0) and np.all(np.isneginf(np.asarray(got.lse)))

  def test_nan_in_unused_slots_never_leaks(self):
    q, k, v, qp, kp = make_inputs(t=self.QUERY_LENGTHS[0], seed=3)
    unused = (kp < 0)[:, :, None, None]
    clean = self.run(q, k, v, qp, kp, window=6, num_sinks=1)
    dirty = self.run(q, jnp.where(unused, jnp.nan, k), jnp.where(unused, jnp.nan, v), qp, kp, window=6, num_sinks=1)
    assert np.all(np.isfinite(np.asarray(dirty.out)))
    np.testing.assert_array_equal(np.asarray(dirty.out), np.asarray(clean.out))

  def test_heads_first_layouts(self):
    q, k, v, qp, kp = make_inputs(t=self.QUERY_LENGTHS[0], seed=4)
    a = self.run(q, k, v, qp, kp, window=5, num_sinks=2)
    b = self.run(q, jnp.swapaxes(k, 1, 2), jnp.moveaxis(v, 1, 3), qp, kp, window=5, num_sinks=2,
                 kv_layout="bksh", v_layout="bkhs")  # fmt: skip
    np.testing.assert_allclose(a.out, b.out, atol=1e-6)
    assert_matches(b, numpy_reference(q, k, v, qp, kp, window=5, num_sinks=2), jnp.float32)

  def test_gradients_match_reference(self):
    """Gradients through ``out`` and ``lse`` against autodiff of the XLA reference (``jstream.ops.attention.
    xla_attention``, itself checked against NumPy above and against finite differences in test_attention.py)."""
    q, k, v, qp, kp = make_inputs(b=1, t=self.QUERY_LENGTHS[0], s=19, seed=5)
    w_out = jax.random.normal(jax.random.key(9), q.shape)
    w_lse = jax.random.normal(jax.random.key(10), q.shape[:3])
    spec = A.AttentionSpec(window=4, num_sinks=1)

    def loss(fn, q, k, v):
      res = fn(q, k, v)
      lse = jnp.where(jnp.isfinite(res.lse), res.lse, 0.0)
      return jnp.sum(res.out * w_out) + jnp.sum(lse * w_lse)

    ours = jax.grad(lambda q, k, v: loss(lambda *a: self.run(*a, qp, kp, window=4, num_sinks=1), q, k, v),
                    argnums=(0, 1, 2))(q, k, v)  # fmt: skip
    ref = jax.grad(lambda q, k, v: loss(lambda *a: A.xla_attention(*a, qp, kp, spec), q, k, v),
                   argnums=(0, 1, 2))(q, k, v)  # fmt: skip
    for a, b in zip(ours, ref):
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)

  def test_repeated_runs_are_bit_identical(self):
    q, k, v, qp, kp = make_inputs(t=self.QUERY_LENGTHS[-1], seed=6)
    a = self.run(q, k, v, qp, kp, window=7, num_sinks=2)
    b = self.run(q, k, v, qp, kp, window=7, num_sinks=2)
    np.testing.assert_array_equal(np.asarray(a.out), np.asarray(b.out))

  def test_key_mass(self):
    if not self.SUPPORTS_KEY_MASS:
      pytest.skip("this implementation defers key mass to another")
    q, k, v, qp, kp = make_inputs(t=self.QUERY_LENGTHS[0], seed=7)
    got = self.run(q, k, v, qp, kp, window=5, num_sinks=1, return_key_mass=True)
    want = numpy_reference(q, k, v, qp, kp, window=5, num_sinks=1, return_key_mass=True)
    assert_matches(got, want, jnp.float32, key_mass=True)

  def test_bf16_key_mass_is_accumulated_in_f32(self):
    """Key mass from bf16 inputs: scores, probabilities and the sum over queries stay float32, so it equals the
    float64 computation on the same (bf16) values to float32 accuracy, not bf16's (~1e-2)."""
    if not self.SUPPORTS_KEY_MASS:
      pytest.skip("this implementation defers key mass to another")
    q, k, v, qp, kp = make_inputs(t=self.QUERY_LENGTHS[-1], kvh=1, dtype=jnp.bfloat16, seed=17)
    got = self.run(q, k, v, qp, kp, window=9, num_sinks=2, return_key_mass=True)
    assert got.key_mass.dtype == jnp.float32
    want = numpy_reference(q, k, v, qp, kp, window=9, num_sinks=2, return_key_mass=True)
    np.testing.assert_allclose(np.asarray(got.key_mass, np.float64), want.key_mass, atol=2e-5, rtol=2e-5)
