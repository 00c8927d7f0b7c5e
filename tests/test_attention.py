"""The attention op: reference semantics, layouts, merging, residuals, NaN safety, dispatch, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_base import numpy_reference

from conftest import library_checks_only
from jstream.ops import attention as A


def _rand(shape, seed, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def test_hand_computed_case():
  # One query, two keys with scores 0 and log(3): weights 1/4 and 3/4.
  q = jnp.array([[[[1.0, 0.0]]]])  # [1, 1, 1, 2]
  k = jnp.array([[[[0.0, 0.0]], [[np.log(3.0) * np.sqrt(2.0), 0.0]]]])  # [1, 2, 1, 2]
  v = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])
  pos = jnp.array([[1]]), jnp.array([[0, 1]])
  res = A.attention(q, k, v, q_positions=pos[0], k_positions=pos[1], return_lse=True)
  np.testing.assert_allclose(res.out[0, 0, 0], [0.25, 0.75], atol=1e-6)
  np.testing.assert_allclose(res.lse[0, 0, 0], np.log(4.0), atol=1e-6)


@pytest.mark.parametrize("window,num_sinks", [(None, 0), (3, 0), (3, 2), (1, 1), (20, 4)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_matches_loop_reference(window, num_sinks, kv_heads):
  b, t, s, n, h = 2, 5, 11, 4, 8
  q, k, v = _rand((b, t, n, h), 0), _rand((b, s, kv_heads, h), 1), _rand((b, s, kv_heads, h), 2)
  kp = np.tile(np.arange(s, dtype=np.int32), (b, 1))
  kp[0, 3] = -1  # an empty slot
  kp[1] = np.random.default_rng(0).permutation(s)  # slots in any order
  qp = np.array([[6, 7, 8, 9, 10], [-1, 2, 0, 10, 4]], np.int32)  # a padded query in row 1
  res = A.attention(
    q,
    k,
    v,
    q_positions=jnp.asarray(qp),
    k_positions=jnp.asarray(kp),
    window=window,
    num_sinks=num_sinks,
    return_lse=True,
  )
  ref_out, ref_lse, _ = numpy_reference(q, k, v, qp, kp, window=window, num_sinks=num_sinks)
  np.testing.assert_allclose(res.out, ref_out, atol=2e-6)
  np.testing.assert_allclose(res.lse, ref_lse, atol=2e-6)


def test_matches_jax_dot_product_attention_causal():
  b, t, n, kh, h = 2, 16, 4, 2, 8
  q, k, v = _rand((b, t, n, h), 3), _rand((b, t, kh, h), 4), _rand((b, t, kh, h), 5)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  ours = A.attention(q, k, v, q_positions=pos, k_positions=pos)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_layouts_agree():
  b, t, s, n, kh, h = 1, 3, 9, 4, 2, 8
  q, k, v = _rand((b, t, n, h), 6), _rand((b, s, kh, h), 7), _rand((b, s, kh, h), 8)
  qp, kp = jnp.array([[6, 7, 8]]), jnp.arange(s, dtype=jnp.int32)[None]
  kw = dict(q_positions=qp, k_positions=kp, window=4, num_sinks=1, return_lse=True, return_key_mass=True)
  a = A.attention(q, k, v, **kw)
  c = A.attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1), kv_layout="bksh", v_layout="bkhs", **kw)
  np.testing.assert_allclose(a.out, c.out, atol=1e-6)
  np.testing.assert_allclose(a.lse, c.lse, atol=1e-6)
  np.testing.assert_allclose(a.key_mass, c.key_mass.transpose(0, 2, 1), atol=1e-6)


def test_merge_of_disjoint_parts_equals_whole():
  b, t, s, n, kh, h = 2, 4, 12, 4, 2, 8
  q, k, v = _rand((b, t, n, h), 9), _rand((b, s, kh, h), 10), _rand((b, s, kh, h), 11)
  qp = jnp.array([[8, 9, 10, 11], [0, 1, 2, 3]], jnp.int32)
  kp = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  whole = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=5, num_sinks=2, return_lse=True)
  parts = [
    A.attention(
      q,
      k[:, lo:hi],
      v[:, lo:hi],
      q_positions=qp,
      k_positions=kp[:, lo:hi],
      window=5,
      num_sinks=2,
      return_lse=True,
      out_dtype=jnp.float32,
    )
    for lo, hi in ((0, 2), (2, 7), (7, 12))
  ]
  out, lse = A.merge([(p.out, p.lse) for p in parts])
  np.testing.assert_allclose(out, whole.out, atol=2e-6)
  np.testing.assert_allclose(lse, whole.lse, atol=2e-6)


def test_rows_with_nothing_to_attend_give_zeros_not_nan():
  q, k, v = _rand((1, 2, 2, 4), 12), _rand((1, 3, 2, 4), 13), _rand((1, 3, 2, 4), 14)
  res = A.attention(
    q,
    k,
    v,
    q_positions=jnp.array([[-1, 0]]),
    k_positions=jnp.array([[-1, 5, -1]]),
    return_lse=True,
    return_key_mass=True,
  )
  np.testing.assert_array_equal(res.out, 0.0)
  assert np.all(np.isneginf(res.lse))
  np.testing.assert_array_equal(res.key_mass, 0.0)
  out, lse = A.merge([(res.out, res.lse), (res.out, res.lse)])
  assert np.all(np.isfinite(out)) and np.all(np.isneginf(lse))


def test_key_mass_is_the_attention_received():
  b, t, s, n, kh, h = 1, 4, 6, 4, 2, 8
  q, k, v = _rand((b, t, n, h), 15), _rand((b, s, kh, h), 16), _rand((b, s, kh, h), 17)
  qp, kp = jnp.array([[2, 3, 4, 5]]), jnp.arange(s, dtype=jnp.int32)[None]
  res = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=3, return_key_mass=True)
  scores = np.einsum("btnh,bsnh->bnts", q, np.repeat(np.asarray(k), 2, axis=2)) / np.sqrt(h)
  mask = np.asarray(A.attention_mask(qp, kp, window=3))[:, 0]  # [b, t, s]
  scores = np.where(mask[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = p.reshape(b, kh, 2, t, s).sum(axis=(2, 3))  # [b, k, s]
  np.testing.assert_allclose(res.key_mass, want.transpose(0, 2, 1), atol=1e-5)
  # every valid query distributes a mass of 1 per head
  np.testing.assert_allclose(res.key_mass.sum(), t * n, rtol=1e-5)


def test_key_mass_of_a_part_is_its_share_of_the_merged_attention():
  """``key_mass`` with the merged log-sum-exp of disjoint key sets gives each part's keys their mass in the
  attention over the union (the float64 reference over all keys), in both key layouts; with the part's own lse
  it is the part's ``key_mass``. A query that sees nothing anywhere gives zero mass."""
  b, t, s, n, kh, h = 2, 3, 12, 4, 2, 8
  q, k, v = _rand((b, t, n, h), 31), _rand((b, s, kh, h), 32), _rand((b, s, kh, h), 33)
  qp = jnp.array([[9, 10, 11], [-1, 4, 6]], jnp.int32)
  kp = jnp.broadcast_to(jnp.where(jnp.arange(s) == 3, -1, jnp.arange(s, dtype=jnp.int32)), (b, s))
  kw = dict(window=6, num_sinks=2)
  want = numpy_reference(q, k, v, qp, kp, return_key_mass=True, **kw).key_mass  # [b, s, k]
  cuts = ((0, 5), (5, 12))
  parts = [
    A.attention(q, k[:, lo:hi], v[:, lo:hi], q_positions=qp, k_positions=kp[:, lo:hi], return_lse=True,
                return_key_mass=True, **kw)
    for lo, hi in cuts
  ]  # fmt: skip
  lse = A.merge([(p.out.astype(jnp.float32), p.lse) for p in parts])[1]
  for (lo, hi), part in zip(cuts, parts, strict=True):
    got = A.key_mass(q, k[:, lo:hi], lse, q_positions=qp, k_positions=kp[:, lo:hi], **kw)
    np.testing.assert_allclose(got, want[:, lo:hi], atol=1e-5)
    heads_first = A.key_mass(
      q, jnp.swapaxes(k[:, lo:hi], 1, 2), lse, q_positions=qp, k_positions=kp[:, lo:hi], kv_layout="bksh", **kw
    )
    np.testing.assert_allclose(heads_first, np.swapaxes(want[:, lo:hi], 1, 2), atol=1e-5)
    own = A.key_mass(q, k[:, lo:hi], part.lse, q_positions=qp, k_positions=kp[:, lo:hi], **kw)
    np.testing.assert_allclose(own, part.key_mass, atol=1e-5)
  with library_checks_only(), pytest.raises(ValueError, match="lse must be"):
    A.key_mass(q, k, lse[:, :1], q_positions=qp, k_positions=kp)


