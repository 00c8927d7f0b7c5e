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

Invariant of a round: both caches hold every emitted token except the last one, ``pending``. The draft reads
``pending`` and its own proposals one at a time (``K + 1`` single-token calls, the last only to cache ``y_K``); the
target reads ``[pending, y_1..y_K]`` in one call. After the test, both roll back the ``K - a`` rejected tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jstream import cache as cache_lib
from jstream.rollout import Sampling, filter_logits, prefill
from jstream.typing import Array, ArrayLike, Int, TokenIds


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
    target_cache, draft_cache: the caches after the run; they hold every emitted token (also those a row emitted
      past ``max_new_tokens`` in its last round) except the last, ``pending``.
    pending: ``[b]`` the last emitted token of each row (not yet in the caches).
    emitted: ``[b]`` tokens each row emitted (>= ``max_new_tokens``).
  """

  tokens: Array
  all_tokens: Array
  accepted: Array
  rounds: Array
  proposed: Array
  target_cache: object
  draft_cache: object
  pending: Array
  emitted: Array

  @property
  def acceptance_rate(self) -> Array:
    """``[b]`` share of proposed drafts that were accepted."""
    return self.accepted / jnp.maximum(self.proposed, 1)

  @property
  def tokens_per_call(self) -> Array:
    """``[b]`` tokens emitted per target call."""
    return self.emitted / jnp.maximum(self.rounds, 1)


def expected_tokens_per_call(acceptance: float, num_draft: int) -> float:
  """Leviathan et al.'s expected tokens per target call, ``(1 - a^(K+1)) / (1 - a)``, for i.i.d. acceptance ``a``."""
  if acceptance >= 1.0:
    return float(num_draft + 1)
  return (1.0 - acceptance ** (num_draft + 1)) / (1.0 - acceptance)


def _probs(logits: Array, sampling: Sampling) -> Array:
  """The sampling distribution ``[..., v]`` (float32) that ``rollout.sample`` draws from: one-hot argmax for
  ``temperature=0``, else the softmax of the filtered logits."""
  if sampling.temperature == 0:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


