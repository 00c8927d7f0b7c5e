"""Score-based eviction (H2O, SnapKV, age-normalised): equal to an independent float64 reference of each rule,
to SinkWindow / Dense where the rule reduces to them, compiled once in rollouts, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import scored_stream_logits

from conftest import chunk_sizes, compilations, jit_step, random_tokens, stream, tiny_model, tol
from jstream import cache as C
from jstream import rollout
from jstream.cache import planner

F32 = tol(jnp.float32)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_no_scored_slots_is_sinkwindow(positions, scan_layers):
  """budget == sinks + recent keeps exactly sinks + the recent window: SinkWindow(sinks, recent + 1) token by token."""
  model = tiny_model(seed=1, scan_layers=scan_layers)
  tokens = random_tokens(2, 30, seed=2)
  sizes = [1] * 30
  want, _ = stream(jit_step(model), tokens, model.init_cache(C.SinkWindow(2, 6, positions=positions), 2), sizes)
  for policy in (C.H2O(7, 5, 2, positions), C.SnapKV(7, 5, 2, positions=positions)):
    got, _ = stream(jit_step(model), tokens, model.init_cache(policy, 2), sizes)
    np.testing.assert_allclose(got, want, **F32)


@pytest.mark.parametrize("policy", [C.H2O(40, 1), C.SnapKV(40, 1, kernel=3), C.AgeNormalized(40, 2, 1)], ids=str)
def test_budget_above_the_stream_is_dense(policy):
  model = tiny_model(seed=3)
  tokens = random_tokens(2, 40, seed=4)
  got, _ = stream(jit_step(model), tokens, model.init_cache(policy, 2), chunk_sizes(40, [1, 4, 9], seed=5))
  np.testing.assert_allclose(got, model.forward(tokens), **F32)


CASES = [
  (C.H2O(9, 3, 1), dict(score="accumulated")),
  (C.H2O(9, 2, 0, "cache_relative"), dict(score="accumulated")),
  (C.AgeNormalized(9, 3, 1), dict(score="mean")),
  (C.SnapKV(9, 2, 1, observation=3, kernel=3), dict(score="observation", observation=3, kernel=3)),
  (
    C.SnapKV(9, 3, 0, observation=4, kernel=1, pooling="avg", positions="cache_relative"),
    dict(score="observation", observation=4, kernel=1, pooling="avg"),
  ),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c[0]) for c in CASES])
def test_equals_the_python_reference(case):
  """Chunked prefill then decode; every (layer, kv head) evicts on its own (two kv heads, two layers). Stacked and
  per-layer blocks alternate between cases (both layer structures also run in the SinkWindow test)."""
  policy, rule = CASES[case]
  model = tiny_model(seed=6 + case, scan_layers=case % 2 == 0)
  n = 36
  tokens = random_tokens(2, n, seed=7 + case)
  sizes = [5, 1, 7, 1, 1, 3] + [1] * (n - 18)
  got, cache = stream(jit_step(model), tokens, model.init_cache(policy, 2), sizes)
  for row in range(2):
    want = scored_stream_logits(
      model,
      tokens[row],
      sizes,
      budget=policy.budget,
      recent=policy.recent,
      num_sinks=policy.num_sinks,
      positions=policy.positions,
      **rule,
    )
    np.testing.assert_allclose(got[row], want, atol=5e-5, rtol=5e-5)
  idx = np.asarray(cache.idx)
  assert (idx >= 0).all()  # full, and the heads keep different tokens
  assert not all(np.array_equal(idx[0, 0, 0], idx[li, 0, h]) for li in range(2) for h in range(2))


@pytest.mark.parametrize("seed", [2, 3])
def test_chunks_between_single_tokens_keep_the_earlier_of_equal_scores(seed):
  """Single tokens leave the slots out of stream order; a chunk after them must still keep the earlier of tokens
  with equal priority, as the reference does. SnapKV's max pooling makes exact ties common; chunks and single
  tokens alternate with evictions in both."""
  model = tiny_model(seed=seed)
  policy = C.SnapKV(6, 1, 0, observation=2, kernel=3)
  sizes = [2] + [1] * 12 + [2, 2, 2] + [1] * 4 + [2] * 4
  tokens = random_tokens(1, sum(sizes), seed=100 + seed)
  got, _ = stream(jit_step(model), tokens, model.init_cache(policy, 1), sizes)
  want = scored_stream_logits(
    model, tokens[0], sizes, budget=6, recent=1, num_sinks=0, score="observation", observation=2, kernel=3
  )
  np.testing.assert_allclose(got[0], want, atol=5e-5, rtol=5e-5)


def test_score_eviction_differs_from_recency():
  """A guard on the reference test: with scored slots, H2O and the window keep different tokens (the outputs
  differ), so an H2O that silently kept the most recent tokens would fail."""
  model = tiny_model(seed=11)
  tokens = random_tokens(1, 30, seed=12)
  sizes = [1] * 30
  h2o, _ = stream(jit_step(model), tokens, model.init_cache(C.H2O(8, 2, 1), 1), sizes)
  window, _ = stream(jit_step(model), tokens, model.init_cache(C.SinkWindow(1, 8), 1), sizes)
  assert float(jnp.max(jnp.abs(h2o - window))) > 1e-3


def test_ragged_rows_with_a_reset_equal_each_stream_alone():
  model = tiny_model(seed=13)
  policy = C.H2O(8, 2, 1)
  tokens = random_tokens(2, 24, seed=14)
  step = jit_step(model)
  cache = model.init_cache(policy, 2)
  _, cache = step(tokens[:, :6], cache)
  _, cache = step(tokens[:, 6:10], cache)
  cache = C.reset(cache, rows=np.array([True, False]))
  # Row 0 restarts with the second half; row 1 continues its stream.
  got, _ = stream(step, tokens[:, 10:], cache, [3, 1, 1, 4, 1, 1, 3])
  alone, _ = stream(step, tokens[:1, 10:], model.init_cache(policy, 1), [3, 1, 1, 4, 1, 1, 3])
  whole, _ = stream(step, tokens[1:], model.init_cache(policy, 1), [6, 4, 3, 1, 1, 4, 1, 1, 3])
  np.testing.assert_allclose(got[0], alone[0], **F32)
  np.testing.assert_allclose(got[1], whole[0, 10:], **F32)


def test_padding_is_not_cached():
  model = tiny_model(seed=15)
  policy = C.AgeNormalized(8, 2, 1)
  tokens = random_tokens(1, 20, seed=16)
  want, _ = stream(jit_step(model), tokens, model.init_cache(policy, 1), [4, 1, 5, 1, 5, 4])
  padded = jnp.concatenate([tokens[:, :4], tokens[:, :2], tokens[:, 4:]], axis=1)
  seg = jnp.zeros((1, 22), jnp.int32).at[:, 4:6].set(-1)
  got, _ = stream(jit_step(model), padded, model.init_cache(policy, 1), [6, 1, 5, 1, 5, 4], segment_ids=seg)
  np.testing.assert_allclose(np.delete(np.asarray(got), [4, 5], axis=1), want, **F32)


def test_rebase_is_invisible(monkeypatch):
  """The index rebase of endless streams (every 2**29 tokens) changes no output; run it every 24 tokens."""
  model = tiny_model(seed=17)
  policy = C.H2O(8, 2, 1, "cache_relative")
  tokens = random_tokens(1, 90, seed=18)
  sizes = chunk_sizes(90, [1, 3, 6], seed=19)
  want, _ = stream(jit_step(model), tokens, model.init_cache(policy, 1), sizes)
  monkeypatch.setattr(planner, "REBASE_AT", 24)
  monkeypatch.setattr(planner, "REBASE_SHIFT", 12)
  got, cache = stream(jit_step(model), tokens, model.init_cache(policy, 1), sizes)
  assert int(cache.count[0]) < 40  # rebased repeatedly
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_stream_nll_compiles_once_and_equals_the_chunked_stream():
  model = tiny_model(seed=20)
  policy = C.SnapKV(12, 4, 1, observation=4, kernel=3)
  tokens = random_tokens(2, 96, seed=21)
  jax.clear_caches()
  with compilations() as n:
    nll = rollout.stream_nll(model, tokens, policy, chunk_size=6)
  assert n["_stream_nll"] == 1
  logits, _ = stream(jit_step(model), tokens, model.init_cache(policy, 2), [6] * 16)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  want = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(nll[:, 1:], want, atol=1e-4)


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_bf16_cache_keeps_float32_scores(positions):
  """A bf16 cache through a chunk and single tokens that evict: bf16 keys and values, float32 scores, and logits
  within bf16 tolerance of the float32 cache's (the same tokens kept: the scores are float32 in both)."""
  model = tiny_model(seed=22)
  tokens = random_tokens(1, 16, seed=23)
  sizes = [5] + [1] * 11
  got, cache = stream(
    jit_step(model), tokens, model.init_cache(C.H2O(8, 2, 1, positions), 1, dtype=jnp.bfloat16), sizes
  )
  assert cache.k.dtype == cache.v.dtype == jnp.bfloat16 and cache.score.dtype == jnp.float32
  assert float(jnp.sum(cache.score)) > 0 and int(cache.count[0]) == 16
  want, ref = stream(jit_step(model), tokens, model.init_cache(C.H2O(8, 2, 1, positions), 1), sizes)
  np.testing.assert_array_equal(np.sort(cache.idx, axis=-1), np.sort(ref.idx, axis=-1))
  np.testing.assert_allclose(got, want, **tol(jnp.bfloat16))


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="recent must be an int >= 1"):
    C.H2O(8, 0)
  with pytest.raises(ValueError, match="must fit in the cache"):
    C.H2O(8, 6, 3)
  with pytest.raises(ValueError, match="kernel must be odd"):
    C.SnapKV(8, 2, kernel=4)
  with pytest.raises(ValueError, match="pooling"):
    C.SnapKV(8, 2, pooling="median")
  model = tiny_model(seed=24)
  cache = model.init_cache(C.H2O(8, 2), 1)
  with pytest.raises(ValueError, match="longer than the cache capacity"):
    model(random_tokens(1, 9), cache)
  with pytest.raises(ValueError, match="segment_ids must be 0 or -1"):
    model(random_tokens(1, 3), cache, segment_ids=jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="cannot roll back"):
    C.rollback(cache, 1)
  with pytest.raises(ValueError, match="this model needs"):
    tiny_model(num_layers=3)(random_tokens(1, 2), cache)


