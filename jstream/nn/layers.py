"""NNX building blocks of the streaming transformer: RMSNorm, SwiGLU MLP, attention projections, a block.

The blocks hold parameters only; attention itself (cache reads, masks, RoPE) is passed in as a function, so the
same block serves the cached streaming path, the offline forward and the recompute baseline.

Projections of a single row (single-token decode) on CPU split their contraction into one batched product per
core (``dot_general``): XLA:CPU runs a matrix-vector product on one thread, and the batches of a batched product
on several, so decode reads its weights with every core (``experiments/profile_decode.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jstream.config import TransformerConfig
from jstream.typing import Array, Float


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover (not on Linux)
    return os.cpu_count() or 1


SPLIT_PLATFORMS = ("cpu",)
"""Platforms whose single-row projections split their contraction (``()`` turns it off, for measurements: the
split made single-token decode about 1.6x faster on the 2-core development VM, ``experiments/profile_decode.py``).
Read when a step is traced."""


def split_parts(rows: int, contraction: int, platform: str | None = None) -> int:
  """How many partial products ``dot_general`` splits a ``[rows, contraction]`` input into: one per core for a
  single row on a ``SPLIT_PLATFORMS`` platform (each part at least 32 deep, the contraction divisible), else 1."""
  if rows != 1 or (platform or jax.default_backend()) not in SPLIT_PLATFORMS:
    return 1
  fits = [p for p in range(1, _cores() + 1) if contraction % p == 0 and contraction // p >= 32]
  return max(fits, default=1)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs) -> Array:
  """``lax.dot_general`` for projections ``x [..., i] @ kernel [i, o]`` (the ``dot_general`` of the model's
  ``nnx.Linear`` layers), with the contraction of a single row on CPU split in ``split_parts`` parts: a batched
  product of ``[p, 1, i/p] x [p, i/p, o]`` whose partial results are added in float32. Other products are plain
  ``lax.dot_general``."""
  (lc, rc), (lb, rb) = dimension_numbers
  rows = math.prod(lhs.shape[:-1])
  plain = lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or rhs.ndim != 2 or kwargs.get("out_sharding")
  parts = 1 if plain else split_parts(rows, lhs.shape[-1])
  if parts == 1:
    return jax.lax.dot_general(
      lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kwargs
    )
  i, o = rhs.shape
  out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
  partial = jax.lax.dot_general(
    lhs.reshape(parts, 1, i // parts),
    rhs.reshape(parts, i // parts, o),
    (((2,), (1,)), ((0,), (0,))),
    precision=precision,
    preferred_element_type=jnp.float32,
  )  # [p, 1, o]
  return jnp.sum(partial, axis=0).astype(out_dtype).reshape(*lhs.shape[:-1], o)


def rms_normalize(x: Float[Array, "*lead d"], eps: float = 1e-6) -> Float[Array, "*lead d"]:
  """``x`` divided by its root mean square over the last axis, computed in float32 (no learned scale)."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32 (``rms_normalize``), with a learned scale (initialised to 1)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: Float[Array, "*lead d"]) -> Float[Array, "*lead d"]:
    y = rms_normalize(x.astype(jnp.float32), self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``, with gate and up fused into one ``[d, 2f]`` projection.

  One matmul instead of two matters for single-token decode, where each matmul is a small, overhead-bound gemv.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=dot_general, rngs=rngs)
    self.mlp_dim = cfg.mlp_dim
    self.gate_up = nnx.Linear(cfg.embed_dim, 2 * cfg.mlp_dim, **kw)
    self.down = nnx.Linear(cfg.mlp_dim, cfg.embed_dim, **kw)

  def __call__(self, x: Float[Array, "*lead d"]) -> Float[Array, "*lead d"]:
    gate_up = self.gate_up(x)
    gate, up = gate_up[..., : self.mlp_dim], gate_up[..., self.mlp_dim :]
    return self.down(jax.nn.silu(gate) * up)


