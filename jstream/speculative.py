"""Exact speculative decoding (Leviathan et al. 2023; Chen et al. 2023) at static shapes, batched, on any cache.

A cheap draft model proposes ``num_draft`` tokens ``y_1..y_K`` from its distributions ``q``; the target scores
them in one call of ``K + 1`` tokens, giving its distributions ``p`` after the pending token and after each draft;
draft ``i`` is accepted with probability ``min(1, p_i(y_i) / q_i(y_i))``; the first rejected one is replaced by a
sample of ``norm(max(0, p - q))``, and when all ``K`` are accepted a bonus token is drawn from ``p_{K+1}``. Every
emitted token is then distributed exactly as the target's own sampler would draw it (temperature, top-k and top-p
applied to both ``p`` and ``q`` first); ``temperature=0`` is argmax matching (greedy output equals the target's
greedy decoding).

Shapes never depend on what is accepted. Each row of the batch keeps its own count and advances by
``accepted + 1`` tokens per round; the rejected drafts are rolled back in both caches with a masked per-row
``rollback`` (exact for ``Dense`` caches, and for ``Window`` / ``SinkWindow`` past their window when the policy has
``max_rollback >= num_draft`` spare slots). The whole generation is one ``lax.while_loop`` inside one ``jit``: no
host sync per round. Rows that have their ``max_new_tokens`` feed padding (segment id -1: nothing is cached) until
the last row is done.

Invariant of a round: every cache holds every emitted token except the last one, ``pending``. The draft reads
``pending`` and its own proposals one at a time (``K + 1`` single-token calls, the last only to cache ``y_K``); the
target reads ``[pending, y_1..y_K]`` in one call. After the test, all roll back the ``K - a`` rejected tokens.

Three proposers: a draft model; ``Staged`` (Spector & Re 2023), whose draft samples its ``K`` tokens by the same
algorithm with a smaller inner draft (one inner ``while_loop`` per round; the draft's verification calls give its
exact ``q``); ``DraftHeads`` (Medusa, Cai et al. 2024), extra heads on the target's final features that guess
the next tokens from the last accepted token's features, so that a round is one target call and no draft call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jstream import cache as cache_lib
from jstream.checks import check_int
from jstream.rollout import Sampling, filter_logits, prefill
from jstream.typing import Array, ArrayLike, Float, Int, TokenIds


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
  """What ``generate`` returns.

  Attributes:
    tokens: ``[b, max_new_tokens]`` int32 generated tokens.
    all_tokens: ``[b, max_new_tokens + num_draft + 1]`` every token each row emitted (a row's last round may
      emit past ``max_new_tokens``), valid up to ``emitted``.
    accepted: ``[b]`` drafts accepted per row (over the rounds that produced its tokens).
    rounds: ``[b]`` target calls per row (rounds while the row was generating); the prompt's prefill not counted.
    proposed: ``[b]`` drafts proposed per row (``rounds * num_draft``).
    tested: ``[b]`` drafts that met the acceptance test (each round tests up to and including its first rejected
      draft; the drafts after it are discarded untested): ``accepted`` plus the rounds with a rejection.
    accept_prob: ``[b]`` the sum, over the tested drafts, of the probability that the test accepts a draft drawn
      at that position, ``sum_x min(p(x), q(x))`` (Leviathan et al.'s ``beta``).
    draft_calls: ``[b]`` calls of the draft model per row: ``num_draft + 1`` single-token calls a round for a
      draft model; for ``Staged`` the draft's verification calls (each also runs the inner draft
      ``inner_draft + 1`` times) plus one single-token call a round; 0 for ``DraftHeads``.
    target_cache, draft_cache: the caches after the run; they hold every emitted token (also those a row emitted
      past ``max_new_tokens`` in its last round) except the last, ``pending``. ``draft_cache`` is the draft's
      cache, for ``Staged`` the pair ``(draft cache, inner draft cache)``, for ``DraftHeads`` the features
      ``[b, d]`` the heads read next.
    pending: ``[b]`` the last emitted token of each row (not yet in the caches).
    emitted: ``[b]`` tokens each row emitted (>= ``max_new_tokens``).
  """

  tokens: Array
  all_tokens: Array
  accepted: Array
  rounds: Array
  proposed: Array
  tested: Array
  accept_prob: Array
  draft_calls: Array
  target_cache: object
  draft_cache: object
  pending: Array
  emitted: Array

  @property
  def acceptance_rate(self) -> Array:
    """``[b]`` share of tested drafts that were accepted: the estimate of the per-draft acceptance rate ``alpha``
    that ``expected_tokens_per_call`` takes (``accepted / proposed`` would count the untested drafts after each
    rejection as rejected, and underestimate it)."""
    return self.accepted / jnp.maximum(self.tested, 1)

  @property
  def expected_acceptance(self) -> Array:
    """``[b]`` mean of ``sum_x min(p(x), q(x))`` over the tested drafts: ``alpha`` computed from the
    distributions rather than counted (lower variance than ``acceptance_rate``, same expectation)."""
    return self.accept_prob / jnp.maximum(self.tested, 1)

  @property
  def tokens_per_call(self) -> Array:
    """``[b]`` tokens emitted per target call."""
    return self.emitted / jnp.maximum(self.rounds, 1)


def expected_tokens_per_call(acceptance: float, num_draft: int) -> float:
  """Leviathan et al.'s expected tokens per target call, ``(1 - a^(K+1)) / (1 - a)``, for i.i.d. acceptance ``a``."""
  if acceptance >= 1.0:
    return float(num_draft + 1)
  return (1.0 - acceptance ** (num_draft + 1)) / (1.0 - acceptance)