def test_needle_streams_put_the_value_where_the_benchmark_scores_it():
  from experiments.bench_needle import LEAD, make_streams

  text = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, np.uint8).astype(np.int32)
  for control in (False, True):
    streams, where = make_streams(text, 50, 3, seed=1, control=control)
    for row, at in zip(streams, where):
      b = row.astype(np.uint8).tobytes()
      value = b[at[0] : at[-1] + 1]
      assert b[at[-1] + 1 : at[-1] + 3] == b'"\n' and len(value) == 6
      needle = b[LEAD:].split(b"\n")[1]  # the planted line: name = "value"
      name, shown = needle.split(b' = "')
      assert b[: at[0]].endswith(b"\n" + name + b' = "')  # the cue repeats the name just before the value
      assert (shown[:-1] == value) != control
      assert at[0] - (LEAD + len(needle) + 2) == 50 + len(name) + 5  # distance bytes, then the cue


def test_greedy_generate_equals_a_manual_argmax_loop():
  model = tiny_model(seed=25)
  policy = C.H2O(12, 3, 1)
  prompt = random_tokens(2, 8, seed=26)
  got = rollout.generate(model, prompt, max_new_tokens=20, policy=policy, temperature=0.0)
  got = np.asarray(getattr(got, "tokens", got))
  step = jit_step(model)
  logits, cache = step(prompt, model.init_cache(policy, 2))
  want = []
  for _ in range(20):
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
    want.append(tok)
    logits, cache = step(tok, cache)
  np.testing.assert_array_equal(got, np.concatenate(want, axis=1))


