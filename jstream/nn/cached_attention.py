"""Attention of a chunk over a cache: segments, RoPE frames and the per-layer read/write.

A chunk attends, for every track of the cache policy, up to three *segments* whose partial attentions are
merged with their log-sum-exp (flash-decoding style):

* **sinks**: the track's write-once sink slots (written before attention, so sinks inside the chunk are here);
* **ring**: the track's ring slots, read before this chunk's ring writes;
* **chunk**: the chunk's own non-sink keys of that track.

When a chunk is short enough that its ring writes cannot overwrite a key one of its own queries still needs
(``t <= max_rollback + 1`` slots of slack, always true for single-token decode), the chunk is written first and
read back from the cache, and the chunk segment disappears ("write-first").

Masks use track indices (``cache.idx``). RoPE frames (see ``jstream.positions``): in ``absolute`` mode queries
and keys rotate by their stream positions measured from the chunk start, so all segments share one frame; in
``cache_relative`` mode ring and chunk keys rotate by their track index measured from the chunk start, and the
sink segment has its own query frame ``min(c, S + W - 1)`` (StreamingLLM: the sinks sit just before the window).
Everything position-dependent is computed once per chunk (``build``) and shared by all layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jstream import cache as cache_lib
from jstream.ops import attention as attn_ops
from jstream.positions import SINGLE_TABLE_LIMIT, apply_rope, rope_cos_sin
from jstream.typing import Array


class Segment(NamedTuple):
  """One key set of the chunk's attention. ``lo``/``hi`` are static slot bounds (``source == "cache"``)."""

  source: str  # "cache" | "chunk"
  lo: int
  hi: int
  k_mask: Array  # [b, s] track indices, -1 invisible
  q_mask: Array  # [b, t]
  k_cos: Array  # [b, s, h/2]
  k_sin: Array
  frame: int  # index into Context.q_frames
  window: int | None
  num_sinks: int


class Context(NamedTuple):
  segments: tuple[Segment, ...]
  q_frames: tuple[tuple[Array, Array], ...]  # (cos, sin) [b, t, h/2] per query frame
  write_first: bool
  has_sinks: bool
  ring_slots: Array  # [b, t]
  sink_slots: Array
  all_slots: Array


def _write_first(policy, chunk_len: int) -> bool:
  for tl in cache_lib.layout(policy):
    tr = tl.track
    if tr.window is not None and chunk_len > tr.ring - tr.window + 1:
      return False
  return True


def build(plan: cache_lib.Plan, *, head_dim: int, rope_base: float) -> Context:
  """Segments and RoPE tables for one chunk (shared by all layers)."""
  cache = plan.cache
  policy = cache.policy
  lay = cache_lib.layout(policy)
  cap = cache.capacity
  t = plan.seg.shape[1]
  write_first = _write_first(policy, t)
  rel_bound = cap + t
  rel_bound = rel_bound if rel_bound <= SINGLE_TABLE_LIMIT else None

  def cs(p, bound):
    return rope_cos_sin(p, head_dim, rope_base, bound)

  # What the cache holds when it is read: sinks are always written first; the ring only in write-first mode.
  if write_first:
    idx, pos = plan.after.idx, plan.after.pos
  else:
    is_sink_slot = np.zeros((cap,), bool)
    for tl in lay:
      is_sink_slot[tl.sink_lo : tl.ring_lo] = True
    idx = jnp.where(is_sink_slot[None], plan.after.idx, cache.idx)
    pos = jnp.where(is_sink_slot[None], plan.after.pos, cache.pos)

  segments, frames = [], []
  if policy.positions == "absolute":
    ref = cache.next_pos[:, None]
    single_far = len(lay) == 1 and lay[0].track.num_sinks == 0
    bound = rel_bound if single_far else None
    q_rel = jnp.where(plan.tok_pos >= 0, plan.tok_pos - ref, 0)
    frames.append(cs(q_rel, rel_bound))
    k_cos, k_sin = cs(jnp.where(idx >= 0, pos - ref, 0), bound)
    c_cos, c_sin = cs(q_rel, rel_bound)
    for m, tl in enumerate(lay):
      tr = tl.track
      q_mask = plan.q_idx[:, m]
      segments.append(
        Segment(
          "cache", tl.base, tl.hi, idx[:, tl.base : tl.hi], q_mask,
          k_cos[:, tl.base : tl.hi], k_sin[:, tl.base : tl.hi], 0, tr.window, tr.num_sinks,
        )
      )
      if not write_first:
        ck = jnp.where((plan.seg == m) & (plan.tok_idx >= tr.num_sinks), plan.tok_idx, -1)
        segments.append(Segment("chunk", 0, t, ck, q_mask, c_cos, c_sin, 0, tr.window, 0))
  else:
    for m, tl in enumerate(lay):
      tr = tl.track
      c0 = cache.count[:, m : m + 1]
      q_mask = plan.q_idx[:, m]
      q_rel = jnp.where(q_mask >= 0, q_mask - c0, 0)
      rel = len(frames)
      frames.append(cs(q_rel, rel_bound))
      if tr.num_sinks:
        top = tr.num_sinks + (tr.window if tr.window is not None else tr.ring) - 1
        q_sink = jnp.minimum(jnp.maximum(q_mask, 0), top)
        sink_frame = len(frames)
        frames.append(cs(q_sink, top))
        kidx = idx[:, tl.sink_lo : tl.ring_lo]
        k_cos, k_sin = cs(jnp.maximum(kidx, 0), top)
        segments.append(
          Segment("cache", tl.sink_lo, tl.ring_lo, kidx, q_mask, k_cos, k_sin, sink_frame, None, 0)
        )
      ridx = idx[:, tl.ring_lo : tl.hi]
      k_cos, k_sin = cs(jnp.where(ridx >= 0, ridx - c0, 0), rel_bound)
      segments.append(Segment("cache", tl.ring_lo, tl.hi, ridx, q_mask, k_cos, k_sin, rel, tr.window, 0))
      if not write_first:
        ck = jnp.where((plan.seg == m) & (plan.tok_idx >= tr.num_sinks), plan.tok_idx, -1)
        c_cos, c_sin = cs(jnp.where(ck >= 0, ck - c0, 0), rel_bound)
        segments.append(Segment("chunk", 0, t, ck, q_mask, c_cos, c_sin, rel, tr.window, 0))
  all_slots = jnp.where(plan.sink_slots < cap, plan.sink_slots, plan.ring_slots)
  has_sinks = any(tl.track.num_sinks for tl in lay)
  return Context(tuple(segments), tuple(frames), write_first, has_sinks, plan.ring_slots, plan.sink_slots, all_slots)


