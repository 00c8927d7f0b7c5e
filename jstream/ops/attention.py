"""Attention with the mask derived from positions alone, and a registry of implementations.

Shapes (see ``jstream.typing`` for the legend): queries ``q [b, t, n, h]``; keys ``[b, s, k, h]``
(``kv_layout="bskh"``, the public layout) or ``[b, k, s, h]`` (``"bksh"``, the cache's heads-first layout); values
in the same layout, or in the one ``v_layout`` names (also ``"bkhs"``, slots last: what a dot over slots reads
without a transpose on CPU). ``n`` is a multiple of ``k`` (grouped-query attention: query head ``i`` reads kv
head ``i // (n // k)``).

The contract of a call apart from its arrays (mask parameters, score scale, layouts, output dtype) is one frozen,
hashable ``AttentionSpec``, validated when it is built; every implementation (the XLA reference here, the Pallas
kernels) takes it, and kernels take it as a static argument. It owns the visibility rule. Key ``j`` is visible
to query ``i`` iff

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

Implementations are registered by name (``register``; ``get_implementation`` reads one back). Optional packages
add theirs through the ``jstream.attention`` packaging entry point group: each entry point names a function
that calls ``register``; the group is loaded lazily, the first time the registry is consulted (``pallas_kernels``
is one such package; this module does not import it). ``impl="auto"`` tries the implementations registered for
the current platform in priority order and falls back to ``"xla"`` (the reference, always available) when one
raises ``NotImplementedError`` for an unsupported configuration. An implementation may come with a *probe* (a
function that compiles and checks it, returning None or the reason it failed): the probe runs at the first
``"auto"`` dispatch on its platform, once, outside any trace, and an implementation whose probe fails is left out
of ``"auto"`` (with a warning) but stays available by name. Nothing is probed or compiled at import.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.metadata
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jstream.checks import check_int
from jstream.typing import Array, ArrayLike, Bool, Float, Int

# Keys and values come in the layouts ``kv_layout`` / ``v_layout`` name, so their middle dimensions are checked by
# ``AttentionSpec.check_inputs``, not by the annotation (``_``: see ``jstream.typing``).
Queries = Float[ArrayLike, "b t n h"]
Keys = Float[ArrayLike, "b _ _ h"]
Values = Float[ArrayLike, "b _ _ _"]
QueryPositions = Int[ArrayLike, "b t"]
KeyPositions = Int[ArrayLike, "b _"] | Int[ArrayLike, "b _ _"]

KVLayout = Literal["bskh", "bksh"]
VLayout = Literal["bskh", "bksh", "bkhs"]
KV_LAYOUTS = ("bskh", "bksh")
V_LAYOUTS = ("bskh", "bksh", "bkhs")
NEG_INF = float("-inf")
PLUGIN_GROUP = "jstream.attention"  # packaging entry points: functions that register implementations


def layout_dims(x: Array, layout: str) -> dict[str, int]:
  """The sizes of ``x`` by dimension letter, e.g. ``{"b": 2, "k": 4, "s": 128, "h": 64}`` for ``"bksh"``."""
  return dict(zip(layout, x.shape))


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Everything about an attention call except its arrays; frozen and hashable (a static argument of ``jit``).

  Attributes:
    window: sliding-window length (the query's own position included), or None for full causal attention.
    num_sinks: keys with position ``< num_sinks`` are visible to every later query, whatever the window.
    scale: score scale; None means ``h ** -0.5`` (filled in by ``resolved``).
    kv_layout: layout of the keys: ``"bskh"`` or ``"bksh"``.
    v_layout: layout of the values: ``"bskh"``, ``"bksh"`` or ``"bkhs"``; None (at construction) means
      ``kv_layout``.
    out_dtype: dtype of the output; None means the queries' dtype (filled in by ``resolved``).
    mask_values: zero the values of slots no query sees before the weighted sum, so NaN/Inf there cannot reach
      the output. Callers that keep unused slots finite by construction may turn it off (the kernels always zero
      the values a tile does not see, whatever this says).

  Raises:
    ValueError / TypeError: at construction, for a field out of its range or of the wrong type.
  """

  window: int | None = None
  num_sinks: int = 0
  scale: float | None = None
  kv_layout: KVLayout = "bskh"
  v_layout: VLayout | None = None
  out_dtype: DTypeLike | None = None
  mask_values: bool = True

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    if self.window is not None:
      set_("window", check_int("AttentionSpec.window", self.window, 1))
    set_("num_sinks", check_int("AttentionSpec.num_sinks", self.num_sinks, 0))
    if self.scale is not None:
      if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"AttentionSpec.scale must be a real number or None, got {self.scale!r}")
      if not math.isfinite(self.scale):
        raise ValueError(f"AttentionSpec.scale must be finite, got {self.scale!r}")
      set_("scale", float(self.scale))
    if self.kv_layout not in KV_LAYOUTS:
      raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
    if self.v_layout is None:
      set_("v_layout", self.kv_layout)
    if self.v_layout not in V_LAYOUTS:
      raise ValueError(f"v_layout must be one of {V_LAYOUTS}, got {self.v_layout!r}")
    if self.out_dtype is not None:
      dt = jnp.dtype(self.out_dtype)
      if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"AttentionSpec.out_dtype must be a floating dtype, got {dt}")
      set_("out_dtype", dt)
    if not isinstance(self.mask_values, (bool, np.bool_)):
      raise TypeError(f"AttentionSpec.mask_values must be a bool, got {self.mask_values!r}")
    set_("mask_values", bool(self.mask_values))

  def replace(self, **changes) -> AttentionSpec:
    """A copy with ``changes`` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  def resolved(self, q: Array) -> AttentionSpec:
    """This spec with the defaults that depend on the queries filled in: ``scale`` and ``out_dtype``."""
    return self.replace(
      scale=q.shape[-1] ** -0.5 if self.scale is None else self.scale,
      out_dtype=q.dtype if self.out_dtype is None else self.out_dtype,
    )

  @property
  def v_slots_last(self) -> bool:
    """Whether values are laid out slots-last (``"bkhs"``)."""
    return self.v_layout == "bkhs"

  # ------------------------------------------------------------------------------------------- the mask

  def visible(self, q_pos: Int[ArrayLike, "*q"], k_pos: Int[ArrayLike, "*k"]) -> Bool[ArrayLike, "*qk"]:
    """Elementwise visibility of keys at ``k_pos`` to queries at ``q_pos`` (broadcasting arrays of positions).

    The one definition of the mask (see the module docstring); every implementation calls it.
    """
    mask = (q_pos >= 0) & (k_pos >= 0) & (k_pos <= q_pos)
    if self.window is not None:
      in_window = (q_pos - k_pos) < self.window
      if self.num_sinks:
        in_window = in_window | (k_pos < self.num_sinks)
      mask = mask & in_window
    return mask

  def excludes_all(self, qmin, qmax, kmin, kmax):
    """True when ``visible`` is false for every query position in ``[qmin, qmax]`` and key position in
    ``[kmin, kmax]``: the ranges of the valid positions of a query block and a key block (``qmax < 0`` or
    ``kmax < 0`` when a block holds no valid position). Kernels skip such block pairs.

    Exact for the corners of the ranges: no valid query or key; every key after every query (causal); every key
    older than the window for every query, and none of them a sink.
    """
    skip = (kmax < 0) | (qmax < 0) | (kmin > qmax)
    if self.window is not None:
      too_old = (qmin - kmax) >= self.window
      if self.num_sinks:
        too_old = too_old & (kmin >= self.num_sinks)
      skip = skip | too_old
    return skip

  def mask(self, q_positions: Int[Array, "b t"], k_positions: KeyPositions) -> Bool[Array, "b _ t _"]:
    """Boolean visibility ``[b, 1 | k, t, s]`` of ``k_positions [b, s]`` (or ``[b, k, s]``) to ``q_positions
    [b, t]``."""
    qp = q_positions[:, None, :, None]  # [b, 1, t, 1]
    kp = k_positions[:, None, None, :] if k_positions.ndim == 2 else k_positions[:, :, None, :]
    return self.visible(qp, kp)

  # ------------------------------------------------------------------------------------------- inputs

  def check_inputs(
    self, q: Queries, k: Keys, v: Values, q_positions: QueryPositions, k_positions: KeyPositions
  ) -> None:
    """Raises a clear ``ValueError`` / ``TypeError`` unless the arrays fit this spec and each other."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
      raise ValueError(f"q, k, v must be 4-D; got shapes {q.shape}, {k.shape}, {v.shape}")
    b, t, n, h = q.shape
    kd, vd = layout_dims(k, self.kv_layout), layout_dims(v, self.v_layout)
    if (kd["b"], vd["b"]) != (b, b):
      raise ValueError(f"batch mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if (vd["s"], vd["k"]) != (kd["s"], kd["k"]):
      raise ValueError(f"k ({self.kv_layout}) and v ({self.v_layout}) disagree on slots/heads: {k.shape}, {v.shape}")
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


class AttentionResult(NamedTuple):
  """Output of an attention implementation.

  Attributes:
    out: ``[b, t, n, h]`` attention output (dtype given by the caller; float32 for partials that will be merged).
    lse: ``[b, t, n]`` float32 natural-log sum of exp of the scaled scores; ``-inf`` for queries that see nothing.
    key_mass: attention probability each key received, summed over queries and over the query heads of its kv
      group: ``[b, s, k]`` for ``kv_layout="bskh"``, ``[b, k, s]`` for ``"bksh"``. Float32.
  """

  out: Float[Array, "b t n _"]
  lse: Float[Array, "b t n"] | None = None
  key_mass: Float[Array, "b _ _"] | None = None


def attention_mask(
  q_positions: Int[Array, "b t"], k_positions: KeyPositions, *, window: int | None = None, num_sinks: int = 0
) -> Bool[Array, "b _ t _"]:
  """Boolean visibility mask ``[b, 1 | k, t, s]`` from positions (``AttentionSpec.mask``)."""
  return AttentionSpec(window=window, num_sinks=num_sinks).mask(q_positions, k_positions)


def _grouped_scores(q, k, q_positions, k_positions, spec: AttentionSpec) -> tuple[Array, Array]:
  """Scaled float32 scores ``[b, k, g, t, s]`` (queries grouped by kv head) and the mask ``[b, 1|k, 1, t, s]``: one
  definition for ``xla_attention`` and ``key_mass``, so that XLA computes the scores once when both run."""
  b, t, n, h = q.shape
  kv_heads = layout_dims(k, spec.kv_layout)["k"]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum(f"btkgh,{spec.kv_layout}->bkgts", qg, k, preferred_element_type=jnp.float32)
  return scores * jnp.float32(spec.scale), spec.mask(q_positions, k_positions)[:, :, None]


def _key_layout(mass: Float[Array, "b k s"], spec: AttentionSpec) -> Float[Array, "b _ _"]:
  """Per-key mass ``[b, k, s]`` in the keys' layout (``[b, s, k]`` for ``"bskh"``)."""
  return jnp.moveaxis(mass, 1, 2) if spec.kv_layout == "bskh" else mass


def xla_attention(
  q: Float[Array, "b t n h"],
  k: Keys,
  v: Values,
  q_positions: Int[Array, "b t"],
  k_positions: KeyPositions,
  spec: AttentionSpec,
  *,
  return_lse: bool = True,
  return_key_mass: bool = False,
) -> AttentionResult:
  """The reference (``impl="xla"``): dense scores, masked softmax in float32. The definition of correct.

  Args:
    q, k, v, q_positions, k_positions: as for ``attention`` (not checked here: ``attention`` checks them).
    spec: the call's contract; ``scale`` and ``out_dtype`` default from ``q`` when unset.
    return_lse: fill in ``lse``.
    return_key_mass: fill in ``key_mass``.

  Returns:
    An ``AttentionResult``.
  """
  spec = spec.resolved(q)
  b, t, n, _ = q.shape
  scores, mask = _grouped_scores(q, k, q_positions, k_positions, spec)
  scores = jnp.where(mask, scores, NEG_INF)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(scores - m), 0.0)  # where(): a NaN key never leaks through exp
  denom = jnp.sum(p, axis=-1, keepdims=True)
  inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
  if spec.mask_values:  # zero the values of invisible slots: 0 * NaN would otherwise poison the sum
    seen = jnp.any(mask, axis=(2, 3))  # [b, 1|k, s]
    vis = {
      "bskh": jnp.moveaxis(seen, 1, 2)[..., None],
      "bksh": seen[..., None],
      "bkhs": seen[:, :, None, :],
    }[spec.v_layout]
    v = jnp.where(vis, v, 0)
  probs = p * inv
  out = jnp.einsum(f"bkgts,{spec.v_layout}->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out.reshape(b, t, n, out.shape[-1]).astype(spec.out_dtype)
  lse = None
  if return_lse:
    lse_ = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), NEG_INF)[..., 0]  # [b,k,g,t]
    lse = jnp.moveaxis(lse_.reshape(b, n, t), 1, 2)  # [b, t, n]
  key_mass = None
  if return_key_mass:
    key_mass = _key_layout(jnp.sum(probs, axis=(2, 3)), spec)
  return AttentionResult(out, lse, key_mass)


