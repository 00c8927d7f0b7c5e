"""What the video-QA training clips show against what a long evaluation stream shows.

  python -m experiments.scene_stats [--flags F[;G...]] [--clips 400] [--streams 8] [--frames 1000] [--burn 50]
      --out DIR

A training clip is the first ``clip_frames`` ticks of a stream (``video_qa.stream_clips``; with ``clips_per_stream``
> 1, ``configs/video_lm.py:midstream``, the stream's first ticks cut into that many clips, counted here as the
stream's ticks they cover, the overlap once; the announcements then include those a self-contained clip hides): the
canvas starts empty and fills, while a stream of 1,000 frames spends nearly all its ticks in a steady state in which
the canvas is full most of the time, digits leave before others can enter, and a digit that enters meets the others
already there. The video-QA model answers what it was trained on; where the two differ (issue 10: ``count_now``
overcounts after exits at 1,000 frames), this experiment measures the difference, from the simulation alone (no
model): for the training clips of each flag set (``configs/video_lm.py``, with its training curriculum:
``train_stay``, ``fulfil_prob``, ...) and for the evaluation streams (the test split,
``data_config(curriculum=False)``, from tick ``--burn`` on), per ``clip_frames`` ticks: the share of ticks with 0-3
digits on screen, the exits, the entries by how many digits were already there, the entries in the same tick as an
exit, the proactive announcements due, and the words of the text slots per tick (what the text track of a cache
holds per tick: a text window of ``W`` tokens reaches about ``W / words_per_tick`` ticks back; a model that hides
standing requests, ``hide_requests``, caches a few fewer).
Writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from experiments.bench_video_qa import eval_streams, run_config
from jstream.data import video_qa


def scene_stats(config: video_qa.VideoQAConfig, split: str, streams: int, frames: int, burn: int = 0) -> dict:
  """Statistics of ``streams`` streams of ``split`` (the benchmark's seed-0 streams of the test split,
  ``bench_video_qa.eval_streams``; the training clips' streams, from index 0, of the training split), ticks
  ``burn .. frames - 1``, per ``config.clip_frames`` ticks."""
  if not 0 <= burn < frames:
    raise ValueError(f"burn must be in [0, frames={frames}), got {burn}")
  indices = eval_streams(0, streams) if split == "test" else range(streams)
  limit = config.max_on_screen
  on_screen = np.zeros(limit + 1)
  beside = np.zeros(limit)  # entries by the digits already on screen
  exits = with_exit = announcements = words = 0
  for i in indices:
    chunk = video_qa.VideoQAStream(config, split, i).take(frames)
    drawn = (chunk.objects[..., 0] >= 0).sum(-1)
    on_screen += np.bincount(drawn[burn:], minlength=limit + 1)
    exit_ticks = {f for f, kind, _, _ in chunk.events if kind == video_qa.EXIT and f >= burn}
    exits += len(exit_ticks)
    for f, kind, _, _ in chunk.events:
      if kind == video_qa.ENTER and f >= burn:
        beside[drawn[f] - 1] += 1
        with_exit += f in exit_ticks
    announcements += sum(f >= burn for f, _, _ in chunk.announcements)
    words += int(np.sum(chunk.text[burn:] != video_qa.PAD))
  clips = streams * (frames - burn) / config.clip_frames
  entries = beside.sum()
  return {
    "split": split,
    "streams": streams,
    "ticks": [burn, frames],
    "on_screen_share": (on_screen / on_screen.sum()).round(3).tolist(),
    "exits_per_clip": round(exits / clips, 3),
    "entries_per_clip_beside": (beside / clips).round(3).tolist(),
    "entries_with_an_exit": round(with_exit / max(entries, 1), 3),
    "announcements_per_clip": round(announcements / clips, 3),
    "words_per_tick": round(words / (streams * (frames - burn)), 3),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="scene_stats", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--flags", default="long", help="';'-separated flag sets of configs/video_lm.py (each a,b,c)")
  parser.add_argument("--clips", type=int, default=400, help="training clips per flag set")
  parser.add_argument("--streams", type=int, default=8, help="evaluation streams")
  parser.add_argument("--frames", type=int, default=1000, help="evaluation stream length")
  parser.add_argument("--burn", type=int, default=50, help="evaluation ticks skipped (the canvas filling)")
  args = parser.parse_args(argv)
  t0 = time.time()
  rows = []
  flag_sets = [f for f in args.flags.split(";") if f]
  for i, flags in enumerate(flag_sets):
    cfg = run_config(False, None, flags)
    train = cfg.video.data_config()
    streams = max(args.clips // train.clips_per_stream, 1)  # a stream's clips are its consecutive ticks
    rows.append({"flags": flags, **scene_stats(train, "train", streams, video_qa.clips_span(train))})
    if i == 0:
      evaluation = cfg.video.data_config(curriculum=False)
      rows.insert(0, {"flags": "evaluation", **scene_stats(evaluation, "test", args.streams, args.frames, args.burn)})
  print(
    f"per {evaluation.clip_frames} ticks: on screen 0/1/2/3 (share of ticks), exits, entries beside 0/1/2 others, "
    "share of entries with an exit, announcements, words per tick"
  )
  for r in rows:
    share = " / ".join(f"{x:.2f}" for x in r["on_screen_share"])
    beside = " / ".join(f"{x:.2f}" for x in r["entries_per_clip_beside"])
    print(
      f"  {r['flags'][-60:]:60s} {share}  {r['exits_per_clip']:.2f}  {beside}  {r['entries_with_an_exit']:.2f}"
      f"  {r['announcements_per_clip']:.2f}  {r['words_per_tick']:.2f}"
    )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = {"args": vars(args), "rows": rows, "seconds": time.time() - t0}
  (out / "results.json").write_text(json.dumps(result, indent=2))
  print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