def test_nan_in_unused_slots_never_leaks():
  b, t, s, n, kh, h = 1, 2, 8, 2, 1, 4
  q, k, v = _rand((b, t, n, h), 18), _rand((b, s, kh, h), 19), _rand((b, s, kh, h), 20)
  kp = jnp.array([[0, 1, 2, 3, -1, -1, 9, 10]], jnp.int32)  # 4, 5 empty; 9, 10 in the future
  qp = jnp.array([[3, 4]], jnp.int32)
  clean = A.attention(q, k, v, q_positions=qp, k_positions=kp, window=3)
  poison = jnp.array([False, False, False, False, True, True, True, True])[None, :, None, None]
  kn, vn = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  dirty = A.attention(q, kn, vn, q_positions=qp, k_positions=kp, window=3)
  np.testing.assert_array_equal(dirty, clean)


def test_bf16_close_to_f32():
  b, t, s, n, kh, h = 2, 8, 8, 4, 2, 16
  q, k, v = _rand((b, t, n, h), 21), _rand((b, s, kh, h), 22), _rand((b, s, kh, h), 23)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  f32 = A.attention(q, k, v, q_positions=pos, k_positions=pos, window=4)
  bf16 = A.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), q_positions=pos, k_positions=pos, window=4)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.astype(jnp.float32), f32, atol=3e-2, rtol=3e-2)


