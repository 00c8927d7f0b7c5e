"""Rollouts as scans: streaming NLL, prefill, decode and sampling, each one jit-compiled ``lax.scan``.

Every function splits the NNX model outside ``jit`` (``nnx.split``) and merges it inside, so the compiled program
sees plain arrays; caches are donated so that a rollout's memory is the cache plus one chunk, whatever the stream
length. Shapes are static: a stream of any length is padded to whole chunks with padding tokens (segment id -1),
which consume no position and are never cached.

The first token of a stream has no prediction: ``stream_nll`` returns NaN there (and at padding).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jstream import cache as cache_lib
from jstream import flow
from jstream._compat import is_concrete
from jstream.models import video_dit
from jstream.typing import Array, ArrayLike, Float, Int, SegmentIds, TokenIds

# ----------------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick a token from logits (hashable: a static argument of the compiled loops).

  Attributes:
    temperature: 0 for greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the ``top_k`` largest logits (None: all).
    top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (None: all).
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")


def filter_logits(logits: Float[Array, "*lead v"], sampling: Sampling) -> Float[Array, "*lead v"]:
  """Temperature-scaled logits ``[..., v]`` with the tokens top-k / top-p exclude set to ``-inf``."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0:
    return logits
  logits = logits / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = before < sampling.top_p  # the most likely token is always kept
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample(logits: Float[Array, "*lead v"], rng: Array, sampling: Sampling = Sampling()) -> Int[Array, "*lead"]:
  """Samples token ids ``[...]`` from ``logits [..., v]``."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- checks


def _check_stream(model, tokens, policy, chunk_size, start_position):
  tokens = model.check_tokens(tokens)
  if not isinstance(policy, cache_lib.Policy):
    raise TypeError(f"policy must be a jstream.cache policy, got {policy!r}")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if chunk_size > policy.capacity:
    raise ValueError(f"chunk_size {chunk_size} is larger than the cache capacity {policy.capacity} ({policy})")
  n = tokens.shape[1]
  start = int(np.max(np.asarray(cache_lib.start_positions(start_position, tokens.shape[0]))))
  if policy.positions == "absolute":
    if start + n > cache_lib.INT32_MAX:
      raise ValueError(
        f"a stream of {n} tokens from position {start} runs past 2**31 - 1 in absolute-position mode; use "
        "positions='cache_relative'"
      )
  if policy.max_stream is not None and n > policy.max_stream:
    raise ValueError(f"a stream of {n} tokens does not fit {policy}")
  return tokens.astype(jnp.int32)


def _chunked(x: Array, chunk: int, fill) -> Array:
  """``[b, n] -> [n_chunks, b, chunk]``, padded with ``fill``."""
  b, n = x.shape
  pad = (-n) % chunk
  x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
  return jnp.swapaxes(x.reshape(b, -1, chunk), 0, 1)


# ----------------------------------------------------------------------------------------------- stream NLL


def stream_nll(
  model,
  tokens: TokenIds,
  policy: cache_lib.Policy,
  *,
  chunk_size: int,
  dtype=jnp.float32,
  segment_ids: SegmentIds = None,
  start_position=0,
) -> Float[Array, "b t"]:
  """Per-token negative log-likelihood of a long stream, computed as one jit-compiled scan over chunks.

  Args:
    model: a ``StreamingTransformer``.
    tokens: ``[b, n]`` token ids.
    policy: the cache policy (``Dense``, ``Window``, ``SinkWindow``, ``Segmented``, ``Recompute``).
    chunk_size: tokens per step (at most the policy's capacity). With ``cache_relative`` or absolute positions
      the result does not depend on it.
    dtype: cache dtype.
    segment_ids: optional ``[b, n]`` segment of each token (``Segmented`` policies; -1 = padding).
    start_position: stream position of each row's first token.

  Returns:
    ``[b, n]`` float32: ``nll[:, i] = -log p(tokens[:, i] | tokens[:, :i])``; NaN at ``i = 0`` and at padding.
  """
  tokens = _check_stream(model, tokens, policy, chunk_size, start_position)
  b, n = tokens.shape
  segs = jnp.zeros((b, n), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  if segs.shape != (b, n):
    raise ValueError(f"segment_ids must be [b, n] = {(b, n)}, got {segs.shape}")
  graphdef, state = nnx.split(model)
  start = jnp.broadcast_to(jnp.asarray(start_position, jnp.int32), (b,))
  return _stream_nll(graphdef, state, tokens, segs, start, policy, int(chunk_size), jnp.dtype(dtype).name)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _stream_nll(graphdef, state, tokens, segs, start, policy, chunk, dtype):
  model = nnx.merge(graphdef, state)
  b, n = tokens.shape
  cache = model.init_cache(policy, b, dtype=dtype, start_position=start)
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  targets = jnp.where(jnp.pad(segs[:, 1:], ((0, 0), (0, 1)), constant_values=-1) >= 0, targets, -1)
  nll, _ = _nll_scan(model, tokens, segs, targets, cache, chunk)
  return jnp.concatenate([jnp.full((b, 1), jnp.nan, jnp.float32), nll[:, : n - 1]], axis=1)


def _nll_scan(model, tokens, segs, targets, cache, chunk):
  """Scans ``model`` over ``tokens [b, n]`` in chunks; returns ``(-log p(targets[i] | tokens[:i+1]) [b, n], cache)``."""
  b, n = tokens.shape
  xs = (_chunked(tokens, chunk, 0), _chunked(segs, chunk, -1), _chunked(targets, chunk, -1))

  def step(cache, x):
    tok, seg, tgt = x
    logits, cache = model(tok, cache, segment_ids=seg)
    lp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lp, jnp.maximum(tgt, 0)[..., None], axis=-1)[..., 0]
    return cache, jnp.where((seg >= 0) & (tgt >= 0), nll, jnp.nan)

  cache, nll = jax.lax.scan(step, cache, xs)  # [chunks, b, chunk]
  return jnp.swapaxes(nll, 0, 1).reshape(b, -1)[:, :n], cache


def nll_segment(
  model,
  tokens: TokenIds,
  targets: Int[ArrayLike, "b t"],
  cache: cache_lib.Cache,
  *,
  chunk_size: int,
  segment_ids: SegmentIds = None,
) -> tuple[Float[Array, "b t"], cache_lib.Cache]:
  """One segment of a stream: ``(nll [b, n], cache)`` with ``nll[:, i] = -log p(targets[:, i] | ...tokens[:, i])``.

  The caller aligns ``targets`` (usually the next token; -1 for none, which gives NaN) and carries ``cache`` from
  one segment to the next (it is donated), e.g. to time a long stream piece by piece. Compiles once per segment
  shape.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  segs = jnp.zeros(tokens.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  graphdef, state = nnx.split(model)
  return _nll_segment(graphdef, state, tokens, segs, jnp.asarray(targets, jnp.int32), cache, int(chunk_size))


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(5,))
def _nll_segment(graphdef, state, tokens, segs, targets, cache, chunk):
  return _nll_scan(nnx.merge(graphdef, state), tokens, segs, targets, cache, chunk)


# ----------------------------------------------------------------------------------------------- generation


def _check_absolute_room(cache, n: int) -> None:
  """Raises before an absolute-position cache would run past ``2**31 - 1`` within the next ``n`` tokens.

  Reads the cache's ``next_pos`` (a ``[b]`` int32) on the host, once per call; cache-relative caches rebase their
  counters and need no check.
  """
  if cache.policy.positions != "absolute" or not is_concrete(cache.next_pos):
    return
  start = int(np.max(jax.device_get(cache.next_pos)))
  if start + n > cache_lib.INT32_MAX:
    raise ValueError(
      f"{n} more tokens from position {start} run past 2**31 - 1 in absolute-position mode; use "
      "positions='cache_relative'"
    )


class GenerateOutput(NamedTuple):
  """``tokens [b, max_new_tokens]`` sampled ids, the cache after all of them and the logits after the last one."""

  tokens: Array
  cache: cache_lib.Cache
  last_logits: Array


def prefill(
  model,
  tokens: TokenIds,
  cache: cache_lib.Cache,
  *,
  chunk_size: int | None = None,
  lengths: Int[ArrayLike, " b"] | None = None,
  return_features: bool = False,
) -> tuple[Float[Array, "b v"], cache_lib.Cache] | tuple[Float[Array, "b v"], cache_lib.Cache, Float[Array, "b d"]]:
  """Runs a prompt through the cache in chunks (one compiled scan).

  Args:
    model: a ``StreamingTransformer``.
    tokens: ``[b, p]`` prompt ids.
    cache: the cache (donated).
    chunk_size: tokens per step (default: the whole prompt, if it fits the cache).
    lengths: optional ``[b]`` prompt length of each row (ragged prompts; the rest is padding).
    return_features: also return the final features after each row's last prompt token (a ``KVCache`` only).

  Returns:
    ``(last_logits [b, v], cache)``: the logits after each row's last prompt token (``(last_logits, cache,
    last_features [b, d])`` with ``return_features``).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, p = tokens.shape
  chunk = int(chunk_size or min(p, cache.capacity))
  if chunk > cache.capacity:
    raise ValueError(f"chunk_size {chunk} is larger than the cache capacity {cache.capacity}")
  _check_absolute_room(cache, p + (-p) % chunk)
  lengths = jnp.full((b,), p, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  if return_features and not isinstance(cache, cache_lib.KVCache):
    raise TypeError(f"return_features needs a KVCache, got {type(cache).__name__}")
  graphdef, state = nnx.split(model)
  last, cache, features = _prefill(graphdef, state, tokens, lengths, cache, chunk, bool(return_features))
  return (last, cache, features) if return_features else (last, cache)


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(4,))
def _prefill(graphdef, state, tokens, lengths, cache, chunk, with_features):
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  segs = jnp.where(jnp.arange(p)[None] < lengths[:, None], 0, -1).astype(jnp.int32)
  offsets = jnp.arange(0, p + (-p) % chunk, chunk)
  xs = (_chunked(tokens, chunk, 0), _chunked(segs, chunk, -1), offsets)
  d = model.config.embed_dim if with_features else 0
  last0 = (jnp.zeros((b, model.config.vocab_size), jnp.float32), jnp.zeros((b, d), jnp.float32))

  def step(carry, x):
    cache, last = carry
    tok, seg, off = x
    if with_features:
      logits, cache, feats = model.extend(tok, cache, segment_ids=seg, return_features=True)
    else:
      (logits, cache), feats = model(tok, cache, segment_ids=seg), jnp.zeros((b, chunk, 0))
    idx = lengths - 1 - off  # row's last prompt token inside this chunk?
    here = (idx >= 0) & (idx < chunk)
    at = jnp.clip(idx, 0, chunk - 1)[:, None, None]
    pick = [jnp.take_along_axis(a.astype(jnp.float32), at, axis=1)[:, 0] for a in (logits, feats)]
    return (cache, tuple(jnp.where(here[:, None], new, old) for new, old in zip(pick, last))), None

  (cache, (last, features)), _ = jax.lax.scan(step, (cache, last0), xs)
  return last, cache, features


class Decoder:
  """A compiled decode loop for one model: ``steps`` sampled tokens per call, one ``lax.scan``.

  ``Decoder(model, steps=n)(cache, last_logits, rng)`` is ``decode(model, cache, last_logits, steps=n, rng=rng)``
  with the model split once, at construction, instead of at every call: what a serving loop or a benchmark that
  calls decode many times wants. The decoder holds the model's parameters as they were when it was built (build
  a new one after the model changes). Compiles once per cache shape and policy.

  Args:
    model: a ``StreamingTransformer``.
    steps: tokens sampled per call.
    sampling: how tokens are picked (``Sampling``; default: temperature 1).
  """

  def __init__(self, model, *, steps: int, sampling: Sampling = Sampling()):
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
      raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(sampling, Sampling):
      raise TypeError(f"sampling must be a Sampling, got {sampling!r}")
    self.steps, self.sampling = int(steps), sampling
    self.graphdef, self.state = nnx.split(model)

  def _args(self, cache, last_logits, rng):
    rng = jax.random.key(0) if rng is None else rng
    return (self.graphdef, self.state, cache, jnp.asarray(last_logits, jnp.float32), rng, self.steps, self.sampling)

  def __call__(self, cache: cache_lib.Cache, last_logits: Float[ArrayLike, "b v"], rng=None) -> GenerateOutput:
    """Samples ``steps`` tokens from the logits after the cache's last token (the cache is donated).

    Args:
      cache: the cache (donated).
      last_logits: ``[b, v]`` logits after the cache's last token (e.g. from ``prefill``).
      rng: a PRNG key (default ``jax.random.key(0)``); step ``i`` uses ``fold_in(rng, i)``.

    Returns:
      ``GenerateOutput(tokens [b, steps], cache, last_logits)``.

    Raises:
      ValueError: when an absolute-position cache would run past ``2**31 - 1``.
    """
    _check_absolute_room(cache, self.steps)
    return _decode(*self._args(cache, last_logits, rng))

  def lower(self, cache, last_logits, rng=None) -> jax.stages.Lowered:
    """The lowered decode program for these arguments (``.compile().as_text()`` shows the optimized loop)."""
    return _decode.lower(*self._args(cache, last_logits, rng))


def decode(
  model,
  cache: cache_lib.Cache,
  last_logits: Float[ArrayLike, "b v"],
  *,
  steps: int,
  rng,
  sampling: Sampling = Sampling(),
) -> GenerateOutput:
  """Samples ``steps`` tokens, one per scan step, from the logits after the cache's last token.

  The step's RNG is ``fold_in(rng, step)``. The cache is donated. To decode many times with one model, build a
  ``Decoder`` once.
  """
  return Decoder(model, steps=steps, sampling=sampling)(cache, last_logits, rng)


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(2,))
def _decode(graphdef, state, cache, last, rng, steps, sampling):
  model = nnx.merge(graphdef, state)

  def step(carry, i):
    cache, logits = carry
    tok = sample(logits, jax.random.fold_in(rng, i), sampling)
    new_logits, cache = model(tok[:, None], cache)
    return (cache, new_logits[:, 0]), tok

  (cache, last), toks = jax.lax.scan(step, (cache, last), jnp.arange(steps, dtype=jnp.int32))
  return GenerateOutput(jnp.swapaxes(toks, 0, 1), cache, last)


def generate(
  model,
  prompt: TokenIds,
  *,
  max_new_tokens: int,
  policy: cache_lib.Policy | None = None,
  cache=None,
  rng=None,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  prompt_lengths: Int[ArrayLike, " b"] | None = None,
  prefill_chunk: int | None = None,
  dtype=jnp.float32,
) -> GenerateOutput:
  """Prefill a prompt, then sample ``max_new_tokens`` tokens (greedy with ``temperature=0``).

  Args:
    model: a ``StreamingTransformer``.
    prompt: ``[b, p]`` prompt ids (``p >= 1``).
    max_new_tokens: tokens to sample.
    policy: cache policy for a new cache (or pass ``cache``).
    cache: an existing cache to continue (donated).
    rng: a PRNG key (default ``jax.random.key(0)``); step ``i`` uses ``fold_in(rng, i)``.
    temperature, top_k, top_p: see ``Sampling``.
    prompt_lengths: ``[b]`` lengths for ragged prompts (right-padded).
    prefill_chunk: prompt tokens per prefill step.
    dtype: cache dtype for a new cache.

  Returns:
    ``GenerateOutput(tokens [b, max_new_tokens], cache, last_logits)``.
  """
  prompt = model.check_tokens(prompt, "prompt")
  if (policy is None) == (cache is None):
    raise ValueError("pass exactly one of policy= (for a new cache) or cache=")
  if cache is None:
    cache = model.init_cache(policy, prompt.shape[0], dtype=dtype)
  sampling = Sampling(temperature, top_k, top_p)
  last, cache = prefill(model, prompt, cache, chunk_size=prefill_chunk, lengths=prompt_lengths)
  return decode(model, cache, last, steps=max_new_tokens, rng=rng, sampling=sampling)


# ----------------------------------------------------------------------------------------------- video


class VideoOutput(NamedTuple):
  """``frames [b, n, H, W, C]`` generated frames in [0, 1] and the cache after them (holding their clean keys)."""

  frames: Array
  cache: cache_lib.Cache


class VideoGenerator:
  """A compiled video rollout for one ``jstream.models.video_dit.VideoDiT``: ``chunks`` chunks per call, one
  ``lax.scan``, each chunk denoised from Gaussian noise with ``steps`` Euler steps against the cache (which those
  steps do not change) and then committed to it at noise level 0 (CausVid / Self Forcing). The cache is donated
  and carried, so calls can continue one rollout for ever at the memory of one call (``generate_video`` for one
  call). Chunk ``i`` of a rollout draws its noise from ``fold_in(rng, i)``: a rollout split into several calls
  (``start`` counting its chunks) equals the one-call rollout.

  Args:
    model: a ``VideoDiT``.
    chunks: chunks generated per call.
    steps: Euler steps per chunk (``jstream.flow.schedule``).
    shift: the time grid's shift (``jstream.flow.shift_time``).
    out_dtype: dtype of the returned frames (``uint8``: 0-255, a quarter of float32's memory for long rollouts).
    guidance: classifier-free guidance scale (1: none) of a class-conditioned model; with ``guidance != 1`` the
      cache is a paired one (``VideoDiT.init_cache(..., guided=True)``: ``2 b`` rows for ``b`` videos, each chunk
      committed to both branches), and every denoising step is one call on both branches.
  """

  def __init__(
    self, model, *, chunks: int, steps: int = 4, shift: float = 1.0, out_dtype=jnp.float32, guidance: float = 1.0
  ):
    for name, v in (("chunks", chunks), ("steps", steps)):
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    video_dit.check_guidance(model.config, guidance)
    self.model = model
    self.chunks, self.steps, self.shift, self.guidance = int(chunks), int(steps), float(shift), float(guidance)
    self.out_dtype = jnp.dtype(out_dtype)
    self.graphdef, self.state = nnx.split(model)

  @property
  def frames(self) -> int:
    """Frames generated per call."""
    return self.chunks * self.model.config.frames_per_chunk

  def _check(self, cache, labels, actions):
    cfg = self.model.config
    if not isinstance(cache, cache_lib.KVCache):
      raise TypeError(f"expected a cache from VideoDiT.init_cache, got {type(cache).__name__}")
    cache.check_model(self.model.dit.cache_geometry)
    video_dit.check_policy(cfg, cache.policy)
    b = cache.batch_size
    if self.guidance != 1.0:
      b //= 2  # a paired cache; the labels (a guided model has them) must then count half its rows
    if labels is not None and np.shape(labels)[:1] != (b,):
      kind = "a paired cache, 2 rows per video" if self.guidance != 1.0 else "an unguided cache, 1 row per video"
      raise ValueError(
        f"labels hold {np.shape(labels)[:1]} rows for a cache of {cache.batch_size} rows; guidance "
        f"{self.guidance} takes {kind} (VideoDiT.init_cache(..., guided=...))"
      )
    labels, actions = self.model.check_conditioning(labels, actions, b, self.frames)
    if self.guidance != 1.0:
      video_dit.check_guided_labels(labels)
    return labels, actions

  def __call__(
    self,
    cache: cache_lib.KVCache,
    rng=None,
    *,
    start: int | Array = 0,
    labels: Int[ArrayLike, " b"] | None = None,
    actions: Int[ArrayLike, "b n"] | None = None,
  ) -> VideoOutput:
    """Generates ``frames`` frames after the cache's.

    Args:
      cache: from ``VideoDiT.init_cache`` (donated), empty or holding earlier frames (``context_frames``).
      rng: a PRNG key (default ``jax.random.key(0)``).
      start: the rollout's index of this call's first chunk (noise of chunk ``i``: ``fold_in(rng, i)``).
      labels: ``[b]`` class ids (a class-conditioned model; ``b`` is half the rows of a guided cache).
      actions: ``[b, frames]`` action ids, the action before each frame (an action-conditioned model).

    Returns:
      ``VideoOutput(frames [b, frames, H, W, C] in out_dtype, cache)``.
    """
    labels, actions = self._check(cache, labels, actions)
    rng = jax.random.key(0) if rng is None else rng
    return _video(
      self.graphdef,
      self.state,
      cache,
      rng,
      jnp.asarray(start, jnp.int32),
      labels,
      actions,
      self.chunks,
      self.steps,
      self.shift,
      self.out_dtype.name,
      self.guidance,
    )


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10, 11), donate_argnums=(2,))
def _video(graphdef, state, cache, rng, start, labels, actions, chunks, steps, shift, out_dtype, guidance):
  model = nnx.merge(graphdef, state)
  cfg = model.config
  b, k = cache.batch_size // (1 if guidance == 1.0 else 2), cfg.frames_per_chunk
  shape = (b, k, *cfg.frame_size, cfg.channels)
  times = flow.schedule(steps, shift)
  acts = None if actions is None else jnp.moveaxis(actions.reshape(b, chunks, k), 1, 0)

  def step(cache, xs):
    i, act = xs
    noise = jax.random.normal(jax.random.fold_in(rng, start + i), shape, jnp.float32)
    x0 = model.denoise(cache, noise, times, labels=labels, actions=act, guidance=guidance)
    cache = model.commit(x0, cache, labels=labels, actions=act, guidance=guidance)
    frames = video_dit.from_model(x0)
    if jnp.dtype(out_dtype) == jnp.uint8:
      frames = jnp.round(frames * 255.0)
    return cache, frames.astype(out_dtype)

  idx = jnp.arange(chunks, dtype=jnp.int32)
  cache, frames = jax.lax.scan(step, cache, (idx, acts))
  frames = jnp.moveaxis(frames, 0, 1).reshape(b, chunks * k, *shape[2:])
  return VideoOutput(frames, cache)


def context_frames(
  model,
  frames: Float[ArrayLike, "b n H W C"],
  cache: cache_lib.KVCache,
  *,
  labels: Int[ArrayLike, " b"] | None = None,
  actions: Int[ArrayLike, "b n"] | None = None,
  guided: bool = False,
) -> cache_lib.KVCache:
  """Commits given frames (in [0, 1], whole chunks) to a ``VideoDiT`` cache, chunk by chunk in one scan: the
  context a rollout continues (image-to-video, or a video's first frames). The cache is donated. ``guided``: the
  cache is a paired one (``init_cache(..., guided=True)``): the frames go into both branches, the labels into the
  first and ``NULL_LABEL`` into the second."""
  frames = model.check_frames(jnp.asarray(frames))
  b, n = frames.shape[:2]
  if cache.batch_size != (2 * b if guided else b):
    raise ValueError(
      f"frames have batch size {b} but the {'paired ' if guided else ''}cache has {cache.batch_size} rows"
    )
  labels, actions = model.check_conditioning(labels, actions, b, n)
  if guided:
    frames = video_dit.pair(frames)
    labels, actions = video_dit.paired(labels, actions)
  graphdef, state = nnx.split(model)
  return _context(graphdef, state, frames, cache, labels, actions)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _context(graphdef, state, frames, cache, labels, actions):
  model = nnx.merge(graphdef, state)
  k = model.config.frames_per_chunk
  b, n = frames.shape[:2]
  xs = jnp.moveaxis(video_dit.to_model(frames).reshape(b, n // k, k, *frames.shape[2:]), 1, 0)
  acts = None if actions is None else jnp.moveaxis(actions.reshape(b, n // k, k), 1, 0)

  def step(cache, x):
    chunk, act = x
    return model.commit(chunk, cache, labels=labels, actions=act), None

  cache, _ = jax.lax.scan(step, cache, (xs, acts))
  return cache


def generate_video(
  model,
  *,
  num_frames: int,
  policy: cache_lib.Policy | None = None,
  cache: cache_lib.KVCache | None = None,
  batch_size: int | None = None,
  steps: int = 4,
  shift: float = 1.0,
  guidance: float = 1.0,
  rng=None,
  labels: Int[ArrayLike, " b"] | None = None,
  actions: Int[ArrayLike, "b n"] | None = None,
  context: Float[ArrayLike, "b c H W C"] | None = None,
  context_actions: Int[ArrayLike, "b c"] | None = None,
  dtype=jnp.float32,
  out_dtype=jnp.float32,
) -> VideoOutput:
  """Generates ``num_frames`` frames (whole chunks) with a ``VideoDiT``: one compiled scan over the chunks
  (``VideoGenerator``), after committing ``context`` frames if given.

  Args:
    model: a ``VideoDiT``.
    num_frames: frames to generate (a multiple of ``frames_per_chunk``).
    policy: cache policy for a new cache (``video_dit.rolling_policy``), with ``batch_size``; or pass ``cache``.
    cache: an existing cache to continue (donated; a paired one for ``guidance != 1``).
    steps, shift, guidance: the sampler (``VideoGenerator``); a new cache for ``guidance != 1`` is a paired one.
    rng: a PRNG key (default ``jax.random.key(0)``).
    labels: ``[b]`` class ids; actions: ``[b, num_frames]`` action ids (conditioned models).
    context: ``[b, c, H, W, C]`` frames in [0, 1] to continue (committed first), with ``context_actions``.
    dtype: cache dtype for a new cache; out_dtype: frames' dtype (``uint8`` for 0-255).

  Returns:
    ``VideoOutput(frames [b, num_frames, H, W, C], cache)``.
  """
  k = model.config.frames_per_chunk
  if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or num_frames % k:
    raise ValueError(f"num_frames must be a positive multiple of frames_per_chunk ({k}), got {num_frames!r}")
  if (policy is None) == (cache is None):
    raise ValueError("pass exactly one of policy= (with batch_size=) or cache=")
  if cache is None:
    if batch_size is None:
      batch_size = 1 if labels is None else len(labels)
    cache = model.init_cache(policy, batch_size, dtype=dtype, guided=guidance != 1.0)
  if context is not None:
    cache = context_frames(model, context, cache, labels=labels, actions=context_actions, guided=guidance != 1.0)
  gen = VideoGenerator(model, chunks=num_frames // k, steps=steps, shift=shift, out_dtype=out_dtype, guidance=guidance)
  return gen(cache, rng, labels=labels, actions=actions)