def test_a_single_token_takes_the_slot_the_ranking_frees():
  """``scored._token_slot`` (the decode step's choice): an empty slot while the head is not full, else the slot of
  the lowest priority, ties evicting the later token in stream order (what ranking all candidates keeps: the
  reference keeps the earlier of equal priorities). Against NumPy on heads whose slots are not in stream order,
  with tied priorities, protected tokens and heads not yet full."""
  from jstream.cache.scored import _PROTECTED, _token_slot

  rng = np.random.default_rng(31)
  s, cases = 7, []
  for _ in range(300):
    held = int(rng.integers(1, s + 1))
    rank = np.full(s, -1)
    rank[rng.permutation(s)[:held]] = np.arange(held)  # held tokens at random slots
    pr = rng.choice([0.1, 0.2, 0.3, _PROTECTED], size=s, p=[0.3, 0.3, 0.2, 0.2])
    cases.append((np.where(rank >= 0, pr, -np.inf).astype(np.float32), rank))
  pr, rank = (jnp.asarray(np.stack(a).reshape(100, 3, s)) for a in zip(*cases, strict=True))
  got = np.asarray(_token_slot(pr, rank.astype(jnp.int32))).reshape(-1)
  for (p, r), slot in zip(cases, got, strict=True):
    if (r < 0).any():
      assert r[slot] == -1
    else:
      assert slot == max(range(s), key=lambda j, p=p, r=r: (-p[j], r[j]))


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_a_single_token_moves_no_cached_key(positions):
  """Decode on a full cache rewrites one slot per (layer, kv head), the evicted token's, with the new token's key
  and value; every other slot's key and value stay bit for bit (no compaction, no re-rotation). A padding token
  changes nothing at all."""
  model = tiny_model(seed=41)
  policy = C.H2O(8, 2, 1, positions)
  tokens = random_tokens(2, 14, seed=42)
  step = jit_step(model)
  _, before = stream(step, tokens[:, :13], model.init_cache(policy, 2), [6, 4, 1, 1, 1])
  _, after = step(tokens[:, 13:], before)
  changed = np.any(np.asarray(after.k) != np.asarray(before.k), axis=-1)  # [l, b, k, s]
  np.testing.assert_array_equal(changed.sum(-1), 1)
  np.testing.assert_array_equal(np.any(np.asarray(after.v) != np.asarray(before.v), axis=-2), changed)  # slots last
  np.testing.assert_array_equal(np.asarray(after.idx)[changed], 13)
  _, padded = step(tokens[:, 13:], before, segment_ids=jnp.full((2, 1), -1, jnp.int32))
  for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