# --------------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Implementation:
  """A registered attention implementation.

  Attributes:
    name: the ``impl=`` name.
    fn: ``fn(q, k, v, q_positions, k_positions, spec, *, return_lse, return_key_mass) -> AttentionResult`` (the
      signature of ``xla_attention``; ``spec`` arrives resolved and the inputs checked). It raises
      ``NotImplementedError`` for configurations it does not support, so that dispatch falls back to the next
      implementation.
    platforms: platforms (``jax.default_backend()`` values) where ``impl="auto"`` considers it.
    priority: higher is tried first by ``"auto"``.
    probe: optional ``probe() -> None | reason``: compiles and checks ``fn`` on this platform. Run once per
      platform, lazily (see the module docstring); ``"auto"`` skips the implementation where it fails.
  """

  name: str
  fn: Callable[..., AttentionResult]
  platforms: tuple[str, ...] = ()
  priority: int = 0
  probe: Callable[[], str | None] | None = None


_registry: dict[str, Implementation] = {}
_probe_results: dict[tuple[str, str], str | None] = {}  # (name, platform) -> None (passed) or the reason
_plugins_loaded: set[str] = set()  # entry points (name=value) already loaded


def register(
  name: str,
  fn: Callable[..., AttentionResult],
  *,
  platforms: Sequence[str] = (),
  priority: int = 0,
  probe: Callable[[], str | None] | None = None,
) -> None:
  """Registers (or replaces) an implementation under ``name`` (see ``Implementation`` for the arguments).

  Replacing an implementation forgets its probe results.
  """
  _registry[name] = Implementation(name, fn, tuple(platforms), priority, probe)
  for key in [key for key in _probe_results if key[0] == name]:
    del _probe_results[key]


