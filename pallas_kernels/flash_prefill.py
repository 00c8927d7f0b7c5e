"""Chunk / prefill flash attention with position-derived masks and block skipping, forward and backward.

Queries of a chunk against keys (cache slots and/or the chunk's own keys) with the mask of
``jstream.ops.attention`` (valid, causal, window, sinks), grouped-query heads, online softmax, the log-sum-exp as
a second output, and a ``custom_vjp`` whose backward is two flash-style kernels (dq; dk and dv), which also
accepts a cotangent for the log-sum-exp (partial attentions merged by ``merge`` are differentiated through it).
Key blocks the mask fully excludes are skipped (see ``common``), so a sink + window mask costs
``O(T x (W + S))``.

Grid: ``(batch, kv_heads, query blocks)`` for the forward and dq passes, ``(batch, kv_heads, key blocks)`` for
dk/dv; each program loops over the other axis's blocks in ``lax.fori_loop`` and skips excluded ones under
``lax.cond``. ``interpret=True`` runs the same kernels on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jstream.ops.attention import AttentionSpec, Keys, Values
from jstream.typing import Array, Float, Int
from pallas_kernels import common


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. ``block_q`` counts tokens (a query tile holds ``block_q * g`` rows); ``block_k`` counts slots."""

  block_q: int = 64
  block_k: int = 64

  def __post_init__(self):
    common.check_powers_of_two(self, ("block_q", "block_k"))


# ------------------------------------------------------------------------------------------------ forward


def _fwd_kernel(
  qmin_ref, qmax_ref, kmin_ref, kmax_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, o_ref, lse_ref, *, spec, blocks
):  # fmt: skip
  qi = pl.program_id(2)
  q = q_ref[...]  # [R, h]: the rows of one query block
  o, m, l = common.attend_key_blocks(
    q, qpos_ref[...], qmin_ref[qi], qmax_ref[qi], k_ref, v_ref, kpos_ref, kmin_ref, kmax_ref, o_ref.shape[-1], spec,
    blocks.block_k,
  )  # fmt: skip
  out, lse = common.finish(o, m, l)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _forward(spec: AttentionSpec, blocks: BlockSizes, interpret, g: int, q, k, v, qp, kp):
  """Packed, padded inputs: q [b, k, R, h], k [b, k, S, h], v [b, k, S, vh] or [b, k, vh, S], qp [b, R], kp [b, S];
  ``g`` query rows per token."""
  b, kvh, rows, h = q.shape
  s = k.shape[2]
  vh = v.shape[2] if spec.v_slots_last else v.shape[3]
  rb, bk = blocks.block_q * g, blocks.block_k
  num_qb, num_kb = rows // rb, s // bk
  qmin, qmax = common.block_summaries(qp, rb)
  kmin, kmax = common.block_summaries(kp, bk)
  v_block = (None, None, vh, s) if spec.v_slots_last else (None, None, s, vh)
  row = lambda bi, ki, qi: (bi, 0)
  return pl.pallas_call(
    functools.partial(_fwd_kernel, spec=spec, blocks=blocks),
    grid=(b, kvh, num_qb),
    in_specs=[
      pl.BlockSpec((None, num_qb), row),
      pl.BlockSpec((None, num_qb), row),
      pl.BlockSpec((None, num_kb), row),
      pl.BlockSpec((None, num_kb), row),
      pl.BlockSpec((None, None, rb, h), lambda bi, ki, qi: (bi, ki, qi, 0)),
      pl.BlockSpec((None, None, s, h), lambda bi, ki, qi: (bi, ki, 0, 0)),
      pl.BlockSpec(v_block, lambda bi, ki, qi: (bi, ki, 0, 0)),
      pl.BlockSpec((None, rb), lambda bi, ki, qi: (bi, qi)),
      pl.BlockSpec((None, s), row),
    ],
    out_specs=[
      pl.BlockSpec((None, None, rb, vh), lambda bi, ki, qi: (bi, ki, qi, 0)),
      pl.BlockSpec((None, None, rb), lambda bi, ki, qi: (bi, ki, qi)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, kvh, rows, vh), spec.out_dtype),
      jax.ShapeDtypeStruct((b, kvh, rows), jnp.float32),
    ],
    interpret=interpret,
    name="jstream_flash_prefill_fwd",
  )(qmin, qmax, kmin, kmax, q, k, v, qp, kp)


# ------------------------------------------------------------------------------------------------ backward


