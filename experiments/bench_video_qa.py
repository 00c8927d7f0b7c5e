"""Streaming video QA benchmark (``jstream bench video-qa``): accuracy, proactive timing, latency and memory as
streams grow far past the training clips.

Trains the model of ``configs/video_lm.py`` (or reuses the checkpoint in ``--workdir``), then answers held-out
streams (the test split: unseen handwriting; stream indices from ``--seed``, never used in training) of each
length in ``--frames`` under each cache policy, with the model speaking for itself (``jstream.qa_stream``):

* ``dense``: ``Segmented((Dense, Dense))`` sized to the stream, keeps everything (only up to
  ``--dense-max-tokens`` tokens: a dense step attends every slot, so its cost grows with the stream);
* ``window``: text window + vision window (``--window`` tokens each; by default the run's ``VideoTask.eval_window``,
  else 256);
* ``sinks+window``: text sinks + text window + vision window, absolute positions;
* ``sinks+window, cache_relative``: the same with StreamingVLM's contiguous positions inside each track.

``--memory 64,128,256`` runs the memory sweep instead (issue 11): at one stream length (``--memory-frames``), for
each budget of vision tokens per stream, ``window`` (a vision window of the whole budget: recency), ``sinks`` (the
stream's first frame tokens, half the budget, kept for good beside a window of the other half), ``retrieval``
(``jstream.memory.Retrieval``, ReKV: half the budget is the window, the other half the blocks of one frame each that
a question's words retrieve from the store of every evicted frame, or of the latest ``--store-frames`` frames) and
``compressed`` (``jstream.memory.Compressed``, Flash-VStream-style: half the window, half merged memory slots read
by the question's words), ``offload`` (``retrieval`` with its store in host memory, ``store_memory="host"``: asked
for by ``--methods`` only), ``rekv`` (``retrieval`` with ReKV's positions, ``reindex=True``: the retrieved frames
just before the window; named only, with ``--memory-positions cache_relative``, which puts every method of the sweep
under contiguous positions per track), ``h2o``, ``agenorm`` and ``tova`` (``jstream.memory.Scored``, score-based
eviction: half the window, half the evicted frame tokens of highest attention mass, H2O's sum, the mass per reading
query of Evict3R / StreamMem, or the latest chunk's mass (TOVA), scored and read by every query, frames and words);
the text track is the same in all; ``--methods`` picks some. Per (method, budget): accuracy per question type, the
kept-token share (vision tokens a question attends / vision tokens streamed), per-frame latency, the cache's size
(the retrieval store apart), what is in device memory (``device_mib``: the store included unless offloaded), and
``memory.png`` (accuracy per question category against the budget).
``--flat 1000,10000`` (issue 10's flat latency) times calls of ``--ticks-per-call`` ticks that continue the
streams at each length under ``sinks+window``, in ``--rounds`` interleaved rounds (``flat_sweep``), instead.
``--drop 0.9,0.99`` (also issue 11) runs the ``sinks+window`` policy at ``--memory-frames`` without and with
TimeChat-Online's differential token drop (``jstream.reduce.DifferentialDrop``: a frame token whose encoder features
are more similar than the threshold to the same place's in the previous frame is not cached) and reports the share
of frame tokens dropped and the accuracy relative to no drop.

Per (policy, length): accuracy per question type with its chance level (the share of the most common answer of
that type in these streams), proactive announcements within 2 frames, false alarms (``--speak-threshold``: when the
model speaks; ``--close-threshold``: for a model with an activation model, how sure it must be for an announcement
to answer the standing request; ``qa_stream.run``), per-frame latency (the calls
after the first, which compiles), frames/s, the cache's size and the process's peak RSS. Then a speed table: the
``sinks+window`` policy at each batch size of ``--speed-batches`` (frames/s counts every stream's frames). Prints
the tables and writes ``results.json`` and ``accuracy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.machine import device_line
from jstream import cache as C
from jstream import memory as M
from jstream import qa_stream, reduce
from jstream.data import video_qa
from jstream.models.video_lm import TEXT
from jstream.process_memory import reset_peak_rss, rss_mib, tree_bytes
from jstream.train import load_config, load_model, train
from jstream.train.aligned import video_policy

DEFAULT_WINDOW = 256
"""Tokens per track of the bounded policies for a run without a ``VideoTask.eval_window``."""
CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "video_lm.py"


def run_config(quick: bool, workdir: str | None, flags: str = "", config: pathlib.Path = CONFIG):
  """The training run of ``config`` (default ``configs/video_lm.py``) with ``flags`` (comma-separated; ``quick``
  added if ``quick``), in ``workdir`` if given."""
  parts = [f for f in flags.split(",") if f] + (["quick"] if quick else [])
  if workdir:
    parts.append(f"workdir={workdir}")
  return load_config(f"{config}:{','.join(parts)}" if parts else str(config))


def add_speaking_arguments(parser: argparse.ArgumentParser) -> None:
  """``--speak-threshold`` and ``--close-threshold``: when the model speaks unprompted (``speaking``)."""
  parser.add_argument(
    "--speak-threshold",
    type=float,
    default=0.5,
    help="the model speaks unprompted where <speak>'s share of P(<speak>) + P(<silent>) exceeds this (qa_stream.run)",
  )
  parser.add_argument(
    "--close-threshold",
    type=float,
    default=None,
    help="a model with an activation model: speaking answers the standing request only above this probability "
    "(default: the speak threshold; a less certain announcement leaves the request standing; qa_stream.run)",
  )


def eval_window(cfg) -> int:
  """The window (tokens per track) a run is evaluated under by default: its ``VideoTask.eval_window``, else 256."""
  return cfg.video.eval_window or DEFAULT_WINDOW


def add_model_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
  """``--quick``, ``--workdir`` and ``--flags``: which run of ``configs/video_lm.py`` (``run_config``)."""
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--workdir", default=None, help="training run to reuse or create (default: the config's)")
  parser.add_argument("--flags", default="", help="flags of configs/video_lm.py, e.g. long")


def trained_model(cfg, *, progress: bool):
  """Trains ``cfg`` (or resumes or reuses its finished checkpoint); returns ``(model, step, last metrics)``."""
  res = train(cfg, progress=progress)
  model, step = load_model(cfg)
  return model, step, (res.metrics[-1] if res.metrics else {})


def policies(window: int, sinks: int, dense_text: int, dense_vision: int) -> dict[str, C.Policy]:
  """The policies compared; ``dense`` is sized to hold the whole stream (``dense_text`` / ``dense_vision``)."""
  return {
    "dense": C.Segmented((C.Dense(dense_text), C.Dense(dense_vision))),
    "window": video_policy(window),
    "sinks+window": video_policy(window, sinks),
    "sinks+window, cache_relative": dataclasses.replace(video_policy(window, sinks), positions="cache_relative"),
  }


SCORE_RULES = {"h2o": "sum", "agenorm": "mean", "tova": "last"}  # memory.Scored's rules by method name
MEMORY_METHODS = ("window", "sinks", "retrieval", "compressed", *SCORE_RULES)
# Picked by --methods only: retrieval with its store in host memory (the same answers as retrieval), and retrieval
# with ReKV's positions (--memory-positions cache_relative only)
OFFLOAD, REKV = "offload", "rekv"
EXTRA_METHODS = (OFFLOAD, REKV)


def memory_policies(
  budget: int, text: C.Policy, tokens_per_frame: int, frames: int, store_frames: int = 0, positions: str = "absolute"
) -> dict[str, C.Policy]:
  """The memory sweep's methods at ``budget`` vision tokens per stream (see the module docstring); ``text``: the
  text track's policy; ``frames``: the stream length; ``positions``: every policy's. The retrieval store holds every
  evicted frame, or the latest ``store_frames`` (a ring) when that is positive."""
  if store_frames < 0:
    raise ValueError(f"store_frames must be >= 0 (0: every frame), got {store_frames}")
  p = tokens_per_frame
  blocks = max(budget // 2 // p, 1)
  slots = budget // 2

  def tracks(vision: C.Policy) -> C.Segmented:
    return C.Segmented((text, vision), positions=positions)

  half = tracks(C.Window(budget - slots))  # a window of half the budget beside a memory of the rest
  retrieval = M.Retrieval(
    tracks(C.Window(budget - blocks * p)),
    block=p,
    top_k=blocks,
    store_blocks=max(store_frames or frames, blocks),
    readers=(TEXT,),
  )
  relative = positions == "cache_relative"
  return {
    "window": tracks(C.Window(budget)),
    "sinks": tracks(C.SinkWindow(slots, budget - slots)),
    "retrieval": retrieval,
    OFFLOAD: dataclasses.replace(retrieval, store_memory="host"),
    **({REKV: dataclasses.replace(retrieval, reindex=True)} if relative else {}),
    "compressed": M.Compressed(half, slots=slots, readers=(TEXT,)),
    **{name: M.Scored(half, slots=slots, score=rule) for name, rule in SCORE_RULES.items()},
  }


def memory_sweep(model, args, data_config, streams, proactive) -> list[dict]:
  """The ``--memory`` sweep: one row per (budget, method)."""
  frames, p = args.memory_frames, model.config.tokens_per_frame
  text = video_policy(args.window, args.sinks).segments[TEXT]
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - {*MEMORY_METHODS, *EXTRA_METHODS}
  if unknown:
    raise ValueError(f"unknown --methods {sorted(unknown)}; choose from {', '.join(MEMORY_METHODS + EXTRA_METHODS)}")
  if REKV in methods and args.memory_positions != "cache_relative":
    raise ValueError(f"--methods {REKV} needs --memory-positions cache_relative (ReKV's positions are track indices)")
  rows = []
  for budget in [int(x) for x in args.memory.split(",") if x]:
    policies = memory_policies(budget, text, p, frames, args.store_frames, args.memory_positions)
    for name, policy in policies.items():
      if name not in methods:
        continue
      r = measure(model, policy, data_config, streams, frames, args.ticks_per_call, proactive, **speaking(args))
      cache = model.init_cache(policy, len(streams))
      if isinstance(cache, M.MemoryCache):
        parts = M.memory_bytes(cache)
        read = policy.read_tokens
        r["store_mib"] = (parts["store"] - parts["read"]) / 2**20
        r["index_mib"] = parts["index"] / 2**20  # retrieval's block summaries (grow with the store, 1/block of it)
        r["cache_mib"] -= r["store_mib"]  # the device side: local cache + the memory read per chunk + the index
        # in device memory: the store too unless offloaded, and retrieval's copy of the blocks it read (the other
        # memories read their slots in place)
        segment = parts["read"] if isinstance(policy, M.Retrieval) else 0
        r["device_mib"] = (parts["device"] + segment) / 2**20
      else:
        read = 0
      vision = (policy.local if isinstance(policy, M.MemoryPolicy) else policy).tracks()[1].size  # sinks too
      r["kept_share"] = min(1.0, (vision + read) / (frames * p))
      rows.append({"method": name, "budget": budget, "frames": frames, **r})
      acc = ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in sorted(r["scores"].items()) if t != "proactive")
      print(
        f"  {name:<10} budget {budget:>5} ({r['kept_share']:.3f} kept) {frames} frames: {acc}; "
        f"{r['ms_per_frame']:.2f} ms/frame, cache {r['cache_mib']:.2f} MiB"
        + (f", device memory {r['device_mib']:.2f} MiB" if "device_mib" in r else "")
      )
      if "memory_frames" in r:
        h = r["memory_frames"]
        print(
          f"    its entries hold frames {h['q10']:.0f} / {h['median']:.0f} / {h['q90']:.0f} (10% / 50% / 90%), "
          f"{h['first_tenth_share']:.2f} from the first tenth of the stream"
        )
  return rows


def drop_sweep(model, args, data_config, streams, proactive) -> list[dict]:
  """The ``--drop`` sweep: the ``sinks+window`` policy without a drop and with TimeChat-Online's differential drop
  at each threshold; one row each, with the share of frame tokens dropped and the mean accuracy over the answered
  question types relative to no drop."""
  policy = video_policy(args.window, args.sinks)
  rows = []
  for threshold in [None] + [float(x) for x in args.drop.split(",") if x]:
    drop = None if threshold is None else reduce.DifferentialDrop(threshold=threshold)
    frames = args.memory_frames
    r = measure(model, policy, data_config, streams, frames, args.ticks_per_call, proactive, drop, **speaking(args))
    r["mean_accuracy"] = float(np.mean([v["accuracy"] for t, v in r["scores"].items() if t != "proactive"]))
    r["dropped"] = 1.0 - r["frame_tokens_kept"]
    r["relative_accuracy"] = r["mean_accuracy"] / max(rows[0]["mean_accuracy"], 1e-9) if rows else 1.0
    rows.append({"threshold": threshold, "frames": args.memory_frames, **r})
    acc = ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in sorted(r["scores"].items()) if t != "proactive")
    print(
      f"  drop {threshold!s:<6} {r['dropped']:.3f} of frame tokens dropped: {acc}; mean {r['mean_accuracy']:.3f} "
      f"({r['relative_accuracy']:.3f} of no drop); {r['ms_per_frame']:.2f} ms/frame"
    )
  return rows


def flat_sweep(model, args, data_config, streams, proactive) -> list[dict]:
  """``--flat``: per-tick latency continuing streams at each length, timed side by side. For each length ``L`` the
  ``sinks+window`` policy runs the streams' first ``L`` ticks (``answer_streams``), keeps what the next call continues
  from (the cache, the last frame, the standing requests) and the next ``--ticks-per-call`` ticks' inputs; then
  ``--rounds`` rounds each time one call of ``run`` from every length, in an order rotated from round to round (a
  fresh copy of that length's cache each time, made outside the timing: ``run`` donates it), so that the machine's
  drift falls on all lengths alike. A tick at which some row speaks costs a third model call (``_tick``), and each
  length's chunk has its own such ticks: the same calls are also timed with the model kept silent
  (``proactive=False``), whose ticks all cost the same. Per length: the median and least milliseconds per tick over
  the rounds, speaking and silent, the ticks of the timed chunk at which some row spoke, the cache's bytes and the
  process's RSS after the length's run (the process's, which only grows from one length to the next)."""
  policy = video_policy(args.window, args.sinks)
  states = []
  for length in [int(x) for x in args.flat.split(",") if x]:
    qs = [video_qa.VideoQAStream(data_config, "test", i) for i in streams]
    carry: list = []
    kw = {"proactive": proactive, **speaking(args)}
    qa_stream.answer_streams(model, policy, qs, length, ticks_per_call=args.ticks_per_call, carry=carry, **kw)
    frames, questions = qa_stream.chunk_inputs([s.take(args.ticks_per_call) for s in qs])
    states.append((length, carry[0], frames, questions, rss_mib()[0]))
  modes = {"speaking": proactive, "silent": False}
  times = {(length, mode): [] for length, *_ in states for mode in modes}
  speaking_ticks = {}
  for r in range(args.rounds + 1):  # the first round warms up (and compiles the silent calls)
    for k in range(len(states)):
      length, st, frames, questions, _ = states[(k + r) % len(states)]
      for mode, spoken in modes.items():
        cache = jax.tree.map(jnp.copy, st["cache"])
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        _, out = qa_stream.run(
          model,
          cache,
          frames,
          questions,
          proactive=spoken,
          previous_frame=st["previous_frame"],
          request_state=st["request_state"],
          **speaking(args),
        )
        times[length, mode].append((time.perf_counter() - t0) / args.ticks_per_call)
        if mode == "speaking":
          speaking_ticks[length] = int(np.sum(np.any(out.decision == video_qa.SPEAK, axis=0)))
  rows = []
  for length, st, _, _, rss in states:
    row = {"frames": length}
    for mode in modes:
      t = np.asarray(times[length, mode][1:]) * 1e3
      row[mode] = {"ms_per_tick_median": float(np.median(t)), "ms_per_tick_min": float(t.min())}
      row[mode]["ms_per_tick"] = t.tolist()
    row.update(speaking_ticks=speaking_ticks[length], cache_mib=tree_bytes(st["cache"]) / 2**20, rss_mib=rss)
    rows.append(row)
  first = rows[0]
  for r in rows:
    for mode in modes:
      r[mode]["median_change"] = r[mode]["ms_per_tick_median"] / first[mode]["ms_per_tick_median"] - 1
    sp, si = r["speaking"], r["silent"]
    print(
      f"  {r['frames']:>6} frames: {sp['ms_per_tick_median']:.2f} ms per tick ({sp['median_change']:+.1%}; "
      f"{r['speaking_ticks']} of {args.ticks_per_call} ticks spoken), silent {si['ms_per_tick_median']:.2f} "
      f"({si['median_change']:+.1%}); medians of {args.rounds}; cache {r['cache_mib']:.2f} MiB, RSS "
      f"{r['rss_mib']:.0f} MiB"
    )
  return rows


def eval_streams(seed: int, n: int, offset: int = 0) -> list[int]:
  """The test-split indices of the ``n`` evaluation streams of ``--seed seed`` (from ``1000 * (seed + 1) + offset``:
  held-out handwriting, streams no training clip comes from)."""
  return [1000 * (seed + 1) + offset + i for i in range(n)]


def chance(records) -> dict[str, float]:
  """Per question type, the share of its most common answer (what always giving that answer scores)."""
  answers = collections.defaultdict(collections.Counter)
  for rec in records:
    for q in rec.questions:
      if q.qtype != "proactive":
        answers[q.qtype][q.answer] += 1
  return {t: max(c.values()) / sum(c.values()) for t, c in answers.items()}


def measure(
  model,
  policy,
  data_config,
  streams: list[int],
  frames: int,
  ticks_per_call: int,
  proactive: bool = True,
  drop: reduce.DifferentialDrop | None = None,
  speak_threshold: float = 0.5,
  close_threshold: float | None = None,
) -> dict:
  """Answers ``len(streams)`` streams of ``frames`` ticks (a batch) under ``policy``; scores and times them.
  ``proactive=False``: the model answers only when asked; ``drop``: a token drop before the cache;
  ``speak_threshold``, ``close_threshold``: when the model speaks unprompted, and when speaking answers the standing
  request (``qa_stream.run``). A ``memory.Scored`` policy's rows
  also report which frames its entries hold at the end (``memory_frames``)."""
  qs = [video_qa.VideoQAStream(data_config, "test", i) for i in streams]
  times: list[float] = []
  last: list = []
  reset_peak_rss()
  records = qa_stream.answer_streams(
    model,
    policy,
    qs,
    frames,
    ticks_per_call=ticks_per_call,
    call_seconds=times,
    proactive=proactive,
    drop=drop,
    speak_threshold=speak_threshold,
    close_threshold=close_threshold,
    carry=last,
  )
  steady = times[1:] or times
  per_frame = float(np.median(steady)) / ticks_per_call
  cache = model.init_cache(policy, len(streams))
  cache_mib = tree_bytes(cache) / 2**20
  s = qa_stream.score(records)
  held = memory_frames(last[0]["cache"], model.config.tokens_per_frame, frames)
  extra = {"memory_frames": held} if held else {}
  return {
    **extra,
    "scores": s,
    "chance": chance(records),
    "ms_per_frame": per_frame * 1e3,
    "frames_per_s": len(streams) / per_frame,
    "first_call_s": times[0],
    "cache_mib": cache_mib,
    "peak_rss_mib": rss_mib()[1],
    "frame_tokens_kept": float(np.mean([r.kept for r in records])) / model.config.tokens_per_frame,
  }


def speaking(args) -> dict[str, float | None]:
  """``measure``'s speak and close thresholds from the command line."""
  return {"speak_threshold": args.speak_threshold, "close_threshold": args.close_threshold}


def memory_frames(cache, tokens_per_frame: int, frames: int) -> dict | None:
  """For a ``memory.Scored`` cache: the stream frames (track index // tokens per frame) its entries hold, over
  every (layer, row, kv head): quantiles, and the share from the stream's first 10% of frames (H2O keeps early
  tokens, which the accumulated mass favours); None for other caches."""
  if not isinstance(cache, M.MemoryCache) or not isinstance(cache.policy, M.Scored):
    return None
  idx = np.asarray(cache.idx)
  held = idx[idx >= 0] // tokens_per_frame
  if not held.size:
    return None
  q = np.quantile(held, [0.1, 0.5, 0.9])
  return {
    "entries": int(held.size),
    "q10": float(q[0]),
    "median": float(q[1]),
    "q90": float(q[2]),
    "first_tenth_share": float(np.mean(held < frames / 10)),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench video-qa", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/bench_video_qa", help="output folder")
  add_model_arguments(parser, "the quick model and short streams (smoke test)")
  parser.add_argument("--seed", type=int, default=0, help="evaluation streams start at test index 1000 * (seed + 1)")
  add_speaking_arguments(parser)
  parser.add_argument("--frames", default="100,1000", help="comma-separated stream lengths (ticks)")
  parser.add_argument("--streams", type=int, default=4, help="streams per measurement (one batch)")
  parser.add_argument(
    "--window",
    type=int,
    default=None,
    help="tokens per track window (default: the run's VideoTask.eval_window, else 256; a text window beyond what the "
    "training clips hold costs accuracy: RESULTS.md)",
  )
  parser.add_argument("--sinks", type=int, default=4, help="text sinks of the sinks+window policies")
  parser.add_argument("--ticks-per-call", type=int, default=50)
  parser.add_argument("--dense-max-tokens", type=int, default=40_000, help="longest stream (tokens) run dense")
  parser.add_argument("--speed-batches", default="1,8", help="batch sizes of the speed table (sinks+window)")
  parser.add_argument("--speed-frames", type=int, default=500, help="stream length of the speed table")
  parser.add_argument("--memory", default="", help="comma-separated vision budgets: run the memory sweep instead")
  parser.add_argument("--memory-frames", type=int, default=200, help="stream length of the memory / drop sweeps")
  parser.add_argument(
    "--methods", default=",".join(MEMORY_METHODS), help=f"the memory sweep's methods (also: {', '.join(EXTRA_METHODS)})"
  )
  parser.add_argument(
    "--memory-positions",
    choices=("absolute", "cache_relative"),
    default="absolute",
    help="the memory sweep's position mode (cache_relative: contiguous positions per track, and the rekv method)",
  )
  parser.add_argument(
    "--store-frames",
    type=int,
    default=0,
    help="frames the retrieval store keeps, the latest (a ring); 0 (default): every frame of the stream",
  )
  parser.add_argument("--drop", default="", help="comma-separated drop thresholds: run the token drop sweep instead")
  parser.add_argument(
    "--flat",
    default="",
    help="comma-separated stream lengths: time calls continuing the streams at each, side by side, instead",
  )
  parser.add_argument("--rounds", type=int, default=9, help="timed rounds of the --flat sweep")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  cfg = run_config(args.quick, args.workdir, args.flags)
  args.window = args.window or eval_window(cfg)
  lengths = [int(x) for x in args.frames.split(",") if x]
  if args.quick:
    lengths, args.streams, args.ticks_per_call, args.window = [min(x, 20) for x in lengths[:1]], 2, 10, 64
    args.speed_batches, args.speed_frames, args.memory_frames = "1,2", 20, min(args.memory_frames, 20)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = device_line()
  print(f"bench_video_qa on {device}, jax {jax.__version__}; model {cfg.workdir}")
  t0 = time.time()
  model, step, train_log = trained_model(cfg, progress=not args.no_progress)
  data_config = cfg.video.data_config(curriculum=False)
  proactive = cfg.video.streaming_objective  # a model trained to answer only when asked never speaks unprompted
  streams = eval_streams(args.seed, args.streams)
  if args.memory or args.drop or args.flat:
    result = {"device": device, "jax": jax.__version__, "args": vars(args), "model_step": step}
    result.update(train_last_metrics=train_log, streams=streams)
    if args.flat:
      result["flat_rows"] = flat_sweep(model, args, data_config, streams, proactive)
    if args.memory:
      result["memory_rows"] = memory_sweep(model, args, data_config, streams, proactive)
      plot_memory(result, out / "memory.png")
    if args.drop:
      result["drop_rows"] = drop_sweep(model, args, data_config, streams, proactive)
    result["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
    return 0
  rows = []
  for frames in lengths:
    dense = qa_stream.track_tokens(frames, model.config.tokens_per_frame)
    for name, policy in policies(args.window, args.sinks, dense["text"], dense["vision"]).items():
      if name == "dense" and sum(dense.values()) > args.dense_max_tokens:
        rows.append({"policy": name, "frames": frames, "skipped": f"> {args.dense_max_tokens} tokens"})
        continue
      r = measure(model, policy, data_config, streams, frames, args.ticks_per_call, proactive, **speaking(args))
      rows.append({"policy": name, "frames": frames, **r})
      acc = ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in sorted(r["scores"].items()) if t != "proactive")
      p = r["scores"]["proactive"]
      print(
        f"  {name:<30} {frames:>6} frames: {acc}; proactive {p['announced']:.2f} announced, "
        f"{p['false_alarms']:.3f} false alarms; {r['ms_per_frame']:.2f} ms/frame, {r['frames_per_s']:.0f} frames/s, "
        f"cache {r['cache_mib']:.1f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB"
      )
  speed = []
  bounded = policies(args.window, args.sinks, 1, 1)["sinks+window"]
  for b in [int(x) for x in args.speed_batches.split(",") if x]:
    ids = eval_streams(args.seed, b, offset=500)
    n = args.speed_frames
    r = measure(model, bounded, data_config, ids, n, args.ticks_per_call, proactive, **speaking(args))
    speed.append({"batch": b, "frames": args.speed_frames, **{k: r[k] for k in ("ms_per_frame", "frames_per_s")}})
    print(f"  speed, sinks+window, batch {b}: {r['ms_per_frame']:.2f} ms per tick, {r['frames_per_s']:.0f} frames/s")
  result = {
    "device": device,
    "jax": jax.__version__,
    "args": vars(args),
    "model_step": step,
    "train_last_metrics": train_log,
    "streams": streams,
    "rows": rows,
    "speed": speed,
    "seconds": time.time() - t0,
  }
  (out / "results.json").write_text(json.dumps(result, indent=2))
  plot(result, out / "accuracy.png")
  print(f"wrote {out / 'results.json'} and {out / 'accuracy.png'} ({result['seconds']:.0f} s)")
  return 0


def plot(res: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in res["rows"] if "scores" in r]
  qtypes = sorted({t for r in rows for t in r["scores"] if t != "proactive"})
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name in dict.fromkeys(r["policy"] for r in rows):
    rs = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["frames"])
    x = [r["frames"] for r in rs]
    mean = [np.mean([r["scores"][t]["accuracy"] for t in qtypes if t in r["scores"]]) for r in rs]
    axes[0].plot(x, mean, marker="o", label=name)
    axes[1].plot(x, [r["ms_per_frame"] for r in rs], marker="o", label=name)
    axes[2].plot(x, [r["peak_rss_mib"] for r in rs], marker="o", label=name)
  labels = ("mean accuracy over question types", "ms per tick (whole batch)", "peak RSS (MiB)")
  for ax, label in zip(axes, labels):
    ax.set_xscale("log")
    ax.set_xlabel("stream length (frames)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_memory(res: dict, path: pathlib.Path) -> None:
  """Mean accuracy per question category (``video_qa.CATEGORY``) against the vision budget, one line per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = res["memory_rows"]
  cats = sorted({video_qa.CATEGORY[t] for r in rows for t in r["scores"] if t != "proactive"})
  fig, axes = plt.subplots(1, len(cats), figsize=(4 * len(cats), 3.5), squeeze=False)
  for ax, cat in zip(axes[0], cats):
    for method in dict.fromkeys(r["method"] for r in rows):
      rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
      acc = [
        np.mean([v["accuracy"] for t, v in r["scores"].items() if t != "proactive" and video_qa.CATEGORY[t] == cat])
        for r in rs
      ]
      ax.plot([r["budget"] for r in rs], acc, marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vision tokens kept per stream")
    ax.set_title(f"{cat} questions")
    ax.grid(True, alpha=0.3)
  axes[0][0].set_ylabel("accuracy")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  raise SystemExit(main())
