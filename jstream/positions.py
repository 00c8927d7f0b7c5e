"""Rotary position embeddings (RoPE) by table lookup.

Conventions owned by this module:

* RoPE scores depend only on ``q_pos - k_pos``, so callers may rotate in any frame (absolute, or relative to the
  chunk start) and get the same attention scores. The streaming model uses this to rotate each key once, when it
  is written to the cache, at its position in the policy's frame, and queries at read time
  (``jstream.nn.cached_attention``); the rare rebase of cache-relative indices rotates the stored keys back by the
  shift. The result equals caching keys before RoPE and rotating them at read time (tested against a reference
  that does exactly that).
* Rotation uses the split-half ("rotate_half", GPT-NeoX / Llama) layout: feature ``i`` pairs with ``i + h/2``.
* cos/sin are never computed with trigonometry inside the model: they are gathered from tables built once in
  extended precision with NumPy. Positions whose magnitude is statically bounded by ``SINGLE_TABLE_LIMIT`` use one
  table; larger ones (absolute positions up to 2**31) are decomposed into three 11-bit digits whose rotations are
  composed with the angle-addition formula. Either way the angles are exact to float32 rounding, unlike
  ``pos * freq`` in float32, which loses all precision past a few million tokens.

Position modes of a cache (see ``jstream.cache``):

* ``"absolute"``: a token's RoPE position is its position in the stream.
* ``"cache_relative"`` (StreamingLLM): positions are re-indexed inside the cache. Sinks keep 0..S-1, the window
  follows contiguously, the query takes the next index. The distance from a query to a window key is then its
  stream distance, and the distance to sink ``i`` is ``min(c, S + W - 1) - i`` for a query with stream index ``c``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from jstream.typing import Array, ArrayLike, Float, Int, IntLike

POSITION_MODES: tuple[str, ...] = ("absolute", "cache_relative")

SINGLE_TABLE_LIMIT = 8192
"""Largest static bound on ``|position|`` served by a single table (larger ones use three digits)."""

_DIGIT_BITS = 11
_DIGIT = 1 << _DIGIT_BITS
_NUM_DIGITS = 3  # 33 bits: every int32 magnitude


def check_position_mode(mode: str) -> str:
  if mode not in POSITION_MODES:
    raise ValueError(f"positions must be one of {POSITION_MODES}, got {mode!r}")
  return mode


ROPE_SCALINGS: tuple[str, ...] = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A rescaling of RoPE's frequencies for context extension (hashable: part of a model's static config).

  * ``kind="linear"`` (position interpolation): every frequency divided by ``factor``.
  * ``kind="llama3"`` (Llama 3.1): frequencies whose wavelength exceeds ``original_max_position /
    low_freq_factor`` are divided by ``factor``, those shorter than ``original_max_position / high_freq_factor``
    are kept, and the band between is interpolated linearly in ``original_max_position / wavelength``.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALINGS:
      raise ValueError(f"RopeScaling.kind must be one of {ROPE_SCALINGS}, got {self.kind!r}")
    if not self.factor > 0:
      raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor!r}")
    if self.kind == "llama3" and not (0 < self.low_freq_factor < self.high_freq_factor):
      raise ValueError(
        f"llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor}, "
        f"{self.high_freq_factor}"
      )
    if self.original_max_position < 1:
      raise ValueError(f"RopeScaling.original_max_position must be >= 1, got {self.original_max_position}")

  def apply(self, inv_freq: np.ndarray) -> np.ndarray:
    """The scaled inverse frequencies (same dtype as ``inv_freq``)."""
    if self.kind == "linear":
      return inv_freq / self.factor
    wavelength = 2 * math.pi / inv_freq
    ratio = self.original_max_position / wavelength  # periods that fit the original context
    smooth = (ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
    smooth = np.clip(smooth, 0.0, 1.0)  # 0: long wavelengths (scaled), 1: short ones (kept)
    return inv_freq * (smooth + (1 - smooth) / self.factor)


@dataclasses.dataclass(frozen=True)
class Rope:
  """RoPE's frequencies: a base (theta) and an optional ``RopeScaling``. Accepted wherever a base is."""

  base: float = 10_000.0
  scaling: RopeScaling | None = None


