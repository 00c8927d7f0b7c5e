"""Attention of a chunk over a cache: segments, RoPE frames and the per-layer read/write.

A chunk attends, for every track of the cache policy, up to three *segments* whose partial attentions are
merged with their log-sum-exp (flash-decoding style):

* **sinks**: the track's write-once sink slots (written before attention, so sinks inside the chunk are here);
* **ring**: the track's ring slots, read before this chunk's ring writes;
* **chunk**: the chunk's own non-sink keys of that track.

When a chunk is short enough that its ring writes cannot overwrite a key one of its own queries still needs
(``t <= max_rollback + 1``), the chunk is written first and read back from the cache, and the chunk segment
disappears ("write-first").

Single tokens (decode, ``t == 1``) are *read-only*: the layer reads the cache as it was before the token (every
key the token sees is there, except its own: the slot it overwrites is out of its window), its own key is one more
partial attention (softmax over one key: its value, with log-sum-exp ``q . k``), and the model writes every
layer's key and value after the last layer (``write_token``), ordered after the reads. Then nothing writes a
cache buffer before a dot reads it, and the dots read the loop-carried buffers in place: a segment that covers
most of the buffer reads the whole buffer with the other slots masked out, because a slice is a copy. (A write
before the read makes XLA:CPU duplicate the write into the dot's operand and copy every buffer. Reading in place
made single-token decode on CPU 1.3x - 1.4x faster: ``experiments/profile_decode.py``.)

Masks use track indices (``cache.idx``), so they are the same in both position modes. A token in a *group*
(``jstream.cache.plan``: a video frame's patch tokens) sees what the group's last token sees (``Plan.q_idx``), so
the tokens of a group attend to each other; its key is rotated at the group's position (``absolute``) or at the
index of the group's last token (``cache_relative``, ``Plan.rope_idx``). Values of empty slots
(never written, reset, rolled back) must not reach an output even when they hold NaN, and a dot multiplies them
by a zero probability (``0 * NaN = NaN``). Chunks zero them as they are read (``mask_values``); single tokens may
instead attend the raw values and redo the step with zeroed values only when an output is not finite
(``value_guard``: what the model does on CPU, where zeroing is a copy of every value buffer). A finite output of
the first pass equals the second's, since a slot with zero probability then holds a finite value. The attention
op's own value masking (every invisible slot, which needs the full mask) is turned off for cache segments.

RoPE. Keys are rotated once, when they are written, at their position in the policy's frame: the stream
position (``absolute``) or the index within their track (``cache_relative``); queries are rotated per segment.
Because RoPE scores depend only on ``q_pos - k_pos``, this equals rotating un-rotated keys at read time by
their (re-indexed) cache positions, for every policy whose in-cache distances between a query and its window keys
are stream distances, which is all of them: in ``cache_relative`` mode the window is contiguous, and the sink
segment gets its own query frame ``min(c, S + W - 1)`` (StreamingLLM: sinks sit just before the window) while sink
``i`` is stored at position ``i``. Rotating at write saves a full read-modify-write of every cached key per layer
per token. The one event that changes stored positions, the rebase of
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
from jstream.positions import Rope, apply_rope, rope, rope_cos_sin
from jstream.typing import Array, Float, Int, KeyBuffer, Shaped, ValueBuffer

READ_ONLY_TOKENS = True
"""Single tokens take the read-only path (see the module docstring); ``False`` sends them through the chunk path
like any chunk, which is what they did before (for measurements: ``experiments/profile_decode.py``). Read when a
step is traced."""


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
  read_only: bool  # a single token: layers only read, ``write_token`` writes (see the module docstring)
  has_sinks: bool
  ring_slots: Array  # [b, t]
  sink_slots: Array
  all_slots: Array
  valid: Array  # [b, t] bool: a real token (not padding)


def _write_first(policy, chunk_len: int) -> bool:
  for tl in cache_lib.layout(policy):
    tr = tl.track
    if tr.window is not None and chunk_len > tr.ring - tr.window + 1:
      return False
  return True


def build(plan: cache_lib.Plan, *, head_dim: int, rope_base: float | Rope) -> Context:
  """Segments and RoPE tables for one chunk (shared by all layers)."""
  cache = plan.cache
  policy = cache.policy
  lay = cache_lib.layout(policy)
  cap = cache.capacity
  t = plan.seg.shape[1]
  read_only = READ_ONLY_TOKENS and t == 1
  write_first = not read_only and _write_first(policy, t)

  def cs(p, bound=None):
    return rope_cos_sin(p, head_dim, rope_base, bound)

  # What the cache holds when it is read: read-only tokens see it as it was; otherwise sinks are always written
  # first, the ring only in write-first mode.
  if read_only:
    idx = cache.idx
  elif write_first:
    idx = plan.after.idx
  else:
    is_sink_slot = np.zeros((cap + 1,), bool)
    for tl in lay:
      is_sink_slot[tl.sink_lo : tl.ring_lo] = True
    idx = jnp.where(is_sink_slot[None], plan.after.idx, cache.idx)

  segments, frames = [], []

  def cache_segment(lo, hi, q_mask, frame, window, num_sinks):
    if read_only and 2 * (hi - lo) >= cap + 1:  # the whole buffer, the rest masked: no copy (module docstring)
      inside = np.zeros((cap + 1,), bool)
      inside[lo:hi] = True
      return Segment("cache", 0, cap + 1, jnp.where(inside[None], idx, -1), q_mask, frame, window, num_sinks)
    # A slice: a copy, but of a small segment (a sink segment), or of one that chunks write before reading.
    return Segment("cache", lo, hi, idx[:, lo:hi], q_mask, frame, window, num_sinks)

  if policy.positions == "absolute":
    k_rope = cs(jnp.maximum(plan.tok_pos, 0))
    frames.append(k_rope)
    for m, tl in enumerate(lay):
      tr = tl.track
      q_mask = plan.q_idx[:, m]
      segments.append(cache_segment(tl.base, tl.hi, q_mask, 0, tr.window, tr.num_sinks))
      if not (write_first or read_only):
        ck = jnp.where((plan.seg == m) & (plan.tok_idx >= tr.num_sinks), plan.tok_idx, -1)
        segments.append(Segment("chunk", 0, t, ck, q_mask, 0, tr.window, 0))
  else:
    k_rope = cs(jnp.maximum(plan.rope_idx, 0))
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
      if not (write_first or read_only):
        ck = jnp.where((plan.seg == m) & (plan.tok_idx >= tr.num_sinks), plan.tok_idx, -1)
        segments.append(Segment("chunk", 0, t, ck, q_mask, rel, tr.window, 0))
  has_sinks = any(tl.track.num_sinks for tl in lay)
  return Context(
    tuple(segments),
    tuple(frames),
    k_rope,
    write_first,
    read_only,
    has_sinks,
    plan.ring_slots,
    plan.sink_slots,
    plan.slots,
    plan.seg >= 0,
  )


def rerotate(plan: cache_lib.Plan, k: KeyBuffer, *, rope_base: float | Rope) -> KeyBuffer:
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


VALUE_GUARD = {"cpu": "check"}
"""How a single token keeps NaN in invisible value slots out of its output, per platform (default ``"mask"``):
``"mask"`` zeroes the values of empty slots as they are read; ``"check"`` attends the raw values and redoes the
step with ``"mask"`` when an output is not finite (see the module docstring). On CPU zeroing is a copy of every
value buffer, which ``"check"`` saves (decode 1.2x - 1.3x faster, ``experiments/profile_decode.py``); elsewhere a
kernel masks in registers and a conditional may cost a host round trip (unmeasured). Read when a step is traced."""


def value_guard(platform: str | None = None) -> str:
  """The ``VALUE_GUARD`` of ``platform`` (default: the default backend)."""
  return VALUE_GUARD.get(platform or jax.default_backend(), "mask")


def _partials(ctx: Context, kbuf, vbuf, layer, q: Array, k: Array, v: Array, *, impl, mask_values: bool) -> list:
  """``(out, lse)`` of the chunk's queries over each segment; ``k`` rotated as stored."""
  k_layer = cache_lib.layer_buffer(kbuf, layer)  # [b, k, s, h]
  v_layer = cache_lib.layer_buffer(vbuf, layer)  # [b, k, h, s]
  q_rot = [apply_rope(q, cos[:, :, None], sin[:, :, None]) for cos, sin in ctx.q_frames]
  parts = []
  for seg in ctx.segments:
    if seg.source == "cache":
      whole = seg.lo == 0 and seg.hi == k_layer.shape[2]
      ks = (k_layer if whole else k_layer[:, :, seg.lo : seg.hi]).astype(q.dtype)
      vs = (v_layer if whole else v_layer[..., seg.lo : seg.hi]).astype(q.dtype)
      if mask_values:  # empty slots contribute exactly zero even if they hold NaN
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
      scale=q.shape[-1] ** -0.5,
      kv_layout=layout,
      v_layout=v_layout,
      mask_values=seg.source == "chunk",
      out_dtype=jnp.float32,
      return_lse=True,
      impl=impl,
    )
    parts.append((res.out, res.lse))
  return parts