# ----------------------------------------------------------------------------------------------- drafts


class DraftHeads(nnx.Module):
  """Extra prediction heads on a target's final features (Medusa, Cai et al. 2024): self-speculation without a
  draft model.

  Head ``i`` (1-based) reads the features ``f_t`` the target computed for the token at ``t`` and predicts the token
  at ``t + 1 + i`` (the target's own head predicts ``t + 1``): ``logits_i = U_i (f_t + silu(W_i f_t + b_i))``, a
  residual SiLU block (zero-initialised) and an unembedding ``U_i`` initialised from the target's
  (``for_model``). In ``generate`` the heads read the features of the last token the target accepted, so a round
  costs one target call and no draft model; the drafts of a round do not see each other (each head guesses its
  offset from the same features), which is why acceptance falls with the head's offset.

  Train them with the target frozen (Medusa-1): ``loss`` on text, or ``jstream train`` with
  ``TrainConfig.draft_heads`` (``configs/speculative.py:heads``).
  """

  def __init__(self, embed_dim: int, vocab_size: int, num_heads: int, *, rngs: nnx.Rngs):
    num_heads = check_int("DraftHeads.num_heads", num_heads, 1)
    self.num_heads, self.embed_dim, self.vocab_size = num_heads, embed_dim, vocab_size
    d, v, n = embed_dim, vocab_size, num_heads
    self.w = nnx.Param(jnp.zeros((n, d, d), jnp.float32))
    self.b = nnx.Param(jnp.zeros((n, d), jnp.float32))
    self.unembed = nnx.Param(nnx.initializers.normal(d**-0.5)(rngs.params(), (n, d, v), jnp.float32))

  @classmethod
  def for_model(cls, model, num_heads: int, *, rngs: nnx.Rngs | None = None) -> DraftHeads:
    """Heads for ``model`` (a ``StreamingTransformer``), each unembedding initialised from the model's."""
    cfg = model.config
    heads = cls(cfg.embed_dim, cfg.vocab_size, num_heads, rngs=rngs or nnx.Rngs(0))
    u = model.embed.embedding[...].T if cfg.tie_embeddings else model.lm_head.kernel[...]
    heads.unembed[...] = jnp.broadcast_to(u.astype(jnp.float32), heads.unembed.shape)
    return heads

  def __call__(self, features: Float[Array, "b t d"]) -> Float[Array, "b t n v"]:
    """Logits ``[b, t, num_heads, v]`` (float32) of the tokens 2, 3, ... positions after each feature's token."""
    if features.shape[-1] != self.embed_dim:
      raise ValueError(f"features must be [..., {self.embed_dim}], got {features.shape}")
    f = features.astype(jnp.float32)
    h = f[..., None, :] + jax.nn.silu(jnp.einsum("btd,nde->btne", f, self.w[...]) + self.b[...])
    return jnp.einsum("btnd,ndv->btnv", h, self.unembed[...])

  def loss(self, target, tokens: Int[Array, "b n"], *, decay: float = 0.8) -> tuple[Array, dict]:
    """Medusa-1's loss on ``tokens [b, n]`` with ``target`` frozen (no gradient into it): head ``i``'s
    cross-entropy on the token ``i + 1`` after each position, weighted ``decay^(i-1)`` and normalised by the
    weights; also each head's top-1 accuracy (``head{i}_accuracy``)."""
    from jstream.train.losses import next_token_loss  # (jstream.train imports this module)

    _, feats = target.forward(tokens, return_features=True)
    logits = self(jax.lax.stop_gradient(feats))  # [b, n, heads, v]
    n = tokens.shape[1]
    total, wsum, metrics = 0.0, 0.0, {}
    for i in range(1, self.num_heads + 1):
      lg, tgt = logits[:, : n - 1 - i, i - 1], tokens[:, 1 + i :]
      weight = decay ** (i - 1)
      total, wsum = total + weight * next_token_loss(lg, tgt)[0], wsum + weight
      metrics[f"head{i}_accuracy"] = jnp.mean(jnp.argmax(lg, axis=-1) == tgt)
    return total / wsum, metrics


