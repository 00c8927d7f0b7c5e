"""Which proactive events the video-QA model misses, and why: how much of the entering digit other digits cover.

  python -m experiments.proactive_misses [--quick] [--flags F] [--workdir W] [--seed 0] [--streams 16]
      [--frames 1000] [--window N] [--speak-threshold T] [--close-threshold C] --out DIR

Runs held-out streams (``bench_video_qa.eval_streams``) through the stream runner under the benchmark's
``sinks+window`` policy (``--window`` tokens per track, by default the run's ``VideoTask.eval_window``) and, for every
event (a requested digit entering while its request stands, due within 2 frames: ``qa_stream.score``), measures the
entering digit's *occlusion* in its entry frame and the two after it (``occlusion``): the share of its ink (pixels
above 64 of 255 in its image) where another digit drawn in the same frame is at least as bright. A frame is the
pixelwise maximum of its digits, so those pixels show the other digit and the entering one's stroke is lost there.
Per occlusion bin (at the entry frame, and the least of the three): the events, the share announced in time with the
right label, the share the model spoke early for (a false alarm while the request stood) and the mean of the
highest speak margin within the tolerance (``TickOutputs.speak_margin``) over the events whose request still stood
then (an early announcement may have answered it). Prints the table and writes
``DIR/results.json`` (the bins and every event).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from experiments.bench_video_qa import (
  add_model_arguments,
  add_speaking_arguments,
  eval_streams,
  eval_window,
  run_config,
  speaking,
  trained_model,
)
from jstream import qa_stream
from jstream.data import digits, video_qa
from jstream.train.aligned import video_policy

INK = 64
"""A digit image's pixel above this (of 255) is ink."""
BINS = (0.0, 0.05, 0.2, 0.4)
"""Lower edges of the occlusion bins."""
TOLERANCE = 2
"""Frames after its entry within which an event counts as announced (``qa_stream.score``'s default)."""


def occlusion(objects: np.ndarray, obj: int, images: np.ndarray, frame_size: tuple[int, int]) -> float | None:
  """The share of object ``obj``'s ink covered by the other digits of one frame, ``objects [max_on_screen, 5]``
  ``(object, label, image, y, x)`` rows (``video_qa.Chunk.objects``; -1 rows: empty) drawn from ``images [n, s, s]``
  uint8; None if ``obj`` is not drawn in the frame."""
  s = images.shape[-1]
  mine = [o for o in objects if o[0] == obj]
  if not mine:
    return None
  own = np.zeros(frame_size, np.int32)
  others = np.zeros(frame_size, np.int32)
  for o in objects:
    if o[0] < 0:
      continue
    canvas = own if o[0] == obj else others
    y, x = int(o[3]), int(o[4])
    np.maximum(canvas[y : y + s, x : x + s], images[o[2]], out=canvas[y : y + s, x : x + s])
  ink = own > INK
  return float(np.sum(ink & (others >= own)) / max(int(np.sum(ink)), 1))


def event_rows(record: qa_stream.StreamRecord, chunk: video_qa.Chunk, images: np.ndarray, frame_size) -> list[dict]:
  """One row per event of a stream's ``record`` (``qa_stream.answer_streams``), its frames' digits from ``chunk``
  (the same stream's ``take`` of at least as many ticks plus ``TOLERANCE``)."""
  rows = []
  for e in qa_stream.event_outcomes(record, tolerance=TOLERANCE):
    f = e["frame"]
    obj = next(ev[2] for ev in chunk.events if ev[0] == f and ev[1] == video_qa.ENTER)
    margin = np.max(record.speak_margin[f : f + TOLERANCE + 1])
    rows.append(
      {
        "frame": int(f),
        "label": int(e["label"]),
        "wait": int(f - e["asked"]),
        "occlusion": [occlusion(chunk.objects[f + d], obj, images, frame_size) for d in range(TOLERANCE + 1)],
        "announced": e["right"],
        "spoke_early": e["early"],
        "margin": float(margin),
        "standing": bool(margin > qa_stream.CLOSED),
      }
    )
  return rows


def by_bin(rows: list[dict], key) -> list[dict]:
  """The events per occlusion bin of ``key(row)``: their count, the shares announced and spoken early for, and the
  mean highest margin of those whose request still stood."""
  out = []
  for lo, hi in zip(BINS, (*BINS[1:], 1.01)):
    sel = [r for r in rows if lo <= key(r) < hi]
    out.append(
      {
        "occlusion": f"{lo:.2f}-{min(hi, 1.0):.2f}",
        "events": len(sel),
        "announced": float(np.mean([r["announced"] for r in sel])) if sel else None,
        "spoke_early": float(np.mean([r["spoke_early"] for r in sel])) if sel else None,
        "mean_margin": float(np.mean(standing)) if (standing := [r["margin"] for r in sel if r["standing"]]) else None,
      }
    )
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="proactive_misses", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  add_model_arguments(parser, "the quick model and short streams (smoke test)")
  parser.add_argument("--seed", type=int, default=0, help="evaluation streams start at test index 1000 * (seed + 1)")
  parser.add_argument("--streams", type=int, default=16, help="streams (one batch)")
  parser.add_argument("--frames", type=int, default=1000, help="stream length (ticks; a multiple of 50)")
  parser.add_argument("--window", type=int, default=None, help="tokens per track (default: the run's)")
  add_speaking_arguments(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.streams, args.frames = min(args.streams, 2), min(args.frames, 100)
  t0 = time.time()
  cfg = run_config(args.quick, args.workdir, args.flags)
  model, step, _ = trained_model(cfg, progress=False)
  data_config = cfg.video.data_config(curriculum=False)
  args.window = args.window or eval_window(cfg)
  ids = eval_streams(args.seed, args.streams)
  streams = [video_qa.VideoQAStream(data_config, "test", i) for i in ids]
  proactive = cfg.video.streaming_objective  # a model trained to answer only when asked never speaks unprompted
  policy = video_policy(args.window, 4)
  kw = {"ticks_per_call": 50, "proactive": proactive, **speaking(args)}
  records = qa_stream.answer_streams(model, policy, streams, args.frames, **kw)
  images, _ = digits.digit_pool("test", data_config.digit_size)
  rows = []
  for i, rec in zip(ids, records):
    chunk = video_qa.VideoQAStream(data_config, "test", i).take(args.frames + TOLERANCE)
    rows += [{"stream": i, **r} for r in event_rows(rec, chunk, images, data_config.frame_size)]
  at_entry = by_bin(rows, lambda r: r["occlusion"][0])
  least = by_bin(rows, lambda r: min(x for x in r["occlusion"] if x is not None))
  result = {
    "args": vars(args),
    "model_step": step,
    "streams": ids,
    "proactive": qa_stream.score(records)["proactive"],
    "by_occlusion_at_entry": at_entry,
    "by_least_occlusion_within_tolerance": least,
    "events": rows,
    "seconds": time.time() - t0,
  }
  print(f"{len(rows)} events in {args.streams} streams of {args.frames} frames; model step {step}")
  print("occlusion at entry | events | announced | spoke early | mean margin   (least of 3 frames: events, announced)")
  for a, b in zip(at_entry, least):
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(
      f"  {a['occlusion']:>9}  {a['events']:5d}  {fmt(a['announced']):>5}  {fmt(a['spoke_early']):>5}  "
      f"{fmt(a['mean_margin']):>6}   ({b['events']}, {fmt(b['announced'])})"
    )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
