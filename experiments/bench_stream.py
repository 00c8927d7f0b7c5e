"""Per-token decode latency and process memory against stream position, for bounded and unbounded caches.

  python -m experiments.bench_stream [--out DIR] [--quick]      (also: jstream bench stream ...)

For each cache policy one stream is advanced through the checkpoint positions with the real model on real tokens
(chunked prefill, which the tests show equals token-by-token streaming), in a fresh process of its own; that
process's memory is read and the cache saved at each checkpoint. Then ``--steps`` single-token decode steps are
timed from every checkpoint (one compiled ``lax.scan`` through ``jstream.rollout.Decoder``, greedy sampling
included, cache donated), in ``--rounds`` interleaved rounds so that drift of a shared machine hits all positions
alike; the best round counts. Policies:

* ``SinkWindow(4, 1024)`` (StreamingLLM), absolute and cache-relative positions;
* ``Dense`` (full KV cache), at the positions whose cache fits ``--dense-max-gib``. Beyond
  ``--dense-prefill-max`` tokens its cache is filled with random keys/values instead of an O(n^2) prefill (a
  decode step reads every slot, whatever it holds; the note column says so);
* the ``Recompute(1024)`` baseline (re-encode the last 1024 tokens for every token). Its state is only the last
  1024 token ids, so it is built directly at each position instead of re-encoding the whole stream.

The memory floor. A decode step must read every weight and every cached key and value once; the floor is the
time to read that many bytes at the machine's copy bandwidth, measured in the same run on an array of the same
size: an in-place multiply (the array donated, so no output is allocated: an allocating copy of 80 MiB or more
measures page faults, not bandwidth) reads and writes each byte once, so reading takes half its time. The copy
is timed between the decode rounds and its best time counts, like the decode's. Each row reports its decode time
as a multiple of the floor of the bytes it reads (``decode_over_floor``).

That floor assumes that reading alone runs at the copy's read + write rate. For reference the meter also times
the fastest read XLA offers, measured the same way: a matrix-vector product over an array of the same size
(``[n / 1024, 1024] @ [1024]``, the access pattern of decode's reads), reported as ``read_bandwidth_gbs`` and
each row's ``decode_over_read``: decode against reading its bytes once with XLA:CPU's own kernel.

Also measured (``--parts extra prefill``): the SinkWindow decode of the medium model (8 layers, width 512) and of
the small model at batch 8 (per token and per row: a step decodes one token of every row), and prefill
throughput (tokens per second with chunks of ``--chunk``, ``--chunks-per-call`` chunks per compiled call) for the
small model, the medium model and batch 8. Prints a table and writes ``results.json`` and ``latency.png`` to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jstream
from experiments.machine import device_line
from jstream import cache as C
from jstream import rollout
from jstream.process_memory import rss_mib, tree_bytes

_nbytes = tree_bytes


def _time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


class FloorMeter:
  """Best in-place copy time of arrays of given sizes over a run: ``measure(nbytes)`` between timing rounds,
  ``floor(nbytes)`` at the end (see the module docstring). For reference it also times an allocating copy (a new
  output array per call: what this benchmark used before issue 9), reported as ``alloc_copy_bandwidth_gbs``, and
  a read-only pass (a matrix-vector product over an array of that size), reported as ``read_bandwidth_gbs``."""

  def __init__(self):
    self.best: dict[int, float] = {}
    self.best_alloc: dict[int, float] = {}
    self.best_read: dict[int, float] = {}
    self._arrays: dict[int, jax.Array] = {}
    self._matrices: dict[int, jax.Array] = {}
    self._read = jax.jit(lambda m, v: m @ v)
    self._copy = jax.jit(lambda x: x * 1.000001, donate_argnums=0)
    self._alloc_copy = jax.jit(lambda x: x * 1.000001)

  def measure(self, nbytes: int, repeats: int = 5) -> None:
    x = self._arrays.pop(nbytes, None)
    if x is None:
      x = self._copy(jnp.ones((max(nbytes // 4, 1),), jnp.float32))  # compile + first touch
      self._alloc_copy(x).block_until_ready()
    for _ in range(repeats):
      t0 = time.perf_counter()
      x = self._copy(x)
      x.block_until_ready()
      self.best[nbytes] = min(self.best.get(nbytes, float("inf")), time.perf_counter() - t0)
    for _ in range(repeats):
      t0 = time.perf_counter()
      self._alloc_copy(x).block_until_ready()
      self.best_alloc[nbytes] = min(self.best_alloc.get(nbytes, float("inf")), time.perf_counter() - t0)
    self._arrays[nbytes] = x
    if nbytes not in self._matrices:
      self._matrices[nbytes] = jnp.ones((max(nbytes // 4096, 1), 1024), jnp.float32) * 1.000001
    m = self._matrices[nbytes]
    v = jnp.ones((1024,), jnp.float32)
    self._read(m, v).block_until_ready()
    for _ in range(repeats):
      t0 = time.perf_counter()
      self._read(m, v).block_until_ready()
      self.best_read[nbytes] = min(self.best_read.get(nbytes, float("inf")), time.perf_counter() - t0)

  def floor(self, nbytes: int) -> dict:
    if nbytes not in self.best:
      self.measure(nbytes, repeats=20)
    t = self.best[nbytes]
    return {
      "bytes": nbytes,
      "copy_s": t,
      "copy_bandwidth_gbs": 2 * nbytes / t / 1e9,
      "read_once_s": t / 2,
      "alloc_copy_bandwidth_gbs": 2 * nbytes / self.best_alloc[nbytes] / 1e9,
      "read_bandwidth_gbs": self._matrices[nbytes].nbytes / self.best_read[nbytes] / 1e9,
    }


def memory_floor(nbytes: int, repeats: int = 20) -> dict:
  """Copy time of an array of ``nbytes`` (in place) and the time to read it once: the floor for weights + cache."""
  meter = FloorMeter()
  meter.measure(nbytes, repeats)
  return meter.floor(nbytes)


def step_bytes(model, cache) -> int:
  """What one decode step must read: every weight and every cached key and value."""
  return _nbytes(nnx.state(model, nnx.Param)) + _nbytes((cache.k, cache.v))


class Streamer:
  """Advances a cache along a token stream in fixed-size chunks (one compiled step for any position)."""

  def __init__(self, model, chunk: int, chunks_per_call: int):
    self.graphdef, self.state = nnx.split(model)
    self.chunk, self.per_call = chunk, chunks_per_call

    def advance(state, cache, tokens):  # tokens [calls, b, chunk]
      model = nnx.merge(self.graphdef, state)

      def step(cache, tok):
        logits, cache = model(tok, cache)
        return cache, logits[:, -1]

      cache, last = jax.lax.scan(step, cache, tokens)
      return cache, last[-1]

    self._advance = jax.jit(advance, donate_argnums=(1,))

  def advance(self, cache, tokens: np.ndarray):
    """Feeds ``tokens [b, n]`` (n a multiple of chunk); returns the cache and the last logits."""
    b, n = tokens.shape
    if n % self.chunk:
      raise ValueError("stream length must be a multiple of the chunk")
    last = None
    i = 0
    while i < n:  # whole blocks, then single chunks: two compiled programs whatever the lengths
      take = self.chunk * self.per_call if n - i >= self.chunk * self.per_call else self.chunk
      toks = jnp.asarray(tokens[:, i : i + take]).reshape(b, -1, self.chunk).swapaxes(0, 1)
      cache, last = self._advance(self.state, cache, toks)
      i += take
    return cache, last


def decode_latency(model, cache, last, steps: int, repeats: int, meter: FloorMeter | None = None, nbytes: int = 0):
  """Seconds per step of ``steps`` greedy decode steps (best of ``repeats``), and the cache after them. With a
  ``meter``, the copy floor of ``nbytes`` is measured after every timed call."""
  decoder = rollout.Decoder(model, steps=steps, sampling=rollout.Sampling(temperature=0.0))
  rng = jax.random.key(0)
  out = decoder(cache, last, rng)  # compile + warm up
  jax.block_until_ready(out.tokens)
  best = float("inf")
  for _ in range(repeats):
    cache, last = out.cache, out.last_logits
    t0 = time.perf_counter()
    out = decoder(cache, last, rng)
    jax.block_until_ready(out.tokens)
    best = min(best, time.perf_counter() - t0)
    if meter is not None:
      meter.measure(nbytes)
  return best / steps, out.cache, out.last_logits


def prefill_rate(model, batch: int, chunk: int, chunks_per_call: int, rounds: int, policy) -> float:
  """Prefill tokens per second (all rows) with chunks of ``chunk``: best of ``rounds`` calls of
  ``chunks_per_call`` chunks each, continuing one stream (``jstream.rollout.prefill``, one compiled scan)."""
  n = chunk * chunks_per_call
  tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(batch, n), dtype=np.int32)
  tokens = jnp.asarray(tokens)
  cache = model.init_cache(policy, batch)
  last, cache = rollout.prefill(model, tokens, cache, chunk_size=chunk)  # compile + warm up
  jax.block_until_ready(last)
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    last, cache = rollout.prefill(model, tokens, cache, chunk_size=chunk)
    jax.block_until_ready(last)
    best = min(best, time.perf_counter() - t0)
  return batch * n / best


def recompute_cache(tokens: np.ndarray, position: int, window: int):
  """The Recompute baseline's exact state after ``position`` tokens: the last ``window`` ids, in ring order."""
  b = tokens.shape[0]
  first = max(0, position - window)
  held = np.arange(first, position)
  ring = np.zeros((b, window), np.int32)
  idx = np.full((b, window), -1, np.int32)
  ring[:, held % window] = tokens[:, held]
  idx[:, held % window] = held
  return C.TokenCache(
    tokens=jnp.asarray(ring),
    idx=jnp.asarray(idx),
    count=jnp.full((b,), position, jnp.int32),
    next_pos=jnp.full((b,), position, jnp.int32),
    policy=C.Recompute(window),
  )


