"""Plain-jnp definitions of what the kernels compute, in the kernels' own signatures.

Written to be read, not to be fast: keys and values are brought to ``[b, s, n, h]`` (kv heads repeated for
grouped-query attention), scores are formed in float32 at the highest matmul precision, and the mask is the
spec's (``AttentionSpec.visible``, the one definition of which key a query sees).

It is computed differently from ``jstream.ops.attention.xla_attention`` (the dispatcher's reference, which works
on grouped heads without repeating them); ``test_reference.py`` checks that the two agree, and the kernel tests
compare against this module and against the NumPy/float64 reference of the test base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jstream.ops.attention import AttentionSpec, Keys, Values
from jstream.typing import Array, Float, Int
from pallas_kernels import common


def _to_bsnh(x, layout: str, heads: int):
  """``x`` in ``layout`` (``bskh`` / ``bksh`` / ``bkhs``) as ``[b, s, n, h]`` with each kv head repeated."""
  x = {"bskh": lambda a: a, "bksh": lambda a: jnp.swapaxes(a, 1, 2), "bkhs": lambda a: jnp.transpose(a, (0, 3, 1, 2))}[
    layout
  ](x)
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def _probs(q, k, q_positions, k_positions, spec: AttentionSpec):
  """Softmax probabilities ``[b, n, t, s]`` (zero where masked), ``lse [b, n, t]`` and the mask ``[b, 1, t, s]``."""
  n = q.shape[2]
  kk = _to_bsnh(k, spec.kv_layout, n).astype(jnp.float32)
  vis = spec.visible(q_positions[:, :, None], k_positions[:, None, :])[:, None]
  with jax.default_matmul_precision("highest"):
    scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk) * spec.scale
  scores = jnp.where(vis, scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)  # -inf where nothing is visible
  probs = jnp.where(vis, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  return probs, lse, vis


def attention(
  q: Float[Array, "b t n h"],
  k: Keys,
  v: Values,
  q_positions: Int[Array, "b t"],
  k_positions: Int[Array, "b _"],
  *,
  spec: AttentionSpec,
) -> tuple[Float[Array, "b t n _"], Float[Array, "b t n"]]:
  """``(out [b, t, n, h], lse [b, t, n])``: what ``flash_attention`` and ``flash_attention_tpu`` return.

  A query that sees nothing gets zeros and ``lse = -inf``; masked slots never reach the output, whatever they
  hold (NaN included).
  """
  out, lse, _ = decode(q, k, v, q_positions, k_positions, spec=spec)
  return out, lse


def decode(
  q: Float[Array, "b t n h"],
  k: Keys,
  v: Values,
  q_positions: Int[Array, "b t"],
  k_positions: Int[Array, "b _"],
  *,
  spec: AttentionSpec,
  return_key_mass: bool = False,
) -> tuple[Float[Array, "b t n _"], Float[Array, "b t n"], Float[Array, "b _ _"] | None]:
  """``(out, lse, key_mass or None)``: what ``decode_attention`` returns.

  ``key_mass`` is the attention probability each slot received, summed over the queries and over the query heads
  that share its kv head: ``[b, s, k]`` for ``kv_layout="bskh"``, ``[b, k, s]`` for ``"bksh"``.
  """
  spec = spec.resolved(q)
  b, n = q.shape[0], q.shape[2]
  probs, lse, vis = _probs(q, k, q_positions, k_positions, spec)
  vv = _to_bsnh(v, spec.v_layout, n).astype(jnp.float32)
  vv = jnp.where(jnp.any(vis, axis=(1, 2))[:, :, None, None], vv, 0.0)  # slots no query sees: 0 * NaN is NaN
  with jax.default_matmul_precision("highest"):
    out = jnp.einsum("bnts,bsnh->btnh", probs, vv)
  out = out.astype(spec.out_dtype)
  lse = jnp.swapaxes(lse, 1, 2)
  if not return_key_mass:
    return out, lse, None
  kv_heads = common.kv_dims(k, spec)[0]
  mass = probs.sum(axis=2).reshape(b, kv_heads, n // kv_heads, -1).sum(axis=2)  # [b, k, s]
  return out, lse, (jnp.swapaxes(mass, 1, 2) if spec.kv_layout == "bskh" else mass)
