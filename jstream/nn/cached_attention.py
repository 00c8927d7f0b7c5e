"""Attention of a chunk over a cache: segments, RoPE frames and the per-layer read/write.

A chunk attends, for every track of the cache policy, up to three *segments* whose partial attentions are
merged with their log-sum-exp (flash-decoding style):

* **sinks**: the track's write-once sink slots (written before attention, so sinks inside the chunk are here);
* **ring**: the track's ring slots, read before this chunk's ring writes;
* **chunk**: the chunk's own non-sink keys of that track.

When a chunk is short enough that its ring writes cannot overwrite a key one of its own queries still needs
(``t <= max_rollback + 1``, always true for single-token decode), the chunk is written first and read back from
the cache, and the chunk segment disappears ("write-first").

Masks use track indices (``cache.idx``), so they are the same in both position modes. Values of empty slots
(never written, reset, rolled back) are zeroed as they are read, so a NaN there never reaches an output; the
attention op's own value masking (every invisible slot, which needs the full mask) is turned off for cache
segments, because it cost about a third of single-token decode time on CPU (``benchmarks/RESULTS.md``).

RoPE. Keys are rotated once, when they are written, at their position in the policy's frame: the stream
position (``absolute``) or the index within their track (``cache_relative``); queries are rotated per segment.
Because RoPE scores depend only on ``q_pos - k_pos``, this equals rotating un-rotated keys at read time by
their (re-indexed) cache positions, for every policy whose in-cache distances between a query and its window keys
are stream distances, which is all of them: in ``cache_relative`` mode the window is contiguous, and the sink
segment gets its own query frame ``min(c, S + W - 1)`` (StreamingLLM: sinks sit just before the window) while sink
``i`` is stored at position ``i``. Rotating at write saves a full read-modify-write of every cached key per layer
per token (measured in ``benchmarks/RESULTS.md``). The one event that changes stored positions, the rebase of
track indices every ``2**29`` tokens, rotates the ring keys back by the shift (``rerotate``); a policy that
re-indexes keys (eviction holes, retrieval) rotates the moved keys the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jstream import cache as cache_lib
from jstream.ops import attention as attn_ops
from jstream.positions import apply_rope, rope_cos_sin
from jstream.typing import Array


class Segment(NamedTuple):
  """One key set of the chunk's attention: the slots ``[lo, hi)`` of the cache, or the chunk's own keys."""

  source: str  # "cache" | "chunk"
  lo: int
  hi: int
  k_mask: Array  # [b, s] track indices, -1 invisible
  q_mask: Array  # [b, t]
  frame: int  # index into Context.q_frames
  window: int | None
  num_sinks: int


class Context(NamedTuple):
  """Everything position-dependent about one chunk, shared by all layers."""

  segments: tuple[Segment, ...]
  q_frames: tuple[tuple[Array, Array], ...]  # (cos, sin) [b, t, h/2] per query frame
  k_rope: tuple[Array, Array]  # (cos, sin) [b, t, h/2] at which the chunk's keys are stored
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

  def cs(p, bound=None):
    return rope_cos_sin(p, head_dim, rope_base, bound)

  # What the cache holds when it is read: sinks are always written first; the ring only in write-first mode.
  if write_first:
    idx = plan.after.idx
  else:
    is_sink_slot = np.zeros((cap + 1,), bool)
    for tl in lay:
      is_sink_slot[tl.sink_lo : tl.ring_lo] = True
    idx = jnp.where(is_sink_slot[None], plan.after.idx, cache.idx)

  segments, frames = [], []

  def cache_segment(lo, hi, q_mask, frame, window, num_sinks):
    # A slice, not the whole buffer with the rest masked: a dot that reads the loop-carried buffer directly
    # makes XLA:CPU copy the buffers of every layer on every step (measured 2x slower).
    return Segment("cache", lo, hi, idx[:, lo:hi], q_mask, frame, window, num_sinks)

  if policy.positions == "absolute":
    k_rope = cs(jnp.maximum(plan.tok_pos, 0))
    frames.append(k_rope)
    for m, tl in enumerate(lay):
      tr = tl.track
      q_mask = plan.q_idx[:, m]
      segments.append(cache_segment(tl.base, tl.hi, q_mask, 0, tr.window, tr.num_sinks))
      if not write_first:
        ck = jnp.where((plan.seg == m) & (plan.tok_idx >= tr.num_sinks), plan.tok_idx, -1)
        segments.append(Segment("chunk", 0, t, ck, q_mask, 0, tr.window, 0))
  else:
    k_rope = cs(jnp.maximum(plan.tok_idx, 0))
    for m, tl in enumerate(lay):
      tr = tl.track
      q_mask = plan.q_idx[:, m]
      rel = len(frames)
      frames.append(cs(jnp.maximum(q_mask, 0)))
      if tr.num_sinks:
        top = tr.num_sinks + tr.window - 1  # only SinkWindow tracks have sinks, and they have a window
        sink_frame = len(frames)
        frames.append(cs(jnp.clip(q_mask, 0, top), top))
        segments.append(cache_segment(tl.sink_lo, tl.ring_lo, q_mask, sink_frame, None, 0))
      segments.append(cache_segment(tl.ring_lo, tl.hi, q_mask, rel, tr.window, 0))
      if not write_first:
        ck = jnp.where((plan.seg == m) & (plan.tok_idx >= tr.num_sinks), plan.tok_idx, -1)
        segments.append(Segment("chunk", 0, t, ck, q_mask, rel, tr.window, 0))
  has_sinks = any(tl.track.num_sinks for tl in lay)
  return Context(
    tuple(segments),
    tuple(frames),
    k_rope,
    write_first,
    has_sinks,
    plan.ring_slots,
    plan.sink_slots,
    plan.slots,
  )


def rerotate(plan: cache_lib.Plan, k: Array | tuple[Array, ...], *, rope_base: float) -> Array | tuple[Array, ...]:
  """Rotates the ring keys of rebased tracks back by the rebase shift (``cache_relative`` mode only).

  ``k`` is the key buffer (stacked ``[l, b, k, s, h]`` or a tuple of per-layer ``[b, k, s, h]``). The rotation
  runs (inside a zero-or-one-trip ``while_loop``) only when some row was rebased, i.e. once every ``2**29``
  tokens of a track.
  """
  cache = plan.cache
  if cache.policy.positions != "cache_relative":
    return k
  lay = cache_lib.layout(cache.policy)
  ring_of_track = np.full((cache.capacity + 1,), -1, np.int32)
  for m, tl in enumerate(lay):
    ring_of_track[tl.ring_lo : tl.hi] = m

  def rotate(k):
    slot_shift = jnp.where(ring_of_track[None] >= 0, plan.shift[:, np.maximum(ring_of_track, 0)], 0)  # [b, s]
    cos, sin = rope_cos_sin(-slot_shift, k.shape[-1], rope_base)
    lead = (None,) * (k.ndim - 4)  # stacked: [l, b, k, s, h]; per layer: [b, k, s, h]
    return apply_rope(k, cos[(*lead, slice(None), None)], sin[(*lead, slice(None), None)])

  # A while loop that runs zero or one time: unlike lax.cond, it updates the carried buffers in place, so the
  # common (no rebase) case costs no copy of the cache.
  def body(state):
    _, k = state
    return jnp.array(False), jax.tree.map(rotate, k)

  return jax.lax.while_loop(lambda state: state[0], body, (jnp.any(plan.shift != 0), k))[1]


def attend(
  ctx: Context,
  kbuf: Array | tuple[Array, ...],
  vbuf: Array | tuple[Array, ...],
  layer,
  q: Array,
  k: Array,
  v: Array,
  *,
  impl,
  sink_part=None,
) -> tuple[Array, Array | tuple[Array, ...], Array | tuple[Array, ...]]:
  """Attention of one layer over cache + chunk, with the cache writes of that layer.

  Args:
    ctx: from ``build``.
    kbuf, vbuf: the cache buffers (stacked ``[l, b, k, s, h]`` or tuples of per-layer ``[b, k, s, h]``).
    layer: the layer index (static, or traced inside a layer scan).
    q: ``[b, t, n, h]`` un-rotated queries; ``k``, ``v``: ``[b, t, k, h]`` the chunk's un-rotated keys/values.
    impl: attention implementation name(s).
    sink_part: optional ``(out, lse)`` partial of a learned sink.

  Returns:
    ``(out [b, t, n, h] in q.dtype, kbuf, vbuf)``.
  """
  kcos, ksin = ctx.k_rope
  k = apply_rope(k, kcos[:, :, None], ksin[:, :, None])
  if ctx.write_first:
    kbuf = cache_lib.write(kbuf, layer, ctx.all_slots, k)
    vbuf = cache_lib.write(vbuf, layer, ctx.all_slots, v, slots_last=True)
  elif ctx.has_sinks:
    kbuf = cache_lib.write(kbuf, layer, ctx.sink_slots, k)
    vbuf = cache_lib.write(vbuf, layer, ctx.sink_slots, v, slots_last=True)
  k_layer = cache_lib.layer_buffer(kbuf, layer)  # [b, k, s, h]
  v_layer = cache_lib.layer_buffer(vbuf, layer)  # [b, k, h, s]
  q_rot = [apply_rope(q, cos[:, :, None], sin[:, :, None]) for cos, sin in ctx.q_frames]
  parts = []
  for seg in ctx.segments:
    if seg.source == "cache":
      ks = k_layer[:, :, seg.lo : seg.hi].astype(q.dtype)
      vs = v_layer[..., seg.lo : seg.hi].astype(q.dtype)
      # Empty slots contribute exactly zero even if they hold NaN (fused into the slice XLA copies anyway).
      vs = jnp.where(seg.k_mask[:, None, None, :] >= 0, vs, jnp.zeros((), vs.dtype))
      layout, v_layout = "bksh", "bkhs"
    else:
      ks, vs, layout, v_layout = k, v, "bskh", "bskh"
    res = attn_ops.attention(
      q_rot[seg.frame],
      ks,
      vs,
      q_positions=seg.q_mask,
      k_positions=seg.k_mask,
      window=seg.window,
      num_sinks=seg.num_sinks,
      kv_layout=layout,
      v_layout=v_layout,
      mask_values=seg.source == "chunk",
      out_dtype=jnp.float32,
      return_lse=True,
      impl=impl,
    )
    parts.append((res.out, res.lse))
  if sink_part is not None:
    parts.append(sink_part)
  out = parts[0][0] if len(parts) == 1 else attn_ops.merge(parts)[0]
  if not ctx.write_first:
    kbuf = cache_lib.write(kbuf, layer, ctx.ring_slots, k)
    vbuf = cache_lib.write(vbuf, layer, ctx.ring_slots, v, slots_last=True)
  return out.astype(q.dtype), kbuf, vbuf


def offline(
  q: Array, k: Array, v: Array, positions: Array, *, window, num_sinks, rope_base, impl, sink_part=None
) -> Array:
  """Teacher-forced attention of a whole sequence with the banded mask a policy implies (no cache)."""
  cos, sin = rope_cos_sin(jnp.maximum(positions, 0), q.shape[-1], rope_base)
  qr = apply_rope(q, cos[:, :, None], sin[:, :, None])
  kr = apply_rope(k, cos[:, :, None], sin[:, :, None])
  res = attn_ops.attention(
    qr,
    kr,
    v,
    q_positions=positions,
    k_positions=positions,
    window=window,
    num_sinks=num_sinks,
    out_dtype=jnp.float32,
    return_lse=True,
    impl=impl,
  )
  if sink_part is None:
    return res.out.astype(q.dtype)
  return attn_ops.merge([(res.out, res.lse), sink_part])[0].astype(q.dtype)
