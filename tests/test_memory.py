"""Memory beyond the window (jstream.memory): retrieval (ReKV) and compressed (Flash-VStream) memories equal an
independent float64 reference of each rule, the full past when the memory holds everything, run inside the video
stream runner, reset per row, and reject bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import memory_stream_logits

from conftest import chunk_sizes, compilations, jit_step, random_tokens, stream, tiny_model, tol
from jstream import cache as C
from jstream import memory as M

F32 = tol(jnp.float32)


@pytest.mark.parametrize(
  "memory,scan_layers",
  [
    (lambda local: M.Retrieval(local, block=3, top_k=12, store_blocks=12), False),
    (lambda local: M.Compressed(local, slots=36), True),
    (lambda local: M.Scored(local, slots=32, score="mean"), False),
    (lambda local: M.Retrieval(local, block=3, top_k=12, store_blocks=12, store_memory="host"), False),
  ],
  ids=["retrieval-per-layer", "compressed-stacked", "scored-per-layer", "retrieval-host-per-layer"],
)
def test_memory_of_everything_is_dense(memory, scan_layers):
  """A memory that keeps every evicted token as it is (all blocks retrieved; a slot per token) plus the window is
  the whole past: the stream equals the offline forward, in chunks and token by token (the read-only path). The
  layer structures alternate (the reference test covers both for both memories)."""
  model = tiny_model(seed=1, scan_layers=scan_layers)
  tokens = random_tokens(2, 40, seed=2)
  policy = memory(C.SinkWindow(2, 6))
  sizes = chunk_sizes(24, [1, 3, 5], seed=3) + [1] * 16
  got, cache = stream(jit_step(model), tokens, model.init_cache(policy, 2), sizes)
  np.testing.assert_allclose(got, model.forward(tokens), **F32)
  assert int(jnp.max(cache.count.sum(-1))) == 40 - 2 - 6  # every token outside sinks and window is in memory
  assert cache.k.sharding.memory_kind == ("pinned_host" if getattr(policy, "store_memory", "") == "host" else "device")
  window, _ = stream(jit_step(model), tokens, model.init_cache(policy.local, 2), sizes)
  assert np.abs(np.asarray(window) - np.asarray(got)).max() > 1e-2  # the memory matters in this test


CASES = [
  (M.Retrieval(C.SinkWindow(1, 5), block=2, top_k=2, store_blocks=4), dict(kind="retrieval")),  # the store wraps
  (M.Retrieval(C.Window(6), block=3, top_k=1, store_blocks=8), dict(kind="retrieval")),
  (M.Compressed(C.SinkWindow(2, 5), slots=3), dict(kind="compressed")),
  (M.Compressed(C.Window(4), slots=5), dict(kind="compressed")),
  (M.Scored(C.SinkWindow(1, 5), slots=3), dict(kind="scored", score="sum")),
  (M.Scored(C.Window(4), slots=4, score="mean"), dict(kind="scored", score="mean")),
  (M.Scored(C.SinkWindow(2, 4), slots=3, score="last"), dict(kind="scored", score="last")),
  (M.Scored(C.Window(5), slots=3), dict(kind="scored", score="sum", learned_sink="kv")),
  (M.Compressed(C.SinkWindow(1, 4), slots=2), dict(kind="compressed", learned_sink="logit")),
]


@pytest.mark.parametrize(
  "case",
  # CI: each rule, and a learned sink
  [c if c in (0, 2, 4, 5, 6, 7) else pytest.param(c, marks=pytest.mark.slow) for c in range(len(CASES))],
  ids=[str(c[0]) for c in CASES],
)
def test_equals_the_python_reference(case):
  """Chunked prefill then decode, two layers, two kv heads that retrieve / merge on their own; stacked and
  per-layer blocks alternate between cases; the last two models have a learned sink (a key every query attends,
  which a scored entry's mass is normalised over too)."""
  policy, rule = CASES[case]
  rule = dict(rule)
  sink = rule.pop("learned_sink", "none")
  model = tiny_model(seed=6 + case, scan_layers=case % 2 == 0, learned_sink=sink)
  n = 34
  tokens = random_tokens(2, n, seed=7 + case)
  sizes = [4, 1, 3, 2, 1, 3] + [1] * (n - 14)
  got, cache = stream(jit_step(model), tokens, model.init_cache(policy, 2), sizes)
  local = policy.local
  sinks = getattr(local, "num_sinks", 0)
  extra = (
    dict(block=policy.block, top_k=policy.top_k, store_blocks=policy.store_blocks)
    if rule["kind"] == "retrieval"
    else dict(slots=policy.slots)
  )
  for row in range(2):
    want = memory_stream_logits(model, tokens[row], sizes, window=local.window, num_sinks=sinks, **rule, **extra)
    np.testing.assert_allclose(got[row], want, atol=5e-5, rtol=5e-5)
  window, _ = stream(jit_step(model), tokens, model.init_cache(local, 2), sizes)
  assert np.abs(np.asarray(window) - np.asarray(got)).max() > 1e-2
  if rule["kind"] == "compressed":
    assert float(cache.count.max()) > 1  # slots merged several tokens


def test_block_summaries_are_the_mean_of_what_each_block_stores():
  """``Retrieval`` keeps each block's summary key (mean of its stored keys) and fill up to date as it writes,
  through chunks longer than a block and not aligned to blocks, a store that wraps several times, and a row
  reset: equal to a NumPy recomputation from the store."""
  model = tiny_model(seed=21)
  policy = M.Retrieval(C.SinkWindow(1, 5), block=3, top_k=1, store_blocks=4)
  tokens = random_tokens(2, 60, seed=22)
  step = jit_step(model)
  nb, blk = policy.store_blocks, policy.block

  def check(cache):
    k, idx = np.asarray(cache.k, np.float64), np.asarray(cache.idx)
    full = (idx >= 0).reshape(*idx.shape[:3], nb, blk)
    blocks = np.where(full[..., None], k.reshape(*k.shape[:3], nb, blk, -1), 0.0)
    want = blocks.sum(-2) / np.maximum(full.sum(-1), 1)[..., None]
    np.testing.assert_allclose(cache.summary, want, atol=1e-6)
    np.testing.assert_array_equal(cache.filled, full[0, :, 0].sum(-1))
    return np.asarray(cache.filled)

  _, cache = stream(step, tokens[:, :30], model.init_cache(policy, 2), [5, 5, 1, 1, 5, 4, 1, 5, 3])
  check(cache)
  cache = C.reset(cache, rows=np.array([True, False]))
  _, cache = stream(step, tokens[:, 30:37], cache, [2, 5])
  filled = check(cache)
  assert filled[0].sum() == 1 and filled[1].sum() == policy.slots  # a fresh row with a partly filled block
  _, cache = stream(step, tokens[:, 37:], cache, [1, 4, 5, 1, 1, 5, 1, 5])
  check(cache)
  assert int(cache.written[1]) > 3 * policy.slots  # the ring wrapped


def test_merged_slot_attends_like_its_tokens():
  """Proportional attention: a slot holding the mean of n equal keys (count n) gets the mass of those n tokens."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 2, 4, 8)), jnp.float32)  # [b, t, n, h], 2 kv heads of 2 query heads
  keys = rng.normal(size=(1, 2, 3, 8))
  vals = rng.normal(size=(1, 2, 5, 8))
  expanded = np.concatenate([keys[:, :, :1]] * 3 + [keys[:, :, 1:]], axis=2)  # key 0 three times: [b, k, 5, h]
  idx = jnp.zeros((1, 2, 5), jnp.int32)
  limit = jnp.zeros((1, 2), jnp.int32)
  want, want_lse = M.memory_attention(q, jnp.asarray(expanded), jnp.asarray(vals), idx, jnp.ones((1, 2, 5)), limit)
  merged_v = np.concatenate([vals[:, :, :3].mean(2, keepdims=True), vals[:, :, 3:]], axis=2)
  got, got_lse = M.memory_attention(
    q, jnp.asarray(keys), jnp.asarray(merged_v), idx[..., :3], jnp.asarray([[[3.0, 1.0, 1.0]] * 2]), limit
  )
  np.testing.assert_allclose(got, want, **F32)
  np.testing.assert_allclose(got_lse, want_lse, **F32)
  # entries past a query's limit, and queries that read nothing, see nothing
  _, lse = M.memory_attention(q, jnp.asarray(keys), jnp.asarray(merged_v), idx[..., :3] + 5, jnp.ones((1, 2, 3)), limit)
  assert np.isneginf(np.asarray(lse)).all()


def test_video_stream_with_a_memory_matches_a_dense_vision_track():
  """The compiled video-QA runner with a retrieval memory on the vision track (blocks of one frame, every block
  retrieved, frames and words reading), or a scored memory with a slot for every frame token, answers exactly as
  with a vision track that keeps every frame, cache-relative
  (memory tokens keep their distance in vision tokens, which is not the stream's; the text tests cover absolute
  positions)."""
  positions = "cache_relative"
  from jstream import presets, qa_stream
  from jstream.data import video_qa as vqa
  from jstream.models.video_lm import TEXT, VISION, VideoLM, VideoLMConfig

  lm = presets.video_lm(num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64)
  model = VideoLM(VideoLMConfig(lm, frame_size=(16, 16), patch_size=8), rngs=nnx.Rngs(0))
  p, n, b = model.config.tokens_per_frame, 12, 2
  rng = np.random.default_rng(1)
  frames = rng.uniform(size=(b, n, 16, 16)).astype(np.float32)
  q = vqa.Question(frame=0, qtype="count_now", words="how many digits are on screen ?", answer="zero", due=0)
  questions = np.stack(
    [np.stack([qa_stream.question_ids(q if (t + row) % 4 == 1 else None, 9) for t in range(n)]) for row in range(b)]
  )
  text = C.SinkWindow(2, 40)
  local = C.Segmented((text, C.Window(3 * p)), positions=positions)
  retrieval = M.Retrieval(local, block=p, top_k=n, store_blocks=n, track=VISION)
  host = M.Retrieval(local, block=p, top_k=n, store_blocks=n, track=VISION, store_memory="host")
  # every evicted frame retrieved: ReKV's positions just before the window are the frames' own
  rekv = M.Retrieval(local, block=p, top_k=n, store_blocks=n, track=VISION, reindex=True)
  scored = M.Scored(local, slots=n * p, track=VISION)  # room for every frame: nothing is evicted
  dense = C.Segmented((text, C.Dense(n * p)), positions=positions)
  out = {}
  policies = {"retrieval": retrieval, "host": host, "rekv": rekv, "scored": scored, "dense": dense}
  for name, policy in policies.items():
    cache, said = qa_stream.run(model, model.init_cache(policy, b), frames, questions)
    out[name] = said
    if name == "host":  # the compiled scan carried the store in host memory
      assert cache.v.sharding.memory_kind == "pinned_host" and cache.local.k.sharding.memory_kind == "device"
  for name in ("retrieval", "host", "rekv", "scored"):
    np.testing.assert_array_equal(out[name].answer, out["dense"].answer)
    np.testing.assert_array_equal(out[name].decision, out["dense"].decision)
  assert TEXT == 0 and (out["dense"].answer != vqa.PAD).any()


def test_only_reader_tracks_attend_the_memory():
  """Two tracks, the memory on track 1 read by track 0 only, one layer (deeper, track-1 queries read track-0 keys
  that the memory changed): track-1 tokens compute exactly what they compute without a memory, and track-0 tokens
  differ once track 1 has evicted tokens."""
  model = tiny_model(seed=10, num_layers=1)
  n = 40
  tokens = random_tokens(2, n, seed=11)
  seg = jnp.asarray((np.arange(n)[None] * np.array([[1], [3]])) % 5 % 2, jnp.int32)
  local = C.Segmented((C.SinkWindow(1, 8), C.Window(4)))
  sizes = [4, 1, 3] + [2] * 16
  step = jit_step(model)
  want, _ = stream(step, tokens, model.init_cache(local, 2), sizes, seg)
  got, _ = stream(step, tokens, model.init_cache(M.Compressed(local, slots=8, readers=(0,)), 2), sizes, seg)
  vision = np.asarray(seg) == 1
  np.testing.assert_allclose(np.asarray(got)[vision], np.asarray(want)[vision], **F32)
  assert np.abs(np.asarray(got)[~vision] - np.asarray(want)[~vision]).max() > 1e-2


@pytest.mark.parametrize(
  "policy",
  [
    M.Retrieval(C.SinkWindow(1, 5, positions="cache_relative"), block=2, top_k=3, store_blocks=5),
    M.Compressed(C.Window(4), slots=6),
    M.Scored(C.Window(4, positions="cache_relative"), slots=5, score="mean"),
  ],
  ids=["retrieval-cache_relative", "compressed-absolute", "scored-cache_relative"],
)
def test_rebase_is_invisible(monkeypatch, policy):
  """The index rebase of endless streams (every 2**29 tokens) shifts the memory's indices and, cache-relative, rotates
  its keys back like the local ring's: no output changes; run it every 24 tokens."""
  from jstream.cache import planner

  model = tiny_model(seed=12)
  tokens = random_tokens(1, 80, seed=13)
  sizes = chunk_sizes(80, [1, 3, 4], seed=14)
  want, _ = stream(jit_step(model), tokens, model.init_cache(policy, 1), sizes)
  monkeypatch.setattr(planner, "REBASE_AT", 24)
  monkeypatch.setattr(planner, "REBASE_SHIFT", 12)
  got, cache = stream(jit_step(model), tokens, model.init_cache(policy, 1), sizes)
  assert int(cache.local.count[0, 0]) < 40  # rebased repeatedly
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize(
  "policy",
  [M.Retrieval(C.Window(4), block=2, top_k=2, store_blocks=6), M.Scored(C.Window(4), slots=3)],
  ids=["retrieval", "scored"],
)
def test_reset_row_starts_a_fresh_memory(policy):
  model = tiny_model(seed=4)
  tokens = random_tokens(2, 30, seed=5)
  step = jit_step(model)
  _, cache = stream(step, tokens, model.init_cache(policy, 2), [4] * 5)
  cache = C.reset(cache, jnp.asarray([True, False]))
  assert int(cache.written[0]) == 0 and (np.asarray(cache.idx[:, 0]) == -1).all()
  assert (np.asarray(cache.idx[:, 1]) >= 0).any()
  if isinstance(policy, M.Scored):
    assert not np.asarray(cache.score[:, 0]).any() and not np.asarray(cache.seen[:, 0]).any()
    assert np.asarray(cache.score[:, 1]).all() and np.asarray(cache.seen[:, 1]).all()
  got, _ = stream(step, tokens[:, 20:], cache, [4, 4, 2])
  fresh, _ = stream(step, tokens[:1, 20:], model.init_cache(policy, 1), [4, 4, 2])
  np.testing.assert_allclose(got[:1], fresh, **F32)


def test_reindexed_positions_are_just_before_the_window_in_stream_order():
  """``memory.reindexed`` (ReKV's positions): per (row, kv head) the retrieved entries a query of the chunk may see
  (index <= the chunk's largest limit, non-empty), sorted by index, are rotated to the indices ending at that limit;
  empty and not-yet-visible entries keep theirs. Against NumPy RoPE of the raw keys at positions listed by hand."""
  from reference import _rope

  rng = np.random.default_rng(3)
  base, h = 10_000.0, 8
  raw = rng.normal(size=(2, 1, 6, h))
  idx = np.array([[[40, 7, 25, -1, 90, 3]], [[5, 6, 4, 30, 31, 2]]])
  count = np.array([[[1.0, 1, 1, 0, 1, 1]], [[1, 1, 1, 1, 1, 0]]])
  limit = np.array([[60, 70, -2], [29, 20, 10]])  # newest seen: 70 in row 0 (90 is not yet seen), 29 in row 1
  # row 0 sees 3, 7, 25, 40 -> 67, 68, 69, 70; row 1 sees 4, 5, 6 (30 and 31 not yet; 2 is empty) -> 27, 28, 29
  new = np.array([[[70, 68, 69, -1, 90, 67]], [[28, 29, 27, 30, 31, 2]]])
  stored = np.stack([[[_rope(raw[b, 0, m], idx[b, 0, m], base) for m in range(6)]] for b in range(2)])
  want = np.stack([[[_rope(raw[b, 0, m], new[b, 0, m], base) for m in range(6)]] for b in range(2)])
  got = M.reindexed(
    jnp.asarray(stored, jnp.float32), jnp.asarray(idx, jnp.int32), jnp.asarray(count), jnp.asarray(limit), base
  )
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_stream_reads_what_it_retrieved_at_reindexed_positions(monkeypatch):
  """``Retrieval(reindex=True)`` in a stream that retrieves some of its blocks: the outputs differ from the frames'
  own positions, and with ``memory.reindexed`` made the identity they are those of ``reindex=False`` exactly, so the
  re-rotation of the retrieved segment is the whole difference (its rule: the test above)."""
  model = tiny_model(seed=26, scan_layers=False)
  tokens = random_tokens(2, 48, seed=27)
  sizes = chunk_sizes(48, [1, 2, 3], seed=28)
  local = C.Window(6, positions="cache_relative")
  got = {}
  for reindex in (False, True):
    policy = M.Retrieval(local, block=2, top_k=2, store_blocks=12, reindex=reindex)
    got[reindex], _ = stream(jit_step(model), tokens, model.init_cache(policy, 2), sizes)
  assert np.abs(np.asarray(got[True]) - np.asarray(got[False])).max() > 1e-3
  monkeypatch.setattr(M, "reindexed", lambda k, *_: k)
  policy = M.Retrieval(local, block=2, top_k=2, store_blocks=12, reindex=True)
  same, _ = stream(jit_step(model), tokens, model.init_cache(policy, 2), sizes)
  np.testing.assert_array_equal(same, got[False])


def test_a_store_in_host_memory_holds_what_a_store_in_device_memory_holds(monkeypatch, tmp_path):
  """``Retrieval(store_memory="host")``: the store (keys, values, indices, counts) lives in ``pinned_host`` memory
  through chunks, a row reset, index rebases that rotate its keys (cache-relative, every 24 tokens), a save and a
  restore, with its block summaries and fills; the outputs and every cache array equal those of the store in device
  memory bit for bit, and the cache's device memory leaves the store and the summaries out."""
  from jstream.cache import planner

  monkeypatch.setattr(planner, "REBASE_AT", 24)
  monkeypatch.setattr(planner, "REBASE_SHIFT", 12)
  model = tiny_model(seed=23, scan_layers=True)
  tokens = random_tokens(2, 70, seed=24)
  step = jit_step(model)
  sizes = chunk_sizes(40, [1, 3, 5], seed=25)
  local = C.SinkWindow(1, 5, positions="cache_relative")
  got = {}
  for where in ("device", "host"):
    policy = M.Retrieval(local, block=2, top_k=2, store_blocks=6, store_memory=where)
    first, cache = stream(step, tokens[:, :40], model.init_cache(policy, 2), sizes)
    cache = C.reset(cache, jnp.asarray([False, True]))
    C.save(cache, tmp_path / where)
    cache = C.restore(tmp_path / where, like=model.init_cache(policy, 2))
    second, cache = stream(step, tokens[:, 40:], cache, [4, 1, 5] + [2] * 10)
    got[where] = (first, second, cache)
  host, device = got["host"][2], got["device"][2]
  assert int(host.local.count[0, 0]) < 40  # rebased
  stored = {"k", "v", "idx", "count", "summary", "filled"}
  for name in ("k", "v", "idx", "count", "summary", "filled", "written"):
    assert getattr(host, name).sharding.memory_kind == ("pinned_host" if name in stored else "device"), name
    assert getattr(device, name).sharding.memory_kind == "device"
  assert int(host.written[0]) > host.policy.slots  # the store wrapped
  for a, b in zip(jax.tree.leaves(got["host"]), jax.tree.leaves(got["device"])):
    np.testing.assert_array_equal(a, b)
  sizes = M.memory_bytes(host)
  assert sizes["device"] == M.memory_bytes(device)["device"] - sizes["store"] - sizes["index"] and sizes["store"] > 0


def test_memory_bytes_and_compiles_once():
  from jstream import rollout

  model = tiny_model(seed=8)
  policy = M.Retrieval(C.Window(8), block=4, top_k=2, store_blocks=16)
  cache = model.init_cache(policy, 2)
  sizes = M.memory_bytes(cache)
  assert sizes["read"] * 8 == sizes["store"]  # 2 of 16 blocks are read per chunk
  assert sizes["index"] == (2 * 2 * 2 * 16 * 8 + 2 * 16) * 4  # a float32 summary key per (layer, row, head, block)
  jax.clear_caches()
  with compilations() as n:
    nll = rollout.stream_nll(model, random_tokens(2, 80, seed=9), policy, chunk_size=4)  # 20 chunks, one scan
  assert n["_stream_nll"] == 1 and np.isfinite(nll[:, 1:]).all()  # position 0 has no prediction


def test_bad_input():
  with pytest.raises(ValueError, match="max_rollback=0"):
    M.Compressed(C.Window(8, max_rollback=2))
  with pytest.raises(TypeError, match="Window, SinkWindow or Segmented"):
    M.Compressed(C.Dense(8))
  with pytest.raises(ValueError, match="max_rollback=0"):
    M.Retrieval(C.Segmented((C.Window(4), C.Dense(8))))  # the memory track (the last) never evicts
  with pytest.raises(ValueError, match="top_k"):
    M.Retrieval(C.Window(8), top_k=5, store_blocks=4)
  with pytest.raises(ValueError, match="readers"):
    M.Retrieval(C.Window(8), readers=(1,))
  with pytest.raises(ValueError, match="slots"):
    M.Scored(C.Window(8), slots=0)
  with pytest.raises(ValueError, match="'sum', 'mean' or 'last'"):
    M.Scored(C.Window(8), score="max")
  with pytest.raises(ValueError, match="store_memory"):
    M.Retrieval(C.Window(8), store_memory="disk")
  with pytest.raises(ValueError, match=r"reindex=True\).*cache_relative"):
    M.Retrieval(C.Window(8), reindex=True)
  model = tiny_model(seed=0)
  cache = model.init_cache(M.Compressed(C.SinkWindow(2, 4), slots=2), 1)
  with pytest.raises(ValueError, match="more tokens of the memory track than its window"):
    model(random_tokens(1, 5, seed=1), cache)
  with pytest.raises(ValueError, match="cannot roll back"):
    C.rollback(cache, 1)


def test_a_host_store_without_host_memory_is_refused(monkeypatch):
  """On a platform without ``pinned_host`` memory a store in host memory is refused when the cache is made."""
  monkeypatch.setattr(M, "host_memory_available", lambda: False)
  policy = M.Retrieval(C.Window(4), block=2, top_k=1, store_blocks=3, store_memory="host")
  with pytest.raises(ValueError, match="no pinned_host memory"):
    tiny_model(seed=0).init_cache(policy, 1)


@pytest.mark.parametrize(
  "policy",
  [
    M.Retrieval(C.Window(4), block=2, top_k=1, store_blocks=3, readers=(0,)),
    M.Compressed(C.Window(4), slots=3),
    M.Scored(C.Window(4), slots=3),
  ],
  ids=["retrieval", "compressed", "scored"],
)
def test_a_memory_cache_saves_and_restores(tmp_path, policy):
  """``jstream.cache.save`` / ``restore`` keep a memory cache exactly (the fields of the other memory kinds are
  empty arrays, which orbax does not store), and refuse it under another memory policy (the saved description
  nests the local policy and the readers)."""
  model = tiny_model(seed=15)
  step = jit_step(model)
  _, cache = stream(step, random_tokens(1, 12, seed=16), model.init_cache(policy, 1), [4, 4, 4])
  C.save(cache, tmp_path / "mem")
  back = C.restore(tmp_path / "mem", like=model.init_cache(policy, 1))
  assert jax.tree.structure(back) == jax.tree.structure(cache)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(cache)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert int(back.idx.max()) >= 0
  # a cache saved before a field was added (the scored memory's, empty in other memories) still restores; a
  # missing field that holds data does not
  from jstream.cache import session

  want = session.describe(model.init_cache(policy, 1))
  older = {**want, "arrays": {k: v for k, v in want["arrays"].items() if k not in (".score", ".seen")}}
  assert bool(session._differences(older, want)) == isinstance(policy, M.Scored)
  if not isinstance(policy, M.Retrieval):
    return
  # where the store lives and how it is read are not what it holds: a store saved in device memory restores into
  # host memory (and is read there), and the descriptions do not carry those fields
  assert "store_memory" not in want["policy"] and "reindex" not in want["policy"]
  hosted = C.restore(tmp_path / "mem", like=model.init_cache(dataclasses.replace(policy, store_memory="host"), 1))
  assert hosted.k.sharding.memory_kind == "pinned_host"
  np.testing.assert_array_equal(hosted.k, cache.k)
  with pytest.raises(ValueError, match="does not fit this stream"):
    C.restore(tmp_path / "mem", like=model.init_cache(M.Retrieval(C.Window(4), block=2, top_k=2, store_blocks=3), 1))