def _merge(parts: list, sink_part, dtype) -> tuple[Array, Array]:
  """The merged ``(out in dtype, lse)`` of the partials and the sink's."""
  if sink_part is not None:
    parts = [*parts, sink_part]
  out, lse = parts[0] if len(parts) == 1 else attn_ops.merge(parts)
  return out.astype(dtype), lse


def rotate_keys(ctx: Context, k: Float[Array, "b t k h"]) -> Float[Array, "b t k h"]:
  """The chunk's keys ``[b, t, k, h]`` rotated by RoPE as the cache stores them."""
  kcos, ksin = ctx.k_rope
  return apply_rope(k, kcos[:, :, None], ksin[:, :, None])


def attend(
  ctx: Context,
  kbuf: KeyBuffer,
  vbuf: ValueBuffer,
  layer,
  q: Float[Array, "b t n h"],
  k: Float[Array, "b t k h"],
  v: Float[Array, "b t k h"],
  *,
  impl,
  sink_part: tuple[Float[Array, "b t n h"], Float[Array, "b t n"]] | None = None,
  mask_values: bool = True,
) -> tuple[Float[Array, "b t n h"], KeyBuffer, ValueBuffer, Float[Array, "b t k h"], Float[Array, "b t n"]]:
  """Attention of one layer over cache + chunk.

  A chunk (``t > 1``) writes its keys and values into this layer's cache buffers. A single token (a read-only
  context) writes nothing: it attends the cache as it was and its own key, and the caller writes every layer's
  key and value after the last layer (``write_token``).

  Args:
    ctx: from ``build``.
    kbuf, vbuf: the cache buffers (stacked ``[l, b, k, s, h]`` or tuples of per-layer ``[b, k, s, h]``).
    layer: the layer index (static, or traced inside a layer scan).
    q: ``[b, t, n, h]`` un-rotated queries; ``k``, ``v``: ``[b, t, k, h]`` the chunk's un-rotated keys/values.
    impl: attention implementation name(s).
    sink_part: optional ``(out, lse)`` partial of a learned sink.
    mask_values: zero the values of empty slots as they are read (single tokens may turn it off: see
      ``value_guard``); chunks always do.

  Returns:
    ``(out [b, t, n, h] in q.dtype, kbuf, vbuf, k, lse)``, ``k`` rotated as the cache stores it, ``lse [b, t, n]``
    the log-sum-exp of every query's logits over all it attends (cache, chunk, the sink part): what normalises the
    attention mass a key set received.

  Raises:
    ValueError: ``mask_values=False`` for a chunk.
  """
  k_rot = rotate_keys(ctx, k)
  if ctx.read_only:
    parts = _partials(ctx, kbuf, vbuf, layer, q, k_rot, v, impl=impl, mask_values=mask_values)
    # The token's own key: RoPE at equal positions cancels, so its score is q . k before rotation.
    b, t, n, h = q.shape
    g = n // k.shape[2]
    qf = q.astype(jnp.float32).reshape(b, t, k.shape[2], g, h)
    score = jnp.einsum("btkgh,btkh->btkg", qf, k.astype(jnp.float32)).reshape(b, t, n) * (h**-0.5)
    own_v = jnp.broadcast_to(v.astype(jnp.float32)[:, :, :, None], (b, t, k.shape[2], g, h)).reshape(b, t, n, h)
    parts.append((own_v, jnp.where(ctx.valid[:, :, None], score, -jnp.inf)))
    out, lse = _merge(parts, sink_part, q.dtype)
    return out, kbuf, vbuf, k_rot, lse
  if not mask_values:
    raise ValueError("chunks always mask the values of empty slots; mask_values=False is for single tokens")
  if ctx.write_first:
    kbuf = cache_lib.write(kbuf, layer, ctx.all_slots, k_rot)
    vbuf = cache_lib.write(vbuf, layer, ctx.all_slots, v, slots_last=True)
  elif ctx.has_sinks:
    kbuf = cache_lib.write(kbuf, layer, ctx.sink_slots, k_rot)
    vbuf = cache_lib.write(vbuf, layer, ctx.sink_slots, v, slots_last=True)
  parts = _partials(ctx, kbuf, vbuf, layer, q, k_rot, v, impl=impl, mask_values=True)
  out, lse = _merge(parts, sink_part, q.dtype)
  if not ctx.write_first:
    kbuf = cache_lib.write(kbuf, layer, ctx.ring_slots, k_rot)
    vbuf = cache_lib.write(vbuf, layer, ctx.ring_slots, v, slots_last=True)
  return out, kbuf, vbuf, k_rot, lse


