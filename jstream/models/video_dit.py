"""A block-causal video diffusion transformer (rectified flow) over an explicit, rolling KV cache.

The model generates video a *chunk* (``frames_per_chunk`` frames) at a time, as CausVid and Self Forcing do: a
chunk's noisy frames are patch tokens that attend to each other fully and causally to the cache of clean past
frames; a few denoising steps each call the model on the chunk against the cache and throw the updated cache
away (a cache is a value: a call that is not kept writes nothing); then the clean chunk is run once more at noise
level 0 and *that* cache is kept (``commit``, the "timestep-zero" pass), so the cache always holds the keys and
values of clean frames.

It is the engine's ``StreamingTransformer`` with adaLN-Zero conditioning (``TransformerConfig.cond_dim``): a
chunk is one *group* (``jstream.cache.plan``), so its tokens share one stream position and see each other, and
positions count chunks; a learned embedding of each patch's place (and of each frame's place in its chunk, when a
chunk holds several) tells the tokens apart. Every token is conditioned on its frame's noise level (sinusoidal
features and an MLP), plus an optional class label per stream and an optional discrete action per frame
(action-conditioned generation, MotionStream / NFD style). The transformer's output head maps each token back to
its patch's pixels: the predicted velocity. The label ``NULL_LABEL`` (-1) means "no label": a model trained with
label dropout (``training_loss(label_dropout=...)``) learns the unconditional velocity under it, and the samplers
take a classifier-free ``guidance`` scale (Ho & Salimans; the guided teacher of CausVid / Self Forcing's DMD):
``v = v(null) + w (v(label) - v(null))``, both branches run as one batch of ``2 b`` rows. Under a KV cache the
branches' keys differ (the label conditions every layer), so a guided stream keeps a *paired* cache: rows ``[0, b)``
committed with the labels, rows ``[b, 2 b)`` with ``NULL_LABEL`` (``VideoDiT.init_cache(..., guided=True)``).

Caches are the engine's: ``Dense`` while the video fits, ``Window`` / ``SinkWindow`` of whole chunks to roll for ever
(LongLive / Rolling Forcing / MotionStream: frame sinks and a rolling window, ``cache_relative`` positions so that
positions stay in the range seen in training); ``rolling_policy`` builds them counted in frames.

Frames are ``[b, n, H, W, C]`` floats in [0, 1]; the model works on ``2 x - 1`` (``to_model`` / ``from_model``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jstream import cache as cache_lib
from jstream import flow
from jstream._compat import is_concrete
from jstream.config import TransformerConfig
from jstream.models.lm import StreamingTransformer
from jstream.typing import Array, ArrayLike, Float, Int

NULL_LABEL = -1
"""The label id of the unconditional branch: no class embedding is added (classifier-free guidance)."""


@dataclasses.dataclass(frozen=True)
class VideoDiTConfig:
  """A block-causal video diffusion transformer (frozen, hashable).

  Attributes:
    frame_size: ``(H, W)`` of a frame.
    channels: channels per pixel (1: grey, 3: RGB).
    patch_size: side of a square patch; ``H`` and ``W`` must be multiples. A frame is one token per patch.
    frames_per_chunk: frames denoised together (full attention among them); the unit of cache writes.
    embed_dim, num_layers, num_heads, num_kv_heads, mlp_dim: the transformer's sizes.
    num_classes: class labels a stream may be conditioned on (0: none); ``NULL_LABEL`` (-1) is always accepted as
      "no label".
    num_actions: discrete actions a frame may be conditioned on (0: none); the action of frame ``i`` is the one
      taken *before* it (the one that led to it).
    rope_base, dtype, param_dtype, attention_impl, scan_layers: as in ``TransformerConfig``.
  """

  frame_size: tuple[int, int] = (32, 32)
  channels: int = 1
  patch_size: int = 8
  frames_per_chunk: int = 1
  embed_dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_dim: int = 384
  num_classes: int = 0
  num_actions: int = 0
  rope_base: float = 10_000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str | tuple[str, ...] = "auto"
  scan_layers: bool = True

  def __post_init__(self):
    h, w = self.frame_size
    if self.patch_size < 1 or h % self.patch_size or w % self.patch_size:
      raise ValueError(f"frame_size {self.frame_size} must be multiples of patch_size {self.patch_size}")
    for name in ("channels", "frames_per_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"VideoDiTConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("num_classes", "num_actions"):
      if getattr(self, name) < 0:
        raise ValueError(f"VideoDiTConfig.{name} must be >= 0, got {getattr(self, name)}")
    self.transformer  # validates the transformer's sizes  # noqa: B018

  @property
  def tokens_per_frame(self) -> int:
    h, w = self.frame_size
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def chunk_tokens(self) -> int:
    """Tokens of one chunk: the unit every cache policy of this model must count in."""
    return self.frames_per_chunk * self.tokens_per_frame

  @property
  def patch_dim(self) -> int:
    """Values of one patch (``patch_size^2 * channels``): the width of a token's input and output."""
    return self.patch_size * self.patch_size * self.channels

  @property
  def transformer(self) -> TransformerConfig:
    """The transformer: its token table ``[patch_dim, d]`` is the linear patch embedding, its (untied) output head
    maps a token to its patch's velocity, and every token is conditioned (``cond_dim = embed_dim``)."""
    return TransformerConfig(
      vocab_size=self.patch_dim,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      embed_dim=self.embed_dim,
      mlp_dim=self.mlp_dim,
      rope_base=self.rope_base,
      tie_embeddings=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_impl=self.attention_impl,
      scan_layers=self.scan_layers,
      cond_dim=self.embed_dim,
    )


