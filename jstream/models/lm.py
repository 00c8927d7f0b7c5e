"""The streaming causal language model.

``logits, cache = model(tokens, cache)`` runs a chunk of any length (up to the cache capacity) against an
explicit cache pytree and returns the updated cache: prefill, chunked streaming and single-token decode are the
same code path, except that a single token takes a read-only path through the layers and writes the cache after
the last one (``jstream.nn.cached_attention``). ``model.forward(tokens, window=..., num_sinks=...)`` is the offline
teacher-forced reference with the mask a policy implies. Layers run as one ``lax.scan`` over stacked weights and a
stacked cache (``scan_layers``), or unrolled over per-layer weights and cache buffers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jstream import cache as cache_lib
from jstream import sharding
from jstream._compat import is_concrete as _is_concrete
from jstream.config import TransformerConfig
from jstream.nn import cached_attention
from jstream.nn.layers import Block, Modulation, RMSNorm, check_cond, modulate
from jstream.ops import attention as attn_ops
from jstream.typing import Array, ArrayLike, Float, Int, Logits, SegmentIds, TokenIds


class StreamingTransformer(nnx.Module):
  """Decoder-only transformer with explicit KV caches.

  Args:
    config: the model configuration.
    rngs: NNX random streams for initialisation.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg = config
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.embed_dim,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      embedding_init=nnx.initializers.normal(stddev=cfg.embed_dim**-0.5),
      rngs=rngs,
    )

    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return Block(cfg, rngs=rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    if cfg.cond_dim:
      self.final_modulation = Modulation(cfg.cond_dim, cfg.embed_dim, 2, param_dtype=cfg.param_dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(
        cfg.embed_dim, cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
      )

  def with_scan_layers(self, scan_layers: bool) -> StreamingTransformer:
    """The same model with its blocks stacked (``True``, one ``lax.scan``) or one set of weights per layer.

    Both structures compute the same function; stacked suits training, deep models and accelerators, per-layer
    suits single-token decode on CPU. Also converts checkpoints between the two.
    """
    if scan_layers == self.config.scan_layers:
      return self
    cfg = self.config.replace(scan_layers=scan_layers)
    new = nnx.eval_shape(lambda: StreamingTransformer(cfg, rngs=nnx.Rngs(0)))
    old = dict(nnx.to_flat_state(nnx.state(self)))
    L = self.config.num_layers
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(new)):
      if path[0] == "blocks" and scan_layers:  # stack per-layer values: ("blocks", i, ...) -> ("blocks", ...)
        value = jnp.stack([old[("blocks", i, *path[1:])].get_value() for i in range(L)])
      elif path[0] == "blocks":  # ("blocks", i, ...) <- ("blocks", ...)[i]
        value = old[("blocks", *path[2:])].get_value()[path[1]]
      else:
        value = old[path].get_value()
      flat.append((path, var.replace(value)))
    nnx.update(new, nnx.from_flat_state(flat))
    return new

  # ------------------------------------------------------------------------------------------ caches

  @property
  def cache_geometry(self) -> cache_lib.Geometry:
    """What a KV cache must match to be read by this model (layers, kv heads, head dim, stacked)."""
    cfg = self.config
    return cache_lib.Geometry(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.scan_layers)

  def init_cache(self, policy: cache_lib.Policy, batch_size: int, dtype=jnp.float32, start_position=0):
    """An empty cache for ``policy`` (``Dense``, ``Window``, ``SinkWindow``, ``Segmented``, ``Recompute``, or a
    score-evicting ``H2O`` / ``SnapKV`` / ``AgeNormalized``). For a model sharded with ``jstream.sharding`` a
    ``KVCache`` comes placed on its mesh (``sharding.cache_shardings``)."""
    g = self.cache_geometry
    cache = cache_lib.init(
      policy,
      num_layers=g.num_layers,
      batch_size=batch_size,
      num_kv_heads=g.num_kv_heads,
      head_dim=g.head_dim,
      dtype=dtype,
      start_position=start_position,
      stacked=g.stacked,
    )
    mesh = sharding.mesh_of(self.embed.embedding[...])
    if mesh is not None and isinstance(cache, cache_lib.KVCache):  # a sharded model makes sharded caches
      cache = sharding.shard_cache(cache, mesh)
    return cache

  # ------------------------------------------------------------------------------------------ helpers

  def check_tokens(self, tokens, what: str = "token") -> Int[Array, "b t"]:
    """``tokens`` as int32 ``[b, t]`` ids, or a clear error (shape, dtype, ids outside the vocabulary)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, chunk], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.shape[1] < 1:
      raise ValueError("tokens must hold at least one token per row")
    if _is_concrete(tokens):
      arr = np.asarray(tokens)
      if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
        raise ValueError(f"{what} ids must be in [0, {self.config.vocab_size}), got range [{arr.min()}, {arr.max()}]")
    return tokens.astype(jnp.int32)

  def embed_tokens(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    """Input embeddings ``[b, t, d]`` of checked int32 ids (under ``jit`` an id outside the vocabulary gives NaN)."""
    x = self.embed(tokens)
    if _is_concrete(tokens):
      return x
    # Under jit an out-of-range id would be silently clamped by the gather: poison it instead.
    bad = (tokens < 0) | (tokens >= self.config.vocab_size)
    return jnp.where(bad[..., None], jnp.nan, x)

  def _features(self, x: Float[Array, "b t d"], cond: Float[Array, "b t c"] | None = None) -> Float[Array, "b t d"]:
    """The last block's output, normalised (and modulated, in a conditioned model): the unembedding's input."""
    x = self.final_norm(x)
    if cond is not None:
      x = modulate(x, *self.final_modulation(cond))
    return x

  def unembed(self, features: Float[Array, "b t d"]) -> Logits:
    """Float32 logits of final features (``return_features`` of ``forward`` / ``extend``): the output head, or the
    embedding's transpose when tied."""
    if self.config.tie_embeddings:
      logits = self.embed.attend(features)
    else:
      logits = self.lm_head(features)
    return logits.astype(jnp.float32)

  def _head(self, x: Float[Array, "b t d"], cond: Float[Array, "b t c"] | None = None) -> Logits:
    return self.unembed(self._features(x, cond))

  def _scan_blocks(self, x: Array, carry, body):
    """Runs ``body(block, layer, x, carry) -> (x, carry, y)`` over the blocks; returns ``(x, carry, ys)`` with the
    per-layer ``y`` stacked along a leading layer axis.

    With ``scan_layers`` (stacked weights) this is one ``lax.scan``, so tracing and compile time do not grow with
    depth; otherwise a Python loop over per-layer weights (XLA:CPU copies each layer's slice of stacked weights
    and caches on every call: see ``scan_layers`` in ``jstream.config`` for what that costs in decode).
    """
    if not self.config.scan_layers:
      ys = []
      for layer, block in enumerate(self.blocks):
        x, carry, y = body(block, layer, x, carry)
        ys.append(y)
      return x, carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
    graphdef, params = nnx.split(self.blocks)

    def step(c, xs):
      x, carry = c
      p, layer = xs
      block = nnx.merge(graphdef, p)
      x, carry, y = body(block, layer, x, carry)
      return (x, carry), y

    layers = jnp.arange(self.config.num_layers, dtype=jnp.int32)
    (x, carry), ys = jax.lax.scan(step, (x, carry), (params, layers))
    return x, carry, ys

  def map_layers(self, x: Float[Array, "b t d"], attend) -> tuple[Logits, object]:
    """Runs input embeddings ``x [b, t, d]`` through the blocks with a caller's attention that reads what it needs
    itself; returns ``(logits [b, t, v], ys)``, each layer's ``y`` stacked along a leading layer axis.

    ``attend(attn, q, k, v, layer) -> (out [b, t, n, h], y)`` gets a block's ``Attention`` module, its un-rotated
    ``q``, ``k``, ``v`` and the layer index (traced under ``scan_layers``, a Python int otherwise). The extension
    point of caches that are not ``KVCache`` (``jstream.cache.scored``): a layer reads its slice of the cache
    buffers (or, for a single token, reads them in place and the caller writes after the last layer). One
    ``lax.scan`` with ``scan_layers``, else a loop over the per-layer blocks. Not for conditioned models.
    """
    check_cond(self.config.cond_dim, None, x.shape[:2])

    def body(block, layer, x, carry):
      x, y = block(x, lambda attn, q, k, v: attend(attn, q, k, v, layer))
      return x, carry, y

    x, _, ys = self._scan_blocks(x.astype(self.config.dtype), None, body)
    return self._head(x), ys

  # ------------------------------------------------------------------------------------------ calls

  def __call__(
    self, tokens: TokenIds, cache: cache_lib.Cache, *, segment_ids: SegmentIds = None
  ) -> tuple[Logits, cache_lib.Cache]:
    """Runs a chunk against the cache.

    Args:
      tokens: ``[b, t]`` int token ids; ``t`` may be anything up to the cache capacity.
      cache: from ``init_cache`` (and previous calls).
      segment_ids: optional ``[b, t]`` int32 track of each token for ``Segmented`` policies; -1 marks padding
        (not attended, not cached, no position consumed).

    Returns:
      ``(logits [b, t, v] float32, new cache)``. Rows whose stream overran the policy (a ``Dense`` cache past
      ``max_len``, absolute positions past ``2**31 - 1``) get NaN logits.

    Raises:
      ValueError / TypeError: on a wrong batch size, a chunk longer than the capacity, non-integer or
        out-of-range token ids (checked eagerly when the ids are concrete) or a cache of another model.
    """
    tokens = self.check_tokens(tokens)
    if not all(hasattr(cache, m) for m in ("check_model", "step", "batch_size", "capacity")):
      raise TypeError(
        f"expected a cache from model.init_cache (a KVCache, TokenCache or ScoreCache), got {type(cache).__name__}"
      )
    cache.check_model(self.cache_geometry)
    b, t = tokens.shape
    if b != cache.batch_size:
      raise ValueError(f"tokens have batch size {b} but the cache was built for {cache.batch_size}")
    if t > cache.capacity:
      raise ValueError(
        f"chunk of {t} tokens is longer than the cache capacity {cache.capacity} ({cache.policy}); "
        "split it into smaller chunks"
      )
    return cache.step(self, tokens, segment_ids)

  def extend(
    self,
    tokens: Int[Array, "b t"],
    cache: cache_lib.Cache,
    *,
    segment_ids: SegmentIds = None,
    groups: Int[Array, "b t"] | None = None,
    return_features: bool = False,
  ) -> tuple[Logits, cache_lib.Cache] | tuple[Logits, cache_lib.Cache, Float[Array, "b t d"]]:
    """Runs a chunk of checked int32 ``tokens [b, t]`` against a ``KVCache``: what ``model(tokens, cache)`` does
    for KV caches (through ``KVCache.step``). Same arguments and results as ``__call__``, which checks them, plus
    ``groups`` and ``return_features`` (see ``extend_embeddings``).

    A single token (``t == 1``, decode) takes a read-only path: every layer reads the cache as it was, and the
    keys and values of all layers are written after the last one (``jstream.nn.cached_attention``).
    """
    x = self.embed_tokens(tokens)
    return self.extend_embeddings(x, cache, segment_ids=segment_ids, groups=groups, return_features=return_features)

  def extend_embeddings(
    self,
    x: Float[Array, "b t d"],
    cache: cache_lib.Cache,
    *,
    segment_ids: SegmentIds = None,
    groups: Int[Array, "b t"] | None = None,
    extra_attention=None,
    extra_outputs: bool = False,
    cond: Float[Array, "b t c"] | None = None,
    return_features: bool = False,
  ) -> tuple[Logits, cache_lib.Cache] | tuple[Logits, cache_lib.Cache, object]:
    """Runs input embeddings ``x [b, t, d]`` (token embeddings, or the patch tokens of a video frame from an
    encoder) against a ``KVCache``; returns ``(logits [b, t, v], cache)`` like ``extend``. A cache that wraps a
    ``KVCache`` (``jstream.memory.MemoryCache``) runs the chunk through its own ``extend_embeddings``.

    Args:
      x: the chunk's input embeddings (in the model's compute dtype or float32).
      cache: a ``KVCache`` of this model.
      segment_ids: optional ``[b, t]`` track of each token (``Segmented`` policies; -1 = padding).
      groups: optional ``[b, t]`` int32 group ids (``jstream.cache.plan``): consecutive tokens with one id
        ``>= 0`` share one stream position and attend to each other (a frame's tokens), each taking its own cache
        slot; -1 = a token of its own. A group lies inside one chunk and one track. In ``absolute`` mode a
        group's tokens share one RoPE position; in ``cache_relative`` mode their keys are rotated at the index
        of the group's last token, so within a group distances are 0 there too.
      extra_attention: optional ``f(plan, layer, q) -> (out [b, t, n, h] f32, lse [b, t, n]) | None``: one more
        key set every layer's un-rotated queries ``q [b, t, n, h]`` attend, merged with the cache's attention by
        log-sum-exp (a memory tier beside the cache: ``jstream.memory``). ``plan`` is this chunk's
        ``jstream.cache.Plan``; ``layer`` is traced under ``scan_layers``.
      extra_outputs: ``extra_attention`` returns ``((out, lse), finish)`` instead, and ``finish(lse [b, t, n])``
        is called with the log-sum-exp of every query's logits over all it attends (cache, chunk, sink and the
        extra key set) and returns any pytree of arrays, stacked over the layers and returned third: ``(logits,
        cache, outputs)``. What a memory that scores its keys by the attention mass they receive reads
        (``jstream.memory.Scored``).
      cond: ``[b, t, cond_dim]``, the per-token conditioning of a conditioned model (``TransformerConfig.cond_dim``;
        required there, refused otherwise).
      return_features: also return the final features ``[b, t, d]`` (the unembedding's input, in the compute
        dtype): ``(logits, cache, features)``. Extra heads read them (``jstream.speculative.DraftHeads``).
    """
    if extra_outputs and (extra_attention is None or return_features):
      raise ValueError("extra_outputs needs an extra_attention and excludes return_features")
    if not isinstance(cache, cache_lib.KVCache):
      if return_features:
        raise TypeError(f"return_features needs a KVCache, got {type(cache).__name__}")
      if extra_attention is None and cond is None and hasattr(cache, "extend_embeddings"):
        return cache.extend_embeddings(self, x, segment_ids=segment_ids, groups=groups)
      raise TypeError(f"extend_embeddings takes a KVCache (or a cache that wraps one), got {type(cache).__name__}")
    if x.shape[:1] != (cache.batch_size,) or x.shape[-1] != self.config.embed_dim:
      raise ValueError(
        f"embeddings must be [b, t, d] = [{cache.batch_size}, t, {self.config.embed_dim}], got {x.shape}"
      )
    t = x.shape[1]
    cfg = self.config
    check_cond(cfg.cond_dim, cond, x.shape[:2])
    plan = cache_lib.plan(cache, segment_ids, t, groups)
    ctx = cached_attention.build(plan, head_dim=cfg.head_dim, rope_base=cfg.rope)
    kbuf = cached_attention.rerotate(plan, plan.cache.k, rope_base=cfg.rope)
    vbuf = plan.cache.v
    x = x.astype(cfg.dtype)

    def sinks(attn, layer, q):  # the learned sink and the extra key set as one partial attention, and `finish`
      extra, finish = extra_attention and extra_attention(plan, layer, q), None
      if extra_outputs:
        extra, finish = extra
      parts = [p for p in (attn.sink_part(q), extra) if p is not None]
      return (attn_ops.merge(parts) if len(parts) > 1 else (parts[0] if parts else None)), finish

    step = self._token_step if ctx.read_only else self._chunk_step
    features, kbuf, vbuf, outputs = step(x, ctx, kbuf, vbuf, sinks, cond)
    logits = jnp.where(plan.poison[:, None, None], jnp.nan, self.unembed(features))
    if _is_concrete(plan.poison) and bool(jnp.any(plan.poison)):
      raise ValueError(
        f"stream overran the cache policy {cache.policy} (a Dense cache past max_len, or absolute positions "
        "past 2**31 - 1); use a larger cache, a sliding-window policy or positions='cache_relative'"
      )
    cache = plan.after.replace(k=kbuf, v=vbuf)
    if extra_outputs:
      return logits, cache, outputs
    return (logits, cache, features) if return_features else (logits, cache)

  @staticmethod
  def _attend(ctx, kbuf, vbuf, layer, q, k, v, attn, sinks, **kw):
    """``cached_attention.attend`` with the sink / extra partial of ``sinks``; returns ``(out, kbuf, vbuf, k_rot,
    outputs)``, ``outputs`` the extra key set's ``finish(lse)`` (None without one)."""
    part, finish = sinks(attn, layer, q)
    *res, lse = cached_attention.attend(ctx, kbuf, vbuf, layer, q, k, v, sink_part=part, **kw)
    return (*res, None if finish is None else finish(lse))

  def _chunk_step(self, x, ctx, kbuf, vbuf, sinks, cond=None):
    impl = self.config.attention_impl

    def body(block, layer, x, bufs):
      def attend(attn, q, k, v):
        out, kb, vb, _, outputs = self._attend(ctx, bufs[0], bufs[1], layer, q, k, v, attn, sinks, impl=impl)
        return out, (kb, vb, outputs)

      x, (kb, vb, outputs) = block(x, attend, cond)
      return x, (kb, vb), outputs

    x, (kbuf, vbuf), outputs = self._scan_blocks(x, (kbuf, vbuf), body)
    return self._features(x, cond), kbuf, vbuf, outputs

  def _token_step(self, x0, ctx, kbuf, vbuf, sinks, cond=None):
    impl = self.config.attention_impl

    def forward(mask_values):
      def body(block, layer, x, carry):
        def attend(attn, q, k, v):
          out, _, _, k_rot, outputs = self._attend(
            ctx, kbuf, vbuf, layer, q, k, v, attn, sinks, impl=impl, mask_values=mask_values
          )
          return out, (k_rot, v, out, outputs)

        x, written = block(x, attend, cond)
        return x, carry, written

      x, _, (ks, vs, outs, outputs) = self._scan_blocks(x0, None, body)
      return self._features(x, cond), ks, vs, outputs, outs

    if cached_attention.value_guard() == "check":
      features, ks, vs, outputs, outs = forward(mask_values=False)
      features, ks, vs, outputs = jax.lax.cond(
        jnp.all(jnp.isfinite(outs)),
        lambda: (features, ks, vs, outputs),
        lambda: forward(mask_values=True)[:4],
      )
    else:
      features, ks, vs, outputs, _ = forward(mask_values=True)
    kbuf, vbuf = cached_attention.write_token(ctx, kbuf, vbuf, ks, vs, after=features)
    return features, kbuf, vbuf, outputs

  def forward(
    self,
    tokens: TokenIds,
    *,
    positions: Int[ArrayLike, "b t"] | None = None,
    window: int | None = None,
    num_sinks: int = 0,
    return_features: bool = False,
  ) -> Logits | tuple[Logits, Float[Array, "b n d"]]:
    """Offline teacher-forced forward with the mask a policy implies (the reference streaming must equal).

    Args:
      tokens: ``[b, n]`` token ids.
      positions: ``[b, n]`` int32 positions (default ``0..n-1``; -1 = padding).
      window, num_sinks: the banded mask (see ``jstream.ops.attention``).
      return_features: also return the final features ``[b, n, d]`` (the unembedding's input).

    Returns:
      ``[b, n, v]`` float32 logits (and the features).
    """
    tokens = self.check_tokens(tokens)
    return self.forward_embeddings(
      self.embed_tokens(tokens),
      positions=positions,
      window=window,
      num_sinks=num_sinks,
      return_features=return_features,
    )

  def forward_embeddings(
    self,
    x: Float[Array, "b t d"],
    *,
    positions: Int[ArrayLike, "b t"] | None = None,
    window: int | None = None,
    num_sinks: int = 0,
    policy: cache_lib.Policy | None = None,
    segment_ids: Int[ArrayLike, "b t"] | None = None,
    cond: Float[Array, "b t c"] | None = None,
    return_features: bool = False,
  ) -> Logits | tuple[Logits, Float[Array, "b t d"]]:
    """``forward`` of input embeddings ``x [b, n, d]`` (see ``extend_embeddings``). Tokens that share a position
    see each other: with the positions a ``Dense`` stream's groups imply, this is that stream offline.

    ``policy`` (instead of ``window`` / ``num_sinks``): the mask a stream under this policy has, windows counted
    in cached tokens of each track (``segment_ids`` pick a ``Segmented`` policy's track; -1 or position -1 is
    padding): the offline forward of that stream, e.g. to train with the inference attention pattern
    (StreamingVLM). ``Dense``, ``Window``, ``SinkWindow`` or ``Segmented`` of them, in the policy's position
    mode: ``cache_relative`` rotates each query and key at its track index as that stream's cache does (training
    with the positions a ``cache_relative`` stream gives).

    ``cond``: ``[b, n, cond_dim]`` per-token conditioning of a conditioned model (see ``extend_embeddings``).
    ``return_features``: return ``(logits, features [b, n, d])``, the features being the unembedding's input.
    """
    b, n = x.shape[:2]
    if x.shape[-1] != self.config.embed_dim:
      raise ValueError(f"embeddings must be [b, t, {self.config.embed_dim}], got {x.shape}")
    check_cond(self.config.cond_dim, cond, (b, n))
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    positions = jnp.asarray(positions, jnp.int32)
    cfg = self.config
    if policy is not None:
      if window is not None or num_sinks:
        raise ValueError("pass either policy or window / num_sinks, not both")
      cached_attention.check_offline_policy(policy)
      if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if segment_ids.shape != positions.shape:
          raise ValueError(f"segment_ids {segment_ids.shape} must match positions {positions.shape}")
        positions = jnp.where(segment_ids >= 0, positions, -1)
      elif isinstance(policy, cache_lib.Segmented) and len(policy.segments) > 1:
        raise ValueError("a Segmented policy with several segments needs segment_ids")
      masks = cached_attention.track_masks(policy, positions, segment_ids)
    elif segment_ids is not None:
      raise ValueError("segment_ids go with a policy")

    def body(block, layer, x, carry):
      def attend(attn, q, k, v):
        if policy is not None:
          o = cached_attention.offline_policy(
            q,
            k,
            v,
            positions,
            masks,
            rope_base=cfg.rope,
            impl=cfg.attention_impl,
            relative=policy.positions == "cache_relative",
            sink_part=attn.sink_part(q),
          )
          return o, None
        o = cached_attention.offline(
          q,
          k,
          v,
          positions,
          window=window,
          num_sinks=num_sinks,
          rope_base=cfg.rope,
          impl=cfg.attention_impl,
          sink_part=attn.sink_part(q),
        )
        return o, None

      x, _ = block(x, attend, cond)
      return x, carry, None

    x, _, _ = self._scan_blocks(x.astype(cfg.dtype), None, body)
    features = self._features(x, cond)
    logits = self.unembed(features)
    return (logits, features) if return_features else logits
