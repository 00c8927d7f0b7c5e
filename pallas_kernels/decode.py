"""Decode attention (flash-decoding): a few queries per row against a long ring / sink cache, split over slots.

Up to ``MAX_DECODE_ROWS`` = 64 query rows (queries x query heads per kv head: single-token decode, a speculative
draft) against the cache, with per-row validity and
positions taken from ``k_positions`` (ragged rows, rings in any slot order). The slot axis is cut into
``num_splits`` contiguous splits, one program each, so that a long cache keeps every core busy even at batch 1;
each program loops over its key blocks, skipping those the mask excludes (empty, future, out of window), and
writes a partial ``(o, m, l)``. A combine step merges the partials by log-sum-exp.

Optionally a second kernel returns the attention mass each key received, ``sum_q p(q, key)`` over the queries
and the query heads of its kv group (for score-based eviction: H2O, SnapKV), recomputing the scores from the
final log-sum-exp instead of materialising them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """``block_k`` slots per inner step; ``num_splits`` programs along the slot axis (flash-decoding's split-K)."""

  block_k: int = 128
  num_splits: int = 8

  def __post_init__(self):
    common.check_powers_of_two(self, ("block_k", "num_splits"))


MAX_DECODE_ROWS = 64  # queries x group size handled by one program


def _split_kernel(kmin_ref, kmax_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, o_ref, m_ref, l_ref, *, st):
  q, qp = q_ref[...], qpos_ref[...]
  qmin, qmax = common.position_range(qp)
  rows = q.shape[0]
  bk = st["block_k"]
  slots_last = st["v_slots_last"]

  def body(j, carry):
    skip = common.block_skipped(qmin, qmax, kmin_ref[j], kmax_ref[j], window=st["window"], num_sinks=st["num_sinks"])

    def compute(carry):
      sl = pl.ds(j * bk, bk)
      kp = kpos_ref[sl]
      v = v_ref[:, sl] if slots_last else v_ref[sl, :]
      return common.attend_tile(carry, q, k_ref[sl, :], v, qp, kp, scale=st["scale"], window=st["window"],
                                num_sinks=st["num_sinks"], v_slots_last=slots_last)  # fmt: skip

    return jax.lax.cond(skip, lambda c: c, compute, carry)

  o, m, l = jax.lax.fori_loop(0, kmin_ref.shape[0], body, common.softmax_init(rows, o_ref.shape[-1]))
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def _mass_kernel(kmin_ref, kmax_ref, q_ref, k_ref, qpos_ref, kpos_ref, lse_ref, mass_ref, *, st):
  q, qp, lse = q_ref[...], qpos_ref[...], lse_ref[...]
  qmin, qmax = common.position_range(qp)
  bk = st["block_k"]

  def body(j, _):
    skip = common.block_skipped(qmin, qmax, kmin_ref[j], kmax_ref[j], window=st["window"], num_sinks=st["num_sinks"])
    sl = pl.ds(j * bk, bk)

    def compute():
      p, _ = common.probs_from_lse(q, k_ref[sl, :], qp, kpos_ref[sl], lse, scale=st["scale"], window=st["window"],
                                   num_sinks=st["num_sinks"])  # fmt: skip
      return jnp.sum(p, axis=0)

    mass_ref[sl] = jax.lax.cond(skip, lambda: jnp.zeros((bk,), jnp.float32), compute)
    return 0

  jax.lax.fori_loop(0, kmin_ref.shape[0], body, 0)


def decode_attention(
  q,
  k,
  v,
  q_positions,
  k_positions,
  *,
  window: int | None = None,
  num_sinks: int = 0,
  scale: float | None = None,
  kv_layout: str = "bskh",
  v_layout: str | None = None,
  out_dtype=None,
  blocks: DecodeBlockSizes = DecodeBlockSizes(),
  interpret: bool = False,
  return_key_mass: bool = False,
):
  """Split-K decode attention; returns ``(out [b, t, n, h], lse [b, t, n], key_mass or None)``.

  Same contract as ``jstream.ops.attention.attention``; ``t * (n // k)`` must be at most ``MAX_DECODE_ROWS``.
  ``key_mass`` is ``[b, s, k]`` for ``kv_layout="bskh"`` and ``[b, k, s]`` for ``"bksh"``. Differentiable: the
  backward pass is that of the XLA reference for ``out`` and ``lse`` (decode is not trained through; this keeps it
  correct if it is); ``key_mass`` is a statistic for eviction and is not differentiated (its gradient is zero).
  """
  static = common.static_args(
    q, window=window, num_sinks=num_sinks, scale=scale, kv_layout=kv_layout, v_layout=v_layout, out_dtype=out_dtype,
    blocks=blocks, interpret=interpret, return_key_mass=return_key_mass,
  )  # fmt: skip
  out, lse, mass = _decode_vjp(q, k, v, q_positions, k_positions, common.freeze(static))
  return out, lse, (mass if return_key_mass else None)


@functools.partial(
  jax.jit,
  static_argnames=(
    "window", "num_sinks", "scale", "kv_layout", "v_layout", "out_dtype", "blocks", "interpret", "return_key_mass",
  ),
)  # fmt: skip
def _decode_forward(q, k, v, q_positions, k_positions, *, window, num_sinks, scale, kv_layout, v_layout, out_dtype,
                    blocks, interpret, return_key_mass):  # fmt: skip
  b, t, n, h = q.shape
  kvh, s_orig = common.kv_dims(k, kv_layout)
  rows = t * (n // kvh)
  if rows > MAX_DECODE_ROWS:
    raise ValueError(f"decode_attention handles at most {MAX_DECODE_ROWS} query rows, got {rows}")
  bk = min(blocks.block_k, pl.next_power_of_2(pl.cdiv(s_orig, blocks.num_splits)))
  p = common.pack(q, k, v, q_positions, k_positions, kv_layout=kv_layout, v_layout=v_layout, row_multiple=8,
                  slot_multiple=blocks.num_splits * bk)  # fmt: skip
  qq, kk, vv, qp, kp, v_slots_last, g = p.q, p.k, p.v, p.qp, p.kp, p.v_slots_last, p.g
  r, s = qq.shape[2], kk.shape[2]
  splits = blocks.num_splits
  s_split = s // splits
  kb_split = s_split // bk
  vh = vv.shape[2] if v_slots_last else vv.shape[3]
  kmin, kmax = common.block_summaries(kp, bk)
  st = dict(scale=float(scale), window=window, num_sinks=int(num_sinks), block_k=bk, v_slots_last=v_slots_last)
  v_block = (None, None, vh, s_split) if v_slots_last else (None, None, s_split, vh)
  v_index = (lambda bi, ki, sp: (bi, ki, 0, sp)) if v_slots_last else (lambda bi, ki, sp: (bi, ki, sp, 0))
  summary = pl.BlockSpec((None, kb_split), lambda bi, ki, sp: (bi, sp))
  o, m, l = pl.pallas_call(
    functools.partial(_split_kernel, st=st),
    grid=(b, kvh, splits),
    in_specs=[
      summary,
      summary,
      pl.BlockSpec((None, None, r, h), lambda bi, ki, sp: (bi, ki, 0, 0)),
      pl.BlockSpec((None, None, s_split, h), lambda bi, ki, sp: (bi, ki, sp, 0)),
      pl.BlockSpec(v_block, v_index),
      pl.BlockSpec((None, r), lambda bi, ki, sp: (bi, 0)),
      pl.BlockSpec((None, s_split), lambda bi, ki, sp: (bi, sp)),
    ],
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
  )(kmin, kmax, qq, kk, vv, qp, kp)
  out, lse = common.merge_splits(o, m, l)  # [b, k, r, vh], [b, k, r]
  mass = None
  if return_key_mass:
    mass = pl.pallas_call(
      functools.partial(_mass_kernel, st=st),
      grid=(b, kvh, splits),
      in_specs=[
        summary,
        summary,
        pl.BlockSpec((None, None, r, h), lambda bi, ki, sp: (bi, ki, 0, 0)),
        pl.BlockSpec((None, None, s_split, h), lambda bi, ki, sp: (bi, ki, sp, 0)),
        pl.BlockSpec((None, r), lambda bi, ki, sp: (bi, 0)),
        pl.BlockSpec((None, s_split), lambda bi, ki, sp: (bi, sp)),
        pl.BlockSpec((None, None, r), lambda bi, ki, sp: (bi, ki, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, s_split), lambda bi, ki, sp: (bi, ki, sp)),
      out_shape=jax.ShapeDtypeStruct((b, kvh, s), jnp.float32),
      interpret=interpret,
      name="jstream_decode_key_mass",
    )(kmin, kmax, qq, kk, qp, kp, lse)[:, :, :s_orig]
    if kv_layout == "bskh":
      mass = jnp.swapaxes(mass, 1, 2)
  out = common.unpack_rows(out[:, :, :rows], t, g).astype(out_dtype)
  lse = common.unpack_rows(lse[:, :, :rows], t, g)
  return out, lse, mass


def _forward_with_mass(q, k, v, qp, kp, **static):
  out, lse, mass = _decode_forward(q, k, v, qp, kp, **static)
  return out, lse, (jnp.zeros((), jnp.float32) if mass is None else mass)


_decode_vjp = common.with_reference_vjp(_forward_with_mass)
