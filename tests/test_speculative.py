"""Exact speculative decoding (``jstream.speculative``) with each kind of draft (a draft model, staged speculation,
draft heads on the target): greedy output equals the target's greedy decoding; sampled tokens follow the target's
distribution (first token and a later position, with top-k / top-p); rejected drafts leave no trace in any cache;
rows are independent; the acceptance statistics estimate alpha; the heads' loss and training; bad input is refused
before any compute."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import jstream
from jstream import cache, rollout, speculative
from jstream.config import TransformerConfig
from jstream.speculative import DraftHeads, Staged


def _model(seed, vocab=16, layers=2, width=32, scale=0.0):
  cfg = TransformerConfig(vocab_size=vocab, num_layers=layers, num_heads=2, embed_dim=width, mlp_dim=2 * width)
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(seed))
  if scale:  # sharper distributions than the init's near-uniform ones, so that a wrong sampler shows
    emb = model.embed.embedding
    emb[...] = emb[...] * scale
  return model


KINDS = ["model", "staged", "heads"]


def _heads(target, seed, scale=0.3, n=4):
  """Heads on ``target`` with random residual blocks (the init's zero blocks would copy the target's head)."""
  heads = DraftHeads.for_model(target, n, rngs=nnx.Rngs(seed))
  heads.w[...] = scale * jax.random.normal(jax.random.key(seed), heads.w.shape) / np.sqrt(heads.embed_dim)
  return heads


def _draft(kind, target, vocab=16, scale=0.0, policy=None):
  if kind == "heads":
    return _heads(target, 7)
  draft = _model(1, vocab=vocab, layers=1, width=16, scale=scale)
  if kind == "model":
    return draft
  return Staged(draft, _model(5, vocab=vocab, layers=1, width=8, scale=scale), inner_draft=2, policy=policy)


@pytest.fixture(scope="module")
def pair():
  return _model(0), _model(1, layers=1, width=16)


def _prompts(b=3, p=5, vocab=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, p)), jnp.int32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
  "policy", [cache.Dense(64), cache.SinkWindow(2, 8, max_rollback=5)], ids=["dense", "sinkwindow-wrapped"]
)
def test_greedy_equals_plain_greedy_decoding(pair, kind, policy):
  target = pair[0]
  prompt = _prompts()
  draft = _draft(kind, target)
  out = speculative.generate(target, draft, prompt, max_new_tokens=24, num_draft=3, policy=policy, temperature=0)
  ref = rollout.generate(target, prompt, max_new_tokens=24, policy=policy, temperature=0)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  proposed, accepted = np.asarray(out.proposed), np.asarray(out.accepted)
  assert (accepted < proposed).all()  # the draft is another model: some drafts were rejected ...
  if kind != "heads":  # (random heads seldom guess a greedy token)
    assert (np.asarray(out.rounds) < 24).any()  # ... and some accepted: fewer target calls than tokens


def test_self_speculation_accepts_every_draft(pair):
  target, _ = pair
  out = speculative.generate(
    target, target, _prompts(), max_new_tokens=12, num_draft=3, policy=cache.Dense(64), rng=jax.random.key(5)
  )
  np.testing.assert_array_equal(np.asarray(out.accepted), np.asarray(out.proposed))
  np.testing.assert_array_equal(np.asarray(out.tokens_per_call), 4.0)  # K + 1 per target call
  np.testing.assert_allclose(np.asarray(out.expected_acceptance), 1.0, rtol=1e-5)


def test_staged_with_the_draft_as_its_own_inner_draft_needs_fewer_draft_calls(pair):
  """Staged(draft, draft): every inner draft is accepted, so each round's 4 drafts take 2 inner rounds of 3 tokens
  (2 past the 4 rolled back) and one call to cache the 4th: 3 draft calls instead of 5."""
  target, draft = pair
  kw = dict(max_new_tokens=40, num_draft=4, policy=cache.Dense(96), rng=jax.random.key(3))
  staged = speculative.generate(target, Staged(draft, draft, inner_draft=2), _prompts(), **kw)
  np.testing.assert_array_equal(np.asarray(staged.draft_calls), 3 * np.asarray(staged.rounds))
  plain = speculative.generate(target, draft, _prompts(), **kw)
  np.testing.assert_array_equal(np.asarray(plain.draft_calls), 5 * np.asarray(plain.rounds))


def _target_marginals(target, prompt, sampling):
  """Exact distributions of the first and second generated token under the target's own sampler."""
  probs = lambda lg: np.asarray(speculative._probs(jnp.asarray(lg), sampling), np.float64)
  first = probs(target.forward(prompt)[:, -1])[0]
  v = first.shape[0]
  seqs = jnp.concatenate([jnp.repeat(prompt, v, axis=0), jnp.arange(v, dtype=jnp.int32)[:, None]], axis=1)
  second = first @ probs(target.forward(seqs)[:, -1])
  return first, second