def synthetic_dense(model, slots: int, filled: int):
  """A Dense cache holding ``filled`` tokens whose keys/values are random (for decode timing only)."""
  cache = model.init_cache(C.Dense(slots), 1)
  idx = jnp.where(jnp.arange(slots + 1) < filled, jnp.arange(slots + 1), -1)[None].astype(jnp.int32)
  key = jax.random.key(1)

  def fill(buf):
    return jax.random.normal(key, buf.shape, buf.dtype) * 0.1

  return cache.replace(
    k=jax.tree.map(fill, cache.k),
    v=jax.tree.map(fill, cache.v),
    idx=idx,
    pos=jnp.array(idx),
    count=jnp.full((1, 1), filled, jnp.int32),
    next_pos=jnp.full((1,), filled, jnp.int32),
  )


MODELS = {
  "tiny": dict(vocab_size=256, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64),
  "tiny_medium": dict(vocab_size=256, num_layers=3, num_heads=4, embed_dim=64, mlp_dim=128),
  "small": dict(vocab_size=256, num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024),
  "medium": dict(vocab_size=256, num_layers=8, num_heads=8, embed_dim=512, mlp_dim=2048),
}
"""The benchmark's models (f32, per-layer weights): ``small`` is the default, ``medium`` 8 layers of width 512;
``tiny`` and ``tiny_medium`` stand in for them in the ``--tiny`` smoke run."""