def ordered_after(slots: Int[Array, "b t"], probe: Shaped[Array, "b ..."]) -> Int[Array, "b t"]:
  """``slots [b, t]`` unchanged, but computed from ``probe [b, ...]``: writes at these slots are then ordered after
  everything ``probe`` depends on (XLA otherwise may schedule an in-place write before a read of the old buffer,
  and copy the buffer to keep the read correct). The dependency is a comparison XLA cannot fold: every slot is
  below both values a NaN test of the probe selects."""
  above = jnp.iinfo(jnp.int32).max // 2  # above every slot
  flag = jnp.isnan(probe.reshape(probe.shape[0], -1)[:, :1])  # [b, 1]
  return jnp.minimum(slots, jnp.where(flag, above, above - 1))


def write_token(
  ctx: Context,
  kbuf: KeyBuffer,
  vbuf: ValueBuffer,
  ks: Float[Array, "l b 1 k h"],
  vs: Float[Array, "l b 1 k h"],
  *,
  after: Array,
) -> tuple[KeyBuffer, ValueBuffer]:
  """Writes a single token's keys and values of every layer, after ``after`` (the model's output).

  Args:
    ctx: the single-token context.
    kbuf, vbuf: the cache buffers.
    ks, vs: ``[l, b, 1, k, h]`` each layer's key (rotated, from ``attend``) and value.
    after: an array computed from every layer's attention (the final features): the writes are ordered after it.

  Returns:
    ``(kbuf, vbuf)``.
  """
  slots = ordered_after(ctx.all_slots, after)
  for layer in range(ks.shape[0]):
    kbuf = cache_lib.write(kbuf, layer, slots, ks[layer])
    vbuf = cache_lib.write(vbuf, layer, slots, vs[layer], slots_last=True)
  return kbuf, vbuf


