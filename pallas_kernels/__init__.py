"""Pallas attention kernels for jstream, registered behind ``jstream.ops.attention.attention``.

* ``flash_prefill``: chunk / prefill flash attention (position-derived mask, block skipping, flash backward);
* ``decode``: split-K decode attention for 1..16 queries per row, with optional per-key attention mass;
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


def _check(q, k_positions, return_key_mass, kind):
  if k_positions.ndim != 2:
    raise NotImplementedError("per-kv-head key positions ([b, k, s]) are handled by the xla implementation")
  if q.dtype.type not in _DTYPES:
    raise NotImplementedError(f"dtype {q.dtype}")


def _make(kind: str):
  def impl(q, k, v, q_positions, k_positions, *, window, num_sinks, scale, kv_layout, v_layout, mask_values,
           out_dtype, return_lse, return_key_mass):  # fmt: skip
    del mask_values  # the kernels always zero the values of slots no query of a tile sees
    _check(q, k_positions, return_key_mass, kind)
    kvh = k.shape[2] if kv_layout == "bskh" else k.shape[1]
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
  _check(q, k_positions, return_key_mass, "tpu")
  kvh = k.shape[2] if kv_layout == "bskh" else k.shape[1]
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


def register():
  """Registers the kernels with ``jstream.ops.attention`` (idempotent)."""
  _attn.register("pallas_tpu", _tpu_impl, platforms=("tpu",), priority=20)
  _attn.register("pallas", _make("auto"), platforms=("gpu", "tpu"), priority=10)
  _attn.register("pallas_prefill", _make("prefill"))
  _attn.register("pallas_decode", _make("decode"))


register()

__all__ = ["BlockSizes", "DecodeBlockSizes", "decode_attention", "flash_attention", "flash_attention_tpu", "register"]