class TargetWithHeads(nnx.Module):
  """A target LM and its ``DraftHeads``: the model of a ``TrainConfig.draft_heads`` run (the target frozen)."""

  def __init__(self, target, heads: DraftHeads):
    if heads.embed_dim != target.config.embed_dim or heads.vocab_size != target.config.vocab_size:
      raise ValueError("heads and target differ in width or vocabulary")
    self.target, self.heads = target, heads


@dataclasses.dataclass(frozen=True, eq=False)
class Staged:
  """Staged speculation (Spector & Re 2023): the draft's own proposals come from speculative decoding with a
  smaller ``inner`` draft, so each draft token costs a fraction of a draft call.

  The outer test still sees exactly the draft's distributions ``q`` (the inner loop samples exactly from the draft,
  and the draft's verification call gives ``q`` at every position), so the output stays exactly the target's.

  Attributes:
    draft: the draft model (a ``StreamingTransformer``).
    inner: the draft of the draft.
    inner_draft: tokens the inner draft proposes per inner round.
    policy: the cache policy of ``draft`` and ``inner`` (default: ``generate``'s ``draft_policy``); it needs
      ``max_rollback >= num_draft + inner_draft``.
  """

  draft: nnx.Module
  inner: nnx.Module
  inner_draft: int = 2
  policy: cache_lib.Policy | None = None


def _probs(logits: Array, sampling: Sampling) -> Array:
  """The sampling distribution ``[..., v]`` (float32) that ``rollout.sample`` draws from: one-hot argmax for
  ``temperature=0``, else the softmax of the filtered logits."""
  if sampling.temperature == 0:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


def _check_policy(name: str, pol, rollback: int, chunk: int) -> None:
  if not isinstance(pol, cache_lib.Policy):
    raise TypeError(f"{name} must be a cache policy, got {pol!r}")
  if rollback > pol.max_rollback:
    raise ValueError(
      f"num_draft ({rollback}) exceeds the rollback room of {name} {pol} (max_rollback {pol.max_rollback}): "
      f"rejected drafts could not be undone exactly; give the policy max_rollback >= {rollback}"
    )
  if chunk > pol.capacity:
    raise ValueError(f"{name} {pol} holds {pol.capacity} tokens, fewer than a verification chunk ({chunk})")