def _key(base: float | Rope) -> float | Rope:
  """One cache key per distinct set of frequencies (a plain base as a float)."""
  if isinstance(base, Rope):
    return float(base.base) if base.scaling is None else base
  return float(base)


def _inv_freq(head_dim: int, base: float | Rope) -> np.ndarray:
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  rope = base if isinstance(base, Rope) else Rope(float(base))
  exponent = np.arange(0, head_dim, 2, dtype=np.longdouble) / np.longdouble(head_dim)
  inv = np.power(np.longdouble(rope.base), -exponent)  # [h/2]
  return inv if rope.scaling is None else rope.scaling.apply(inv)


def _angles_table(head_dim: int, base: float | Rope, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  angles = positions.astype(np.longdouble)[:, None] * _inv_freq(head_dim, base)[None, :]
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _single_table(head_dim: int, base: float | Rope, bound: int) -> tuple[np.ndarray, np.ndarray]:
  return _angles_table(head_dim, base, np.arange(-bound, bound + 1))  # [2*bound+1, h/2]


@functools.lru_cache(maxsize=64)
def _digit_tables(head_dim: int, base: float | Rope) -> tuple[np.ndarray, np.ndarray]:
  digits = np.arange(_DIGIT, dtype=np.int64)
  tables = [_angles_table(head_dim, base, digits << (_DIGIT_BITS * i)) for i in range(_NUM_DIGITS)]
  cos = np.stack([c for c, _ in tables])  # [3, 2048, h/2]
  sin = np.stack([s for _, s in tables])
  return cos, sin


def rope_cos_sin(
  positions: IntLike, head_dim: int, base: float | Rope = 10_000.0, bound: int | None = None
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
  """cos and sin of the RoPE angles of integer ``positions``.

  Args:
    positions: int32 array of any shape; negative values are allowed (rotation the other way).
    head_dim: the rotated feature size (even).
    base: the RoPE base (theta), or a ``Rope`` (base and frequency scaling).
    bound: a static bound on ``|positions|`` if the caller knows one. Bounds up to ``SINGLE_TABLE_LIMIT`` use a
      single gather; otherwise three gathers are composed.

  Returns:
    ``(cos, sin)``, float32 arrays of shape ``positions.shape + (head_dim // 2,)``.
  """
  positions = jnp.asarray(positions, jnp.int32)
  if bound is not None and bound <= SINGLE_TABLE_LIMIT:
    cos_t, sin_t = _single_table(head_dim, _key(base), int(bound))
    idx = jnp.clip(positions + bound, 0, 2 * bound)
    return jnp.asarray(cos_t)[idx], jnp.asarray(sin_t)[idx]
  cos_t, sin_t = (jnp.asarray(t) for t in _digit_tables(head_dim, _key(base)))
  sign = jnp.where(positions < 0, -1.0, 1.0).astype(jnp.float32)[..., None]
  mag = jnp.abs(positions)
  cos, sin = None, None
  for i in range(_NUM_DIGITS):
    d = (mag >> (_DIGIT_BITS * i)) & (_DIGIT - 1)
    c, s = cos_t[i][d], sin_t[i][d]
    if cos is None:
      cos, sin = c, s
    else:  # (cos + i sin) * (c + i s)
      cos, sin = cos * c - sin * s, sin * c + cos * s
  return cos, sin * sign


def apply_rope(
  x: Float[Array, "*lead h"], cos: Float[Array, "..."], sin: Float[Array, "..."]
) -> Float[Array, "*lead h"]:
  """Rotates the last axis of ``x`` (split-half layout) by angles given as cos/sin ``[..., h/2]``.

  ``cos``/``sin`` must broadcast against ``x[..., : h // 2]``. Math is float32; the result has ``x``'s dtype.
  """
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rope(
  x: Float[Array, "b t n h"], positions: Int[ArrayLike, "b t"], base: float | Rope = 10_000.0, bound: int | None = None
) -> Float[Array, "b t n h"]:
  """Applies RoPE to ``x [b, t, n, h]`` at integer ``positions [b, t]``."""
  cos, sin = rope_cos_sin(positions, x.shape[-1], base, bound)
  return apply_rope(x, cos[..., None, :], sin[..., None, :])
