"""Pallas attention kernels for jstream, registered behind ``jstream.ops.attention.attention``.

* ``flash_prefill``: chunk / prefill flash attention (position-derived mask, block skipping, flash backward);
* ``decode``: split-K decode attention for 1..16 queries per row, with optional per-key attention mass;
* ``reference``: the plain-jnp definitions they are tested against.

Registered implementations: ``"pallas"`` (decode kernel for a few query rows, prefill kernel otherwise),
``"pallas_prefill"`` and ``"pallas_decode"``. ``impl="auto"`` picks ``"pallas"`` on GPU and TPU; on CPU the
kernels run in interpret mode when asked for by name (that is how the tests run them).
"""

from __future__ import annotations

import jax.numpy as jnp

from jstream.ops import attention as _attn
from pallas_kernels import common
from pallas_kernels.decode import MAX_DECODE_ROWS, DecodeBlockSizes, decode_attention
from pallas_kernels.flash_prefill import BlockSizes, flash_attention

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


def register():
  """Registers the kernels with ``jstream.ops.attention`` (idempotent)."""
  _attn.register("pallas", _make("auto"), platforms=("gpu", "tpu"), priority=10)
  _attn.register("pallas_prefill", _make("prefill"))
  _attn.register("pallas_decode", _make("decode"))


register()

__all__ = ["BlockSizes", "DecodeBlockSizes", "decode_attention", "flash_attention", "register"]
