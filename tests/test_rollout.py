"""Rollouts: generation equals step-by-step argmax over the offline forward, ragged prompts, sampling
distributions, stream NLL independent of chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import stream_logits

from conftest import random_tokens, tiny_model, tol
from jstream import cache as C
from jstream import rollout


def test_greedy_generation_equals_teacher_forced_argmax():
  model = tiny_model(seed=40)
  prompt = random_tokens(2, 5, seed=41)
  out = rollout.generate(model, prompt, max_new_tokens=12, policy=C.Dense(32), temperature=0.0)
  seq = jnp.concatenate([prompt, out.tokens], axis=1)
  logits = model.forward(seq)
  np.testing.assert_array_equal(out.tokens, jnp.argmax(logits[:, 4:-1], -1))


def test_generation_with_sinks_matches_banded_forward():
  model = tiny_model(seed=42)
  prompt = random_tokens(1, 9, seed=43)
  policy = C.SinkWindow(2, 6)
  out = rollout.generate(model, prompt, max_new_tokens=20, policy=policy, temperature=0.0, prefill_chunk=4)
  seq = jnp.concatenate([prompt, out.tokens], axis=1)
  logits = model.forward(seq, window=6, num_sinks=2)
  np.testing.assert_array_equal(out.tokens, jnp.argmax(logits[:, 8:-1], -1))


def test_decoder_calls_continue_the_stream_like_the_banded_forward():
  """A ``Decoder`` built once and called three times (carrying cache and logits) decodes what greedy argmax over
  the offline forward with the policy's mask predicts, and what ``decode`` gives in one call."""
  model = tiny_model(seed=46)
  prompt = random_tokens(2, 7, seed=47)
  policy = C.SinkWindow(2, 6, positions="absolute")
  last, cache = rollout.prefill(model, prompt, model.init_cache(policy, 2), chunk_size=3)
  decoder = rollout.Decoder(model, steps=5, sampling=rollout.Sampling(temperature=0.0))
  pieces = []
  for _ in range(3):
    out = decoder(cache, last)
    pieces.append(out.tokens)
    cache, last = out.cache, out.last_logits
  got = jnp.concatenate(pieces, axis=1)
  seq = jnp.concatenate([prompt, got], axis=1)
  logits = model.forward(seq, window=6, num_sinks=2)
  np.testing.assert_array_equal(got, jnp.argmax(logits[:, 6:-1], -1))
  last, cache = rollout.prefill(model, prompt, model.init_cache(policy, 2), chunk_size=3)
  once = rollout.decode(model, cache, last, steps=15, rng=None, sampling=rollout.Sampling(temperature=0.0))
  np.testing.assert_array_equal(once.tokens, got)
  with pytest.raises(ValueError, match="steps"):
    rollout.Decoder(model, steps=0)


def test_ragged_prompts_equal_each_row_alone():
  model = tiny_model(seed=44)
  prompt = np.asarray(random_tokens(3, 7, seed=45))
  lengths = np.array([7, 3, 5])
  policy = C.SinkWindow(1, 8, positions="cache_relative")
  batch = rollout.generate(
    model, prompt, max_new_tokens=6, policy=policy, temperature=0.0, prompt_lengths=lengths, prefill_chunk=4
  )
  for r in range(3):
    alone = rollout.generate(model, prompt[r : r + 1, : lengths[r]], max_new_tokens=6, policy=policy, temperature=0.0)
    np.testing.assert_array_equal(batch.tokens[r], alone.tokens[0])


