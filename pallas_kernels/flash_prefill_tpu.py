"""TPU (Mosaic) variant of the chunk / prefill flash kernel: key blocks on a grid axis, skipped without a DMA.

The portable kernel (``flash_prefill``) gives each program a whole row of keys and loops over it; on a TPU that
row must fit in VMEM, and every block of it is copied in whether the mask needs it or not. Here the key blocks
are the last ("arbitrary") grid axis, with the running max, sum and output in VMEM scratch, and the per-block
position summaries are scalar-prefetched into SMEM. For an excluded block the key/value ``index_map`` returns
the block already resident (the last one computed), so the pipeline issues no copy, and ``pl.when`` skips the
compute: a sink + window prefill moves ``O(T x (W + S))`` bytes, not ``O(T x S)``.

Forward only: the backward pass is the XLA reference's (as for decode); training on TPU uses the portable
kernel's flash backward or XLA. Tested on CPU with ``pltpu.InterpretParams()`` (TPU interpret mode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jstream.ops.attention import AttentionSpec, Keys, Values
from jstream.typing import Array, Float, Int
from pallas_kernels import common
from pallas_kernels.flash_prefill import BlockSizes

TPU_BLOCKS = BlockSizes(block_q=128, block_k=128)


def _kernel(
  qmin_ref, qmax_ref, kmin_ref, kmax_ref, eff_ref,  # scalar prefetch (SMEM)
  q_ref, k_ref, v_ref, qpos_ref, kpos_ref,  # VMEM blocks
  o_ref, lse_ref,  # outputs
  m_sc, l_sc, acc_sc,  # VMEM scratch
  *, spec,
):  # fmt: skip
  del eff_ref  # only the index maps read it
  bi, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, common.NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  skip = spec.excludes_all(qmin_ref[bi, qi], qmax_ref[bi, qi], kmin_ref[bi, kj], kmax_ref[bi, kj])

  @pl.when(jnp.logical_not(skip))
  def _compute():
    carry = (acc_sc[...], m_sc[...][:, 0], l_sc[...][:, 0])
    o, m, l = common.attend_tile(carry, q_ref[...], k_ref[...], v_ref[...], qpos_ref[...], kpos_ref[...], spec)
    acc_sc[...] = o
    m_sc[...] = m[:, None]
    l_sc[...] = l[:, None]

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish():
    out, lse = common.finish(acc_sc[...], m_sc[...][:, 0], l_sc[...][:, 0])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def resident_block(skipped):
  """Per (q block, k block): the key block to have in VMEM, the last computed one for skipped steps (no DMA)."""
  nkb = skipped.shape[-1]
  idx = jnp.arange(nkb, dtype=jnp.int32)
  last = jax.lax.cummax(jnp.where(skipped, -1, idx), axis=skipped.ndim - 1)
  first = jnp.argmin(skipped, axis=-1).astype(jnp.int32)[..., None]  # before any computed block: the first one
  return jnp.where(last >= 0, last, first)


def _forward(q, k, v, q_positions, k_positions, *, spec: AttentionSpec, blocks: BlockSizes, interpret):
  """``(out [b, t, n, h], lse [b, t, n])`` (forward only: ``flash_attention_tpu`` adds the reference's backward)."""
  b, t, n, h = q.shape
  kvh, s_len = common.kv_dims(k, spec)
  tiles = BlockSizes(min(blocks.block_q, pl.next_power_of_2(t)), min(blocks.block_k, pl.next_power_of_2(s_len)))
  rb, bk = tiles.block_q * (n // kvh), tiles.block_k  # rows per query block, slots per key block
  p = common.pack(q, k, v, q_positions, k_positions, spec, row_multiple=rb, slot_multiple=bk)
  qq, kk, vv, qp, kp, g = p.q, p.k, p.v, p.qp, p.kp, p.g
  v_slots_last = spec.v_slots_last
  rows, s = qq.shape[2], kk.shape[2]
  vh = vv.shape[2] if v_slots_last else vv.shape[3]
  nqb, nkb = rows // rb, s // bk
  qmin, qmax = common.block_summaries(qp, rb)
  kmin, kmax = common.block_summaries(kp, bk)
  skipped = spec.excludes_all(qmin[:, :, None], qmax[:, :, None], kmin[:, None, :], kmax[:, None, :])
  eff = resident_block(skipped)  # [b, nqb, nkb]

  def kv_index(bi, ki, qi, kj, qmn, qmx, kmn, kmx, eff):
    return (bi, ki, eff[bi, qi, kj], 0)

  if v_slots_last:
    v_spec = pl.BlockSpec((None, None, vh, bk), lambda bi, ki, qi, kj, *p: (bi, ki, 0, p[4][bi, qi, kj]))
  else:
    v_spec = pl.BlockSpec((None, None, bk, vh), kv_index)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=5,
    grid=(b, kvh, nqb, nkb),
    in_specs=[
      pl.BlockSpec((None, None, rb, h), lambda bi, ki, qi, kj, *p: (bi, ki, qi, 0)),
      pl.BlockSpec((None, None, bk, h), kv_index),
      v_spec,
      pl.BlockSpec((None, rb), lambda bi, ki, qi, kj, *p: (bi, qi)),
      pl.BlockSpec((None, bk), lambda bi, ki, qi, kj, *p: (bi, p[4][bi, qi, kj])),
    ],
    out_specs=[
      pl.BlockSpec((None, None, rb, vh), lambda bi, ki, qi, kj, *p: (bi, ki, qi, 0)),
      pl.BlockSpec((None, None, rb), lambda bi, ki, qi, kj, *p: (bi, ki, qi)),
    ],
    scratch_shapes=[
      pltpu.VMEM((rb, 1), jnp.float32),
      pltpu.VMEM((rb, 1), jnp.float32),
      pltpu.VMEM((rb, vh), jnp.float32),
    ],
  )
  out, lse = pl.pallas_call(
    functools.partial(_kernel, spec=spec),
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((b, kvh, rows, vh), spec.out_dtype),
      jax.ShapeDtypeStruct((b, kvh, rows), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="jstream_flash_prefill_tpu",
  )(qmin, qmax, kmin, kmax, eff, qq, kk, vv, qp, kp)
  out = common.unpack_rows(out[:, :, : t * g], t, g)
  lse = common.unpack_rows(lse[:, :, : t * g], t, g)
  return out, lse


_differentiable = common.with_reference_vjp(_forward)


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret"))
def flash_attention_tpu(
  q: Float[Array, "b t n h"],
  k: Keys,
  v: Values,
  q_positions: Int[Array, "b t"],
  k_positions: Int[Array, "b _"],
  *,
  spec: AttentionSpec,
  blocks: BlockSizes = TPU_BLOCKS,
  interpret=False,
) -> tuple[Float[Array, "b t n _"], Float[Array, "b t n"]]:
  """TPU prefill flash attention; returns ``(out [b, t, n, h], lse [b, t, n])``.

  Args:
    q, k, v, q_positions, k_positions: as for ``flash_prefill.flash_attention``.
    spec: mask, scale, layouts and output dtype (static).
    blocks: tile sizes (static); clipped to the input.
    interpret: False, or ``pltpu.InterpretParams()`` for TPU interpret mode on CPU.

  Differentiable through the XLA reference's backward pass.
  """
  spec = common.prepare(spec, q, k, v, q_positions, k_positions)
  return _differentiable(q, k, v, q_positions, k_positions, spec, blocks, interpret)