def offline(
  q: Float[Array, "b t n h"],
  k: Float[Array, "b t k h"],
  v: Float[Array, "b t k h"],
  positions: Int[Array, "b t"],
  *,
  window,
  num_sinks,
  rope_base,
  impl,
  sink_part: tuple[Float[Array, "b t n h"], Float[Array, "b t n"]] | None = None,
) -> Float[Array, "b t n h"]:
  """Teacher-forced attention of a whole sequence with the banded mask a policy implies (no cache)."""
  cos, sin = rope_cos_sin(jnp.maximum(positions, 0), q.shape[-1], rope_base)
  qr = apply_rope(q, cos[:, :, None], sin[:, :, None])
  kr = apply_rope(k, cos[:, :, None], sin[:, :, None])
  out, lse = _offline_part(qr, kr, v, positions, positions, window, num_sinks, impl)
  if sink_part is None:
    return out.astype(q.dtype)
  return attn_ops.merge([(out, lse), sink_part])[0].astype(q.dtype)


def check_offline_policy(policy: cache_lib.Policy) -> None:
  """Raises unless ``offline_policy`` emulates ``policy``: ``Dense``, ``Window``, ``SinkWindow`` or a
  ``Segmented`` of them, in either position mode (a ``Segmented`` policy's own ``positions`` count, as in a
  stream)."""
  parts = policy.segments if isinstance(policy, cache_lib.Segmented) else ()
  for p in (policy, *parts):
    if not isinstance(p, (cache_lib.Dense, cache_lib.Window, cache_lib.SinkWindow, cache_lib.Segmented)):
      raise TypeError(f"an offline forward emulates Dense, Window, SinkWindow and Segmented policies, got {policy}")