def rolling_policy(config: VideoDiTConfig, window_frames: int | None, sink_frames: int = 0) -> cache_lib.Policy:
  """A cache policy counted in frames: ``Window`` of the last ``window_frames`` frames (the chunk being denoised
  included), after ``sink_frames`` frame sinks (``SinkWindow``: the first frames stay for ever, LongLive /
  Rolling Forcing), or ``Dense`` for ``window_frames=None`` (``sink_frames`` then is the longest video). Both
  counts must be whole chunks."""
  k, f = config.frames_per_chunk, config.tokens_per_frame
  for name, n in (("window_frames", window_frames), ("sink_frames", sink_frames)):
    if n is not None and (n < 0 or n % k):
      raise ValueError(f"{name} ({n}) must be a non-negative multiple of frames_per_chunk ({k})")
  rel = "cache_relative"
  if window_frames is None:
    return cache_lib.Dense(max(sink_frames, k) * f, positions=rel)
  if window_frames < k:
    raise ValueError(f"window_frames ({window_frames}) must hold at least one chunk ({k} frames)")
  if sink_frames:
    return cache_lib.SinkWindow(sink_frames * f, window_frames * f, positions=rel)
  return cache_lib.Window(window_frames * f, positions=rel)


def check_policy(config: VideoDiTConfig, policy: cache_lib.Policy) -> None:
  """A clear error unless ``policy`` is a single-track KV policy counted in whole chunks (its window, sinks and
  length multiples of ``chunk_tokens``) with ``cache_relative`` positions, without spare rollback slots.

  Why ``cache_relative`` only: there a key's RoPE index is its track index, so chunks sit ``chunk_tokens`` apart,
  as in the training forward (``VideoDiT.forward``); ``absolute`` streams number the chunks 0, 1, 2, ... (a
  group takes one stream position), distances the model was never trained on. With frame sinks it is also what
  keeps the sinks next to the window (LongLive, Rolling Forcing) instead of ever further away."""
  if not isinstance(policy, (cache_lib.Dense, cache_lib.Window, cache_lib.SinkWindow)):
    raise ValueError(f"a video diffusion cache is Dense, Window or SinkWindow (see rolling_policy), got {policy}")
  if policy.positions != "cache_relative":
    raise ValueError(
      f"a video diffusion cache needs positions='cache_relative' (chunks chunk_tokens apart, as in training), "
      f"got {policy}; use rolling_policy"
    )
  c = config.chunk_tokens
  sizes = {
    "max_len": getattr(policy, "max_len", None),
    "window": getattr(policy, "window", None),
    "num_sinks": getattr(policy, "num_sinks", None),
  }
  for name, n in sizes.items():
    if n is not None and n % c:
      raise ValueError(
        f"{type(policy).__name__}.{name} = {n} is not a whole number of chunks of {c} tokens "
        f"({config.frames_per_chunk} frames x {config.tokens_per_frame} patches); use rolling_policy"
      )
  if getattr(policy, "max_rollback", 0) and isinstance(policy, (cache_lib.Window, cache_lib.SinkWindow)):
    raise ValueError(f"{policy}: a video diffusion cache takes no rollback slots")