def test_gradients_are_finite_and_match_finite_differences():
  b, t, n, h = 1, 4, 2, 4
  q, k, v = _rand((b, t, n, h), 24), _rand((b, t, n, h), 25), _rand((b, t, n, h), 26)
  pos = jnp.array([[0, 1, -1, 3]], jnp.int32)

  def loss(q, k, v):
    return jnp.sum(A.attention(q, k, v, q_positions=pos, k_positions=pos, window=2) ** 2)

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  eps = 1e-3
  d = jnp.zeros_like(q).at[0, 1, 0, 2].set(eps)
  fd = (loss(q + d, k, v) - loss(q - d, k, v)) / (2 * eps)
  np.testing.assert_allclose(grads[0][0, 1, 0, 2], fd, rtol=1e-2, atol=1e-3)


def test_repeated_runs_are_bit_identical():
  q, k, v = _rand((2, 5, 4, 8), 27), _rand((2, 9, 2, 8), 28), _rand((2, 9, 2, 8), 29)
  qp = jnp.broadcast_to(jnp.arange(4, 9, dtype=jnp.int32), (2, 5))
  kp = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
  f = jax.jit(lambda q, k, v: A.attention(q, k, v, q_positions=qp, k_positions=kp, window=3))
  np.testing.assert_array_equal(f(q, k, v), f(q, k, v))


def test_dispatch_falls_back_and_reports():
  calls = []

  def picky(q, k, v, q_positions, k_positions, spec, **kwargs):
    calls.append(spec.window)
    raise NotImplementedError("only full attention")

  A.register("picky_test", picky, platforms=("cpu",), priority=10)
  try:
    q = _rand((1, 2, 2, 4), 30)
    pos = jnp.array([[0, 1]], jnp.int32)
    assert A.resolve("auto", "cpu")[0] == "picky_test"
    out = A.attention(q, q[:, :, :1], q[:, :, :1], q_positions=pos, k_positions=pos, window=1)
    assert calls == [1] and out.shape == (1, 2, 2, 4)
    with pytest.raises(NotImplementedError, match="only full attention"):
      A.attention(q, q, q, q_positions=pos, k_positions=pos, impl="picky_test")
  finally:
    A.unregister("picky_test")
  with pytest.raises(ValueError, match="unknown attention impl"):
    A.attention(q, q, q, q_positions=pos, k_positions=pos, impl="nope")