@pytest.mark.parametrize(
  "kind,temperature,top_k,top_p",
  [
    ("model", 1.0, None, None),
    ("model", 0.7, 4, None),
    ("model", 1.3, None, 0.8),
    ("staged", 1.0, None, None),
    ("heads", 1.0, None, None),
  ],
  ids=["plain", "topk", "topp", "staged", "heads"],
)
def test_sampled_tokens_follow_the_target_distribution(kind, temperature, top_k, top_p):
  vocab, n = 8, 6000
  target = _model(2, vocab=vocab, scale=1.5)
  draft = _draft(kind, target, vocab=vocab, scale=1.5)
  sampling = rollout.Sampling(temperature, top_k, top_p)
  prompt = _prompts(1, 4, vocab, seed=1)
  first, second = _target_marginals(target, prompt, sampling)
  if kind == "model":
    q_first = np.asarray(speculative._probs(draft.forward(prompt)[:, -1], sampling))[0]
    assert 0.5 * np.abs(q_first - first).sum() > 0.15  # the draft really differs from the target
  out = speculative.generate(
    target,
    draft,
    jnp.repeat(prompt, n, axis=0),
    max_new_tokens=2,
    num_draft=2,
    policy=cache.Dense(16),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    rng=jax.random.key(11),
  )
  tokens = np.asarray(out.tokens)
  assert 0.05 < float(np.mean(out.acceptance_rate)) < 0.95  # both branches (accept, resample) are exercised
  for pos, want in ((0, first), (1, second)):
    counts = np.bincount(tokens[:, pos], minlength=vocab)
    keep = want > 0
    assert counts[~keep].sum() == 0, (pos, counts, want)  # nothing outside top-k / top-p
    expected = want / want.sum() * n
    big = expected >= 5  # bins with small expectations are pooled (the chi-square approximation needs >= 5)
    obs = np.append(counts[big], counts[keep & ~big].sum())
    exp = np.append(expected[big], expected[keep & ~big].sum())
    obs, exp = (obs, exp) if exp[-1] >= 5 else (obs[:-1] + 0, exp[:-1] * (n / exp[:-1].sum()))
    chi2 = stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert chi2.pvalue > 1e-3, (pos, counts, np.round(expected))


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens, kv):
  return nnx.merge(graphdef, state).extend(tokens, kv, return_features=True)


def _fed(model, policy, seq):
  """``model``'s ``(logits, cache, features)`` for the last of ``seq`` after feeding the others one at a time:
  nothing speculative (one compiled step per model)."""
  graphdef, state = nnx.split(model)
  kv = model.init_cache(policy, 1)
  for tok in seq[:-1]:
    kv = _step(graphdef, state, jnp.asarray([[tok]], jnp.int32), kv)[1]
  return _step(graphdef, state, jnp.asarray([[seq[-1]]], jnp.int32), kv)