def unregister(name: str) -> None:
  """Removes the implementation registered under ``name`` (and its probe results).

  Raises:
    ValueError: if no implementation has that name.
  """
  get_implementation(name)
  del _registry[name]
  for key in [key for key in _probe_results if key[0] == name]:
    del _probe_results[key]


def _load_plugins() -> None:
  """Calls each ``jstream.attention`` entry point's registration function once (lazily, at first use).

  Raises:
    RuntimeError: when a plugin fails to load or register (retried at the next use).
  """
  for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
    key = f"{ep.name}={ep.value}"
    if key in _plugins_loaded:
      continue
    try:
      ep.load()()
    except Exception as e:
      raise RuntimeError(f"the attention plugin {ep.name!r} ({ep.value}) failed to register: {e}") from e
    _plugins_loaded.add(key)


def implementations() -> tuple[str, ...]:
  """Names of the registered implementations."""
  _load_plugins()
  return tuple(_registry)


def get_implementation(name: str) -> Implementation:
  """The implementation registered under ``name``.

  Raises:
    ValueError: if there is none.
  """
  _load_plugins()
  if name not in _registry:
    raise ValueError(
      f"unknown attention impl {name!r}; registered: {sorted(_registry)} (or 'auto'). Pallas kernels register "
      f"through the {PLUGIN_GROUP!r} entry point group of an installed package (pip install -e .)."
    )
  return _registry[name]


