"""Definitions that config files share: the small byte-level LM, its training run, the ``quick`` shrink, and the
video-QA model and run.

``configs/lm_tiny.py`` and ``configs/streaming_llm.py`` both build on these, so the model that ``jstream train
--config configs/lm_tiny.py`` trains and the models of ``jstream demo`` are the same by construction, and so are
their ``quick`` (smoke-test) versions.
"""

from __future__ import annotations

import dataclasses

from jstream.config import TransformerConfig
from jstream.train.config import TrainConfig, VideoTask

BYTE_VOCAB = 257  # the 256 byte values + the id of the learned sink token (the last id)

# What ``quick`` changes: the model's size and the run's sample shape and logging (the run's length, checkpoint
# interval and workdir are the caller's).
_QUICK_MODEL = {"num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "embed_dim": 64, "mlp_dim": 128}
_QUICK_RUN = {"seq_len": 64, "batch_size": 8, "warmup_steps": 5, "log_every": 10}


def byte_lm(**fields) -> TransformerConfig:
  """The small byte-level transformer: 4 layers, width 128, 4 query / 2 kv heads, SwiGLU 384, RoPE (0.82M
  parameters); ``fields`` override any ``TransformerConfig`` field (``scan_layers=False``)."""
  base = dict(vocab_size=BYTE_VOCAB, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, mlp_dim=384)
  return TransformerConfig(**{**base, **fields})


def byte_lm_run(workdir: str, *, steps: int, **fields) -> TrainConfig:
  """A training run of ``byte_lm()`` (or ``fields["model"]``) on the default text corpus: 256-byte samples,
  batch 16, AdamW at 3e-3, metrics every 20 steps; ``fields`` override any other ``TrainConfig`` field."""
  base = dict(model=byte_lm(), seq_len=256, batch_size=16, lr=3e-3, log_every=20)
  return TrainConfig(**{**base, **fields, "workdir": workdir, "steps": steps})


def quick(cfg: TrainConfig, **fields) -> TrainConfig:
  """``cfg`` as a smoke test of seconds: its model shrunk to 2 layers of width 64 with 2 query / 1 kv heads and
  SwiGLU 128 (other model fields kept), 64-token samples, batch 8, 5 warmup steps, metrics every 10 steps;
  ``fields`` (``steps``, ``checkpoint_every``, ``workdir``, ...) override any ``TrainConfig`` field on top."""
  return dataclasses.replace(cfg, model=cfg.model.replace(**_QUICK_MODEL), **{**_QUICK_RUN, **fields})


def video_lm(**fields) -> TransformerConfig:
  """The language model of the video-QA model: 4 layers, width 128, 4 query / 2 kv heads, SwiGLU 256, over the
  word vocabulary of ``jstream.data.video_qa`` and the frames' patch tokens; ``fields`` override any field."""
  from jstream.data.video_qa import WORDS

  base = dict(vocab_size=len(WORDS), num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, mlp_dim=256)
  return TransformerConfig(**{**base, **fields})


VIDEO_TASK = VideoTask(
  clip_frames=24,
  patch_window=16,
  patch_loss=1.0,
  speak_weight=10.0,
  question_weights=(2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0),
  text_budget=8,
  encoder_steps=600,
)
"""The default video-QA task: 24-tick clips of 32x32 frames, 8-pixel patches that each embed the 16-pixel square
around them, patch labels on the encoder, ``<speak>`` decisions weighted 10x and proactive requests asked 3x as
often as the other long-range types (they are fulfilled in few ticks of a clip), clips packed to 8 words per tick
(a slot averages about 4); the first 600 steps train the frame encoder alone (about 0.1 s each, against about 2 s
for a joint step)."""


def video_lm_run(workdir: str, *, steps: int, video: VideoTask | None = None, **fields) -> TrainConfig:
  """A video-QA training run of ``video_lm()`` (or ``fields["model"]``), batch 8, AdamW at 2e-3, metrics every 10
  steps, on ``video`` (default ``VIDEO_TASK``)."""
  base = dict(model=video_lm(), batch_size=8, lr=2e-3, log_every=10, warmup_steps=30)
  video = VIDEO_TASK if video is None else video
  return TrainConfig(**{**base, **fields, "data": "video_qa", "video": video, "workdir": workdir, "steps": steps})


__all__ = ["BYTE_VOCAB", "VIDEO_TASK", "byte_lm", "byte_lm_run", "quick", "video_lm", "video_lm_run"]
