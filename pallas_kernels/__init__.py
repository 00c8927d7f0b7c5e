"""Pallas attention kernels for jstream, registered behind ``jstream.ops.attention.attention``.

* ``flash_prefill``: chunk / prefill flash attention (position-derived mask, block skipping, flash backward);
* ``decode``: split-K decode attention for up to 64 query rows (queries x group size), with optional per-key
  attention mass (not differentiated);
* ``flash_prefill_tpu``: the TPU (Mosaic) prefill variant, key blocks on the grid and skipped without a DMA;
* ``reference``: the plain-jnp definitions they are tested against.

Every kernel takes the call's contract as one static ``jstream.ops.attention.AttentionSpec`` (``spec=``), its
block sizes (``blocks=``) and ``interpret=``.

Registration: ``register`` is the ``jstream.attention`` entry point of this package (``pyproject.toml``); the
attention registry calls it the first time it is consulted, so importing ``jstream`` (or this package) registers,
compiles and probes nothing. Registered implementations: ``"pallas"`` (decode kernel for a few query rows, prefill
kernel otherwise), ``"pallas_prefill"``, ``"pallas_decode"`` and ``"pallas_tpu"``. ``impl="auto"`` tries
``"pallas_tpu"`` (TPU) then ``"pallas"`` (GPU and TPU) then ``"xla"``, each declining with ``NotImplementedError``
what it does not serve. Before ``"auto"`` first uses ``"pallas"`` or ``"pallas_tpu"`` on a platform, the registry
runs its ``probe`` once (compile, run, compare with XLA on small cases); a kernel that fails it is left to be asked
for by name. On CPU the kernels run in interpret mode when asked for by name (that is how the tests run them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jstream.ops import attention as A
from pallas_kernels import common
from pallas_kernels.decode import MAX_DECODE_ROWS, DecodeBlockSizes, decode_attention
from pallas_kernels.flash_prefill import BlockSizes, flash_attention
from pallas_kernels.flash_prefill_tpu import flash_attention_tpu

DECODE_ROWS = 16  # "pallas" uses the decode kernel up to this many query rows (queries x group size)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _declines(q, k, k_positions, spec: A.AttentionSpec) -> int:
  """Raises ``NotImplementedError`` for calls no kernel serves; returns the number of query rows."""
  if k_positions.ndim != 2:
    raise NotImplementedError("per-kv-head key positions ([b, k, s]) are handled by the xla implementation")
  if q.dtype.type not in _DTYPES:
    raise NotImplementedError(f"dtype {q.dtype}")
  return q.shape[1] * (q.shape[2] // common.kv_dims(k, spec)[0])


def _portable(kind: str):
  """The registry adapter of the portable kernels: ``kind`` is ``"auto"`` (by row count), ``"prefill"`` or
  ``"decode"``."""

  def impl(q, k, v, q_positions, k_positions, spec, *, return_lse, return_key_mass):
    del return_lse  # always computed
    rows = _declines(q, k, k_positions, spec)
    interpret = common.interpret_default()
    if kind == "decode" or (kind == "auto" and rows <= DECODE_ROWS):
      if rows > MAX_DECODE_ROWS:
        raise NotImplementedError(f"{rows} query rows is more than the decode kernel takes ({MAX_DECODE_ROWS})")
      out, lse, mass = decode_attention(
        q, k, v, q_positions, k_positions, spec=spec, interpret=interpret, return_key_mass=return_key_mass
      )
      return A.AttentionResult(out, lse, mass)
    if return_key_mass:
      raise NotImplementedError("key mass is returned by the decode kernel only")
    out, lse = flash_attention(q, k, v, q_positions, k_positions, spec=spec, interpret=interpret)
    return A.AttentionResult(out, lse, None)

  return impl


def _tpu(q, k, v, q_positions, k_positions, spec, *, return_lse, return_key_mass):
  """The registry adapter of the TPU prefill kernel (declines few rows and key mass)."""
  del return_lse
  rows = _declines(q, k, k_positions, spec)
  if return_key_mass:
    raise NotImplementedError("key mass is returned by the decode kernel only")
  if rows <= DECODE_ROWS:
    raise NotImplementedError("few query rows: the split-K decode kernel serves them")
  from jax.experimental.pallas import tpu as pltpu

  interpret = pltpu.InterpretParams() if common.interpret_default() else False
  out, lse = flash_attention_tpu(q, k, v, q_positions, k_positions, spec=spec, interpret=interpret)
  return A.AttentionResult(out, lse, None)


def probe(impl: str) -> str | None:
  """Compiles and runs the implementation registered as ``impl`` on small cases on this platform and compares it
  with the XLA reference.

  Returns None when it works, else the reason. The registry runs it (outside any trace) before ``impl="auto"``
  first offers ``"pallas"`` / ``"pallas_tpu"`` on a GPU or TPU, so that a lowering problem on an untested
  accelerator or JAX version degrades to XLA instead of failing every model that uses ``"auto"``.
  """

  def case(seed, t, s, q_start, *, kvh, layout, dtype, window, num_sinks):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (1, t, 4, 64), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (1, s, kvh, 64), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (1, s, kvh, 64), jnp.float32).astype(dtype)
    kp = jnp.where(jnp.arange(s) < s - 1, jnp.arange(s), -1).astype(jnp.int32)[None]  # last slot empty (trash)
    qp = jnp.arange(q_start, q_start + t, dtype=jnp.int32)[None]
    kw = dict(q_positions=qp, k_positions=kp, window=window, num_sinks=num_sinks, return_lse=True,
              out_dtype=jnp.float32)  # fmt: skip
    if layout == "cache":  # what the model passes: keys heads-first, values slots-last
      k, v = jnp.swapaxes(k, 1, 2), jnp.transpose(v, (0, 2, 3, 1))
      kw.update(kv_layout="bksh", v_layout="bkhs")
    return (q, k, v), kw

  cases = [  # a prefill chunk (public layout), single-token decode and a bf16 chunk over a ring-sized cache
    case(0, 32, 128, 96, kvh=2, layout="public", dtype=jnp.float32, window=48, num_sinks=4),
    case(1, 1, 261, 259, kvh=2, layout="cache", dtype=jnp.float32, window=256, num_sinks=4),
    case(2, 24, 261, 236, kvh=1, layout="cache", dtype=jnp.bfloat16, window=64, num_sinks=1),
  ]
  try:
    for args, kw in cases:
      try:
        got = jax.jit(functools.partial(A.attention, impl=impl, **kw))(*args)
      except NotImplementedError:  # a case this kernel declines: dispatch falls back for it anyway
        continue
      want = A.attention(*args, impl="xla", **kw)
      err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got[:2], want[:2]))
      if not err < 5e-2:  # bf16 inputs; also catches NaN
        return f"wrong result (max error {err:.2e}, t={args[0].shape[1]})"
    return None
  except Exception as e:  # lowering / compilation failures on this platform
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def register() -> None:
  """Registers the kernels with ``jstream.ops.attention`` (idempotent; the package's entry point).

  Nothing is compiled here: ``"pallas"`` and ``"pallas_tpu"`` carry ``probe`` for the registry to run lazily.
  """
  A.register("pallas_tpu", _tpu, platforms=("tpu",), priority=20, probe=functools.partial(probe, "pallas_tpu"))
  A.register(
    "pallas", _portable("auto"), platforms=("gpu", "tpu"), priority=10, probe=functools.partial(probe, "pallas")
  )
  A.register("pallas_prefill", _portable("prefill"))
  A.register("pallas_decode", _portable("decode"))


__all__ = [
  "DECODE_ROWS",
  "BlockSizes",
  "DecodeBlockSizes",
  "decode_attention",
  "flash_attention",
  "flash_attention_tpu",
  "probe",
  "register",
]