@pytest.mark.parametrize("kind", KINDS)
def test_rejected_drafts_leave_no_trace_in_any_cache(pair, kind):
  """After a run whose windows wrapped, every cache gives the next-token logits of a cache fed the emitted tokens
  directly (every row, its own number of tokens); draft heads hold the features of the last token before
  ``pending``."""
  target = pair[0]
  prompt = _prompts(2, 4)
  policy = cache.SinkWindow(2, 8, max_rollback=6, positions="cache_relative")
  draft = _draft(kind, target, policy=policy)
  out = speculative.generate(
    target, draft, prompt, max_new_tokens=30, num_draft=4, policy=policy, rng=jax.random.key(2)
  )
  assert int(np.min(out.accepted)) < int(np.min(out.proposed))  # rejections happened
  assert int(np.max(out.accepted)) > 0  # and acceptances
  pending = out.pending[:, None]
  checks = [(target, target(pending, out.target_cache)[0])]
  if kind == "model":
    checks.append((draft, draft(pending, out.draft_cache)[0]))
  elif kind == "staged":
    checks += [(m, m(pending, c)[0]) for m, c in zip((draft.draft, draft.inner), out.draft_cache)]
  for row in range(2):
    seq = np.concatenate([np.asarray(prompt[row]), np.asarray(out.all_tokens[row, : int(out.emitted[row])])])
    assert seq[-1] == int(out.pending[row])
    for model, got in checks:
      want = _fed(model, policy, seq)[0]
      np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want[0]), atol=1e-5, rtol=1e-5)
    if kind == "heads":
      feats = _fed(target, policy, seq[:-1])[2]
      np.testing.assert_allclose(np.asarray(out.draft_cache[row]), np.asarray(feats[0, 0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_are_independent_and_prompts_can_be_ragged(pair, kind):
  target = pair[0]
  draft = _draft(kind, target)
  prompt = _prompts(3, 6, seed=4)
  lengths = np.array([6, 3, 5])
  kw = dict(max_new_tokens=10, num_draft=2, policy=cache.Dense(32), temperature=0)
  together = speculative.generate(target, draft, prompt, prompt_lengths=lengths, **kw)
  for row, n in enumerate(lengths):
    alone = speculative.generate(target, draft, prompt[row : row + 1, :n], **kw)
    np.testing.assert_array_equal(np.asarray(together.tokens[row]), np.asarray(alone.tokens[0]))
    assert int(together.accepted[row]) == int(alone.accepted[0])
    assert int(together.draft_calls[row]) == int(alone.draft_calls[0])
  if kind == "model":
    assert len(set(np.asarray(together.accepted).tolist())) > 1  # rows advanced by different amounts


def test_acceptance_statistics_estimate_alpha(pair):
  """Each tested draft is accepted with probability ``sum_x min(p, q)``: over many rounds the accepted count
  matches the summed probabilities (``acceptance_rate`` vs ``expected_acceptance``); untested drafts after a
  rejection count in neither; every round emits its accepted drafts plus one token."""
  target, draft = pair
  out = speculative.generate(
    target, draft, _prompts(64, 4), max_new_tokens=40, num_draft=4, policy=cache.Dense(64), rng=jax.random.key(9)
  )
  accepted, tested, proposed = (int(np.sum(x)) for x in (out.accepted, out.tested, out.proposed))
  assert accepted < tested < proposed
  emitted, rounds = np.asarray(out.emitted), np.asarray(out.rounds)
  np.testing.assert_array_equal(emitted, np.asarray(out.accepted) + rounds)
  rejections = tested - accepted
  assert rejections <= int(np.sum(rounds))  # at most one rejection per round
  expected = float(np.sum(out.accept_prob))
  sd = np.sqrt(tested * 0.25)  # a Bernoulli sum's standard deviation is at most sqrt(n / 4)
  assert abs(accepted - expected) < 4 * sd, (accepted, expected, sd)
  assert 0.2 < expected / tested < 0.9  # a mixed regime, where a wrong count would show


def test_tokens_per_call_formula():
  assert speculative.expected_tokens_per_call(0.0, 4) == 1.0
  assert speculative.expected_tokens_per_call(1.0, 4) == 5.0
  assert speculative.expected_tokens_per_call(0.5, 2) == pytest.approx(1.75)


def test_features_are_the_unembedding_input(pair):
  """``return_features``: prefill, chunked ``extend`` and ``forward`` give the same features, and the target's
  head on them gives its logits."""
  target = pair[0]
  tokens = _prompts(2, 9, seed=6)
  logits, feats = target.forward(tokens, return_features=True)
  np.testing.assert_allclose(np.asarray(target.unembed(feats)), np.asarray(logits), atol=1e-5, rtol=1e-5)
  last, kv, f_last = rollout.prefill(target, tokens[:, :5], target.init_cache(cache.Dense(16), 2), return_features=True)
  np.testing.assert_allclose(np.asarray(f_last), np.asarray(feats[:, 4]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(last), np.asarray(logits[:, 4]), atol=1e-4, rtol=1e-4)
  lg, _, f = target.extend(tokens[:, 5:], kv, return_features=True)
  np.testing.assert_allclose(np.asarray(f), np.asarray(feats[:, 5:]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lg), np.asarray(logits[:, 5:]), atol=1e-4, rtol=1e-4)


def test_draft_heads_loss_against_numpy(pair):
  target = pair[0]
  heads = _heads(target, 3, scale=1.0, n=3)
  heads.b[...] = 0.1 * jax.random.normal(jax.random.key(1), heads.b.shape)
  tokens = _prompts(2, 12, seed=8)
  loss, metrics = heads.loss(target, tokens, decay=0.5)
  _, f = target.forward(tokens, return_features=True)
  f = np.asarray(f, np.float64)
  w, b, u = (np.asarray(x[...], np.float64) for x in (heads.w, heads.b, heads.unembed))
  total, wsum = 0.0, 0.0
  for i in range(3):
    z = f @ w[i] + b[i]
    logits = (f + z / (1 + np.exp(-z))) @ u[i]  # [b, n, v]
    lg, tgt = logits[:, : 12 - 2 - i], np.asarray(tokens)[:, 2 + i :]
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tgt[..., None], -1).mean()
    total, wsum = total + 0.5**i * ce, wsum + 0.5**i
    assert float(metrics[f"head{i + 1}_accuracy"]) == pytest.approx(np.mean(lg.argmax(-1) == tgt))
  assert float(loss) == pytest.approx(total / wsum, rel=1e-5)


def test_fresh_heads_copy_the_target_head(pair):
  """``DraftHeads.for_model``: zero residual blocks and the target's unembedding, so every head starts as the
  target's own next-token head."""
  target = pair[0]
  heads = DraftHeads.for_model(target, 2)
  logits, feats = target.forward(_prompts(1, 6), return_features=True)
  got = np.asarray(heads(feats))
  for i in range(2):
    np.testing.assert_allclose(got[:, :, i], np.asarray(logits), atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_before_compute(pair):
  target, draft = pair
  prompt = _prompts()
  other = _model(4, vocab=17)
  with pytest.raises(ValueError, match="vocabulary"):
    speculative.generate(target, other, prompt, max_new_tokens=4, num_draft=2, policy=cache.Dense(32))
  with pytest.raises(ValueError, match="rollback room"):
    speculative.generate(target, draft, prompt, max_new_tokens=4, num_draft=2, policy=cache.SinkWindow(2, 8))
  with pytest.raises(ValueError, match="rollback room of draft_policy"):
    speculative.generate(
      target,
      draft,
      prompt,
      max_new_tokens=4,
      num_draft=2,
      policy=cache.Dense(32),
      draft_policy=cache.Window(8, max_rollback=1),
    )
  with pytest.raises(ValueError, match="num_draft"):
    speculative.generate(target, draft, prompt, max_new_tokens=4, num_draft=0, policy=cache.Dense(32))
  with pytest.raises(ValueError, match="verification chunk"):
    speculative.generate(target, draft, prompt, max_new_tokens=4, num_draft=4, policy=cache.Dense(4))
  staged = Staged(draft, draft, inner_draft=3, policy=cache.SinkWindow(2, 8, max_rollback=4))
  with pytest.raises(ValueError, match="rollback room of Staged policy"):  # needs num_draft + inner_draft = 5
    speculative.generate(target, staged, prompt, max_new_tokens=4, num_draft=2, policy=cache.Dense(32))
  with pytest.raises(ValueError, match="Staged draft and inner draft must share a vocabulary"):
    speculative.generate(target, Staged(draft, other), prompt, max_new_tokens=4, num_draft=2, policy=cache.Dense(32))
  heads = DraftHeads.for_model(target, 2)
  with pytest.raises(ValueError, match="2 heads"):
    speculative.generate(target, heads, prompt, max_new_tokens=4, num_draft=3, policy=cache.Dense(32))
  with pytest.raises(ValueError, match="features of width"):
    speculative.generate(target, DraftHeads(8, 16, 2, rngs=nnx.Rngs(0)), prompt, max_new_tokens=4, num_draft=2,
                         policy=cache.Dense(32))  # fmt: skip
  with pytest.raises(TypeError, match="draft must be"):
    speculative.generate(target, object(), prompt, max_new_tokens=4, num_draft=2, policy=cache.Dense(32))