def track_masks(
  policy: cache_lib.Policy, positions: Int[Array, "b t"], segment_ids: Int[Array, "b t"] | None = None
) -> list[tuple[Int[Array, "b t"], Int[Array, "b t"], int | None, int]]:
  """The masks of a stream under ``policy`` as position-only masks, one per track: ``(q_pos, k_pos, window,
  num_sinks)`` for ``jstream.ops.attention`` (``offline_policy``).

  A track's keys are numbered by their index among the track's tokens (``k_pos``; -1 for other tracks and
  padding), and a query sits at the index of the track's latest token at or before its stream position
  (``q_pos``; -1 before the track's first token). A window counted in the track's tokens is then the op's
  window over these numbers, and the track's sinks its first ``num_sinks``. Tokens of a group (equal stream
  positions) see what the group's last token sees, as in a stream. Costs ``O(t^2)`` comparisons per track.
  """
  valid = positions >= 0
  seg = jnp.zeros_like(positions) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  seen = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :]  # [b, q, k]: key at or before query
  out = []
  for m, track in enumerate(policy.tracks()):
    member = valid & (seg == m)
    index = jnp.cumsum(member, axis=1, dtype=jnp.int32) - 1
    k_pos = jnp.where(member, index, -1)
    q_pos = jnp.where(valid, jnp.sum(seen & member[:, None, :], axis=-1, dtype=jnp.int32) - 1, -1)
    out.append((q_pos, k_pos, track.window, track.num_sinks))
  return out


def offline_policy(
  q: Float[Array, "b t n h"],
  k: Float[Array, "b t k h"],
  v: Float[Array, "b t k h"],
  positions: Int[Array, "b t"],
  masks: list[tuple[Int[Array, "b t"], Int[Array, "b t"], int | None, int]],
  *,
  rope_base,
  impl,
  relative: bool = False,
  sink_part: tuple[Float[Array, "b t n h"], Float[Array, "b t n"]] | None = None,
) -> Float[Array, "b t n h"]:
  """Teacher-forced attention of a whole sequence with the mask a stream under a policy has (no cache):
  ``masks = track_masks(policy, positions, segment_ids)`` (computed once for all layers; windows counted in
  tokens of each track, as the cache keeps them). The partial attentions of the tracks are merged.

  ``relative=False`` (``absolute`` positions): queries and keys are rotated at their stream ``positions``.
  ``relative=True`` (the policy's ``cache_relative`` positions, StreamingVLM's contiguous positions per track):
  for each track, a query is rotated at its ``q_pos`` in that track and a key at its group's last track index
  (which is ``q_pos`` at the key), the window keys in one partial attention and the track's sinks in another
  whose queries sit at most at ``num_sinks + window - 1`` (sinks just before a full window), as ``build`` reads
  a cache; the distances a query sees are then those of the stream, which is what a model trained this way
  meets under a ``cache_relative`` cache."""
  if not relative:
    cos, sin = rope_cos_sin(jnp.maximum(positions, 0), q.shape[-1], rope_base)
    qr = apply_rope(q, cos[:, :, None], sin[:, :, None])
    kr = apply_rope(k, cos[:, :, None], sin[:, :, None])
    parts = [
      _offline_part(qr, kr, v, q_pos, k_pos, window, num_sinks, impl) for q_pos, k_pos, window, num_sinks in masks
    ]
  else:
    parts = []
    for q_pos, k_pos, window, num_sinks in masks:
      cos, sin = rope_cos_sin(jnp.maximum(q_pos, 0), q.shape[-1], rope_base)
      kr = apply_rope(k, cos[:, :, None], sin[:, :, None])
      ring = jnp.where(k_pos >= num_sinks, k_pos, -1)
      parts.append(_offline_part(apply_rope(q, cos[:, :, None], sin[:, :, None]), kr, v, q_pos, ring, window, 0, impl))
      if num_sinks:  # only SinkWindow tracks have sinks, and they have a window
        top = num_sinks + window - 1
        qs = rope(q, jnp.clip(q_pos, 0, top), rope_base, top)
        parts.append(_offline_part(qs, kr, v, q_pos, jnp.where(k_pos < num_sinks, k_pos, -1), None, 0, impl))
  if sink_part is not None:
    parts.append(sink_part)
  return attn_ops.merge(parts)[0].astype(q.dtype)


def _offline_part(qr, kr, v, q_pos, k_pos, window, num_sinks, impl) -> tuple[Array, Array]:
  """One partial attention of ``offline_policy``: ``(out, lse)`` in float32."""
  res = attn_ops.attention(
    qr,
    kr,
    v,
    q_positions=q_pos,
    k_positions=k_pos,
    window=window,
    num_sinks=num_sinks,
    out_dtype=jnp.float32,
    return_lse=True,
    impl=impl,
  )
  return res.out, res.lse
