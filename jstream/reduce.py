"""Token reduction before the cache: which of a frame's tokens are worth keeping (issue 11, first part).

A video stream is mostly redundant: a patch that looks like the same patch a frame ago adds little. These
functions decide, at static shapes, which frame tokens to keep; a dropped token is meant to become padding (segment
id -1, not attended, not cached), so any drop pattern runs the same compiled program. They read tokens
``[b, n, p, d]`` (``n`` frames of ``p`` patch tokens of width ``d``: a frame encoder's features, or raw pixel
patches) and return masks or indices; none of them changes a shape.

* ``differential_drop``: TimeChat-Online's Differential Token Drop. A token whose cosine similarity to the token at
  the same place in the reference frame exceeds a threshold is dropped, or each frame keeps a fixed share of its
  tokens, the least similar ones. The reference is the previous frame (the paper's rule) or, per place, the last
  token kept there (``reference="kept"``: slow drifts add up until the place is kept again). Streaming: the state
  (``DropState``) carries the reference across calls, so chunked calls equal one call over the whole stream;
  a row's first frame after a reset keeps every token.
* ``temporal_merge``: merging in the style of DyCoke's temporal merging and TempMe: inside each window of
  ``window`` consecutive frames, a token similar to the token at the same place in the window's first frame (the
  pivot) is dropped and averaged into the pivot's token. The pivot then carries the later frames of its window, so
  in a stream it can only enter the cache ``window - 1`` frames late; it is meant for clips processed whole.
* ``inverse_transform_sample``: BOLT's query-guided frame selection for offline clips: frame-question
  similarities, rescaled to [0, 1] and sharpened by a power, are a distribution over frames whose inverse CDF at
  ``k`` evenly spaced quantiles picks ``k`` distinct frames (dense where the question's evidence is, sparse
  elsewhere, never only one region).

Similarity is cosine similarity; two (near-)zero vectors (blank pixel patches) count as identical, a zero and a
non-zero vector as dissimilar.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jstream.typing import Array, ArrayLike, Bool, Float, Int

_EPS = 1e-6


def cosine_similarity(a: Float[ArrayLike, "... d"], b: Float[ArrayLike, "... d"]) -> Float[Array, "..."]:
  """Cosine similarity over the last axis in float32; 1 for two (near-)zero vectors, 0 for one."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
  cos = jnp.sum(a * b, axis=-1) / jnp.maximum(na * nb, _EPS * _EPS)
  zero_a, zero_b = na < _EPS, nb < _EPS
  return jnp.where(zero_a & zero_b, 1.0, jnp.where(zero_a | zero_b, 0.0, cos))


# ----------------------------------------------------------------------------------------------------------------
# Differential token drop (TimeChat-Online).


class DropState(NamedTuple):
  """What ``differential_drop`` carries from one call to the next, per row.

  Attributes:
    reference: ``[b, p, d]`` float32, the tokens each place is compared with.
    started: ``[b]`` whether the row has seen a frame since its reset (its first frame keeps everything).
  """

  reference: Float[Array, "b p d"]
  started: Bool[Array, " b"]


