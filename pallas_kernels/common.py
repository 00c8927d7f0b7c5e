"""Pieces shared by the attention kernels: input packing, per-block position summaries, masks, skipping.

Layout inside the kernels: grouped-query heads are folded into rows. ``q [b, t, n, h]`` becomes
``[b, k, t * g, h]`` (row ``i * g + j`` is token ``i``, query head ``j`` of kv head ``k``), so one program loads
a key/value tile once for all the query heads that share it. Keys are ``[b, k, s, h]``; values ``[b, k, s, h]``
or slots-last ``[b, k, h, s]`` (the cache layout).

Block skipping: positions are data (a ring cache holds them in any slot order), so whether a key block can be
skipped is decided from per-block summaries: the smallest and largest valid position of the block (``kmax < 0``
when it holds no valid key). A (query block, key block) pair is skipped when the mask excludes every pair in it
(``AttentionSpec.excludes_all``: no valid key or query, every key after every query, or every key older than the
window for every query and none of them a sink). Skipped blocks are neither loaded nor computed, so a sink +
window mask costs ``O(T x (W + S))``.

Static arguments, one style in every kernel: the public wrapper takes ``spec`` (a ``jstream.ops.attention.
AttentionSpec``), ``blocks`` (the kernel's block-size dataclass) and ``interpret``, all static; kernel bodies are
bound with ``functools.partial(body, spec=spec, blocks=blocks)`` (``blocks`` clipped to the input; bodies that
do not loop over blocks take ``spec`` only) and read ``spec.window``, ``blocks.block_k``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jstream.ops.attention import AttentionSpec, layout_dims, xla_attention

NEG_INF = float("-inf")
BIG = 2**30  # larger than any valid position


class Packed(NamedTuple):
  """Kernel-layout inputs (see the module docstring), padded to block multiples, plus what unpacking needs."""

  q: jax.Array  # [b, k, R, h]
  k: jax.Array  # [b, k, S, h]
  v: jax.Array  # [b, k, S, vh] or slots-last [b, k, vh, S]
  qp: jax.Array  # [b, R]
  kp: jax.Array  # [b, S]
  t: int
  g: int
  s: int  # unpadded number of slots


def prepare(spec: AttentionSpec, q, k, v, q_positions, k_positions) -> AttentionSpec:
  """Checks a kernel wrapper's inputs against ``spec`` (clear errors) and returns ``spec.resolved(q)``."""
  spec.check_inputs(q, k, v, q_positions, k_positions)
  if k_positions.ndim != 2:
    raise ValueError("the kernels take key positions [b, s]; per-kv-head positions are handled by impl='xla'")
  return spec.resolved(q)


def check_powers_of_two(obj, names) -> None:
  """Raises a clear ``ValueError`` unless each named field of the block-size dataclass ``obj`` is a power of two."""
  for name in names:
    v = getattr(obj, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
      raise ValueError(f"{type(obj).__name__}.{name} must be a positive power of two, got {v!r}")


def kv_dims(k, spec: AttentionSpec) -> tuple[int, int]:
  """``(kv heads, slots)`` of a key array in ``spec.kv_layout``."""
  dims = layout_dims(k, spec.kv_layout)
  return dims["k"], dims["s"]


def pack(q, k, v, q_positions, k_positions, spec: AttentionSpec, *, row_multiple: int, slot_multiple: int) -> Packed:
  """Folds query heads into rows, moves keys/values heads-first and pads rows and slots with invalid positions.

  ``row_multiple`` is counted in rows (a token is ``g = n // kv_heads`` rows); ``slot_multiple`` in slots. Values
  stay slots-last when ``spec.v_slots_last``.
  """
  _, t, n, _ = q.shape
  kvh = kv_dims(k, spec)[0]
  g = n // kvh
  kk = jnp.swapaxes(k, 1, 2) if spec.kv_layout == "bskh" else k
  v_slots_last = spec.v_slots_last
  vv = jnp.swapaxes(v, 1, 2) if spec.v_layout == "bskh" else v
  qq, qp = pack_queries(q, q_positions.astype(jnp.int32), kvh)
  s = kk.shape[2]
  qq, qp = pad_axis(qq, 2, row_multiple, 0), pad_axis(qp, 1, row_multiple, -1)
  kk = pad_axis(kk, 2, slot_multiple, 0)
  vv = pad_axis(vv, 3 if v_slots_last else 2, slot_multiple, 0)
  kp = pad_axis(k_positions.astype(jnp.int32), 1, slot_multiple, -1)
  return Packed(qq, kk, vv, qp, kp, t, g, s)


def pack_queries(q, q_positions, kv_heads: int):
  """``q [b, t, n, h] -> [b, k, t*g, h]`` and positions ``[b, t] -> [b, t*g]``."""
  b, t, n, h = q.shape
  g = n // kv_heads
  qk = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, h)
  qp = jnp.repeat(q_positions, g, axis=1)
  return qk, qp


