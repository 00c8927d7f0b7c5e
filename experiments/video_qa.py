"""Streaming video QA, seen: ``jstream video-qa show`` draws a stream with its questions and the model's answers.

  jstream video-qa show --out DIR [--quick] [--workdir W] [--stream I] [--frames N] [--policy NAME] [--window N]
      [--speak-threshold T] [--close-threshold C]

Trains the model of ``configs/video_lm.py`` (or reuses the checkpoint in ``--workdir``), lets it watch test stream
``--stream`` (unseen handwriting) for ``--frames`` ticks under one of the benchmark's cache policies (``jstream bench
video-qa``; ``--window`` tokens per track, by default the run's ``VideoTask.eval_window``), speaking for itself
(``jstream.qa_stream``), and writes ``DIR/stream.gif``: each frame enlarged, beside it the question asked (held on
screen for a few frames), the model's answer against the truth, the pending proactive request and what the model
announced. ``DIR/transcript.txt`` has the same as text.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from experiments.bench_video_qa import (
  add_model_arguments,
  add_speaking_arguments,
  eval_window,
  policies,
  run_config,
  speaking,
  trained_model,
)
from jstream import qa_stream
from jstream.data import video_qa

HOLD = 6
"""Frames a question and its answer stay on screen."""
RIGHT, WRONG, PLAIN, DIM = (90, 220, 120), (240, 90, 90), (235, 235, 235), (150, 150, 150)


def transcript(record: qa_stream.StreamRecord, num_frames: int) -> list[list[tuple[str, tuple[int, int, int]]]]:
  """Per frame, the coloured lines drawn beside it: the question (held ``HOLD`` frames) with the model's answer and
  the truth, the pending proactive request, the announcement due now and what the model said."""
  asked = {q.frame: q for q in record.questions}
  due = {f: label for f, _, label in record.announcements}
  lines, shown, pending = [], None, None
  for f in range(num_frames):
    if f in asked:
      shown = asked[f]
      if shown.qtype == "proactive":
        pending = shown.answer
    out = [(f"frame {f}", DIM)]
    if shown is not None and f - shown.frame < HOLD:
      out.append((f"Q ({shown.qtype}): {shown.words}", PLAIN))
      if shown.qtype != "proactive":
        said = video_qa.WORDS[int(record.answer[shown.frame])]
        out.append((f"A: {said}   (truth: {shown.answer})", RIGHT if said == shown.answer else WRONG))
    if pending is not None:
      out.append((f"waiting for a {pending}", DIM))
    if f in due:
      out.append((f"event: a {video_qa.NUMBERS[due[f]]} enters", PLAIN))
      pending = None
    if record.decision[f] == video_qa.SPEAK:
      word = video_qa.WORDS[int(record.announced[f])]
      good = any(due.get(f - d) is not None and video_qa.NUMBERS[due[f - d]] == word for d in range(3))
      out.append((f"model: <speak> {word}", RIGHT if good else WRONG))
    lines.append(out)
  return lines


def render(frames: np.ndarray, lines, path: pathlib.Path, *, scale: int = 8, fps: float = 6.0) -> None:
  """Writes an animated GIF of ``frames [n, H, W]`` uint8, each enlarged ``scale`` times with its lines beside it."""
  from PIL import Image, ImageDraw, ImageFont

  font = ImageFont.load_default()
  n, h, w = frames.shape
  panel = 440
  images = []
  for f in range(n):
    img = Image.new("RGB", (w * scale + panel, max(h * scale, 140)), (20, 20, 24))
    big = Image.fromarray(frames[f]).resize((w * scale, h * scale), Image.NEAREST).convert("RGB")
    img.paste(big, (0, 0))
    draw = ImageDraw.Draw(img)
    for i, (text, colour) in enumerate(lines[f]):
      draw.text((w * scale + 10, 10 + 20 * i), text, fill=colour, font=font)
    images.append(img)
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def show(argv) -> int:
  parser = argparse.ArgumentParser(prog="jstream video-qa show", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/video_qa_show", help="output folder")
  add_model_arguments(parser, "the quick model (smoke test)")
  parser.add_argument("--stream", type=int, default=1000, help="index of the test stream")
  parser.add_argument("--frames", type=int, default=120, help="ticks to show")
  parser.add_argument("--policy", default="sinks+window", help="a policy of jstream bench video-qa")
  parser.add_argument("--window", type=int, default=None, help="tokens per track window (default: the run's)")
  add_speaking_arguments(parser)
  parser.add_argument("--fps", type=float, default=6.0)
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  cfg = run_config(args.quick, args.workdir, args.flags)
  model, step, _ = trained_model(cfg, progress=not args.no_progress)
  data_config = cfg.video.data_config(curriculum=False)
  args.window = args.window or eval_window(cfg)
  dense = qa_stream.track_tokens(args.frames, model.config.tokens_per_frame)
  choices = policies(args.window, 4, dense["text"], dense["vision"])
  if args.policy not in choices:
    parser.error(f"unknown policy {args.policy!r}; one of {sorted(choices)}")
  stream = video_qa.VideoQAStream(data_config, "test", args.stream)
  ticks = next(t for t in range(min(args.frames, 50), 0, -1) if args.frames % t == 0)
  (record,) = qa_stream.answer_streams(
    model,
    choices[args.policy],
    [stream],
    args.frames,
    ticks_per_call=ticks,
    proactive=cfg.video.streaming_objective,
    **speaking(args),
  )
  frames = video_qa.VideoQAStream(data_config, "test", args.stream).take(args.frames).frames
  lines = transcript(record, args.frames)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  render(frames, lines, out / "stream.gif", fps=args.fps)
  (out / "transcript.txt").write_text("\n".join(" | ".join(t for t, _ in frame) for frame in lines) + "\n")
  s = qa_stream.score([record])
  answered = {t: v for t, v in s.items() if t != "proactive"}
  right = sum(v["correct"] for v in answered.values())
  asked = sum(v["asked"] for v in answered.values())
  print(f"model step {step}, stream {args.stream}, {args.frames} frames under {args.policy}: {right}/{asked} answers")
  print(f"wrote {out / 'stream.gif'} and {out / 'transcript.txt'}")
  return 0


def main(argv=None) -> int:
  argv = list(argv or [])
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    return 0
  if argv[0] != "show":
    print(f"jstream video-qa: unknown subcommand {argv[0]!r}; one of: show", flush=True)
    return 2
  return show(argv[1:])


if __name__ == "__main__":
  raise SystemExit(main())