@pytest.mark.parametrize("policy", [C.SinkWindow(2, 6), C.Recompute(6)], ids=str)
def test_padded_and_ragged_prefill_equals_the_offline_forward(policy):
  """Chunk padding and ragged prompt lengths never enter the cache: the prefill's last logits equal the offline
  forward of each row's own prompt (under the window the policy implies), for every chunk size."""
  model = tiny_model(seed=50)
  prompt = np.asarray(random_tokens(3, 9, seed=51))
  lengths = np.array([9, 4, 7])
  nxt = np.asarray(random_tokens(3, 1, seed=52))  # one more token after the prompt

  def offline_last(row):
    row = row[None]
    if isinstance(policy, C.Recompute):  # the last token sees the last `window` tokens, re-indexed from 0
      return model.forward(row[:, -policy.window :])[0, -1]
    return model.forward(row, window=policy.window, num_sinks=policy.num_sinks)[0, -1]

  rows = [prompt[r, : lengths[r]] for r in range(3)]
  want_last = [offline_last(row) for row in rows]
  want_after = [offline_last(np.append(row, nxt[r])) for r, row in enumerate(rows)]
  for chunk in (1, 4, 6):
    cache = model.init_cache(policy, 3)
    last, cache = rollout.prefill(model, prompt, cache, chunk_size=chunk, lengths=lengths)
    after, _ = model(nxt, cache)
    for r in range(3):
      np.testing.assert_allclose(last[r], want_last[r], **tol(jnp.float32))
      np.testing.assert_allclose(after[r, 0], want_after[r], **tol(jnp.float32))


def test_sampling_is_reproducible_and_depends_on_the_key():
  model = tiny_model(seed=46)
  prompt = random_tokens(2, 3, seed=47)
  kw = dict(max_new_tokens=16, policy=C.Window(8), temperature=1.0, top_k=20)
  a = rollout.generate(model, prompt, rng=jax.random.key(1), **kw).tokens
  b = rollout.generate(model, prompt, rng=jax.random.key(1), **kw).tokens
  c = rollout.generate(model, prompt, rng=jax.random.key(2), **kw).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize(
  "sampling",
  [
    rollout.Sampling(1.0),
    rollout.Sampling(0.5),
    rollout.Sampling(1.0, top_k=3),
    rollout.Sampling(1.0, top_p=0.7),
    rollout.Sampling(2.0, top_k=4, top_p=0.9),
  ],
  ids=str,
)
def test_sampling_distribution(sampling):
  logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  p = np.exp(np.asarray(logits, np.float64) / sampling.temperature)
  p /= p.sum()
  order = np.argsort(-p)
  keep = np.ones_like(p, bool)
  if sampling.top_k is not None:
    keep[order[sampling.top_k :]] = False
  if sampling.top_p is not None:
    before = np.cumsum(p[order]) - p[order]
    keep[order[before >= sampling.top_p]] = False
  want = np.where(keep, p, 0)
  want /= want.sum()
  n = 40_000
  draws = jax.vmap(lambda k: rollout.sample(logits, k, sampling))(jax.random.split(jax.random.key(0), n))
  freq = np.bincount(np.asarray(draws), minlength=6) / n
  np.testing.assert_allclose(freq, want, atol=0.01)
  assert np.all(freq[~keep] == 0)


def test_greedy_sampling_is_argmax():
  logits = jax.random.normal(jax.random.key(3), (5, 11))
  np.testing.assert_array_equal(
    rollout.sample(logits, jax.random.key(0), rollout.Sampling(0.0)), jnp.argmax(logits, -1)
  )


def test_stream_nll_does_not_depend_on_chunking_in_cache_relative_mode():
  model = tiny_model(seed=48)
  tokens = random_tokens(2, 41, seed=49)
  policy = C.SinkWindow(2, 8, positions="cache_relative")
  ref = rollout.stream_nll(model, tokens, policy, chunk_size=1)
  for chunk in (3, 10):
    np.testing.assert_allclose(rollout.stream_nll(model, tokens, policy, chunk_size=chunk), ref, atol=2e-5)


def test_bad_arguments():
  model = tiny_model(seed=50)
  with pytest.raises(ValueError, match="exactly one of"):
    rollout.generate(model, random_tokens(1, 3), max_new_tokens=2)
  with pytest.raises(ValueError, match="temperature"):
    rollout.Sampling(-1.0)
  with pytest.raises(ValueError, match="top_p"):
    rollout.Sampling(top_p=0.0)
  with pytest.raises(ValueError, match="prompt ids"):
    rollout.generate(model, jnp.array([[70]]), max_new_tokens=2, policy=C.Window(4))