def unpack_rows(x, t: int, g: int):
  """``[b, k, t*g, ...] -> [b, t, n, ...]``."""
  b, kv_heads = x.shape[:2]
  rest = x.shape[3:]
  x = x.reshape(b, kv_heads, t, g, *rest)
  x = jnp.moveaxis(x, 2, 1)  # [b, t, k, g, ...]
  return x.reshape(b, t, kv_heads * g, *rest)


def pad_axis(x, axis: int, multiple: int, value):
  size = x.shape[axis]
  pad = (-size) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def position_range(positions):
  """``(min, max)`` of the valid (>= 0) entries of a position vector (``BIG``, -1 when there are none)."""
  valid = positions >= 0
  return jnp.min(jnp.where(valid, positions, BIG)), jnp.max(jnp.where(valid, positions, -1))


def block_summaries(positions, block: int):
  """Per-block ``(min, max)`` of the valid (>= 0) positions of ``[b, s]`` (s a multiple of ``block``).

  Empty blocks get ``min = BIG``, ``max = -1``.
  """
  b, s = positions.shape
  p = positions.reshape(b, s // block, block)
  valid = p >= 0
  pmin = jnp.min(jnp.where(valid, p, BIG), axis=-1).astype(jnp.int32)
  pmax = jnp.max(jnp.where(valid, p, -1), axis=-1).astype(jnp.int32)
  return pmin, pmax


def tile_mask(qp, kp, spec: AttentionSpec):
  """``[rows, cols]`` visibility of query positions ``qp [rows]`` and key positions ``kp [cols]``."""
  return spec.visible(qp[:, None], kp[None, :])


def zero_unseen_values(v, mask, slots_last: bool):
  """Zeroes the value columns no query of the tile sees (so NaN in empty or masked slots cannot leak)."""
  seen = jnp.any(mask, axis=0)  # [cols]
  return jnp.where(seen[None, :], v, 0) if slots_last else jnp.where(seen[:, None], v, 0)


def value_dot(v, slots_last: bool):
  """``p -> p @ v_tile`` in float32, for a value tile ``[block_k, h]`` or slots-last ``[h, block_k]``."""
  if slots_last:
    return lambda p: jnp.dot(p.astype(v.dtype), v.T, preferred_element_type=jnp.float32)
  return lambda p: jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def online_softmax_step(carry, s, mask, v_tile_dot):
  """One flash step: fold scores ``s [rows, cols]`` (masked by ``mask``) into ``(o, m, l)``.

  ``v_tile_dot(p)`` returns ``p @ v_tile`` in float32.
  """
  o, m, l = carry
  s = jnp.where(mask, s, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
  p = jnp.where(mask, jnp.exp(s - m_safe[:, None]), 0.0)
  corr = jnp.exp(m - m_safe)  # exp(-inf) = 0 for rows that had nothing yet
  l = corr * l + jnp.sum(p, axis=-1)
  o = corr[:, None] * o + v_tile_dot(p)
  return o, m_new, l


def softmax_init(rows: int, vh: int):
  """The empty online-softmax state ``(o [rows, vh], m [rows], l [rows])``."""
  return (
    jnp.zeros((rows, vh), jnp.float32),
    jnp.full((rows,), NEG_INF, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )


def attend_tile(carry, q, k, v, qp, kp, spec: AttentionSpec):
  """One flash step of a query tile ``q [rows, h]`` over a key tile ``k [cols, h]`` and its values (``[cols, h]``, or
  ``[h, cols]`` when ``spec.v_slots_last``): scores, the position mask, values no query sees zeroed, then
  ``online_softmax_step``."""
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * spec.scale
  mask = tile_mask(qp, kp, spec)
  v = zero_unseen_values(v, mask, spec.v_slots_last)
  return online_softmax_step(carry, s, mask, value_dot(v, spec.v_slots_last))


def attend_key_blocks(q, qp, qmin, qmax, k_ref, v_ref, kpos_ref, kmin_ref, kmax_ref, vh: int, spec, block_k: int):
  """The online softmax ``(o, m, l)`` of a query tile ``q [rows, h]`` (positions ``qp``, valid range ``[qmin,
  qmax]``) over every ``block_k``-slot key block of the refs in a ``fori_loop``, skipping under ``lax.cond`` the
  blocks the mask excludes (``kmin_ref``, ``kmax_ref``: per-block summaries)."""

  def body(j, carry):
    def compute(carry):
      sl = pl.ds(j * block_k, block_k)
      v = v_ref[:, sl] if spec.v_slots_last else v_ref[sl, :]
      return attend_tile(carry, q, k_ref[sl, :], v, qp, kpos_ref[sl], spec)

    return jax.lax.cond(spec.excludes_all(qmin, qmax, kmin_ref[j], kmax_ref[j]), lambda c: c, compute, carry)

  return jax.lax.fori_loop(0, kmin_ref.shape[0], body, softmax_init(q.shape[0], vh))


def probs_from_lse(q, k, qp, kp, lse, spec: AttentionSpec):
  """Masked probabilities ``p [rows, cols]`` of a (query tile, key tile) pair recomputed from the final
  log-sum-exp ``lse [rows]`` (flash backward, key mass), and the mask."""
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * spec.scale
  mask = tile_mask(qp, kp, spec)
  lse_safe = jnp.where(lse == NEG_INF, 0.0, lse)
  return jnp.where(mask, jnp.exp(s - lse_safe[:, None]), 0.0), mask


def finish(o, m, l):
  """Normalised output ``o [..., r, h]`` and log-sum-exp ``[..., r]`` (zeros and -inf for rows that saw nothing)."""
  ok = l > 0
  out = jnp.where(ok[..., None], o / jnp.where(ok, l, 1.0)[..., None], 0.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  return out, lse


def merge_splits(o, m, l):
  """Combines split-K partials ``o [..., p, r, h]``, ``m, l [..., p, r]`` (flash-decoding's final step)."""
  m_max = jnp.max(m, axis=-2, keepdims=True)
  m_safe = jnp.where(m_max == NEG_INF, 0.0, m_max)
  corr = jnp.exp(m - m_safe)
  l_tot = jnp.sum(l * corr, axis=-2)
  o_tot = jnp.sum(o * corr[..., None], axis=-3)
  return finish(o_tot, m_safe[..., 0, :], l_tot)


def interpret_default() -> bool:
  """Kernels run in interpret mode on CPU (tests) and compiled on GPU/TPU."""
  return jax.default_backend() == "cpu"


def with_reference_vjp(forward):
  """Wraps a forward-only kernel ``forward(q, k, v, qp, kp, *, spec, blocks, interpret) -> (out, lse)`` in a
  ``custom_vjp`` (``spec``, ``blocks``, ``interpret`` static) whose backward is that of the XLA reference (used
  where no flash backward kernel exists). Returns ``wrapped(q, k, v, qp, kp, spec, blocks, interpret)``."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
  def wrapped(q, k, v, qp, kp, spec, blocks, interpret):
    return forward(q, k, v, qp, kp, spec=spec, blocks=blocks, interpret=interpret)

  def fwd(q, k, v, qp, kp, spec, blocks, interpret):
    return wrapped(q, k, v, qp, kp, spec, blocks, interpret), (q, k, v, qp, kp)

  def bwd(spec, blocks, interpret, res, cts):
    del blocks, interpret
    q, k, v, qp, kp = res
    ref = lambda q, k, v: tuple(xla_attention(q, k, v, qp, kp, spec.replace(mask_values=True), return_lse=True)[:2])
    _, vjp = jax.vjp(ref, q, k, v)
    dq, dk, dv = vjp(tuple(cts))
    return dq, dk, dv, None, None

  wrapped.defvjp(fwd, bwd)
  return wrapped