def attend(
  ctx: Context,
  kbuf: Array,
  vbuf: Array,
  layer,
  q: Array,
  k: Array,
  v: Array,
  *,
  impl,
  sink_part=None,
) -> tuple[Array, Array, Array]:
  """Attention of one layer over cache + chunk, with the cache writes of that layer.

  Args:
    ctx: from ``build``.
    kbuf, vbuf: the stacked cache buffers ``[l, b, k, s, h]``.
    layer: the layer index (traced inside the layer scan).
    q: ``[b, t, n, h]`` un-rotated queries; ``k``, ``v``: ``[b, t, k, h]`` the chunk's un-rotated keys/values.
    impl: attention implementation name(s).
    sink_part: optional ``(out, lse)`` partial of a learned sink.

  Returns:
    ``(out [b, t, n, h] in q.dtype, kbuf, vbuf)``.
  """
  if ctx.write_first:
    kbuf = cache_lib.write(kbuf, layer, ctx.all_slots, k)
    vbuf = cache_lib.write(vbuf, layer, ctx.all_slots, v)
  elif ctx.has_sinks:
    kbuf = cache_lib.write(kbuf, layer, ctx.sink_slots, k)
    vbuf = cache_lib.write(vbuf, layer, ctx.sink_slots, v)
  k_layer, v_layer = kbuf[layer], vbuf[layer]  # [b, k, s, h]
  q_rot = [apply_rope(q, cos[:, :, None], sin[:, :, None]) for cos, sin in ctx.q_frames]
  parts = []
  for seg in ctx.segments:
    if seg.source == "cache":
      ks = apply_rope(k_layer[:, :, seg.lo : seg.hi], seg.k_cos[:, None], seg.k_sin[:, None]).astype(q.dtype)
      vs = v_layer[:, :, seg.lo : seg.hi].astype(q.dtype)
      layout = "bksh"
    else:
      ks = apply_rope(k, seg.k_cos[:, :, None], seg.k_sin[:, :, None])
      vs = v
      layout = "bskh"
    res = attn_ops.attention(
      q_rot[seg.frame], ks, vs, q_positions=seg.q_mask, k_positions=seg.k_mask, window=seg.window,
      num_sinks=seg.num_sinks, kv_layout=layout, out_dtype=jnp.float32, return_lse=True, impl=impl,
    )
    parts.append((res.out, res.lse))
  if sink_part is not None:
    parts.append(sink_part)
  out = parts[0][0] if len(parts) == 1 else attn_ops.merge(parts)[0]
  if not ctx.write_first:
    kbuf = cache_lib.write(kbuf, layer, ctx.ring_slots, k)
    vbuf = cache_lib.write(vbuf, layer, ctx.ring_slots, v)
  return out.astype(q.dtype), kbuf, vbuf


def offline(
  q: Array, k: Array, v: Array, positions: Array, *, window, num_sinks, rope_base, impl, sink_part=None
) -> Array:
  """Teacher-forced attention of a whole sequence with the banded mask a policy implies (no cache)."""
  cos, sin = rope_cos_sin(positions, q.shape[-1], rope_base, None)
  qr = apply_rope(q, cos[:, :, None], sin[:, :, None])
  kr = apply_rope(k, cos[:, :, None], sin[:, :, None])
  res = attn_ops.attention(
    qr, kr, v, q_positions=positions, k_positions=positions, window=window, num_sinks=num_sinks,
    out_dtype=jnp.float32, return_lse=True, impl=impl,
  )
  if sink_part is None:
    return res.out.astype(q.dtype)
  return attn_ops.merge([(res.out, res.lse), sink_part])[0].astype(q.dtype)