def _check(target, draft, max_new_tokens, num_draft, policy, draft_policy) -> None:
  check_int("num_draft", num_draft, 1)
  check_int("max_new_tokens", max_new_tokens, 1)
  tv = target.config.vocab_size
  if isinstance(draft, DraftHeads):
    dv = draft.vocab_size
    if draft.embed_dim != target.config.embed_dim:
      raise ValueError(
        f"DraftHeads read features of width {draft.embed_dim}, the target's are {target.config.embed_dim}"
      )
    if num_draft > draft.num_heads:
      raise ValueError(f"num_draft ({num_draft}) exceeds the DraftHeads' {draft.num_heads} heads")
  elif isinstance(draft, Staged):
    check_int("Staged.inner_draft", draft.inner_draft, 1)
    dv, iv = draft.draft.config.vocab_size, draft.inner.config.vocab_size
    if dv != iv:
      raise ValueError(f"Staged draft and inner draft must share a vocabulary: vocab_size {dv} vs {iv}")
  elif hasattr(draft, "config") and hasattr(draft, "init_cache"):
    dv = draft.config.vocab_size
  else:
    raise TypeError(f"draft must be a StreamingTransformer, Staged or DraftHeads, got {type(draft).__name__}")
  if tv != dv:
    raise ValueError(f"target and draft must share a vocabulary: vocab_size {tv} vs {dv}")
  _check_policy("policy", policy, num_draft, num_draft + 1)
  if isinstance(draft, Staged):
    room = num_draft + draft.inner_draft
    _check_policy("Staged policy", draft.policy or draft_policy, room, draft.inner_draft + 1)
  elif not isinstance(draft, DraftHeads):
    _check_policy("draft_policy", draft_policy, num_draft, 1)