@pytest.mark.parametrize(
  "kwargs,err",
  [
    (dict(q=(1, 2, 3, 4), k=(1, 5, 2, 4)), "multiple of kv heads"),
    (dict(q=(1, 2, 4, 4), k=(2, 5, 2, 4)), "batch mismatch"),
    (dict(q=(1, 2, 4, 8), k=(1, 5, 2, 4)), "head_dim"),
    (dict(q=(1, 2, 4, 4), k=(1, 5, 2, 4), window=0), "window"),
    (dict(q=(1, 2, 4, 4), k=(1, 5, 2, 4), qp=(1, 3)), "q_positions"),
    (dict(q=(1, 2, 4, 4), k=(1, 5, 2, 4), kdtype=jnp.bfloat16), "dtypes differ"),
    (dict(q=(1, 2, 4, 4), k=(1, 5, 2, 4), pdtype=jnp.float32), "integer"),
  ],
)
def test_bad_input_raises(kwargs, err):
  q = jnp.ones(kwargs["q"])
  k = jnp.ones(kwargs["k"], kwargs.get("kdtype", jnp.float32))
  qp = jnp.zeros(kwargs.get("qp", kwargs["q"][:2]), kwargs.get("pdtype", jnp.int32))
  kp = jnp.zeros((kwargs["k"][0], kwargs["k"][1]), jnp.int32)
  with library_checks_only(), pytest.raises((ValueError, TypeError), match=err):
    A.attention(q, k, k, q_positions=qp, k_positions=kp, window=kwargs.get("window"))


@pytest.mark.parametrize(
  "kwargs,err",
  [
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(window=True), "window"),
    (dict(num_sinks=-1), "num_sinks"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale="0.5"), "scale"),
    (dict(kv_layout="bkhs"), "kv_layout"),
    (dict(v_layout="bhks"), "v_layout"),
    (dict(out_dtype=jnp.int32), "out_dtype"),
    (dict(mask_values=None), "mask_values"),
  ],
)
def test_spec_is_validated_at_construction(kwargs, err):
  with library_checks_only(), pytest.raises((ValueError, TypeError), match=err):
    A.AttentionSpec(**kwargs)


def test_spec_is_hashable_normalised_and_resolved_from_the_queries():
  with library_checks_only():  # a NumPy integer is accepted and normalised (the annotation says int)
    a = A.AttentionSpec(window=np.int64(4), num_sinks=2, kv_layout="bksh", out_dtype="bfloat16")
  b = A.AttentionSpec(window=4, num_sinks=2, kv_layout="bksh", v_layout="bksh", out_dtype=jnp.bfloat16)
  assert a == b and hash(a) == hash(b) and type(a.window) is int
  assert a.v_layout == "bksh" and not a.v_slots_last and a.replace(v_layout="bkhs").v_slots_last
  q = jnp.zeros((1, 2, 2, 16), jnp.float32)
  r = A.AttentionSpec(window=4).resolved(q)
  assert r.scale == 0.25 and r.out_dtype == jnp.float32
  assert A.AttentionSpec(scale=2, out_dtype=jnp.float16).resolved(q) == A.AttentionSpec(scale=2.0, out_dtype="float16")
  f = jax.jit(lambda x, spec: x * spec.scale, static_argnames="spec")  # a static argument of jit
  assert float(f(jnp.ones(()), spec=r)) == 0.25


@pytest.mark.parametrize("window,num_sinks", [(None, 0), (3, 0), (3, 2), (1, 1), (6, 4)])
def test_block_exclusion_is_exact_on_ranges_of_positions(window, num_sinks):
  """``excludes_all`` on a query block and a key block holding every position of their ranges is true exactly
  when ``visible`` is false for every pair (so kernels skip no block that has a visible pair, and compute no block
  that has none)."""
  spec = A.AttentionSpec(window=window, num_sinks=num_sinks)
  rng = np.random.default_rng(0)
  for _ in range(300):
    qmin, kmin = rng.integers(0, 12, 2)
    qmax, kmax = qmin + rng.integers(0, 4), kmin + rng.integers(0, 4)
    qs, ks = np.arange(qmin, qmax + 1), np.arange(kmin, kmax + 1)
    any_visible = bool(np.any(spec.visible(qs[:, None], ks[None, :])))
    assert bool(spec.excludes_all(qmin, qmax, kmin, kmax)) == (not any_visible), (qmin, qmax, kmin, kmax)
  assert spec.excludes_all(0, 5, 0, -1) and spec.excludes_all(-1, -1, 0, 3)  # a block without valid positions