def _run_probe(probe: Callable[[], str | None]) -> str | None:
  """``probe()``, or the exception it raised as a reason."""
  try:
    return probe()
  except Exception as e:  # a probe is expected to return its failure; a raising one fails too
    first_line = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first_line[:200]}"


def _probe_passes(impl: Implementation, platform: str) -> bool:
  """Runs ``impl``'s probe on ``platform`` the first time it is asked (outside any trace), then its cached answer."""
  key = (impl.name, platform)
  if key not in _probe_results:
    # The first dispatch usually happens while a jit is being traced, where new arrays would be tracers of that
    # trace. JAX's trace state is per thread, so a fresh thread starts at the top level: the probe's arrays are
    # concrete, its kernels compile and run now, and nothing it creates can leak into the caller's trace.
    # (jax.ensure_compile_time_eval is not enough: it also folds the constants inside the kernels' bodies while
    # they are traced, and Pallas refuses kernels that capture constants.) Thread-local JAX settings of the
    # caller (context managers) do not apply inside the probe.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jstream-attention-probe") as pool:
      reason = pool.submit(_run_probe, impl.probe).result()
    _probe_results[key] = reason
    if reason is not None:
      warnings.warn(
        f"attention implementation {impl.name!r} did not pass its probe on {platform} ({reason}); impl='auto' "
        f"skips it. It stays available as impl={impl.name!r}.",
        RuntimeWarning,
        stacklevel=4,
      )
  return _probe_results[key] is None


