"""Attention with the mask derived from positions alone, and a registry of implementations.

Shapes (see ``jstream.typing`` for the legend): queries ``q [b, t, n, h]``; keys ``[b, s, k, h]``
(``kv_layout="bskh"``, the public layout) or ``[b, k, s, h]`` (``"bksh"``, the cache's heads-first layout); values
in the same layout, or in the one ``v_layout`` names (also ``"bkhs"``, slots last: what a dot over slots reads
without a transpose on CPU). ``n`` is a multiple of ``k`` (grouped-query attention: query head ``i`` reads kv
head ``i // (n // k)``).

The mask is a function of int32 positions only. Key ``j`` is visible to query ``i`` iff

  q_pos[i] >= 0 and k_pos[j] >= 0                       (both valid; -1 marks padding / an empty slot)
  and k_pos[j] <= q_pos[i]                              (causal)
  and (window is None or q_pos[i] - k_pos[j] < window   (sliding window, the query itself included)
       or k_pos[j] < num_sinks)                         (attention sinks are always visible)

so one op serves every cache policy. Block-causal attention (all tokens of a video frame see each other) is
obtained by giving the tokens of a frame equal positions. ``k_positions`` may also be ``[b, k, s]`` (per kv
head), for policies that keep different slots per head.

A query that sees no key returns zeros and a log-sum-exp of ``-inf`` (never NaN), so partial attentions over
disjoint key sets merge exactly with ``merge``. Keys in slots that are masked out never reach the output, even
when they hold NaN.

Implementations are registered by name; ``impl="auto"`` tries the accelerator kernels registered for the current
platform in priority order and falls back to ``"xla"`` (the reference, always available) when a kernel raises
``NotImplementedError`` for an unsupported configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from jstream.typing import Array

KVLayout = Literal["bskh", "bksh"]
VLayout = Literal["bskh", "bksh", "bkhs"]
_LAYOUTS = ("bskh", "bksh")
_V_LAYOUTS = ("bskh", "bksh", "bkhs")


def _dims(x, layout: str) -> dict[str, int]:
  return dict(zip(layout, x.shape))


NEG_INF = float("-inf")


class AttentionResult(NamedTuple):
  """Output of an attention implementation.

  Attributes:
    out: ``[b, t, n, h]`` attention output (dtype given by the caller; float32 for partials that will be merged).
    lse: ``[b, t, n]`` float32 natural-log sum of exp of the scaled scores; ``-inf`` for queries that see nothing.
    key_mass: attention probability each key received, summed over queries and over the query heads of its kv
      group: ``[b, s, k]`` for ``kv_layout="bskh"``, ``[b, k, s]`` for ``"bksh"``. Float32.
  """

  out: Array
  lse: Array | None = None
  key_mass: Array | None = None


def visible(q_pos: Array, k_pos: Array, *, window: int | None = None, num_sinks: int = 0) -> Array:
  """Elementwise visibility of keys at ``k_pos`` to queries at ``q_pos`` (broadcasting arrays of positions)."""
  mask = (q_pos >= 0) & (k_pos >= 0) & (k_pos <= q_pos)
  if window is not None:
    in_window = (q_pos - k_pos) < window
    if num_sinks:
      in_window = in_window | (k_pos < num_sinks)
    mask = mask & in_window
  return mask


def attention_mask(q_positions: Array, k_positions: Array, *, window: int | None = None, num_sinks: int = 0) -> Array:
  """Boolean visibility mask ``[b, 1 | k, t, s]`` from positions (see the module docstring)."""
  qp = q_positions[:, None, :, None]  # [b, 1, t, 1]
  kp = k_positions[:, None, None, :] if k_positions.ndim == 2 else k_positions[:, :, None, :]
  return visible(qp, kp, window=window, num_sinks=num_sinks)


def _xla_attention(
  q: Array,
  k: Array,
  v: Array,
  q_positions: Array,
  k_positions: Array,
  *,
  window: int | None,
  num_sinks: int,
  scale: float,
  kv_layout: KVLayout,
  v_layout: VLayout,
  mask_values: bool,
  out_dtype,
  return_lse: bool,
  return_key_mass: bool,
) -> AttentionResult:
  """The reference: dense scores, masked softmax in float32. The definition of correct."""
  b, t, n, h = q.shape
  kv_heads = _dims(k, kv_layout)["k"]
  g = n // kv_heads
  qg = q.reshape(b, t, kv_heads, g, h)
  scores = jnp.einsum(f"btkgh,{kv_layout}->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(scale)
  mask = attention_mask(q_positions, k_positions, window=window, num_sinks=num_sinks)  # [b, 1|k, t, s]
  mask = mask[:, :, None]  # [b, 1|k, 1, t, s]
  scores = jnp.where(mask, scores, NEG_INF)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(scores - m), 0.0)  # where(): a NaN key never leaks through exp
  denom = jnp.sum(p, axis=-1, keepdims=True)
  inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
  if mask_values:  # zero the values of invisible slots: 0 * NaN would otherwise poison the sum
    visible = jnp.any(mask, axis=(2, 3))  # [b, 1|k, s]
    vis = {
      "bskh": jnp.moveaxis(visible, 1, 2)[..., None],
      "bksh": visible[..., None],
      "bkhs": visible[:, :, None, :],
    }[v_layout]
    v = jnp.where(vis, v, 0)
  probs = p * inv
  out = jnp.einsum(f"bkgts,{v_layout}->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out.reshape(b, t, n, out.shape[-1]).astype(out_dtype)
  lse = None
  if return_lse:
    lse_ = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), NEG_INF)[..., 0]  # [b,k,g,t]
    lse = jnp.moveaxis(lse_.reshape(b, n, t), 1, 2)  # [b, t, n]
  key_mass = None
  if return_key_mass:
    mass = jnp.sum(probs, axis=(2, 3))  # [b, k, s]
    key_mass = jnp.moveaxis(mass, 1, 2) if kv_layout == "bskh" else mass
  return AttentionResult(out, lse, key_mass)


# --------------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Implementation:
  """A registered attention implementation.

  Attributes:
    name: the ``impl=`` name.
    fn: callable with the signature of ``_xla_attention``. It raises ``NotImplementedError`` for configurations it
      does not support, so that dispatch falls back to the next implementation.
    platforms: platforms (``jax.default_backend()`` values) where ``impl="auto"`` considers it.
    priority: higher is tried first by ``"auto"``.
  """

  name: str
  fn: Callable[..., AttentionResult]
  platforms: tuple[str, ...] = ()
  priority: int = 0


_REGISTRY: dict[str, Implementation] = {}


def register(name: str, fn: Callable[..., AttentionResult], *, platforms=(), priority: int = 0) -> None:
  """Registers (or replaces) an implementation under ``name``."""
  _REGISTRY[name] = Implementation(name, fn, tuple(platforms), priority)


_PLUGINS_LOADED = False


def _load_plugins() -> None:
  """Imports the optional kernel package, which registers its implementations (once; absent is fine)."""
  global _PLUGINS_LOADED
  if _PLUGINS_LOADED:
    return
  _PLUGINS_LOADED = True
  try:
    import pallas_kernels  # noqa: F401
  except ModuleNotFoundError as e:  # not installed; any other import failure is a bug and is raised
    if e.name != "pallas_kernels":
      raise


def implementations() -> tuple[str, ...]:
  """Names of the registered implementations."""
  _load_plugins()
  return tuple(_REGISTRY)


register("xla", _xla_attention, platforms=("cpu", "gpu", "tpu"), priority=-100)


def resolve(impl: str | Sequence[str] = "auto", platform: str | None = None) -> tuple[str, ...]:
  """The implementation names ``impl`` stands for, in the order dispatch tries them."""
  _load_plugins()
  if isinstance(impl, str):
    if impl == "auto":
      platform = platform or jax.default_backend()
      cands = sorted((i for i in _REGISTRY.values() if platform in i.platforms), key=lambda i: -i.priority)
      names = tuple(i.name for i in cands)
      return names if "xla" in names else (*names, "xla")
    names = (impl,)
  else:
    names = tuple(impl)
  for name in names:
    if name not in _REGISTRY:
      raise ValueError(
        f"unknown attention impl {name!r}; registered: {sorted(_REGISTRY)} (or 'auto'). Pallas kernels "
        "register themselves when pallas_kernels is importable."
      )
  return names


def _validate(q, k, v, q_positions, k_positions, kv_layout, v_layout, window, num_sinks):
  if kv_layout not in _LAYOUTS:
    raise ValueError(f"kv_layout must be one of {_LAYOUTS}, got {kv_layout!r}")
  if v_layout not in _V_LAYOUTS:
    raise ValueError(f"v_layout must be one of {_V_LAYOUTS}, got {v_layout!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D; got shapes {q.shape}, {k.shape}, {v.shape}")
  b, t, n, h = q.shape
  kd, vd = _dims(k, kv_layout), _dims(v, v_layout)
  if (kd["b"], vd["b"]) != (b, b):
    raise ValueError(f"batch mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
  if (vd["s"], vd["k"]) != (kd["s"], kd["k"]):
    raise ValueError(f"k ({kv_layout}) and v ({v_layout}) disagree on slots/heads: {k.shape}, {v.shape}")
  if kd["h"] != h:
    raise ValueError(f"q head_dim {h} != k head_dim {kd['h']}")
  if n % kd["k"]:
    raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kd['k']})")
  if q.dtype != k.dtype or k.dtype != v.dtype:
    raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
  s = kd["s"]
  if q_positions.shape != (b, t):
    raise ValueError(f"q_positions must be [b, t] = {(b, t)}, got {q_positions.shape}")
  if k_positions.shape not in ((b, s), (b, kd["k"], s)):
    raise ValueError(f"k_positions must be [b, s] = {(b, s)} or [b, k, s], got {k_positions.shape}")
  for name, p in (("q_positions", q_positions), ("k_positions", k_positions)):
    if not jnp.issubdtype(p.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer array, got {p.dtype}")
  if window is not None and int(window) < 1:
    raise ValueError(f"window must be >= 1 or None, got {window}")
  if int(num_sinks) < 0:
    raise ValueError(f"num_sinks must be >= 0, got {num_sinks}")


def attention(
  q: Array,
  k: Array,
  v: Array,
  *,
  q_positions: Array,
  k_positions: Array,
  window: int | None = None,
  num_sinks: int = 0,
  scale: float | None = None,
  kv_layout: KVLayout = "bskh",
  v_layout: VLayout | None = None,
  mask_values: bool = True,
  out_dtype=None,
  return_lse: bool = False,
  return_key_mass: bool = False,
  impl: str | Sequence[str] = "auto",
) -> Array | AttentionResult:
  """Multi-head attention whose mask is derived from positions (see the module docstring).

  Args:
    q: ``[b, t, n, h]`` queries (already rotated, if RoPE is used).
    k: keys, ``[b, s, k, h]`` (``kv_layout="bskh"``) or ``[b, k, s, h]`` (``"bksh"``).
    v: values, ``[b, s, k, h]`` / ``[b, k, s, h]`` / ``[b, k, h, s]`` (see ``v_layout``).
    q_positions: ``[b, t]`` int32, -1 for padded queries.
    k_positions: ``[b, s]`` (or ``[b, k, s]``) int32, -1 for empty slots.
    window: sliding-window length (the query's own position included), or None for full causal attention.
    num_sinks: keys with position ``< num_sinks`` are visible to every later query, whatever the window.
    scale: score scale, default ``h ** -0.5``.
    kv_layout: layout of ``k`` (and of ``v`` unless ``v_layout`` says otherwise): ``"bskh"`` or ``"bksh"``.
    v_layout: layout of ``v``: ``"bskh"``, ``"bksh"`` or ``"bkhs"``; default ``kv_layout``.
    mask_values: zero the values of slots no query sees before the weighted sum, so NaN/Inf there cannot reach
      the output. Callers that keep unused slots finite by construction (jstream's caches) may turn it off.
    out_dtype: dtype of ``out``; default ``q.dtype``. Use float32 for partials that will be merged.
    return_lse: also return the log-sum-exp residuals ``[b, t, n]``.
    return_key_mass: also return the attention mass each key received.
    impl: ``"auto"``, ``"xla"``, ``"pallas"`` (or another registered name), or a sequence of names tried in order.

  Returns:
    ``out [b, t, n, h]``, or an ``AttentionResult`` when ``return_lse`` or ``return_key_mass`` is set.

  Raises:
    ValueError / TypeError: on inconsistent shapes, dtypes or mask parameters.
  """
  v_layout = kv_layout if v_layout is None else v_layout
  _validate(q, k, v, q_positions, k_positions, kv_layout, v_layout, window, num_sinks)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  kwargs = dict(
    window=None if window is None else int(window),
    num_sinks=int(num_sinks),
    scale=scale,
    kv_layout=kv_layout,
    v_layout=v_layout,
    mask_values=mask_values,
    out_dtype=q.dtype if out_dtype is None else out_dtype,
    return_lse=return_lse,
    return_key_mass=return_key_mass,
  )
  errors = []
  for name in resolve(impl):
    try:
      res = _REGISTRY[name].fn(q, k, v, q_positions, k_positions, **kwargs)
      break
    except NotImplementedError as e:
      errors.append(f"{name}: {e}")
  else:
    raise NotImplementedError("no attention implementation accepted this call: " + "; ".join(errors))
  if return_lse or return_key_mass:
    return res
  return res.out


def merge(parts: Sequence[tuple[Array, Array]], out_dtype=None) -> tuple[Array, Array]:
  """Merges partial attentions over disjoint key sets into the attention over their union.

  Args:
    parts: ``(out, lse)`` pairs with ``out [b, t, n, h]`` (float32 preferred) and ``lse [b, t, n]``; a part whose
      ``lse`` is ``-inf`` contributes nothing.
    out_dtype: dtype of the merged output (default: that of the first part).

  Returns:
    ``(out, lse)`` of the union. Queries that saw nothing in any part get zeros and ``-inf``.
  """
  lses = jnp.stack([lse for _, lse in parts])  # [p, b, t, n]
  m = jnp.max(lses, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  weights = jnp.exp(lses - m_safe)  # exp(-inf) = 0
  total = jnp.sum(weights, axis=0)
  inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  out = sum(o.astype(jnp.float32) * (w * inv)[..., None] for (o, _), w in zip(parts, weights))
  lse = jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), NEG_INF)
  return out.astype(out_dtype or parts[0][0].dtype), lse
