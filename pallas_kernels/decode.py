"""Decode attention (flash-decoding): a few queries per row against a long ring / sink cache, split over slots.

Up to ``MAX_DECODE_ROWS`` = 64 query rows (queries x query heads per kv head: single-token decode, a speculative
draft) against the cache, with per-row validity and
positions taken from ``k_positions`` (ragged rows, rings in any slot order). The slot axis is cut into
``num_splits`` contiguous splits, one program each, so that a long cache keeps every core busy even at batch 1;
each program loops over its key blocks, skipping those the mask excludes (empty, future, out of window), and
writes a partial ``(o, m, l)``. A combine step merges the partials by log-sum-exp.

Optionally a second kernel returns the attention mass each key received, ``sum_q p(q, key)`` over the queries
and the query heads of its kv group (for score-based eviction: H2O, SnapKV), recomputing the scores from the
final log-sum-exp instead of materialising them. It is a statistic, not differentiated (its gradient is zero).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jstream.ops.attention import AttentionSpec, Keys, Values
from jstream.typing import Array, Float, Int
from pallas_kernels import common


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """``block_k`` slots per inner step; ``num_splits`` programs along the slot axis (flash-decoding's split-K)."""

  block_k: int = 128
  num_splits: int = 8

  def __post_init__(self):
    common.check_powers_of_two(self, ("block_k", "num_splits"))


MAX_DECODE_ROWS = 64  # queries x group size handled by one program


def _split_kernel(kmin_ref, kmax_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, o_ref, m_ref, l_ref, *, spec, blocks):
  q, qp = q_ref[...], qpos_ref[...]
  qmin, qmax = common.position_range(qp)
  o, m, l = common.attend_key_blocks(
    q, qp, qmin, qmax, k_ref, v_ref, kpos_ref, kmin_ref, kmax_ref, o_ref.shape[-1], spec, blocks.block_k
  )
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def _mass_kernel(kmin_ref, kmax_ref, q_ref, k_ref, qpos_ref, kpos_ref, lse_ref, mass_ref, *, spec, blocks):
  q, qp, lse = q_ref[...], qpos_ref[...], lse_ref[...]
  qmin, qmax = common.position_range(qp)
  bk = blocks.block_k

  def body(j, _):
    skip = spec.excludes_all(qmin, qmax, kmin_ref[j], kmax_ref[j])
    sl = pl.ds(j * bk, bk)

    def compute():
      p, _ = common.probs_from_lse(q, k_ref[sl, :], qp, kpos_ref[sl], lse, spec)
      return jnp.sum(p, axis=0)

    mass_ref[sl] = jax.lax.cond(skip, lambda: jnp.zeros((bk,), jnp.float32), compute)
    return 0

  jax.lax.fori_loop(0, kmin_ref.shape[0], body, 0)


class _Tiled(NamedTuple):
  """Packed inputs cut into ``blocks.num_splits`` splits of ``blocks.block_k``-slot key blocks."""

  p: common.Packed
  blocks: DecodeBlockSizes  # clipped to the input
  kmin: jax.Array  # [b, S / block_k] per-block position summaries
  kmax: jax.Array


def _tile(q, k, v, q_positions, k_positions, spec: AttentionSpec, blocks: DecodeBlockSizes) -> _Tiled:
  kvh, s_len = common.kv_dims(k, spec)
  rows = q.shape[1] * (q.shape[2] // kvh)
  if rows > MAX_DECODE_ROWS:
    raise ValueError(f"decode_attention handles at most {MAX_DECODE_ROWS} query rows, got {rows}")
  bk = min(blocks.block_k, pl.next_power_of_2(pl.cdiv(s_len, blocks.num_splits)))
  tiles = DecodeBlockSizes(block_k=bk, num_splits=blocks.num_splits)
  p = common.pack(q, k, v, q_positions, k_positions, spec, row_multiple=8, slot_multiple=tiles.num_splits * bk)
  kmin, kmax = common.block_summaries(p.kp, bk)
  return _Tiled(p, tiles, kmin, kmax)


def _specs(tl: _Tiled):
  """Block specs over the grid ``(b, k, splits)``: summaries, queries, keys, query and key positions."""
  r, h = tl.p.q.shape[2:]
  s_split = tl.p.k.shape[2] // tl.blocks.num_splits
  summary = pl.BlockSpec((None, s_split // tl.blocks.block_k), lambda bi, ki, sp: (bi, sp))
  return dict(
    summary=summary,
    q=pl.BlockSpec((None, None, r, h), lambda bi, ki, sp: (bi, ki, 0, 0)),
    k=pl.BlockSpec((None, None, s_split, h), lambda bi, ki, sp: (bi, ki, sp, 0)),
    qp=pl.BlockSpec((None, r), lambda bi, ki, sp: (bi, 0)),
    kp=pl.BlockSpec((None, s_split), lambda bi, ki, sp: (bi, sp)),
  )


def _forward(q, k, v, q_positions, k_positions, *, spec: AttentionSpec, blocks: DecodeBlockSizes, interpret):
  """``(out [b, t, n, h], lse [b, t, n])`` (forward only: ``decode_attention`` adds the reference's backward)."""
  tl = _tile(q, k, v, q_positions, k_positions, spec, blocks)
  p, splits = tl.p, tl.blocks.num_splits
  b, kvh, r, _ = p.q.shape
  s_split = p.k.shape[2] // splits
  vh = p.v.shape[2] if spec.v_slots_last else p.v.shape[3]
  if spec.v_slots_last:
    v_spec = pl.BlockSpec((None, None, vh, s_split), lambda bi, ki, sp: (bi, ki, 0, sp))
  else:
    v_spec = pl.BlockSpec((None, None, s_split, vh), lambda bi, ki, sp: (bi, ki, sp, 0))
  bs = _specs(tl)
  o, m, l = pl.pallas_call(
    functools.partial(_split_kernel, spec=spec, blocks=tl.blocks),
    grid=(b, kvh, splits),
    in_specs=[bs["summary"], bs["summary"], bs["q"], bs["k"], v_spec, bs["qp"], bs["kp"]],
    out_specs=[
      pl.BlockSpec((None, None, None, r, vh), lambda bi, ki, sp: (bi, ki, sp, 0, 0)),
      pl.BlockSpec((None, None, None, r), lambda bi, ki, sp: (bi, ki, sp, 0)),
      pl.BlockSpec((None, None, None, r), lambda bi, ki, sp: (bi, ki, sp, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, kvh, splits, r, vh), jnp.float32),
      jax.ShapeDtypeStruct((b, kvh, splits, r), jnp.float32),
      jax.ShapeDtypeStruct((b, kvh, splits, r), jnp.float32),
    ],
    interpret=interpret,
    name="jstream_decode_split",
  )(tl.kmin, tl.kmax, p.q, p.k, p.v, p.qp, p.kp)
  out, lse = common.merge_splits(o, m, l)  # [b, k, r, vh], [b, k, r]
  rows = p.t * p.g
  out = common.unpack_rows(out[:, :, :rows], p.t, p.g).astype(spec.out_dtype)
  return out, common.unpack_rows(lse[:, :, :rows], p.t, p.g)


def _key_mass(q, k, v, q_positions, k_positions, lse, *, spec: AttentionSpec, blocks: DecodeBlockSizes, interpret):
  """Attention mass per key (``[b, s, k]`` or ``[b, k, s]`` by ``spec.kv_layout``) from the final ``lse``."""
  tl = _tile(q, k, v, q_positions, k_positions, spec, blocks)
  p, splits = tl.p, tl.blocks.num_splits
  b, kvh, r, _ = p.q.shape
  s_split = p.k.shape[2] // splits
  lse_rows, _ = common.pack_queries(lse[..., None], q_positions, kvh)  # [b, k, t*g, 1]
  lse_rows = common.pad_axis(lse_rows[..., 0], 2, r, common.NEG_INF)  # [b, k, r]
  bs = _specs(tl)
  mass = pl.pallas_call(
    functools.partial(_mass_kernel, spec=spec, blocks=tl.blocks),
    grid=(b, kvh, splits),
    in_specs=[
      bs["summary"],
      bs["summary"],
      bs["q"],
      bs["k"],
      bs["qp"],
      bs["kp"],
      pl.BlockSpec((None, None, r), lambda bi, ki, sp: (bi, ki, 0)),
    ],
    out_specs=pl.BlockSpec((None, None, s_split), lambda bi, ki, sp: (bi, ki, sp)),
    out_shape=jax.ShapeDtypeStruct((b, kvh, p.k.shape[2]), jnp.float32),
    interpret=interpret,
    name="jstream_decode_key_mass",
  )(tl.kmin, tl.kmax, p.q, p.k, p.qp, p.kp, lse_rows)[:, :, : p.s]
  return jnp.swapaxes(mass, 1, 2) if spec.kv_layout == "bskh" else mass


_differentiable = common.with_reference_vjp(_forward)


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret", "return_key_mass"))
def decode_attention(
  q: Float[Array, "b t n h"],
  k: Keys,
  v: Values,
  q_positions: Int[Array, "b t"],
  k_positions: Int[Array, "b _"],
  *,
  spec: AttentionSpec,
  blocks: DecodeBlockSizes = DecodeBlockSizes(),
  interpret: bool = False,
  return_key_mass: bool = False,
) -> tuple[Float[Array, "b t n _"], Float[Array, "b t n"], Float[Array, "b _ _"] | None]:
  """Split-K decode attention; returns ``(out [b, t, n, h], lse [b, t, n], key_mass or None)``.

  Args:
    q, k, v, q_positions, k_positions: as for ``jstream.ops.attention.attention`` (key positions ``[b, s]``),
      in the layouts ``spec`` names; ``t * (n // k)`` must be at most ``MAX_DECODE_ROWS``.
    spec: mask, scale, layouts and output dtype (static).
    blocks: split and block sizes (static); ``block_k`` is clipped to the input.
    interpret: run the kernels in Pallas interpret mode (CPU).
    return_key_mass: also compute the attention mass per key: ``[b, s, k]`` for ``kv_layout="bskh"``, ``[b, k,
      s]`` for ``"bksh"``, float32.

  Differentiable: the backward pass is that of the XLA reference for ``out`` and ``lse`` (decode is not trained
  through; this keeps it correct if it is); ``key_mass`` is a statistic for eviction and is not differentiated
  (its gradient is zero).

  Raises:
    ValueError: for more than ``MAX_DECODE_ROWS`` query rows, or inputs that do not fit ``spec``.
  """
  spec = common.prepare(spec, q, k, v, q_positions, k_positions)
  out, lse = _differentiable(q, k, v, q_positions, k_positions, spec, blocks, interpret)
  mass = None
  if return_key_mass:
    sg = jax.lax.stop_gradient
    mass = _key_mass(sg(q), sg(k), v, q_positions, k_positions, sg(lse), spec=spec, blocks=blocks, interpret=interpret)
  return out, lse, mass