def model_config(name: str, scan_layers: bool = False) -> jstream.TransformerConfig:
  return jstream.TransformerConfig(**MODELS[name], scan_layers=scan_layers)


def default_config(tiny: bool) -> jstream.TransformerConfig:
  return model_config("tiny" if tiny else "small")


def _save(cache, path: pathlib.Path):
  leaves, treedef = jax.tree.flatten(cache)
  np.savez(path, *[np.asarray(x) for x in leaves])
  return treedef


def _load(path: pathlib.Path, treedef):
  with np.load(path) as data:
    return jax.tree.unflatten(treedef, [jnp.asarray(data[f"arr_{i}"]) for i in range(len(data.files))])


def advance_pass(args: dict, mode: str, scratch: str) -> list:
  """Streams one SinkWindow policy through the checkpoint positions; saves the cache and reads the process memory
  at each. Returns ``[(position, path, ((rss, peak rss), cache bytes)), ...]`` (runs in its own process)."""
  args = argparse.Namespace(**args)
  cfg = default_config(args.tiny)
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(0))
  positions = sorted(p for p in args.positions if p >= 1)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, max(positions) + args.chunk), dtype=np.int32)
  streamer = Streamer(model, args.chunk, args.chunks_per_call)
  cache = model.init_cache(C.SinkWindow(4, args.window, positions=mode), 1)
  at, out = 0, []
  for p in positions:
    feed = max(p // args.chunk * args.chunk - at, 0)
    if feed:
      cache, _ = streamer.advance(cache, tokens[:, at : at + feed])
      at += feed
    jax.block_until_ready(cache)
    mem = (rss_mib(), _nbytes((cache.k, cache.v)))
    path = pathlib.Path(scratch) / f"{mode}_{at}.npz"
    _save(cache, path)
    out.append((at, str(path), mem))
  return out


def run(args, scratch: pathlib.Path) -> dict:
  cfg = default_config(args.tiny)
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(0))
  window, sinks = args.window, 4
  positions = sorted(p for p in args.positions if p >= 1)
  n_max = max(positions) + args.chunk
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, size=(1, n_max), dtype=np.int32)
  weights = _nbytes(nnx.state(model, nnx.Param))
  meter = FloorMeter()
  rows, prefill = [], []

  small, medium_name = ("tiny", "tiny_medium") if args.tiny else ("small", "medium")

  def record(name, position, latency, cache_bytes, rss, note="", read_bytes=None, batch=1, model_name=None, kind=""):
    row = dict(
      policy=name,
      kind=kind,
      model=model_name or small,
      batch=batch,
      position=position,
      ms_per_step=latency * 1e3,
      ms_per_token=latency * 1e3 / batch,
      tokens_per_s=batch / latency,
      cache_mib=cache_bytes / 2**20,
      rss_mib=rss[0],
      peak_rss_mib=rss[1],
      read_bytes=read_bytes,
      note=note,
    )
    rows.append(row)
    per_row = f" ({row['ms_per_step']:.3f} ms/step)" if batch > 1 else ""
    print(
      f"  {name:<34} {row['model']:<6} b{batch} pos {position:>9,}  {row['ms_per_token']:8.3f} ms/token{per_row} "
      f"{row['tokens_per_s']:9.1f} "
      f"tok/s  cache {row['cache_mib']:7.1f} MiB  rss {rss[0]:7.1f} MiB  peak {rss[1]:7.1f} MiB {note}",
      flush=True,
    )

  def timed_interleaved(name, model_, checkpoints, treedef):
    """Times every saved checkpoint in rounds, so that drift of the machine hits all positions alike; the copy
    floor of the bytes a step reads is measured after every call."""
    best = {p: float("inf") for p, _, _ in checkpoints}
    for _ in range(args.rounds):
      for p, path, _ in checkpoints:
        cache = _load(path, treedef)
        last = jnp.zeros((1, cfg.vocab_size), jnp.float32)
        lat, _, _ = decode_latency(model_, cache, last, args.steps, 1, meter, step_bytes(model_, cache))
        best[p] = min(best[p], lat)
    for p, _, (rss, nbytes) in checkpoints:
      record(name, p, best[p], nbytes, rss, read_bytes=weights + nbytes, kind="stream")

  # --- bounded caches: one real stream each. Pass 1 advances it and saves the cache (and the process memory)
  # at every checkpoint; pass 2 times single-token decode from each checkpoint, interleaved.
  for mode in args.modes if "bounded" in args.parts else ():
    policy = C.SinkWindow(sinks, window, positions=mode)
    name = f"SinkWindow({sinks},{window}) {mode}"
    if args.same_process:
      checkpoints = advance_pass(vars(args), mode, str(scratch))
    else:  # a fresh process, so that its memory is this stream's alone
      import concurrent.futures
      import multiprocessing

      ctx = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        checkpoints = pool.submit(advance_pass, vars(args), mode, str(scratch)).result()
    treedef = jax.tree.structure(model.init_cache(policy, 1))
    checkpoints = [(at, pathlib.Path(path), mem) for at, path, mem in checkpoints]
    timed_interleaved(name, model, checkpoints, treedef)

  first = positions[0] // args.chunk * args.chunk

  def short_stream(model_, policy, batch):
    """A cache that has seen ``first`` real tokens in every row, and the logits after them."""
    toks = np.random.default_rng(2).integers(0, model_.config.vocab_size, size=(batch, first), dtype=np.int32)
    last, cache = rollout.prefill(model_, jnp.asarray(toks), model_.init_cache(policy, batch), chunk_size=args.chunk)
    return cache, last

  def timed_extra(name, model_, policy, batch, model_name, kind):
    cache, last = short_stream(model_, policy, batch)
    nbytes = step_bytes(model_, cache)
    lat, cache, _ = decode_latency(model_, cache, last, args.steps, args.rounds, meter, nbytes)
    record(name, first, lat, _nbytes((cache.k, cache.v)), rss_mib(), "", nbytes, batch, model_name, kind)

  # --- the same with stacked weights and one scan over layers, at the first checkpoint
  if args.compare_scan and "scan" in args.parts:
    scanned = model.with_scan_layers(True)
    timed_extra(f"SinkWindow({sinks},{window}) scan_layers", scanned, C.SinkWindow(sinks, window), 1, None, "scan")
    del scanned

  # --- the medium model and batch 8, at the first checkpoint
  if "extra" in args.parts:
    policy = C.SinkWindow(sinks, window)
    medium = jstream.StreamingTransformer(model_config(medium_name), rngs=nnx.Rngs(0))
    timed_extra(f"SinkWindow({sinks},{window}) absolute", medium, policy, 1, medium_name, "extra")
    timed_extra(f"SinkWindow({sinks},{window}) absolute", model, policy, args.batch, None, "extra")
    del medium

  # --- prefill throughput with chunks of --chunk
  if "prefill" in args.parts:
    policy = C.SinkWindow(sinks, window)
    cases = [(small, model, 1), (medium_name, None, 1), (small, model, args.batch)]
    for model_name, model_, batch in cases:
      if model_ is None:
        model_ = jstream.StreamingTransformer(model_config(model_name), rngs=nnx.Rngs(0))
      rate = prefill_rate(model_, batch, args.chunk, args.chunks_per_call, args.rounds, policy)
      entry = dict(model=model_name, batch=batch, chunk=args.chunk, policy=str(policy), tokens_per_s=rate)
      prefill.append(entry)
      print(f"  prefill {entry['model']:<6} batch {batch}: {rate:10.0f} tokens/s (chunks of {args.chunk})", flush=True)

  # --- dense: as far as its cache fits the budget
  for p in positions if "dense" in args.parts else ():
    p = p // args.chunk * args.chunk
    slots = p + args.steps * (args.rounds + 1) + 1
    cache_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (slots + 1) * 4
    if cache_bytes > args.dense_max_gib * 2**30:
      rows.append(
        dict(
          policy="Dense",
          kind="dense",
          model=small,
          batch=1,
          position=p,
          ms_per_token=None,
          tokens_per_s=None,
          cache_mib=cache_bytes / 2**20,
          note=f"skipped: cache > {args.dense_max_gib} GiB",
        )
      )
      print(
        f"  {'Dense':<34} pos {p:>9,}  skipped: its cache would take {cache_bytes / 2**30:.1f} GiB "
        f"(> --dense-max-gib {args.dense_max_gib})",
        flush=True,
      )
      continue
    note = ""
    if p <= args.dense_prefill_max:
      streamer = Streamer(model, args.chunk, args.chunks_per_call)
      cache, last = streamer.advance(model.init_cache(C.Dense(slots), 1), tokens[:, :p])
      del streamer
    else:  # O(p^2) prefill is minutes on a CPU; decode reads every slot whatever it holds
      cache, last = synthetic_dense(model, slots, p), jnp.zeros((1, cfg.vocab_size), jnp.float32)
      note = "cache filled with random keys/values (decode cost does not depend on them)"
    rss = rss_mib()
    nbytes = step_bytes(model, cache)
    lat, cache, _ = decode_latency(model, cache, last, args.steps, args.rounds, meter, nbytes)
    record("Dense", p, lat, _nbytes((cache.k, cache.v)), rss, note, nbytes, kind="dense")
    del cache

  # --- recompute baseline (its state is the last `window` ids: built directly at each position)
  for p in positions if "recompute" in args.parts else ():
    logits = jnp.zeros((1, cfg.vocab_size), jnp.float32)
    lat, _, _ = decode_latency(model, recompute_cache(tokens, p, window), logits, args.recompute_steps, 2)
    record(f"Recompute({window})", p, lat, 0, rss_mib(), "state built from the last window ids", kind="recompute")

  for row in rows:  # the floor of every row, from the best copy of the run
    if row.get("read_bytes") and row.get("ms_per_step"):
      fl = meter.floor(row["read_bytes"])
      row["floor_ms"] = fl["read_once_s"] * 1e3
      row["copy_bandwidth_gbs"] = fl["copy_bandwidth_gbs"]
      row["decode_over_floor"] = row["ms_per_step"] / row["floor_ms"]
      alloc_floor_ms = row["read_bytes"] / (fl["alloc_copy_bandwidth_gbs"] * 1e9) * 1e3
      row["decode_over_alloc_copy_floor"] = row["ms_per_step"] / alloc_floor_ms  # the floor before issue 9
      row["read_bandwidth_gbs"] = fl["read_bandwidth_gbs"]
      row["decode_over_read"] = row["ms_per_step"] / (row["read_bytes"] / (fl["read_bandwidth_gbs"] * 1e9) * 1e3)
  sink_bytes = weights + 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (sinks + window + 1) * 4
  return dict(rows=rows, prefill=prefill, floor=meter.floor(sink_bytes), weights_bytes=weights)