def resolve(impl: str | Sequence[str] = "auto", platform: str | None = None) -> tuple[str, ...]:
  """The implementation names ``impl`` stands for, in the order dispatch tries them.

  ``"auto"`` on the current platform runs the probes of its candidates that have not run yet (see the module
  docstring); for another ``platform`` nothing is probed (it cannot be), and every candidate is listed.
  """
  _load_plugins()
  if isinstance(impl, str):
    if impl == "auto":
      current = jax.default_backend()
      platform = platform or current
      cands = sorted((i for i in _registry.values() if platform in i.platforms), key=lambda i: -i.priority)
      names = tuple(i.name for i in cands if i.probe is None or platform != current or _probe_passes(i, platform))
      return names if "xla" in names else (*names, "xla")
    names = (impl,)
  else:
    names = tuple(impl)
  for name in names:
    get_implementation(name)
  return names


register("xla", xla_attention, platforms=("cpu", "gpu", "tpu"), priority=-100)


def attention(
  q: Queries,
  k: Keys,
  v: Values,
  *,
  q_positions: QueryPositions,
  k_positions: KeyPositions,
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
) -> Float[Array, "b t n _"] | AttentionResult:
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
    NotImplementedError: when every implementation ``impl`` names declines the call.
  """
  spec = AttentionSpec(
    window=window,
    num_sinks=num_sinks,
    scale=scale,
    kv_layout=kv_layout,
    v_layout=v_layout,
    out_dtype=out_dtype,
    mask_values=mask_values,
  )
  spec.check_inputs(q, k, v, q_positions, k_positions)
  q, k, v, q_positions, k_positions = (jnp.asarray(x) for x in (q, k, v, q_positions, k_positions))
  spec = spec.resolved(q)
  errors = []
  for name in resolve(impl):
    try:
      res = _registry[name].fn(
        q, k, v, q_positions, k_positions, spec, return_lse=return_lse, return_key_mass=return_key_mass
      )
      break
    except NotImplementedError as e:
      errors.append(f"{name}: {e}")
  else:
    raise NotImplementedError("no attention implementation accepted this call: " + "; ".join(errors))
  if return_lse or return_key_mass:
    return res
  return res.out


def merge(
  parts: Sequence[tuple[Float[Array, "b t n h"], Float[Array, "b t n"]]], out_dtype=None
) -> tuple[Float[Array, "b t n h"], Float[Array, "b t n"]]:
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


def key_mass(
  q: Queries,
  k: Keys,
  lse: Float[Array, "b t n"],
  *,
  q_positions: QueryPositions,
  k_positions: KeyPositions,
  window: int | None = None,
  num_sinks: int = 0,
  scale: float | None = None,
  kv_layout: KVLayout = "bskh",
) -> Float[Array, "b _ _"]:
  """The attention mass each key receives when these keys are one part of a larger attention whose log-sum-exp is
  ``lse [b, t, n]`` (e.g. ``merge`` of this part and the query's own key kept outside the buffer): the
  probability ``exp(q . k * scale - lse)`` summed over the queries and over the query heads of the key's kv head, in
  float32. With this call's own ``lse`` it equals ``attention(..., return_key_mass=True).key_mass``.

  Arguments as for ``attention`` (no values); ``[b, s, k]`` for ``kv_layout="bskh"``, ``[b, k, s]`` for ``"bksh"``.
  XLA only: under ``jit`` the scores it recomputes are the ones an ``impl="xla"`` attention call over the same
  inputs computes, which XLA computes once.

  Raises:
    ValueError: ``lse`` not ``[b, t, n]``, or inputs ``attention`` would refuse.
  """
  spec = AttentionSpec(window=window, num_sinks=num_sinks, scale=scale, kv_layout=kv_layout)
  q_positions, k_positions = jnp.asarray(q_positions), jnp.asarray(k_positions)
  spec.check_inputs(q, k, k, q_positions, k_positions)  # the keys stand in for the values it does not take
  if tuple(lse.shape) != tuple(q.shape[:3]):
    raise ValueError(f"lse must be [b, t, n] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
  spec = spec.resolved(q)
  scores, mask = _grouped_scores(q, k, q_positions, k_positions, spec)
  b, kv_heads, g, t, _ = scores.shape
  total = jnp.moveaxis(lse.astype(jnp.float32), 1, 2).reshape(b, kv_heads, g, t)[..., None]  # [b, k, g, t, 1]
  p = jnp.where(mask & jnp.isfinite(total), jnp.exp(scores - jnp.where(jnp.isfinite(total), total, 0.0)), 0.0)
  return _key_layout(jnp.sum(p, axis=(2, 3)), spec)