def to_model(frames: ArrayLike) -> Array:
  """Frames in [0, 1] to the model's range [-1, 1]."""
  return 2.0 * jnp.asarray(frames, jnp.float32) - 1.0


def from_model(x: ArrayLike) -> Array:
  """The model's range to frames in [0, 1] (clipped)."""
  return jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def timestep_features(t: Float[Array, "*lead"], dim: int, scale: float = 1000.0) -> Float[Array, "*lead dim"]:
  """Sinusoidal features ``[..., dim]`` of noise levels ``t`` in [0, 1] (scaled by ``scale``, DiT's convention)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  arg = jnp.asarray(t, jnp.float32)[..., None] * scale * freqs
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


class VideoDiT(nnx.Module):
  """A block-causal video diffusion transformer (see the module docstring).

  Args:
    config: the model configuration.
    rngs: NNX random streams for initialisation.
  """

  def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.embed_dim
    pd = config.param_dtype
    self.dit = StreamingTransformer(config.transformer, rngs=rngs)
    init = nnx.initializers.normal(stddev=d**-0.5)
    self.place = nnx.Param(init(rngs.params(), (config.tokens_per_frame, d), pd))
    if config.frames_per_chunk > 1:
      self.frame_in_chunk = nnx.Param(init(rngs.params(), (config.frames_per_chunk, d), pd))
    self.time_in = nnx.Linear(d, d, param_dtype=pd, rngs=rngs)
    self.time_out = nnx.Linear(d, d, param_dtype=pd, rngs=rngs)
    if config.num_classes:
      self.class_embed = nnx.Embed(config.num_classes, d, param_dtype=pd, rngs=rngs)
    if config.num_actions:
      self.action_embed = nnx.Embed(config.num_actions, d, param_dtype=pd, rngs=rngs)

  # ---------------------------------------------------------------------------------------------- caches

  def init_cache(
    self, policy: cache_lib.Policy, batch_size: int, dtype=jnp.float32, *, guided: bool = False
  ) -> cache_lib.KVCache:
    """An empty cache for ``policy`` (``rolling_policy``; any ``Dense`` / ``Window`` / ``SinkWindow`` counted in
    whole chunks). ``guided``: the paired cache of ``batch_size`` guided streams (``2 * batch_size`` rows: the
    conditioned branch, then the unconditional one; see the module docstring)."""
    check_policy(self.config, policy)
    if guided and not self.config.num_classes:
      raise ValueError("a guided cache needs a class-conditioned model (num_classes > 0)")
    return self.dit.init_cache(policy, 2 * batch_size if guided else batch_size, dtype=dtype)

  # ---------------------------------------------------------------------------------------------- tokens

  def patchify(self, x: Float[Array, "b n H W C"]) -> Float[Array, "b n p q"]:
    """Patch values ``[b, n, tokens_per_frame, patch_dim]`` of frames ``[b, n, H, W, C]`` (row-major patches)."""
    c = self.config
    b, n, h, w, ch = x.shape
    s = c.patch_size
    x = x.reshape(b, n, h // s, s, w // s, s, ch).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, n, (h // s) * (w // s), s * s * ch)

  def unpatchify(self, p: Float[Array, "b n p q"]) -> Float[Array, "b n H W C"]:
    """The inverse of ``patchify``."""
    c = self.config
    b, n = p.shape[:2]
    (h, w), s, ch = c.frame_size, c.patch_size, c.channels
    x = p.reshape(b, n, h // s, w // s, s, s, ch).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, n, h, w, ch)

  def check_frames(self, x: Array, what: str = "frames") -> Array:
    """``x`` as ``[b, n, H, W, C]`` floats with ``n`` whole chunks, or a clear error."""
    c = self.config
    x = jnp.asarray(x)
    if x.ndim != 5 or tuple(x.shape[2:]) != (*c.frame_size, c.channels):
      raise ValueError(f"{what} must be [b, n, {c.frame_size[0]}, {c.frame_size[1]}, {c.channels}], got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{what} must be floats, got {x.dtype} (divide uint8 frames by 255)")
    if x.shape[1] < 1 or x.shape[1] % c.frames_per_chunk:
      raise ValueError(f"{what} hold {x.shape[1]} frames, not a whole number of chunks of {c.frames_per_chunk}")
    return x

  def check_conditioning(self, labels, actions, b: int, n: int) -> tuple[Array | None, Array | None]:
    """``(labels [b], actions [b, n])`` as arrays, or a clear error: each given exactly when the model is
    conditioned on it, integer, of that shape, ids in range (checked when concrete)."""
    c = self.config
    if (labels is None) != (c.num_classes == 0):
      raise ValueError(
        f"labels [b] are required for a class-conditioned model and refused otherwise (num_classes = {c.num_classes})"
      )
    if (actions is None) != (c.num_actions == 0):
      raise ValueError(
        f"actions [b, n] are required for an action-conditioned model and refused otherwise "
        f"(num_actions = {c.num_actions})"
      )
    if labels is not None:
      labels = jnp.asarray(labels)
      if labels.shape != (b,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be int [b] = [{b}], got {labels.dtype} {labels.shape}")
      _check_range("label", labels, c.num_classes, low=NULL_LABEL)
    if actions is not None:
      actions = jnp.asarray(actions)
      if actions.shape != (b, n) or not jnp.issubdtype(actions.dtype, jnp.integer):
        raise ValueError(f"actions must be int [b, n] = [{b}, {n}], got {actions.dtype} {actions.shape}")
      _check_range("action", actions, c.num_actions)
    return labels, actions

  def tokens(
    self,
    x: Float[Array, "b n H W C"],
    t: Float[ArrayLike, "..."] | float,
    labels: Int[Array, " b"] | None = None,
    actions: Int[Array, "b n"] | None = None,
  ) -> tuple[Float[Array, "b s d"], Float[Array, "b s d"], Int[Array, "b s"]]:
    """The transformer's inputs for ``n`` frames in the model's range at noise levels ``t``: ``(x [b, n * P, d],
    cond [b, n * P, d], groups [b, n * P])``, one group per chunk."""
    c = self.config
    x = self.check_frames(x)
    b, n = x.shape[:2]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b, n))
    labels, actions = self.check_conditioning(labels, actions, b, n)
    p, d, k = c.tokens_per_frame, c.embed_dim, c.frames_per_chunk
    table = self.dit.embed.embedding[...]  # [patch_dim, d]: the linear patch embedding
    h = jnp.einsum("bnpq,qd->bnpd", self.patchify(x).astype(table.dtype), table) + self.place[...]
    if k > 1:
      h = h + jnp.tile(self.frame_in_chunk[...], (n // k, 1))[None, :, None]
    cond = self.time_out(jax.nn.silu(self.time_in(timestep_features(t, d))))  # [b, n, d]
    if labels is not None:  # NULL_LABEL adds nothing
      emb = self.class_embed(jnp.maximum(labels, 0))
      cond = cond + jnp.where((labels >= 0)[:, None], emb, 0.0).astype(cond.dtype)[:, None]
    if actions is not None:
      cond = cond + self.action_embed(actions)
    cond = jnp.broadcast_to(cond[:, :, None], (b, n, p, d)).reshape(b, n * p, d)
    groups = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None] // k, (n, p)).reshape(1, n * p)
    return h.reshape(b, n * p, d), cond, jnp.broadcast_to(groups, (b, n * p))

  # ---------------------------------------------------------------------------------------------- calls

  def velocity(
    self,
    x: Float[Array, "b k H W C"],
    t: Float[ArrayLike, "..."] | float,
    cache: cache_lib.KVCache,
    *,
    labels: Int[Array, " b"] | None = None,
    actions: Int[Array, "b k"] | None = None,
  ) -> tuple[Float[Array, "b k H W C"], cache_lib.KVCache]:
    """Runs one chunk (``frames_per_chunk`` frames in the model's range, at noise levels ``t``) against the cache;
    returns ``(velocity [b, k, H, W, C] float32, cache with the chunk written)``. A denoising step keeps the
    velocity and drops the cache; ``commit`` keeps the cache of the clean chunk."""
    if jnp.shape(x)[1:2] != (self.config.frames_per_chunk,):
      raise ValueError(f"a chunk is {self.config.frames_per_chunk} frames, got {jnp.shape(x)}")
    h, cond, groups = self.tokens(x, t, labels, actions)
    out, cache = self.dit.extend_embeddings(h, cache, groups=groups, cond=cond)
    b, k = x.shape[:2]
    return self.unpatchify(out.reshape(b, k, self.config.tokens_per_frame, -1)), cache

  def commit(
    self,
    x0: Float[Array, "b k H W C"],
    cache: cache_lib.KVCache,
    *,
    labels: Int[Array, " b"] | None = None,
    actions: Int[Array, "b k"] | None = None,
    guidance: float = 1.0,
  ) -> cache_lib.KVCache:
    """Writes a clean chunk (model range) into the cache: the model run on it at noise level 0. A stream sampled
    with ``guidance != 1`` keeps a paired cache: the chunk goes into both halves, each with its branch's label."""
    check_guidance(self.config, guidance)
    if guidance != 1.0:
      (labels, actions), x0 = paired(labels, actions), pair(x0)
    return self.velocity(x0, 0.0, cache, labels=labels, actions=actions)[1]

  def forward(
    self,
    x: Float[Array, "b n H W C"],
    t: Float[ArrayLike, "..."] | float,
    *,
    labels: Int[Array, " b"] | None = None,
    actions: Int[Array, "b n"] | None = None,
    policy: cache_lib.Policy | None = None,
    guidance: float = 1.0,
  ) -> Float[Array, "b n H W C"]:
    """Offline velocities ``[b, n, H, W, C]`` of ``n`` frames (whole chunks) at per-frame noise levels ``t``, with
    the block-causal mask: each chunk sees itself and the chunks before it (under a ``Dense`` or ``Window``
    ``policy``, only those a stream under it would keep). Chunk ``c`` sits at position ``c * chunk_tokens``, a
    stream's ``cache_relative`` spacing. This is the training forward (diffusion forcing: a noise level per
    chunk), and, with clean frames at ``t = 0`` before a noisy chunk, what a stream computes for that chunk.
    ``guidance != 1``: the classifier-free guided velocity, both branches in one call of ``2 b`` rows (the guided
    teacher of ``jstream.models.self_forcing``; the no-cache baseline of ``jstream bench video-gen``).

    ``policy`` (``rolling_policy``; ``cache_relative``, as every video diffusion cache): its frame sinks sit next to
    the window, as in the stream (``StreamingTransformer.forward_embeddings`` emulates the cache's positions).
    """
    check_guidance(self.config, guidance)
    if guidance != 1.0:
      pl, pa = paired(labels, actions)
      t = pair(jnp.broadcast_to(jnp.asarray(t, jnp.float32), jnp.shape(x)[:2]))
      return combine(self.forward(pair(x), t, labels=pl, actions=pa, policy=policy), guidance)
    h, cond, groups = self.tokens(x, t, labels, actions)
    b, n = x.shape[:2]
    positions = groups * self.config.chunk_tokens  # a chunk is a group: one position, seen whole
    if policy is not None:
      check_policy(self.config, policy)
    out = self.dit.forward_embeddings(h, positions=positions, policy=policy, cond=cond)
    return self.unpatchify(out.reshape(b, n, self.config.tokens_per_frame, -1))

  def denoise(
    self,
    cache: cache_lib.KVCache,
    noise: Float[Array, "b k H W C"],
    times: Float[Array, " m"],
    *,
    labels: Int[Array, " b"] | None = None,
    actions: Int[Array, "b k"] | None = None,
    guidance: float = 1.0,
  ) -> Float[Array, "b k H W C"]:
    """One chunk sampled from ``noise`` along the time grid ``times`` (``flow.schedule``) with Euler steps, each a
    call against the (unchanged) cache; returns the clean chunk in the model's range. With ``guidance != 1`` the
    cache is a paired one (``init_cache(..., guided=True)``, ``2 b`` rows for ``b`` rows of ``noise``) and each
    step is one call on both branches."""
    check_guidance(self.config, guidance)

    def v(x, t):
      if guidance == 1.0:
        return self.velocity(x, t, cache, labels=labels, actions=actions)[0]
      pl, pa = paired(labels, actions)
      return combine(self.velocity(pair(x), t, cache, labels=pl, actions=pa)[0], guidance)

    return flow.euler(v, noise, times)


def _check_range(what: str, ids: Array, n: int, low: int = 0) -> None:
  if is_concrete(ids) and ids.size:
    arr = np.asarray(ids)
    if arr.min() < low or arr.max() >= n:
      raise ValueError(f"{what} ids must be in [{low}, {n}), got range [{arr.min()}, {arr.max()}]")


def check_guidance(config: VideoDiTConfig, guidance: float) -> None:
  """A clear error unless ``guidance`` is a finite real number and, when it is not 1, the model is
  class-conditioned."""
  if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
    raise ValueError(f"guidance must be a finite float (1: no guidance), got {guidance!r}")
  if guidance != 1.0 and not config.num_classes:
    raise ValueError(f"classifier-free guidance ({guidance}) needs a class-conditioned model (num_classes > 0)")


def check_guided_labels(labels) -> Array:
  """``labels`` as an array, or a clear error for none, or for ``NULL_LABEL`` among them (checked when concrete):
  both branches of that row would be the unconditional one, silently unguided."""
  if labels is None:
    raise ValueError("classifier-free guidance needs labels [b] (a class-conditioned model)")
  labels = jnp.asarray(labels)
  if is_concrete(labels) and labels.size and int(np.min(np.asarray(labels))) < 0:
    raise ValueError(f"guided streams need a real label per row (>= 0), got {np.asarray(labels).tolist()}")
  return labels


def pair(x: Array) -> Array:
  """``x`` for both branches of a guided call: ``[x; x]`` along the batch axis."""
  return jnp.concatenate([x, x], axis=0)


def paired(labels: Array | None, actions: Array | None) -> tuple[Array, Array | None]:
  """The conditioning of a guided call's ``2 b`` rows: the labels then ``NULL_LABEL``; actions for both
  (``check_guided_labels`` first)."""
  labels = check_guided_labels(labels)
  null = jnp.full_like(labels, NULL_LABEL)
  return jnp.concatenate([labels, null]), None if actions is None else pair(jnp.asarray(actions))


def combine(v: Array, guidance: float) -> Array:
  """The guided velocity ``v_u + w (v_c - v_u)`` of a guided call's ``2 b`` rows (conditioned rows first)."""
  v_c, v_u = jnp.split(v, 2, axis=0)
  return v_u + guidance * (v_c - v_u)


def training_inputs(
  x0: Float[Array, "b n H W C"],
  rng: Array,
  frames_per_chunk: int,
  *,
  objective: str = "diffusion_forcing",
  time_sampling: str = "logit_normal",
  time_shift: float = 1.0,
) -> tuple[Array, Array, Array, Array]:
  """The noised clip of a training step: ``(x_t, t [b, n], noise, weight [b, n])`` for clean frames ``x0`` in the
  model's range (whole chunks; ``t`` and ``weight`` per frame, constant over a chunk).

  ``"diffusion_forcing"``: every chunk at its own noise level, weight 1 everywhere. ``"teacher_forcing"``: one chunk
  per clip (uniformly drawn) at a drawn level, weight 1 there and 0 elsewhere; every other chunk clean (``t = 0``):
  those before it are the clean context a stream's cache holds, those after it cannot reach it (block-causal)."""
  b, n = x0.shape[:2]
  k = frames_per_chunk
  m = n // k
  rng_t, rng_e, rng_c = jax.random.split(rng, 3)
  t = flow.sample_times(rng_t, (b, m), kind=time_sampling, shift=time_shift)
  if objective == "diffusion_forcing":
    weight = jnp.ones((b, m), jnp.float32)
  elif objective == "teacher_forcing":
    target = jax.random.randint(rng_c, (b,), 0, m)
    weight = (jnp.arange(m)[None] == target[:, None]).astype(jnp.float32)
    t = t * weight
  else:
    raise ValueError(f"objective must be 'diffusion_forcing' or 'teacher_forcing', got {objective!r}")
  t, weight = jnp.repeat(t, k, axis=1), jnp.repeat(weight, k, axis=1)
  noise = jax.random.normal(rng_e, x0.shape, jnp.float32)
  return flow.noised(x0, noise, t), t, noise, weight


def drop_labels(labels: Int[Array, " b"], rng: Array, rate: float) -> Int[Array, " b"]:
  """``labels`` with each replaced by ``NULL_LABEL`` with probability ``rate`` (label dropout, for guidance)."""
  labels = jnp.asarray(labels)
  return jnp.where(jax.random.uniform(rng, labels.shape) < rate, NULL_LABEL, labels)


def training_loss(
  model: VideoDiT,
  frames: Float[Array, "b n H W C"],
  rng: Array,
  *,
  labels: Int[Array, " b"] | None = None,
  actions: Int[Array, "b n"] | None = None,
  objective: str = "diffusion_forcing",
  time_sampling: str = "logit_normal",
  time_shift: float = 1.0,
  label_dropout: float = 0.0,
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """The flow-matching loss of a clip of ``frames`` in [0, 1] (whole chunks), noised by ``training_inputs``, from
  one block-causal forward, and metrics: ``loss``, ``loss_low_noise`` / ``loss_high_noise`` (the weighted frames
  below / above ``t = 0.5``), ``tokens`` (weighted tokens). ``label_dropout``: the share of clips whose label is
  replaced by ``NULL_LABEL`` (drawn per clip), so that the model also learns the unconditional velocity that
  classifier-free guidance needs."""
  cfg = model.config
  if not 0.0 <= label_dropout < 1.0:
    raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
  if label_dropout and labels is None:
    raise ValueError("label_dropout needs labels (a class-conditioned model)")
  if label_dropout:
    rng, rng_d = jax.random.split(rng)
    labels = drop_labels(labels, rng_d, label_dropout)
  x0 = to_model(frames)
  xt, t, noise, weight = training_inputs(
    x0, rng, cfg.frames_per_chunk, objective=objective, time_sampling=time_sampling, time_shift=time_shift
  )
  v = model.forward(xt, t, labels=labels, actions=actions)
  loss = flow.loss(v, x0, noise, weight)
  low = weight * (t < 0.5)
  metrics = {
    "loss": loss,
    "loss_low_noise": flow.loss(v, x0, noise, low),
    "loss_high_noise": flow.loss(v, x0, noise, weight - low),
    "tokens": jnp.sum(weight) * cfg.tokens_per_frame,
  }
  return loss, metrics