def test_segments_carrying_the_cache_equal_one_stream():
  model = tiny_model(seed=51)
  tokens = random_tokens(2, 40, seed=52)
  policy = C.SinkWindow(2, 6, positions="cache_relative")
  whole = rollout.stream_nll(model, tokens, policy, chunk_size=4)
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
  cache = model.init_cache(policy, 2)
  parts = []
  for i in range(0, 40, 16):
    nll, cache = rollout.nll_segment(model, tokens[:, i : i + 16], targets[:, i : i + 16], cache, chunk_size=4)
    parts.append(nll)
  seg = jnp.concatenate(parts, axis=1)
  np.testing.assert_allclose(seg[:, :-1], whole[:, 1:], atol=1e-5)
  assert np.all(np.isnan(seg[:, -1]))


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.6), (4, 0.5), (11, None), (None, 1.0)])
def test_filter_logits_keeps_what_numpy_keeps_per_row(top_k, top_p):
  """A batch of random logits (with ties at the k-th value): each row keeps exactly the tokens a per-row NumPy
  implementation of top-k then top-p keeps, scaled by the temperature."""
  rng = np.random.default_rng(70)
  logits = rng.normal(size=(5, 11)).astype(np.float32)
  logits[1, [2, 5, 7]] = logits[1].max() - 0.1  # a tie that straddles the k-th place
  temp = 0.7
  got = np.asarray(rollout.filter_logits(jnp.asarray(logits), rollout.Sampling(temp, top_k, top_p)))
  for r in range(5):
    x = logits[r] / temp
    keep = np.ones(11, bool)
    if top_k is not None and top_k < 11:
      keep &= x >= np.sort(x)[::-1][top_k - 1]  # ties with the k-th value are kept
    if top_p is not None and top_p < 1.0:
      y = np.where(keep, x, -np.inf)
      order = np.argsort(-y, kind="stable")
      p = np.exp(y[order] - y[order][0])
      p /= p.sum()
      before = np.cumsum(p) - p
      kept = np.zeros(11, bool)
      kept[order[before < top_p]] = True
      keep &= kept
    np.testing.assert_array_equal(np.isfinite(got[r]), keep)
    np.testing.assert_allclose(got[r][keep], x[keep], rtol=1e-6)


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_stream_nll_under_segmented_equals_the_reference(positions):
  """``stream_nll`` with a two-track Segmented policy (text sinks + window, vision window) and padding equals the
  float64 token-by-token reference; padded tokens and tokens followed by padding get NaN."""
  model = tiny_model(seed=70)
  policy = C.Segmented((C.SinkWindow(1, 5), C.Window(4)), positions=positions)
  n = 30
  tokens = random_tokens(1, n, seed=71)
  segs = np.array((jax.random.uniform(jax.random.key(72), (1, n)) < 0.5).astype(jnp.int32))
  segs[0, [7, 19]] = -1  # padding inside the stream
  got = np.asarray(rollout.stream_nll(model, tokens, policy, chunk_size=3, segment_ids=segs))
  keep = segs[0] >= 0
  logits = stream_logits(model, np.asarray(tokens[0])[keep], [(1, 5), (0, 4)], segment_ids=segs[0][keep],
                         positions=positions)  # fmt: skip
  logp = (
    logits
    - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  real = np.flatnonzero(keep)  # stream index of each real token
  want = np.full(n, np.nan)
  for j in range(1, len(real)):
    if real[j] == real[j - 1] + 1:  # a token right after a real token is predicted; after padding it is not
      want[real[j]] = -logp[j - 1, int(tokens[0, real[j]])]
  np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(want))
  np.testing.assert_allclose(got[0][~np.isnan(want)], want[~np.isnan(want)], atol=5e-5)