def summarize(res: dict) -> dict:
  rows = [r for r in res["rows"] if r.get("ms_per_token")]
  by = {}
  for r in rows:
    if r["kind"] == "stream":
      by.setdefault(r["policy"], {})[r["position"]] = r
  out = {}
  for name, pts in by.items():
    ps = sorted(pts)
    first, last = pts[ps[0]], pts[ps[-1]]
    entry = {
      "latency_ratio_last_vs_first": last["ms_per_token"] / first["ms_per_token"],
      "decode_over_floor_first": first["decode_over_floor"],
      "decode_over_floor_last": last["decode_over_floor"],
      "decode_over_read_first": first["decode_over_read"],
      "decode_over_read_last": last["decode_over_read"],
    }
    if len(ps) >= 3:
      second = pts[ps[1]]
      entry["rss_growth_second_to_last"] = last["rss_mib"] / second["rss_mib"] - 1
    rec = [r for r in rows if r["kind"] == "recompute"]
    if rec:
      entry["speedup_over_recompute"] = rec[-1]["ms_per_token"] / last["ms_per_token"]
    out[name] = entry
  return out


def plot(res: dict, path: pathlib.Path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  by = {}
  for r in res["rows"]:
    if r.get("ms_per_token") and r["kind"] in ("stream", "dense", "recompute"):
      by.setdefault(r["policy"], []).append(r)
  for name, rs in by.items():
    rs = sorted(rs, key=lambda r: r["position"])
    x = [r["position"] for r in rs]
    axes[0].plot(x, [r["ms_per_token"] for r in rs], marker="o", label=name)
    if "rss_mib" in rs[0]:
      axes[1].plot(x, [r["rss_mib"] for r in rs], marker="o", label=name)
  for ax, label in zip(axes, ("decode latency (ms / token)", "process RSS (MiB)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stream position (tokens)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"jstream decode on {res['device']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench stream", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/bench_stream", help="output folder")
  parser.add_argument("--quick", action="store_true", help="positions 1k and 10k only, fewer steps")
  parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
  parser.add_argument("--positions", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
  parser.add_argument("--modes", nargs="+", default=["absolute", "cache_relative"])
  parser.add_argument("--window", type=int, default=1024)
  parser.add_argument("--chunk", type=int, default=256, help="prefill chunk used to advance the stream")
  parser.add_argument("--chunks-per-call", type=int, default=16)
  parser.add_argument("--steps", type=int, default=256, help="decode steps per timing")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best is kept)")
  parser.add_argument("--recompute-steps", type=int, default=4)
  parser.add_argument("--dense-max-gib", type=float, default=2.0, help="largest Dense cache to run")
  parser.add_argument(
    "--dense-prefill-max",
    type=int,
    default=20_000,
    help="prefill Dense caches up to this position; beyond it, fill them with random keys",
  )
  parser.add_argument("--batch", type=int, default=8, help="rows of the batched decode and prefill measurements")
  parser.add_argument("--no-compare-scan", dest="compare_scan", action="store_false")
  parser.add_argument(
    "--same-process", action="store_true", help="advance the bounded streams in this process (memory figures mix)"
  )
  parser.add_argument(
    "--parts",
    nargs="+",
    default=["bounded", "scan", "extra", "prefill", "dense", "recompute"],
    choices=["bounded", "scan", "extra", "prefill", "dense", "recompute"],
    help="which measurements to run",
  )
  args = parser.parse_args(argv)
  if args.quick:
    args.positions = [p for p in args.positions if p <= 10_000] or [1_000]
    args.steps, args.rounds, args.recompute_steps = min(args.steps, 64), min(args.rounds, 2), 2
  if args.tiny:
    args.window, args.chunk = min(args.window, 64), min(args.chunk, 32)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = device_line()
  print(f"bench_stream on {device}, jax {jax.__version__}")
  t0 = time.time()
  with tempfile.TemporaryDirectory() as scratch:
    res = run(args, pathlib.Path(scratch))
  res.update(device=device, jax=jax.__version__, args=vars(args), seconds=time.time() - t0)
  res["summary"] = summarize(res)
  print(
    f"\nmemory floor: {res['floor']['bytes'] / 2**20:.1f} MiB of weights + SinkWindow cache, copy bandwidth "
    f"{res['floor']['copy_bandwidth_gbs']:.1f} GB/s, read once {res['floor']['read_once_s'] * 1e3:.3f} ms; "
    f"XLA's matrix-vector read of as many bytes: {res['floor']['read_bandwidth_gbs']:.1f} GB/s"
  )
  for r in res["rows"]:
    if r.get("decode_over_floor"):
      print(
        f"  {r['policy']:<34} {r['model']:<6} batch {r['batch']} pos {r['position']:>9,}: "
        f"{r['decode_over_floor']:.2f}x the floor ({r['floor_ms']:.3f} ms for {r['read_bytes'] / 2**20:.1f} MiB), "
        f"{r['decode_over_read']:.2f}x XLA's read"
      )
  for name, s in res["summary"].items():
    print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))
  (out / "results.json").write_text(json.dumps(res, indent=2))
  plot(res, out / "latency.png")
  print(f"wrote {out / 'results.json'} and {out / 'latency.png'} ({res['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