def init_drop_state(batch_size: int, tokens_per_frame: int, dim: int) -> DropState:
  """An empty ``DropState``: every row's next frame keeps all its tokens."""
  for name, v in (("batch_size", batch_size), ("tokens_per_frame", tokens_per_frame), ("dim", dim)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  return DropState(jnp.zeros((batch_size, tokens_per_frame, dim), jnp.float32), jnp.zeros((batch_size,), bool))


def reset_drop_state(state: DropState, rows: Bool[ArrayLike, " b"]) -> DropState:
  """Rows where ``rows`` is True start over: their next frame keeps all its tokens."""
  return state._replace(started=state.started & ~jnp.asarray(rows, bool))


def _keep_count(keep_ratio: float, p: int) -> int:
  return max(1, math.ceil(keep_ratio * p - 1e-9))


def check_drop_args(threshold: float | None, keep_ratio: float | None, reference: str) -> None:
  """Raises ``ValueError`` unless exactly one of ``threshold`` (in [-1, 1]) and ``keep_ratio`` (in (0, 1]) is
  given and ``reference`` is ``"previous"`` or ``"kept"``."""
  if (threshold is None) == (keep_ratio is None):
    raise ValueError(f"give exactly one of threshold and keep_ratio, got {threshold=}, {keep_ratio=}")
  if threshold is not None and not -1.0 <= threshold <= 1.0:
    raise ValueError(f"threshold is a cosine similarity and must be in [-1, 1], got {threshold}")
  if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
    raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
  if reference not in ("previous", "kept"):
    raise ValueError(f"reference must be 'previous' or 'kept', got {reference!r}")


@dataclasses.dataclass(frozen=True)
class DifferentialDrop:
  """``differential_drop``'s rule as a static, hashable setting (what the video stream runner takes: ``jstream.
  qa_stream.run(..., drop=DifferentialDrop(threshold=0.9))``). Exactly one of ``threshold`` and ``keep_ratio``."""

  threshold: float | None = None
  keep_ratio: float | None = None
  reference: str = "previous"

  def __post_init__(self):
    check_drop_args(self.threshold, self.keep_ratio, self.reference)

  def __call__(self, tokens: Float[ArrayLike, "b n p d"], state: DropState) -> tuple[Bool[Array, "b n p"], DropState]:
    return differential_drop(
      tokens, state, threshold=self.threshold, keep_ratio=self.keep_ratio, reference=self.reference
    )


def differential_drop(
  tokens: Float[ArrayLike, "b n p d"],
  state: DropState,
  *,
  threshold: float | None = None,
  keep_ratio: float | None = None,
  reference: str = "previous",
) -> tuple[Bool[Array, "b n p"], DropState]:
  """TimeChat-Online's Differential Token Drop over ``n`` frames: ``(keep [b, n, p], state)``.

  Args:
    tokens: ``n`` frames of ``p`` tokens per row (features or pixel patches).
    state: from ``init_drop_state`` or the previous call (the same rows, ``p`` and ``d``).
    threshold: drop a token whose similarity to its reference is above this (a cosine similarity in [-1, 1]).
    keep_ratio: instead, keep ``ceil(keep_ratio * p)`` tokens of each frame, the least similar to their references
      (ties: the lower place first). Exactly one of ``threshold`` and ``keep_ratio``.
    reference: ``"previous"``: compare with the previous frame; ``"kept"``: with the last token kept at that place.

  A row's first frame since its reset keeps every token. Calls over consecutive chunks with the returned state
  equal one call over their concatenation.
  """
  check_drop_args(threshold, keep_ratio, reference)
  tokens = jnp.asarray(tokens)
  b, _, p, d = tokens.shape
  if state.reference.shape != (b, p, d) or state.started.shape != (b,):
    raise ValueError(
      f"state is for [b, p, d] = {tuple(state.reference.shape)}, tokens are {tuple(tokens.shape)} ([b, n, p, d])"
    )
  x = jnp.moveaxis(tokens.astype(jnp.float32), 1, 0)  # [n, b, p, d]
  k = None if keep_ratio is None else _keep_count(keep_ratio, p)

  def frame(carry, cur):
    ref, started = carry
    sim = cosine_similarity(cur, ref)  # [b, p]
    if k is None:
      keep = sim <= threshold
    else:
      rank = jnp.argsort(jnp.argsort(sim, axis=-1, stable=True), axis=-1, stable=True)  # 0: least similar
      keep = rank < k
    keep = keep | ~started[:, None]
    new_ref = cur if reference == "previous" else jnp.where(keep[..., None], cur, ref)
    return (new_ref, jnp.ones_like(started)), keep

  (ref, started), keep = jax.lax.scan(frame, (state.reference, state.started), x)
  return jnp.moveaxis(keep, 0, 1), DropState(ref, started)


# ----------------------------------------------------------------------------------------------------------------
# Temporal merging (DyCoke / TempMe style).


def temporal_merge(
  tokens: Float[ArrayLike, "b n p d"], *, window: int, threshold: float
) -> tuple[Float[Array, "b n p d"], Bool[Array, "b n p"]]:
  """Merges similar tokens at the same place inside each window of ``window`` frames: ``(tokens, keep)``.

  In every window (frames ``[w * window, (w + 1) * window)``; ``n`` must be a multiple of ``window``), a token of
  a later frame whose similarity to the window's first-frame token at the same place is above ``threshold`` is
  dropped (``keep`` False) and the first-frame token becomes the mean of itself and the tokens merged into it.
  Kept tokens are returned unchanged; dropped ones too (they are padding for the caller).
  """
  tokens = jnp.asarray(tokens)
  b, n, p, d = tokens.shape
  if not isinstance(window, int) or window < 1 or n % window:
    raise ValueError(f"window must be a positive int dividing the {n} frames, got {window!r}")
  if not -1.0 <= threshold <= 1.0:
    raise ValueError(f"threshold is a cosine similarity and must be in [-1, 1], got {threshold}")
  x = tokens.reshape(b, n // window, window, p, d)
  pivot = x[:, :, :1]
  merge = cosine_similarity(x, pivot) > threshold  # [b, w, window, p]
  merge = merge.at[:, :, 0].set(False)
  m = merge[..., None].astype(jnp.float32)
  total = pivot[:, :, 0].astype(jnp.float32) + jnp.sum(m * x.astype(jnp.float32), axis=2)
  mean = (total / (1.0 + m.sum(axis=2))).astype(tokens.dtype)
  merged = x.at[:, :, 0].set(mean).reshape(b, n, p, d)
  return merged, ~merge.reshape(b, n, p)


# ----------------------------------------------------------------------------------------------------------------
# Query-guided frame selection (BOLT).


def inverse_transform_sample(
  scores: Float[ArrayLike, "b n"], k: int, *, power: float = 1.0, valid: Bool[ArrayLike, "b n"] | None = None
) -> Int[Array, "b k"]:
  """BOLT's inverse transform sampling: ``k`` distinct frame indices per row, increasing.

  Args:
    scores: frame-question similarities ``[b, n]``.
    k: frames to select (``1 <= k <=`` the valid frames of every row).
    power: the scores, min-max rescaled to [0, 1] over the valid frames, are raised to this power (> 0; larger
      concentrates the picks where the scores are high) and normalised into a distribution over frames.
    valid: frames that may be picked (default all); invalid frames get no mass.

  Frame ``i`` is picked for the quantile ``(j + 0.5) / k`` when the CDF first reaches it at ``i``; picks that
  coincide are then spread to the nearest free later frames (and pushed back from the end), so the ``k`` indices
  are distinct. Uniform scores give evenly spaced frames.
  """
  scores = jnp.asarray(scores)
  b, n = scores.shape
  if not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, {n}] (the frames), got {k!r}")
  if not power > 0:
    raise ValueError(f"power must be > 0, got {power}")
  valid = jnp.ones((b, n), bool) if valid is None else jnp.asarray(valid, bool)
  if not isinstance(valid, jax.core.Tracer) and int(valid.sum(axis=-1).min()) < k:
    raise ValueError(f"k = {k} exceeds the valid frames of a row ({int(valid.sum(axis=-1).min())})")
  s = scores.astype(jnp.float32)
  lo = jnp.min(jnp.where(valid, s, jnp.inf), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True)
  span = hi - lo
  unit = jnp.where(span > 0, (s - lo) / jnp.where(span > 0, span, 1.0), 1.0)
  w = jnp.where(valid, unit**power, 0.0)
  w = jnp.where(jnp.sum(w, axis=-1, keepdims=True) > 0, w, valid.astype(jnp.float32))  # all-zero: uniform
  order = jnp.argsort(~valid, axis=-1, stable=True)  # the valid frames first, in order: picks are ranks in it
  w = jnp.take_along_axis(w, order, axis=-1)
  cdf = jnp.cumsum(w, axis=-1) / jnp.sum(w, axis=-1, keepdims=True)
  q = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
  rank = jax.vmap(lambda c: jnp.searchsorted(c, q, side="left"))(cdf).astype(jnp.int32)  # [b, k]
  j = jnp.arange(k, dtype=jnp.int32)
  rank = jax.lax.cummax(rank - j, axis=1) + j  # strictly increasing
  rank = jnp.minimum(rank, valid.sum(axis=-1, keepdims=True).astype(jnp.int32) - k + j)
  return jnp.take_along_axis(order, rank, axis=-1).astype(jnp.int32)


__all__ = [
  "DropState",
  "check_drop_args",
  "cosine_similarity",
  "differential_drop",
  "init_drop_state",
  "inverse_transform_sample",
  "reset_drop_state",
  "temporal_merge",
]