class Attention(nnx.Module):
  """Projections of grouped-query attention, plus the optional learned sink.

  q, k and v come from one fused ``[d, (n + 2k) h]`` projection (one matmul per token instead of three), with a
  bias when ``cfg.qkv_bias``.
  ``qkv(x [b, t, d])`` gives ``q [b, t, n, h]``, ``k, v [b, t, k, h]`` (before RoPE); ``out(o [b, t, n, h])``
  projects back to ``[b, t, d]``. ``sink_part(q)`` is the learned sink's contribution as an ``(out, lse)`` partial
  attention, or None.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
    kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=dot_general, rngs=rngs)
    self.qkv_proj = nnx.Linear(d, (n + 2 * k) * h, **{**kw, "use_bias": cfg.qkv_bias})
    self.o = nnx.Linear(n * h, d, **kw)
    self.learned_sink = cfg.learned_sink
    if cfg.learned_sink == "logit":
      self.sink_logit = nnx.Param(jnp.zeros((n,), cfg.param_dtype))
    elif cfg.learned_sink == "kv":
      init = nnx.initializers.normal(stddev=h**-0.5)
      self.sink_k = nnx.Param(init(rngs.params(), (k, h), cfg.param_dtype))
      self.sink_v = nnx.Param(init(rngs.params(), (k, h), cfg.param_dtype))

  def qkv(
    self, x: Float[Array, "b t d"]
  ) -> tuple[Float[Array, "b t n h"], Float[Array, "b t k h"], Float[Array, "b t k h"]]:
    b, t, _ = x.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = self.qkv_proj(x)
    q = qkv[..., : n * h].reshape(b, t, n, h)
    k_ = qkv[..., n * h : (n + k) * h].reshape(b, t, k, h)
    v = qkv[..., (n + k) * h :].reshape(b, t, k, h)
    return q, k_, v

  def out(self, o: Float[Array, "b t n h"]) -> Float[Array, "b t d"]:
    b, t = o.shape[:2]
    return self.o(o.reshape(b, t, self.num_heads * self.head_dim))

  def sink_part(self, q: Float[Array, "b t n h"]) -> tuple[Float[Array, "b t n h"], Float[Array, "b t n"]] | None:
    """The learned sink as a partial attention ``(out [b, t, n, h] f32, lse [b, t, n])`` (position-free)."""
    b, t, n, h = q.shape
    if self.learned_sink == "logit":
      lse = jnp.broadcast_to(self.sink_logit[...].astype(jnp.float32), (b, t, n))
      return jnp.zeros((b, t, n, h), jnp.float32), lse
    if self.learned_sink == "kv":
      g = n // self.num_kv_heads
      sk = jnp.repeat(self.sink_k[...].astype(jnp.float32), g, axis=0)  # [n, h]
      sv = jnp.repeat(self.sink_v[...].astype(jnp.float32), g, axis=0)
      lse = jnp.einsum("btnh,nh->btn", q.astype(jnp.float32), sk) * (h**-0.5)
      return jnp.broadcast_to(sv, (b, t, n, h)), lse
    return None


AttendFn = Callable[[Attention, Array, Array, Array], tuple[Array, object]]


class Modulation(nnx.Module):
  """adaLN-Zero (DiT): ``silu(cond) [..., c]`` to ``parts`` vectors of width ``d`` (shifts, scales, gates), from one
  zero-initialised projection, so a modulated block starts as the identity and the final norm as a plain norm."""

  def __init__(self, cond_dim: int, dim: int, parts: int, *, param_dtype, rngs: nnx.Rngs):
    self.parts = parts
    self.proj = nnx.Linear(
      cond_dim,
      parts * dim,
      kernel_init=nnx.initializers.zeros,
      bias_init=nnx.initializers.zeros,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, cond: Float[Array, "*lead c"]) -> list[Float[Array, "*lead d"]]:
    return jnp.split(self.proj(jax.nn.silu(cond.astype(jnp.float32))), self.parts, axis=-1)


def modulate(x: Float[Array, "*lead d"], shift: Array, scale: Array) -> Float[Array, "*lead d"]:
  """``x * (1 + scale) + shift`` in float32, back in ``x``'s dtype."""
  return (x.astype(jnp.float32) * (1.0 + scale) + shift).astype(x.dtype)


def check_cond(cond_dim: int, cond: Array | None, lead: tuple[int, ...]) -> None:
  """A clear error unless ``cond`` is ``[*lead, cond_dim]`` for a conditioned model and absent otherwise."""
  if not cond_dim:
    if cond is not None:
      raise ValueError("cond was given, but the model has no conditioning (TransformerConfig.cond_dim = 0)")
    return
  if cond is None:
    raise ValueError(f"the model is conditioned (TransformerConfig.cond_dim = {cond_dim}): pass cond [b, t, c]")
  if tuple(cond.shape) != (*lead, cond_dim):
    raise ValueError(f"cond must be [b, t, c] = {(*lead, cond_dim)}, got {tuple(cond.shape)}")


class Block(nnx.Module):
  """Pre-norm transformer block. ``attend(attn, q, k, v) -> (o, aux)`` does the attention proper.

  With ``cfg.cond_dim`` the block is modulated by a per-token ``cond [b, t, c]`` (adaLN-Zero, ``Modulation``).
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.cond_dim:
      self.modulation = Modulation(cfg.cond_dim, cfg.embed_dim, 6, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(
    self, x: Float[Array, "b t d"], attend: AttendFn, cond: Float[Array, "b t c"] | None = None
  ) -> tuple[Float[Array, "b t d"], object]:
    if cond is None:
      q, k, v = self.attn.qkv(self.attn_norm(x))
      o, aux = attend(self.attn, q, k, v)
      x = x + self.attn.out(o.astype(x.dtype))
      x = x + self.mlp(self.mlp_norm(x))
      return x, aux
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cond)
    q, k, v = self.attn.qkv(modulate(self.attn_norm(x), shift_a, scale_a))
    o, aux = attend(self.attn, q, k, v)
    x = x + (gate_a * self.attn.out(o.astype(x.dtype))).astype(x.dtype)
    x = x + (gate_m * self.mlp(modulate(self.mlp_norm(x), shift_m, scale_m))).astype(x.dtype)
    return x, aux