def _check(target, draft, max_new_tokens, num_draft, policy, draft_policy) -> None:
  if not isinstance(num_draft, (int, np.integer)) or isinstance(num_draft, bool) or num_draft < 1:
    raise ValueError(f"num_draft must be a positive int, got {num_draft!r}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  tv, dv = target.config.vocab_size, draft.config.vocab_size
  if tv != dv:
    raise ValueError(f"target and draft must share a vocabulary: vocab_size {tv} vs {dv}")
  for name, pol in (("policy", policy), ("draft_policy", draft_policy)):
    if not isinstance(pol, cache_lib.Policy):
      raise TypeError(f"{name} must be a cache policy, got {pol!r}")
    if num_draft > pol.max_rollback:
      raise ValueError(
        f"num_draft ({num_draft}) exceeds the rollback room of {name} {pol} (max_rollback {pol.max_rollback}): "
        f"rejected drafts could not be undone exactly; give the policy max_rollback >= {num_draft}"
      )
    if num_draft + 1 > pol.capacity:
      raise ValueError(f"{name} {pol} holds {pol.capacity} tokens, fewer than a verification chunk ({num_draft + 1})")


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
    target, draft: ``StreamingTransformer``s with the same vocabulary (the draft may be the target itself).
    prompt: ``[b, p]`` prompt ids (right-padded when ``prompt_lengths`` is given).
    max_new_tokens: tokens to generate per row.
    num_draft: drafts per round ``K`` (the target verifies ``K + 1`` positions per call).
    policy: the target's cache policy; ``draft_policy`` the draft's (default: the same). Each needs
      ``max_rollback >= num_draft`` (``Dense`` always has it; ``Window`` / ``SinkWindow(..., max_rollback=K)``).
    temperature, top_k, top_p: the target's sampling (``rollout.Sampling``), applied to both models.
    rng: a PRNG key (default ``jax.random.key(0)``); round ``r`` uses ``fold_in(rng, r)``.
    prompt_lengths: ``[b]`` prompt lengths for ragged prompts.
    dtype: the caches' dtype.

  Returns:
    ``SpeculativeOutput`` with the tokens and the acceptance statistics.

  Raises:
    ValueError / TypeError: bad arguments (checked before any compute): vocabularies that differ, ``num_draft``
      beyond a policy's rollback room or capacity, a bad prompt.
  """
  draft_policy = policy if draft_policy is None else draft_policy
  prompt = target.check_tokens(prompt, "prompt")
  _check(target, draft, max_new_tokens, num_draft, policy, draft_policy)
  sampling = Sampling(temperature, top_k, top_p)
  b, p = prompt.shape
  lengths = jnp.full((b,), p, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
  pending = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
  tcache = target.init_cache(policy, b, dtype=dtype)
  dcache = draft.init_cache(draft_policy, b, dtype=dtype)
  if p > 1:  # every prompt token but each row's last enters the caches; the last is the first pending token
    head = prompt[:, : p - 1]
    _, tcache = prefill(target, head, tcache, chunk_size=min(p - 1, policy.capacity), lengths=lengths - 1)
    _, dcache = prefill(draft, head, dcache, chunk_size=min(p - 1, draft_policy.capacity), lengths=lengths - 1)
  rng = jax.random.key(0) if rng is None else rng
  tg, ts = nnx.split(target)
  dg, ds = nnx.split(draft)
  return _generate(tg, ts, dg, ds, tcache, dcache, pending, rng, int(max_new_tokens), int(num_draft), sampling)


@functools.partial(jax.jit, static_argnums=(0, 2, 8, 9, 10), donate_argnums=(4, 5))
def _generate(tg, ts, dg, ds, tcache, dcache, pending, rng, max_new, k, sampling) -> SpeculativeOutput:
  target, draft = nnx.merge(tg, ts), nnx.merge(dg, ds)
  b = pending.shape[0]
  v = target.config.vocab_size
  width = max_new + k + 1  # a row may emit up to k + 1 tokens in its last round
  zeros = jnp.zeros((b,), jnp.int32)

  def round_(carry):
    r, tcache, dcache, pending, out, count, accepted, rounds = carry
    active = count < max_new
    seg1 = jnp.where(active, 0, -1)[:, None].astype(jnp.int32)  # finished rows feed padding: nothing is cached
    key = jax.random.fold_in(rng, r)
    k_draft, k_accept, k_resample = jax.random.split(key, 3)

    # Draft: read pending, propose y_1..y_k one at a time; a last call caches y_k.
    def draft_step(c, i):
      dcache, tok = c
      logits, dcache = draft(tok[:, None], dcache, segment_ids=seg1)
      q = _probs(logits[:, 0], sampling)
      y = jax.random.categorical(jax.random.fold_in(k_draft, i), jnp.log(q), axis=-1).astype(jnp.int32)
      return (dcache, y), (y, q)

    (dcache, _), (ys, qs) = jax.lax.scan(draft_step, (dcache, pending), jnp.arange(k + 1))
    ys, qs = jnp.swapaxes(ys[:k], 0, 1), jnp.swapaxes(qs[:k], 0, 1)  # [b, k], [b, k, v]

    # Target: [pending, y_1..y_k] in one call; p_i after each.
    chunk = jnp.concatenate([pending[:, None], ys], axis=1)
    seg = jnp.broadcast_to(seg1, (b, k + 1))
    logits, tcache = target(chunk, tcache, segment_ids=seg)
    ps = _probs(logits, sampling)  # [b, k + 1, v]

    # Accept draft i with probability min(1, p_i(y) / q_i(y)); a = accepted before the first rejection.
    p_y = jnp.take_along_axis(ps[:, :k], ys[..., None], axis=-1)[..., 0]
    q_y = jnp.take_along_axis(qs, ys[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, (b, k))
    ok = u * q_y < p_y  # u < p / q without dividing (q_y > 0: y was drawn from q)
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [b]

    # The next token: from norm(max(0, p_a - q_a)) after a rejection, from p_{k+1} (q padded with 0) if none.
    q_pad = jnp.concatenate([qs, jnp.zeros((b, 1, v), jnp.float32)], axis=1)
    p_a = jnp.take_along_axis(ps, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(q_pad, a[:, None, None], axis=1)[:, 0]
    resid = jnp.maximum(p_a - q_a, 0.0)
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_a)  # (p == q: rounding only)
    z = jax.random.categorical(k_resample, jnp.log(resid), axis=-1).astype(jnp.int32)

    # Emit y_1..y_a, z at each row's count; roll back the k - a rejected drafts in both caches.
    idx = jnp.arange(k + 1)
    ys_pad = jnp.concatenate([ys, zeros[:, None]], axis=1)
    emit = jnp.where(idx[None] < a[:, None], ys_pad, jnp.where(idx[None] == a[:, None], z[:, None], 0))
    write = lambda row, e, c: jax.lax.dynamic_update_slice(row, e, (c,))
    out = jnp.where(active[:, None], jax.vmap(write)(out, emit, count), out)
    tcache = cache_lib.rollback(tcache, k - a, rows=active)
    dcache = cache_lib.rollback(dcache, k - a, rows=active)
    step = active.astype(jnp.int32)
    count = count + step * (a + 1)
    accepted = accepted + step * a
    pending = jnp.where(active, z, pending)
    return r + 1, tcache, dcache, pending, out, count, accepted, rounds + step

  def cond(carry):
    return jnp.any(carry[5] < max_new)

  init = (jnp.zeros((), jnp.int32), tcache, dcache, pending, jnp.zeros((b, width), jnp.int32), zeros, zeros, zeros)
  _, tcache, dcache, pending, out, count, accepted, rounds = jax.lax.while_loop(cond, round_, init)
  return SpeculativeOutput(
    tokens=out[:, :max_new],
    all_tokens=out,
    accepted=accepted,
    rounds=rounds,
    proposed=rounds * k,
    target_cache=tcache,
    draft_cache=dcache,
    pending=pending,
    emitted=count,
  )


__all__ = ["SpeculativeOutput", "expected_tokens_per_call", "generate"]
