"""Pallas attention kernels for jstream, registered behind ``jstream.ops.attention.attention``.

* ``flash_prefill``: chunk / prefill flash attention (position-derived mask, block skipping, flash backward);
* ``decode``: split-K decode attention for up to 64 query rows (queries x group size), with optional per-key
  attention mass (not differentiated);
* ``reference``: the plain-jnp definitions they are tested against.

* ``flash_prefill_tpu``: the TPU (Mosaic) prefill variant, key blocks on the grid and skipped without a DMA.

Registered implementations: ``"pallas"`` (decode kernel for a few query rows, prefill kernel otherwise),
``"pallas_prefill"``, ``"pallas_decode"`` and ``"pallas_tpu"``. ``impl="auto"`` tries ``"pallas_tpu"`` (TPU)
then ``"pallas"`` (GPU and TPU) then ``"xla"``, each declining with ``NotImplementedError`` what it does not serve;
on CPU the kernels run in interpret mode when asked for by name (that is how the tests run them).
"""

from __future__ import annotations

import jax.numpy as jnp

from jstream.ops import attention as _attn
from pallas_kernels import common
from pallas_kernels.decode import MAX_DECODE_ROWS, DecodeBlockSizes, decode_attention
from pallas_kernels.flash_prefill import BlockSizes, flash_attention
from pallas_kernels.flash_prefill_tpu import flash_attention_tpu

DECODE_ROWS = 16  # "pallas" uses the decode kernel up to this many query rows (queries x group size)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check(q, k_positions):
  if k_positions.ndim != 2:
    raise NotImplementedError("per-kv-head key positions ([b, k, s]) are handled by the xla implementation")
  if q.dtype.type not in _DTYPES:
    raise NotImplementedError(f"dtype {q.dtype}")


def _make(kind: str):
  def impl(q, k, v, q_positions, k_positions, *, window, num_sinks, scale, kv_layout, v_layout, mask_values,
           out_dtype, return_lse, return_key_mass):  # fmt: skip
    del mask_values  # the kernels always zero the values of slots no query of a tile sees
    _check(q, k_positions)
    kvh = common.kv_dims(k, kv_layout)[0]
    rows = q.shape[1] * (q.shape[2] // kvh)
    interpret = common.interpret_default()
    use_decode = kind == "decode" or (kind == "auto" and rows <= DECODE_ROWS)
    kw = dict(window=window, num_sinks=num_sinks, scale=scale, kv_layout=kv_layout, v_layout=v_layout,
              out_dtype=jnp.dtype(out_dtype), interpret=interpret)  # fmt: skip
    if use_decode:
      if rows > MAX_DECODE_ROWS:
        raise NotImplementedError(f"{rows} query rows is more than the decode kernel takes ({MAX_DECODE_ROWS})")
      out, lse, mass = decode_attention(q, k, v, q_positions, k_positions, return_key_mass=return_key_mass, **kw)
      return _attn.AttentionResult(out, lse, mass)
    if return_key_mass:
      raise NotImplementedError("key mass is returned by the decode kernel only")
    out, lse = flash_attention(q, k, v, q_positions, k_positions, **kw)
    return _attn.AttentionResult(out, lse, None)

  return impl


def _tpu_impl(q, k, v, q_positions, k_positions, *, window, num_sinks, scale, kv_layout, v_layout, mask_values,
              out_dtype, return_lse, return_key_mass):  # fmt: skip
  del mask_values, return_lse
  _check(q, k_positions)
  kvh = common.kv_dims(k, kv_layout)[0]
  if return_key_mass:
    raise NotImplementedError("key mass is returned by the decode kernel only")
  if q.shape[1] * (q.shape[2] // kvh) <= DECODE_ROWS:
    raise NotImplementedError("few query rows: the split-K decode kernel serves them")
  from jax.experimental.pallas import tpu as pltpu

  interpret = pltpu.InterpretParams() if common.interpret_default() else False
  out, lse = flash_attention_tpu(q, k, v, q_positions, k_positions, window=window, num_sinks=num_sinks, scale=scale,
                                 kv_layout=kv_layout, v_layout=v_layout, out_dtype=jnp.dtype(out_dtype),
                                 interpret=interpret)  # fmt: skip
  return _attn.AttentionResult(out, lse, None)


def _probe(impl) -> str | None:
  """Compiles and runs ``impl`` once on a small case on this platform and checks it against the reference.

  Returns None when it works, else the reason. Kernels are only offered to ``impl="auto"`` on platforms where this
  passes, so a lowering problem on an untested accelerator or JAX version degrades to XLA instead of failing every
  model that uses ``"auto"``. Runs at ``import jstream`` (outside any trace), which registers the kernels.
  """
  import jax

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
        got = jax.jit(lambda q, k, v, kw=kw: _attn.attention(q, k, v, impl=impl, **kw))(*args)
      except NotImplementedError:  # a case this kernel declines: dispatch falls back for it anyway
        continue
      want = _attn.attention(*args, impl="xla", **kw)
      err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got[:2], want[:2]))
      if not err < 5e-2:  # bf16 inputs; also catches NaN
        return f"wrong result (max error {err:.2e}, t={args[0].shape[1]})"
    return None
  except Exception as e:  # lowering / compilation failures on this platform
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def register(probe: bool = True):
  """Registers the kernels with ``jstream.ops.attention`` (idempotent).

  On a GPU or TPU the kernels are first probed (``_probe``); those that fail stay available by name but are not
  chosen by ``impl="auto"`` (a warning says why).
  """
  import warnings

  import jax

  backend = jax.default_backend()
  _attn.register("pallas_tpu", _tpu_impl, platforms=("tpu",), priority=20)
  _attn.register("pallas", _make("auto"), platforms=("gpu", "tpu"), priority=10)
  _attn.register("pallas_prefill", _make("prefill"))
  _attn.register("pallas_decode", _make("decode"))
  if probe and backend in ("gpu", "tpu"):
    for name, platforms, priority in (("pallas_tpu", ("tpu",), 20), ("pallas", ("gpu", "tpu"), 10)):
      if backend not in platforms:
        continue
      reason = _probe(name)
      if reason is not None:
        impl = _attn._REGISTRY[name]
        _attn.register(name, impl.fn, platforms=(), priority=priority)
        warnings.warn(
          f"Pallas attention kernel {name!r} did not pass its probe on {backend} ({reason}); impl='auto' uses "
          f"XLA instead. It stays available as impl={name!r}.",
          RuntimeWarning,
          stacklevel=2,
        )


register()

__all__ = ["BlockSizes", "DecodeBlockSizes", "decode_attention", "flash_attention", "flash_attention_tpu", "register"]