def generate(
  target,
  draft,
  prompt: TokenIds,
  *,
  max_new_tokens: int,
  num_draft: int,
  policy: cache_lib.Policy,
  draft_policy: cache_lib.Policy | None = None,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng=None,
  prompt_lengths: Int[ArrayLike, " b"] | None = None,
  dtype=jnp.float32,
) -> SpeculativeOutput:
  """Samples ``max_new_tokens`` tokens per row from ``target`` with ``draft`` proposing ``num_draft`` at a time.

  Args:
    target: a ``StreamingTransformer``.
    draft: what proposes: a ``StreamingTransformer`` with the target's vocabulary (the draft may be the target
      itself), ``Staged(draft, inner, inner_draft)`` (the draft itself speculated by a smaller one) or
      ``DraftHeads`` trained on the target (self-speculation; ``num_draft <= num_heads``; the target's cache must
      be a ``KVCache``).
    prompt: ``[b, p]`` prompt ids (right-padded when ``prompt_lengths`` is given).
    max_new_tokens: tokens to generate per row.
    num_draft: drafts per round ``K`` (the target verifies ``K + 1`` positions per call).
    policy: the target's cache policy; ``draft_policy`` the draft's (default: the same). Each needs
      ``max_rollback >= num_draft`` (``Dense`` always has it; ``Window`` / ``SinkWindow(..., max_rollback=K)``);
      ``Staged``'s policy ``num_draft + inner_draft``.
    temperature, top_k, top_p: the target's sampling (``rollout.Sampling``), applied to every model.
    rng: a PRNG key (default ``jax.random.key(0)``); round ``r`` uses ``fold_in(rng, r)``.
    prompt_lengths: ``[b]`` prompt lengths for ragged prompts.
    dtype: the caches' dtype.

  Returns:
    ``SpeculativeOutput`` with the tokens and the acceptance statistics.

  Raises:
    ValueError / TypeError: bad arguments (checked before any compute): vocabularies that differ, ``num_draft``
      beyond a policy's rollback room or capacity (or the heads' count), a bad prompt.
  """
  draft_policy = policy if draft_policy is None else draft_policy
  prompt = target.check_tokens(prompt, "prompt")
  _check(target, draft, max_new_tokens, num_draft, policy, draft_policy)
  sampling = Sampling(temperature, top_k, top_p)
  b, p = prompt.shape
  lengths = jnp.full((b,), p, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
  pending = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
  head = prompt[:, : p - 1]  # every prompt token but each row's last enters the caches; the last is pending

  def start(model, pol, features=False):
    c = model.init_cache(pol, b, dtype=dtype)
    if p == 1:
      return (c, jnp.zeros((b, model.config.embed_dim), jnp.float32)) if features else c
    out = prefill(model, head, c, chunk_size=min(p - 1, pol.capacity), lengths=lengths - 1, return_features=features)
    return out[1:] if features else out[1]

  if isinstance(draft, DraftHeads):
    tcache, dstate = start(target, policy, features=True)  # the heads read the last prompt token's features
    models = (target, draft)
  elif isinstance(draft, Staged):
    pol = draft.policy or draft_policy
    tcache, dstate = start(target, policy), (start(draft.draft, pol), start(draft.inner, pol))
    models = (target, draft.draft, draft.inner)
  else:
    tcache, dstate = start(target, policy), start(draft, draft_policy)
    models = (target, draft)
  kind = "heads" if isinstance(draft, DraftHeads) else "staged" if isinstance(draft, Staged) else "model"
  inner_k = draft.inner_draft if isinstance(draft, Staged) else 0
  graphs, states = zip(*(nnx.split(m) for m in models))
  rng = jax.random.key(0) if rng is None else rng
  spec = _Spec(kind, int(max_new_tokens), int(num_draft), int(inner_k), sampling)
  return _generate(tuple(graphs), tuple(states), tcache, dstate, pending, rng, spec)


@dataclasses.dataclass(frozen=True)
class _Spec:
  kind: str  # "model", "staged" or "heads"
  max_new: int
  k: int
  inner_k: int
  sampling: Sampling


def _accept(ps, ys, qs, key):
  """The acceptance test of one round for every row: ``ps [b, k + 1, v]`` the verifier's distributions after the
  pending token and each draft, ``ys [b, k]`` the drafts, ``qs [b, k, v]`` the proposer's distributions.

  Returns ``(a [b] accepted before the first rejection, z [b] the next token, beta [b] summed acceptance
  probability of the tested drafts, tested [b])``."""
  b, k = ys.shape
  v = ps.shape[-1]
  k_accept, k_resample = jax.random.split(key)
  p_y = jnp.take_along_axis(ps[:, :k], ys[..., None], axis=-1)[..., 0]
  q_y = jnp.take_along_axis(qs, ys[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(k_accept, (b, k))
  ok = u * q_y < p_y  # u < p / q without dividing (q_y > 0: y was drawn from q)
  a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
  # The next token: from norm(max(0, p_a - q_a)) after a rejection, from p_{k+1} (q padded with 0) if none.
  q_pad = jnp.concatenate([qs, jnp.zeros((b, 1, v), jnp.float32)], axis=1)
  p_a = jnp.take_along_axis(ps, a[:, None, None], axis=1)[:, 0]
  q_a = jnp.take_along_axis(q_pad, a[:, None, None], axis=1)[:, 0]
  resid = jnp.maximum(p_a - q_a, 0.0)
  resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_a)  # (p == q: rounding only)
  z = jax.random.categorical(k_resample, jnp.log(resid), axis=-1).astype(jnp.int32)
  tested = jnp.minimum(a + 1, k)
  beta = jnp.sum(jnp.minimum(ps[:, :k], qs), axis=-1)  # [b, k]
  beta = jnp.sum(jnp.where(jnp.arange(k)[None] < tested[:, None], beta, 0.0), axis=1)
  return a, z, beta, tested


def _emit(buf, ys, a, z, count, active):
  """Writes ``y_1..y_a, z`` of each active row into ``buf [b, w]`` at the row's ``count``."""
  k = ys.shape[1]
  idx = jnp.arange(k + 1)[None]
  ys_pad = jnp.concatenate([ys, jnp.zeros_like(ys[:, :1])], axis=1)
  emit = jnp.where(idx < a[:, None], ys_pad, jnp.where(idx == a[:, None], z[:, None], 0))
  return _write(buf, emit, count, active)


def _write(buf, vals, count, active):
  """``buf [b, w, ...]`` with ``vals [b, n, ...]`` written at each active row's ``count``."""
  zero = (0,) * (buf.ndim - 2)
  new = jax.vmap(lambda row, e, c: jax.lax.dynamic_update_slice(row, e, (c, *zero)))(buf, vals, count)
  return jnp.where(active.reshape((-1,) + (1,) * (buf.ndim - 1)), new, buf)


def _draft_tokens(model, dcache, pending, key, k, sampling, seg1):
  """``k`` tokens sampled one at a time from ``model`` after ``pending``, and one more call to cache the last:
  ``(cache, ys [b, k], qs [b, k, v])``."""

  def step(c, i):
    dcache, tok = c
    logits, dcache = model(tok[:, None], dcache, segment_ids=seg1)
    q = _probs(logits[:, 0], sampling)
    y = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(q), axis=-1).astype(jnp.int32)
    return (dcache, y), (y, q)

  (dcache, _), (ys, qs) = jax.lax.scan(step, (dcache, pending), jnp.arange(k + 1))
  return dcache, jnp.swapaxes(ys[:k], 0, 1), jnp.swapaxes(qs[:k], 0, 1)


def _staged_tokens(draft, inner, caches, pending, key, k, inner_k, sampling, active):
  """``k`` tokens sampled from ``draft`` after ``pending`` by speculative decoding with ``inner`` proposing
  ``inner_k`` at a time, with the draft's distributions at each: ``(caches, ys [b, k], qs [b, k, v], calls [b])``.
  Both caches end holding ``pending, y_1..y_k`` (as ``_draft_tokens`` leaves its cache)."""
  dcache, icache = caches
  b = pending.shape[0]
  width = k + inner_k + 1
  v = draft.config.vocab_size

  def round_(c):
    j, dcache, icache, pend, ys, qs, count, calls = c
    act = active & (count < k)
    seg1 = jnp.where(act, 0, -1)[:, None].astype(jnp.int32)
    k_draft, k_test = jax.random.split(jax.random.fold_in(key, j))
    icache, zs, q2s = _draft_tokens(inner, icache, pend, k_draft, inner_k, sampling, seg1)
    chunk = jnp.concatenate([pend[:, None], zs], axis=1)
    logits, dcache = draft(chunk, dcache, segment_ids=jnp.broadcast_to(seg1, chunk.shape))
    p1 = _probs(logits, sampling)  # the draft's distribution of each emitted token: p1[:, i] for the i-th
    a, w, _, _ = _accept(p1, zs, q2s, k_test)
    ys = _emit(ys, zs, a, w, count, act)
    qs = _write(qs, p1, count, act)
    dcache = cache_lib.rollback(dcache, inner_k - a, rows=act)
    icache = cache_lib.rollback(icache, inner_k - a, rows=act)
    step = act.astype(jnp.int32)
    return j + 1, dcache, icache, jnp.where(act, w, pend), ys, qs, count + step * (a + 1), calls + step

  zeros = jnp.zeros((b,), jnp.int32)
  init = (zeros[0], dcache, icache, pending, jnp.zeros((b, width), jnp.int32), jnp.zeros((b, width, v)), zeros, zeros)
  cond = lambda c: jnp.any(active & (c[6] < k))
  _, dcache, icache, _, ys, qs, count, calls = jax.lax.while_loop(cond, round_, init)
  # The caches hold pending, y_1..y_(count-1): back to pending, y_1..y_(k-1), then y_k.
  dcache = cache_lib.rollback(dcache, count - k, rows=active)
  icache = cache_lib.rollback(icache, count - k, rows=active)
  seg1 = jnp.where(active, 0, -1)[:, None].astype(jnp.int32)
  last = ys[:, k - 1 : k]
  _, dcache = draft(last, dcache, segment_ids=seg1)
  _, icache = inner(last, icache, segment_ids=seg1)
  return (dcache, icache), ys[:, :k], qs[:, :k], calls + active.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2, 3))
