"""Exact speculative decoding (``jstream.speculative``): greedy output equals the target's greedy decoding; sampled
tokens follow the target's distribution (first token and a later position, with top-k / top-p); rejected drafts
leave no trace in either cache; rows are independent; bad input is refused before any compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import jstream
from jstream import cache, rollout, speculative
from jstream.config import TransformerConfig


def _model(seed, vocab=16, layers=2, width=32, scale=0.0):
  cfg = TransformerConfig(vocab_size=vocab, num_layers=layers, num_heads=2, embed_dim=width, mlp_dim=2 * width)
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(seed))
  if scale:  # sharper distributions than the init's near-uniform ones, so that a wrong sampler shows
    emb = model.embed.embedding
    emb[...] = emb[...] * scale
  return model


@pytest.fixture(scope="module")
def pair():
  return _model(0), _model(1, layers=1, width=16)


def _prompts(b=3, p=5, vocab=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, p)), jnp.int32)


@pytest.mark.parametrize(
  "policy", [cache.Dense(64), cache.SinkWindow(2, 8, max_rollback=3)], ids=["dense", "sinkwindow-wrapped"]
)
def test_greedy_equals_plain_greedy_decoding(pair, policy):
  target, draft = pair
  prompt = _prompts()
  out = speculative.generate(target, draft, prompt, max_new_tokens=24, num_draft=3, policy=policy, temperature=0)
  ref = rollout.generate(target, prompt, max_new_tokens=24, policy=policy, temperature=0)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  proposed, accepted = np.asarray(out.proposed), np.asarray(out.accepted)
  assert (accepted < proposed).all()  # the draft is another model: some drafts were rejected ...
  assert (np.asarray(out.rounds) < 24).any()  # ... and some accepted: fewer target calls than tokens


def test_self_speculation_accepts_every_draft(pair):
  target, _ = pair
  out = speculative.generate(
    target, target, _prompts(), max_new_tokens=12, num_draft=3, policy=cache.Dense(64), rng=jax.random.key(5)
  )
  np.testing.assert_array_equal(np.asarray(out.accepted), np.asarray(out.proposed))
  np.testing.assert_array_equal(np.asarray(out.tokens_per_call), 4.0)  # K + 1 per target call


def _target_marginals(target, prompt, sampling):
  """Exact distributions of the first and second generated token under the target's own sampler."""
  probs = lambda lg: np.asarray(speculative._probs(jnp.asarray(lg), sampling), np.float64)
  first = probs(target.forward(prompt)[:, -1])[0]
  v = first.shape[0]
  seqs = jnp.concatenate([jnp.repeat(prompt, v, axis=0), jnp.arange(v, dtype=jnp.int32)[:, None]], axis=1)
  second = first @ probs(target.forward(seqs)[:, -1])
  return first, second


@pytest.mark.parametrize(
  "temperature,top_k,top_p", [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.8)], ids=["plain", "topk", "topp"]
)
def test_sampled_tokens_follow_the_target_distribution(temperature, top_k, top_p):
  vocab, n = 8, 6000
  target, draft = _model(2, vocab=vocab, scale=1.5), _model(3, vocab=vocab, layers=1, width=16, scale=1.5)
  sampling = rollout.Sampling(temperature, top_k, top_p)
  prompt = _prompts(1, 4, vocab, seed=1)
  first, second = _target_marginals(target, prompt, sampling)
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


def _stepper(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda tokens, kv: nnx.merge(graphdef, state)(tokens, kv))


def test_rejected_drafts_leave_no_trace_in_either_cache(pair):
  """After a run whose windows wrapped, both caches give the next-token logits of caches fed the emitted tokens
  directly (every row, its own number of tokens)."""
  target, draft = pair
  prompt = _prompts(2, 4)
  policy = cache.SinkWindow(2, 8, max_rollback=4, positions="cache_relative")
  out = speculative.generate(
    target, draft, prompt, max_new_tokens=30, num_draft=4, policy=policy, rng=jax.random.key(2)
  )
  assert int(np.min(out.accepted)) < int(np.min(out.proposed))  # rejections happened
  pending = out.pending[:, None]
  got_t, _ = target(pending, out.target_cache)
  got_d, _ = draft(pending, out.draft_cache)
  for row in range(2):
    seq = np.concatenate([np.asarray(prompt[row]), np.asarray(out.all_tokens[row, : int(out.emitted[row])])])
    assert seq[-1] == int(out.pending[row])
    for model, got in ((target, got_t), (draft, got_d)):
      step = _stepper(model)
      kv = model.init_cache(policy, 1)
      for tok in seq[:-1]:  # one token at a time: nothing speculative
        _, kv = step(jnp.asarray([[tok]], jnp.int32), kv)
      want, _ = step(jnp.asarray([[seq[-1]]], jnp.int32), kv)
      np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want[0]), atol=1e-5, rtol=1e-5)


def test_rows_are_independent_and_prompts_can_be_ragged(pair):
  target, draft = pair
  prompt = _prompts(3, 6, seed=4)
  lengths = np.array([6, 3, 5])
  kw = dict(max_new_tokens=10, num_draft=2, policy=cache.Dense(32), temperature=0)
  together = speculative.generate(target, draft, prompt, prompt_lengths=lengths, **kw)
  for row, n in enumerate(lengths):
    alone = speculative.generate(target, draft, prompt[row : row + 1, :n], **kw)
    np.testing.assert_array_equal(np.asarray(together.tokens[row]), np.asarray(alone.tokens[0]))
    assert int(together.accepted[row]) == int(alone.accepted[0])
  assert len(set(np.asarray(together.accepted).tolist())) > 1  # rows advanced by different amounts


def test_tokens_per_call_formula():
  assert speculative.expected_tokens_per_call(0.0, 4) == 1.0
  assert speculative.expected_tokens_per_call(1.0, 4) == 5.0
  assert speculative.expected_tokens_per_call(0.5, 2) == pytest.approx(1.75)


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
