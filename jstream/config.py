"""Frozen, hashable configuration dataclasses (safe to pass to ``jit`` as static arguments)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from jstream.positions import Rope, RopeScaling

LearnedSink = Literal["none", "logit", "kv"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A decoder-only causal transformer (pre-norm, RMSNorm, RoPE, grouped-query attention, SwiGLU).

  Attributes:
    vocab_size: number of token ids.
    num_layers: transformer blocks (one ``lax.scan`` over stacked weights with ``scan_layers=True``, else unrolled).
    num_heads: query heads ``n``.
    num_kv_heads: key/value heads ``k`` (``n`` must be a multiple); default ``num_heads``.
    head_dim: per-head width ``h``; default ``embed_dim // num_heads``.
    embed_dim: model width ``d``.
    mlp_dim: SwiGLU hidden width ``f``.
    rope_base: RoPE theta.
    rope_scaling: an optional ``jstream.positions.RopeScaling`` of the RoPE frequencies (linear, Llama 3.1); a dict
      of its fields is accepted (what a saved config holds).
    qkv_bias: biases on the query / key / value projections (Qwen2).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: share the input embedding with the output projection.
    learned_sink: ``"none"``; ``"logit"``, a trainable per-head logit added to every softmax (a sink with a zero
      value); or ``"kv"``, a trainable key/value per kv head that every query attends (StreamingLLM section 3.3
      in the form of a position-free sink slot).
    param_dtype: parameter storage dtype.
    dtype: compute dtype (``bfloat16`` for mixed precision; norms, softmax and logits stay float32).
    attention_impl: ``"auto"``, ``"xla"``, ``"pallas"``, another registered implementation name, or a tuple of
      names tried in order (each falls back to the next on ``NotImplementedError``, e.g. ``("pallas_tpu", "xla")``).
    scan_layers: stack the blocks' weights and run them as one ``lax.scan`` (compile time independent of depth;
      the default). ``False`` keeps one set of weights and cache buffers per layer and unrolls the loop: on CPU,
      where XLA copies a layer's slice of stacked weights and cache on every step, single-token decode of the
      benchmark's small model was 2.7x faster that way (0.665 vs 1.797 ms/token, ``benchmarks/RESULTS.md``).
    cond_dim: width of a per-token conditioning vector (0: none). With ``cond_dim > 0`` every block and the final
      norm are modulated by it, DiT's adaLN-Zero: each block maps ``silu(cond)`` to a shift, scale and gate for
      its attention and its MLP (zero-initialised, so a new block is the identity), the final norm to a shift and
      scale; every call then takes ``cond [b, t, cond_dim]`` (a diffusion model's noise level, class, action:
      ``jstream.models.video_dit``).
  """

  vocab_size: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  learned_sink: LearnedSink = "none"
  param_dtype: str = "float32"
  dtype: str = "float32"
  attention_impl: str | tuple[str, ...] = "auto"
  scan_layers: bool = True
  cond_dim: int = 0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False

  def __post_init__(self):
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise TypeError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
    for name in ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"TransformerConfig.{name} must be a positive int, got {v!r}")
    if not isinstance(self.cond_dim, int) or isinstance(self.cond_dim, bool) or self.cond_dim < 0:
      raise ValueError(f"TransformerConfig.cond_dim must be an int >= 0, got {self.cond_dim!r}")
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.embed_dim % self.num_heads:
        raise ValueError(f"embed_dim ({self.embed_dim}) is not divisible by num_heads ({self.num_heads}); set head_dim")
      object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
    if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads ({self.num_heads}) must be a positive multiple of num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim < 2 or self.head_dim % 2:
      raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
    impl = self.attention_impl
    if not isinstance(impl, str):  # a sequence of names: a tuple, so that the config stays hashable
      impl = tuple(impl) if isinstance(impl, (list, tuple)) else impl
      if not isinstance(impl, tuple) or not impl or not all(isinstance(n, str) and n for n in impl):
        raise ValueError(f"attention_impl must be a name or a non-empty sequence of names, got {impl!r}")
      object.__setattr__(self, "attention_impl", impl)
    elif not impl:
      raise ValueError("attention_impl must not be empty")
    if self.learned_sink not in ("none", "logit", "kv"):
      raise ValueError(f"learned_sink must be 'none', 'logit' or 'kv', got {self.learned_sink!r}")
    for name in ("param_dtype", "dtype"):
      dt = jnp.dtype(getattr(self, name))
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"TransformerConfig.{name} must be a floating dtype, got {dt}")
      object.__setattr__(self, name, dt.name)

  @property
  def rope(self) -> Rope:
    """The RoPE frequencies (base and scaling) that every attention path of the model rotates with."""
    return Rope(float(self.rope_base), self.rope_scaling)

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> TransformerConfig:
    return dataclasses.replace(self, **kw)
