"""Plain-jnp definitions of what the kernels compute, in the kernels' own signatures.

Written to be read, not to be fast: keys and values are brought to ``[b, s, n, h]`` (kv heads repeated for
grouped-query attention), scores are formed in float32 at the highest matmul precision, and the mask is spelled
out from its definition (``jstream.ops.attention``'s module docstring):

  key j is visible to query i  iff  q_pos[i] >= 0, k_pos[j] >= 0, k_pos[j] <= q_pos[i], and
                                    (window is None or q_pos[i] - k_pos[j] < window or k_pos[j] < num_sinks).

It is independent of ``jstream.ops.attention._xla_attention`` (the dispatcher's reference, which works on
grouped heads without repeating them); ``test_reference.py`` checks that the two agree, and the kernel tests
compare against both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common


def _to_bsnh(x, layout: str, heads: int):
  """``x`` in ``layout`` (``bskh`` / ``bksh`` / ``bkhs``) as ``[b, s, n, h]`` with each kv head repeated."""
  x = {"bskh": lambda a: a, "bksh": lambda a: jnp.swapaxes(a, 1, 2), "bkhs": lambda a: jnp.transpose(a, (0, 3, 1, 2))}[
    layout
  ](x)
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def mask(q_positions, k_positions, *, window: int | None = None, num_sinks: int = 0):
  """``[b, t, s]`` boolean visibility of slot ``j`` to query ``i``."""
  qp = q_positions[:, :, None]
  kp = k_positions[:, None, :]
  seen = (qp >= 0) & (kp >= 0) & (kp <= qp)
  if window is None:
    return seen
  return seen & ((qp - kp < window) | (kp < num_sinks))


def _probs(q, k, q_positions, k_positions, *, window, num_sinks, scale, kv_layout):
  """Softmax probabilities ``[b, n, t, s]`` (zero where masked), ``lse [b, n, t]`` and the mask ``[b, 1, t, s]``."""
  n, h = q.shape[2], q.shape[3]
  kk = _to_bsnh(k, kv_layout, n).astype(jnp.float32)
  vis = mask(q_positions, k_positions, window=window, num_sinks=num_sinks)[:, None]
  with jax.default_matmul_precision("highest"):
    scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk) * (h**-0.5 if scale is None else scale)
  scores = jnp.where(vis, scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)  # -inf where nothing is visible
  probs = jnp.where(vis, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  return probs, lse, vis


def attention(
  q,
  k,
  v,
  q_positions,
  k_positions,
  *,
  window: int | None = None,
  num_sinks: int = 0,
  scale: float | None = None,
  kv_layout: str = "bskh",
  v_layout: str | None = None,
  out_dtype=None,
):
  """``(out [b, t, n, h], lse [b, t, n])``: what ``flash_attention`` returns.

  A query that sees nothing gets zeros and ``lse = -inf``; masked slots never reach the output, whatever they
  hold (NaN included).
  """
  out, lse, _ = decode(q, k, v, q_positions, k_positions, window=window, num_sinks=num_sinks, scale=scale,
                       kv_layout=kv_layout, v_layout=v_layout, out_dtype=out_dtype)  # fmt: skip
  return out, lse


def decode(
  q,
  k,
  v,
  q_positions,
  k_positions,
  *,
  window: int | None = None,
  num_sinks: int = 0,
  scale: float | None = None,
  kv_layout: str = "bskh",
  v_layout: str | None = None,
  out_dtype=None,
  return_key_mass: bool = False,
):
  """``(out, lse, key_mass or None)``: what ``decode_attention`` returns.

  ``key_mass`` is the attention probability each slot received, summed over the queries and over the query heads
  that share its kv head: ``[b, s, k]`` for ``kv_layout="bskh"``, ``[b, k, s]`` for ``"bksh"``.
  """
  b, n = q.shape[0], q.shape[2]
  probs, lse, vis = _probs(q, k, q_positions, k_positions, window=window, num_sinks=num_sinks, scale=scale,
                           kv_layout=kv_layout)  # fmt: skip
  vv = _to_bsnh(v, v_layout or kv_layout, n).astype(jnp.float32)
  vv = jnp.where(jnp.any(vis, axis=(1, 2))[:, :, None, None], vv, 0.0)  # slots no query sees: 0 * NaN is NaN
  with jax.default_matmul_precision("highest"):
    out = jnp.einsum("bnts,bsnh->btnh", probs, vv)
  out = out.astype(q.dtype if out_dtype is None else out_dtype)
  lse = jnp.swapaxes(lse, 1, 2)
  if not return_key_mass:
    return out, lse, None
  kv_heads = common.kv_dims(k, kv_layout)[0]
  mass = probs.sum(axis=2).reshape(b, kv_heads, n // kv_heads, -1).sum(axis=2)  # [b, k, s]
  return out, lse, (jnp.swapaxes(mass, 1, 2) if kv_layout == "bskh" else mass)