def _generate(graphs, states, tcache, dstate, pending, rng, spec: _Spec) -> SpeculativeOutput:
  models = [nnx.merge(g, s) for g, s in zip(graphs, states)]
  target = models[0]
  b = pending.shape[0]
  k, max_new, sampling = spec.k, spec.max_new, spec.sampling
  width = max_new + k + 1  # a row may emit up to k + 1 tokens in its last round
  zeros = jnp.zeros((b,), jnp.int32)

  def round_(carry):
    r, tcache, dstate, pending, out, count, stats = carry
    active = count < max_new
    seg1 = jnp.where(active, 0, -1)[:, None].astype(jnp.int32)  # finished rows feed padding: nothing is cached
    k_draft, k_test = jax.random.split(jax.random.fold_in(rng, r))

    # Propose y_1..y_k with their distributions q.
    if spec.kind == "model":
      dstate, ys, qs = _draft_tokens(models[1], dstate, pending, k_draft, k, sampling, seg1)
      calls = (k + 1) * active.astype(jnp.int32)
    elif spec.kind == "staged":
      dstate, ys, qs, calls = _staged_tokens(
        models[1], models[2], dstate, pending, k_draft, k, spec.inner_k, sampling, active
      )
    else:
      qs = _probs(models[1](dstate[:, None])[:, 0, :k], sampling)  # [b, k, v]
      ys = jax.random.categorical(k_draft, jnp.log(qs), axis=-1).astype(jnp.int32)
      calls = zeros

    # Verify [pending, y_1..y_k] in one target call; test, resample, emit.
    chunk = jnp.concatenate([pending[:, None], ys], axis=1)
    seg = jnp.broadcast_to(seg1, chunk.shape)
    if spec.kind == "heads":
      logits, tcache, feats = target.extend(chunk, tcache, segment_ids=seg, return_features=True)
    else:
      logits, tcache = target(chunk, tcache, segment_ids=seg)
    a, z, beta, tested = _accept(_probs(logits, sampling), ys, qs, k_test)
    out = _emit(out, ys, a, z, count, active)

    # Roll back the k - a rejected drafts.
    tcache = cache_lib.rollback(tcache, k - a, rows=active)
    if spec.kind == "model":
      dstate = cache_lib.rollback(dstate, k - a, rows=active)
    elif spec.kind == "staged":
      dstate = tuple(cache_lib.rollback(c, k - a, rows=active) for c in dstate)
    else:  # the heads read the features of the last accepted token next
      f_a = jnp.take_along_axis(feats, a[:, None, None], axis=1)[:, 0].astype(jnp.float32)
      dstate = jnp.where(active[:, None], f_a, dstate)
    step = active.astype(jnp.int32)
    new = (a, step, beta, tested, calls)
    stats = jax.tree.map(lambda s, x: s + step * x, stats, new)
    return r + 1, tcache, dstate, jnp.where(active, z, pending), out, count + step * (a + 1), stats

  def cond(carry):
    return jnp.any(carry[5] < max_new)

  stats0 = (zeros, zeros, jnp.zeros((b,), jnp.float32), zeros, zeros)
  init = (zeros[0], tcache, dstate, pending, jnp.zeros((b, width), jnp.int32), zeros, stats0)
  _, tcache, dstate, pending, out, count, stats = jax.lax.while_loop(cond, round_, init)
  accepted, rounds, beta, tested, calls = stats
  return SpeculativeOutput(
    tokens=out[:, :max_new],
    all_tokens=out,
    accepted=accepted,
    rounds=rounds,
    proposed=rounds * k,
    tested=tested,
    accept_prob=beta,
    draft_calls=calls,
    target_cache=tcache,
    draft_cache=dstate,
    pending=pending,
    emitted=count,
  )


__all__ = ["DraftHeads", "SpeculativeOutput", "Staged", "TargetWithHeads", "expected_tokens_per_call", "generate"]