def _dq_kernel(
  qmin_ref, qmax_ref, kmin_ref, kmax_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, do_ref, lse_ref, delta_ref,
  dq_ref, *, spec, blocks,
):  # fmt: skip
  qi = pl.program_id(2)
  q, qp, do = q_ref[...], qpos_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  qmin, qmax = qmin_ref[qi], qmax_ref[qi]
  bk = blocks.block_k

  def body(j, dq):
    skip = spec.excludes_all(qmin, qmax, kmin_ref[j], kmax_ref[j])

    def compute(dq):
      sl = pl.ds(j * bk, bk)
      kp = kpos_ref[sl]
      k = jnp.where(kp[:, None] >= 0, k_ref[sl, :], 0)
      v = jnp.where(kp[:, None] >= 0, v_ref[sl, :], 0)
      p, mask = common.probs_from_lse(q, k, qp, kp, lse, spec)
      dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
      ds = jnp.where(mask, p * (dp - delta[:, None]), 0.0)
      return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * spec.scale

    return jax.lax.cond(skip, lambda d: d, compute, dq)

  dq = jax.lax.fori_loop(0, kmin_ref.shape[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
  qmin_ref, qmax_ref, kmin_ref, kmax_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, do_ref, lse_ref, delta_ref,
  dk_ref, dv_ref, *, spec,
):  # fmt: skip
  kj = pl.program_id(2)
  kp = kpos_ref[...]
  k = jnp.where(kp[:, None] >= 0, k_ref[...], 0)
  v = jnp.where(kp[:, None] >= 0, v_ref[...], 0)
  kmin, kmax = kmin_ref[kj], kmax_ref[kj]
  rb = q_ref.shape[0] // qmin_ref.shape[0]  # rows per query block (block_q * g); the key block is this program's

  def body(i, carry):
    skip = spec.excludes_all(qmin_ref[i], qmax_ref[i], kmin, kmax)

    def compute(carry):
      dk, dv = carry
      sl = pl.ds(i * rb, rb)
      q, qp, do = q_ref[sl, :], qpos_ref[sl], do_ref[sl, :]
      lse, delta = lse_ref[sl], delta_ref[sl]
      p, mask = common.probs_from_lse(q, k, qp, kp, lse, spec)
      dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
      dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
      ds = jnp.where(mask, p * (dp - delta[:, None]), 0.0)
      dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * spec.scale
      return dk, dv

    return jax.lax.cond(skip, lambda c: c, compute, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, qmin_ref.shape[0], body, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(spec: AttentionSpec, blocks: BlockSizes, interpret, g: int, q, k, v, qp, kp, do, lse, delta):
  """Gradients of packed inputs (values slots-second ``[b, k, S, vh]``, whatever ``spec.v_layout`` says)."""
  b, kvh, rows, h = q.shape
  s, vh = k.shape[2], v.shape[3]
  rb, bk = blocks.block_q * g, blocks.block_k
  num_qb, num_kb = rows // rb, s // bk
  qmin, qmax = common.block_summaries(qp, rb)
  kmin, kmax = common.block_summaries(kp, bk)
  row = lambda bi, ki, x: (bi, 0)
  summaries = [pl.BlockSpec((None, n), row) for n in (num_qb, num_qb, num_kb, num_kb)]
  full_q = [
    pl.BlockSpec((None, None, rows, h), lambda bi, ki, x: (bi, ki, 0, 0)),
  ]
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, spec=spec, blocks=blocks),
    grid=(b, kvh, num_qb),
    in_specs=[
      *summaries,
      pl.BlockSpec((None, None, rb, h), lambda bi, ki, qi: (bi, ki, qi, 0)),
      pl.BlockSpec((None, None, s, h), lambda bi, ki, qi: (bi, ki, 0, 0)),
      pl.BlockSpec((None, None, s, vh), lambda bi, ki, qi: (bi, ki, 0, 0)),
      pl.BlockSpec((None, rb), lambda bi, ki, qi: (bi, qi)),
      pl.BlockSpec((None, s), row),
      pl.BlockSpec((None, None, rb, vh), lambda bi, ki, qi: (bi, ki, qi, 0)),
      pl.BlockSpec((None, None, rb), lambda bi, ki, qi: (bi, ki, qi)),
      pl.BlockSpec((None, None, rb), lambda bi, ki, qi: (bi, ki, qi)),
    ],
    out_specs=pl.BlockSpec((None, None, rb, h), lambda bi, ki, qi: (bi, ki, qi, 0)),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    interpret=interpret,
    name="jstream_flash_prefill_dq",
  )(qmin, qmax, kmin, kmax, q, k, v, qp, kp, do, lse, delta)
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, spec=spec),
    grid=(b, kvh, num_kb),
    in_specs=[
      *summaries,
      *full_q,
      pl.BlockSpec((None, None, bk, h), lambda bi, ki, kj: (bi, ki, kj, 0)),
      pl.BlockSpec((None, None, bk, vh), lambda bi, ki, kj: (bi, ki, kj, 0)),
      pl.BlockSpec((None, rows), row),
      pl.BlockSpec((None, bk), lambda bi, ki, kj: (bi, kj)),
      pl.BlockSpec((None, None, rows, vh), lambda bi, ki, kj: (bi, ki, 0, 0)),
      pl.BlockSpec((None, None, rows), lambda bi, ki, kj: (bi, ki, 0)),
      pl.BlockSpec((None, None, rows), lambda bi, ki, kj: (bi, ki, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, None, bk, h), lambda bi, ki, kj: (bi, ki, kj, 0)),
      pl.BlockSpec((None, None, bk, vh), lambda bi, ki, kj: (bi, ki, kj, 0)),
    ],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    interpret=interpret,
    name="jstream_flash_prefill_dkv",
  )(qmin, qmax, kmin, kmax, q, k, v, qp, kp, do, lse, delta)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------ custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash(spec, blocks, interpret, g, q, k, v, qp, kp):
  return _forward(spec, blocks, interpret, g, q, k, v, qp, kp)


