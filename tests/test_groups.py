"""Token groups (a video frame's patch tokens): one stream position per group, every token of a group sees the
whole group, each token keeps its own cache slot. Streaming equals the independent float64 reference, and the
offline forward where the policy keeps everything."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import stream_logits

from conftest import library_checks_only, random_tokens, tiny_model
from jstream import cache as C


def group_stream(n_runs, seed, max_group=4, vision_only=False):
  """Runs of tokens: text tokens alone (track 0) and groups of 2..max_group (track 1 with ``vision_only``).

  Returns per-token group ids, segment ids and the run lengths."""
  rng = np.random.default_rng(seed)
  groups, segs, runs = [], [], []
  for r in range(n_runs):
    size = 1 if rng.random() < 0.4 else int(rng.integers(2, max_group + 1))
    groups += [r if size > 1 else -1] * size
    segs += [1 if (size > 1 and vision_only) else 0] * size
    runs.append(size)
  return np.asarray(groups, np.int32), np.asarray(segs, np.int32), runs


def extend_step(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, cache, segment_ids, groups):
    return nnx.merge(graphdef, state).extend(tokens, cache, segment_ids=segment_ids, groups=groups)

  return lambda *a: step(state, *a)


def stream_runs(model, tokens, cache, groups, segs, runs, runs_per_chunk, seed):
  """Streams whole runs in chunks of 1..runs_per_chunk runs (a group never straddles chunks)."""
  step, rng = extend_step(model), np.random.default_rng(seed)
  out, i, r = [], 0, 0
  while r < len(runs):
    take = int(rng.integers(1, runs_per_chunk + 1))
    size = sum(runs[r : r + take])
    sl = slice(i, i + size)
    b = tokens.shape[0]
    seg, grp = (jnp.asarray(np.broadcast_to(x[None, sl], (b, size))) for x in (segs, groups))
    logits, cache = step(tokens[:, sl], cache, seg, grp)
    out.append(np.asarray(logits))
    i, r = i + size, r + take
  return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_groups_under_segmented_windows_equal_the_reference(positions):
  """Text sinks + text window + vision window with frames as groups in the vision track, chunks of whole runs
  (so windows cut through groups), against the independent reference."""
  model = tiny_model(seed=21)
  policy = C.Segmented((C.SinkWindow(2, 4, max_rollback=1), C.Window(7)), positions=positions)
  groups, segs, runs = group_stream(24, seed=22, vision_only=True)
  tokens = random_tokens(1, len(groups), seed=23)
  cap = policy.capacity
  got, _ = stream_runs(model, tokens, model.init_cache(policy, 1), groups, segs, runs, 2, seed=24)
  assert max(runs) <= cap
  want = stream_logits(model, tokens[0], [(2, 4), (0, 7)], segment_ids=segs, positions=positions, groups=groups)
  np.testing.assert_allclose(got[0], want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("positions", ["absolute", "cache_relative"])
def test_groups_in_a_dense_cache_equal_the_offline_forward(positions):
  """With nothing evicted, streaming with groups equals ``model.forward`` at the positions the groups imply:
  absolute, the group count; cache-relative, the index of the group's last token."""
  model = tiny_model(seed=25)
  groups, segs, runs = group_stream(20, seed=26)
  n = len(groups)
  tokens = random_tokens(2, n, seed=27)
  got, _ = stream_runs(model, tokens, model.init_cache(C.Dense(64, positions=positions), 2), groups, segs, runs, 3, 28)
  ends = np.cumsum(runs) - 1
  run_of = np.repeat(np.arange(len(runs)), runs)
  pos = run_of if positions == "absolute" else ends[run_of]
  want = model.forward(tokens, positions=jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (2, n)))
  np.testing.assert_allclose(got, np.asarray(want), atol=5e-5, rtol=5e-5)


def test_a_group_sees_its_later_tokens_and_takes_one_position():
  model = tiny_model(seed=29)
  policy = C.Window(8)
  tokens = random_tokens(1, 4, seed=30)
  step = extend_step(model)
  grouped, cache_g = step(tokens, model.init_cache(policy, 1), None, jnp.asarray([[0, 0, 0, -1]]))
  alone, cache_a = step(tokens, model.init_cache(policy, 1), None, None)
  # The first token sees the whole group: its output changes; the token after the group sees the same keys.
  assert not np.allclose(grouped[0, 0], alone[0, 0], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(cache_g.next_pos), [2])
  np.testing.assert_array_equal(np.asarray(cache_a.next_pos), [4])
  np.testing.assert_array_equal(np.asarray(cache_g.count), np.asarray(cache_a.count))  # one slot per token
  changed = tokens.at[0, 2].set((tokens[0, 2] + 1) % 64)
  again, _ = step(changed, model.init_cache(policy, 1), None, jnp.asarray([[0, 0, 0, -1]]))
  assert not np.allclose(again[0, 0], grouped[0, 0], atol=1e-4)  # a later group member reaches the first


@library_checks_only()
def test_bad_groups_are_a_clear_error():
  model = tiny_model(seed=31)
  with pytest.raises(ValueError, match=r"groups must be \[b, t\]"):
    model.extend(random_tokens(1, 4), model.init_cache(C.Window(8), 1), groups=jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="embeddings must be"):
    model.extend_embeddings(jnp.ones((1, 4, 3)), model.init_cache(C.Window(8), 1))