def _flash_fwd(spec, blocks, interpret, g, q, k, v, qp, kp):
  out, lse = _forward(spec, blocks, interpret, g, q, k, v, qp, kp)
  return (out, lse), (q, k, v, qp, kp, out, lse)


def _flash_bwd(spec, blocks, interpret, g, res, cts):
  q, k, v, qp, kp, out, lse = res
  d_out, d_lse = cts
  d_out = d_out.astype(jnp.float32)
  # d lse_i / d s_ij = p_ij, so a cotangent on the lse enters exactly like -delta.
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1) - d_lse
  v_s = jnp.swapaxes(v, 2, 3) if spec.v_slots_last else v
  dq, dk, dv = _backward(spec, blocks, interpret, g, q, k, v_s, qp, kp, d_out.astype(q.dtype), lse, delta)
  if spec.v_slots_last:
    dv = jnp.swapaxes(dv, 2, 3)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------ wrapper


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret"))
def flash_attention(
  q: Float[Array, "b t n h"],
  k: Keys,
  v: Values,
  q_positions: Int[Array, "b t"],
  k_positions: Int[Array, "b _"],
  *,
  spec: AttentionSpec,
  blocks: BlockSizes = BlockSizes(),
  interpret: bool = False,
) -> tuple[Float[Array, "b t n _"], Float[Array, "b t n"]]:
  """Flash attention with the position-derived mask; returns ``(out [b, t, n, h], lse [b, t, n])``.

  Args:
    q, k, v, q_positions, k_positions: as for ``jstream.ops.attention.attention`` (key positions ``[b, s]``),
      in the layouts ``spec`` names. Lengths need not be multiples of the block sizes (inputs are padded with
      invalid positions).
    spec: mask, scale, layouts and output dtype (static).
    blocks: tile sizes (static); clipped to the input.
    interpret: run the kernels in Pallas interpret mode (CPU).

  Differentiable (flash backward kernels, through ``out`` and ``lse``); positions are not.
  """
  spec = common.prepare(spec, q, k, v, q_positions, k_positions)
  kvh, s_len = common.kv_dims(k, spec)
  g = q.shape[2] // kvh
  tiles = BlockSizes(
    min(blocks.block_q, pl.next_power_of_2(q.shape[1])), min(blocks.block_k, pl.next_power_of_2(s_len))
  )
  p = common.pack(q, k, v, q_positions, k_positions, spec, row_multiple=tiles.block_q * g, slot_multiple=tiles.block_k)
  out, lse = _flash(spec, tiles, interpret, g, p.q, p.k, p.v, p.qp, p.kp)
  rows = p.t * p.g
  return common.unpack_rows(out[:, :, :rows], p.t, p.g), common.unpack_rows(lse[:, :, :rows], p.t, p.g)
