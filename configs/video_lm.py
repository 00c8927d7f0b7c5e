"""The streaming video-QA model on moving-digit streams with questions (issue 10).

  jstream train --config configs/video_lm.py          # the default model, minutes on 2 CPU cores
  jstream train --config configs/video_lm.py:quick    # seconds (smoke test)
  jstream train --config configs/video_lm.py:long     # 4x the joint steps
  jstream train --config configs/video_lm.py:aligned  # StreamingVLM: the inference attention pattern in training
  jstream train --config configs/video_lm.py:asked    # VideoLLM-online's baseline: answers only when asked

Flags: ``quick`` (a tiny model, short clips, few steps; the workdir of the other flags + ``_quick``), ``long`` (four
times the joint steps, in ``runs/video_lm_long``), ``aligned`` (trains under the mask of the ``sinks+window`` cache
policy with 128 tokens per track and 4 text sinks, so the vision window of 8 frames bites in two thirds of each
24-tick clip; in ``runs/video_lm_aligned``; compare with ``jstream bench video-qa --flags aligned --window 128
--sinks 4``), ``overlapped`` (StreamingVLM's overlapped chunks: the 2,000 training clips are 4 consecutive clips of
each of 500 streams, each sharing 8 ticks with the one before, so three in four start mid-stream;
``runs/video_lm_overlapped``), ``questions`` (a question at 60% of the ticks instead of 25%, ``where`` and
``count_now`` asked twice as often relative to the other types, 12 words per tick in the packed clips; in
``runs/video_lm_questions``; the benchmark's streams ask alike), ``asked`` (VideoLLM-online's baseline to its
streaming objective: no ``<silent>`` / ``<speak>`` decision or announcement is trained, the model answers only when
asked; in ``runs/video_lm_asked``), ``where`` (a diagnostic: every question is a where-question, at 60% of the
ticks; ``runs/video_lm_where``), ``frame_pos`` (a learned place embedding on the frame tokens the language model
reads, ``VideoLMConfig.frame_pos``; workdir suffix ``_pos``), ``carrier`` (VideoScan's carrier token after each
frame: the frame's patches are seen by their own tick only and one token per frame stays in the cache,
``VideoLMConfig.carrier``; workdir suffix ``_carrier``), ``labels`` (the frame tokens carry the word embedding of
their patch label, ``VideoLMConfig.label_words``; workdir suffix ``_labels``), ``places`` (the frame tokens carry the
word embeddings of their quadrant, ``top`` / ``bottom`` and ``left`` / ``right``, ``VideoLMConfig.place_words``;
workdir suffix ``_places``), ``state`` (the scene-state loss: a head on the language model's features after each
frame names the digit in each quadrant, the count, the entering digit, the first in / out, each digit's entries and
order, ``VideoTask.state_loss``; workdir suffix ``_state``), ``delta`` (the frame encoder sees the frame minus the
previous one, and an entry head names the digit entering in each frame, ``VideoTask.frame_delta``; workdir suffix
``_delta``), ``fulfil`` (a training curriculum: a digit entering while a proactive request is pending is the
requested one with probability 0.3, so that clips hold more announcements; evaluation streams keep
uniform entries; ``VideoTask.fulfil_prob``; workdir suffix ``_fulfil``), ``entries`` (with ``delta``: the frame
tokens also carry the word embedding of the digit the entry head sees entering, ``VideoTask.entry_words``; workdir
suffix ``_entries``), ``request`` (a head on the language model's features after each frame names the digit of the
pending proactive request, ``VideoTask.request_loss``; workdir suffix ``_request``), ``activation``
(StreamBridge's activation model of width 64 decides when to speak from the standing request and the frame,
``VideoTask.activation``; workdir suffix ``_activation``), ``encoder`` (3,000 encoder-only steps instead of 600,
the joint steps unchanged; workdir suffix ``_encoder``), ``augment`` (the training clips draw their digits from a
pool that also holds 9 random affine variants of each training image, ``VideoTask.augment``; workdir suffix
``_augment``), ``data`` (16,000 training clips instead of 2,000; workdir suffix ``_data``), ``heads`` (with
``activation``: the activation model also reads the frame heads' class log-probabilities,
``VideoTask.activation_heads``; workdir suffix ``_heads``), ``cnn`` (a pooled convolutional stem before the
patches: 3x3 convolutions of 16 and 32 channels, each followed by GELU and 2x2 max pooling,
``VideoTask.stem_channels`` / ``VideoTask.stem_pool``; workdir suffix ``_cnn``), ``proj`` (LLaVA's projector: a
linear map brings the encoder's tokens to the scale of the word embeddings before the words of ``labels``,
``places`` and ``entries`` are added, ``VideoTask.projector``; workdir suffix ``_proj``), ``pnorm`` (the projector
with its outputs held at the words' initial scale, ``VideoTask.projector_norm``: trained freely, the projector grows
them back over the words; workdir suffix ``_pnorm``), ``layout`` (a head on
the mean of each frame's encoder tokens is trained to name the digit in each quadrant, ``VideoTask.layout_loss``;
workdir suffix ``_layout``), ``match`` (with ``activation``: at every frame where a digit enters, the activation
model scores all ten requests, the entering digit's a positive and the nine others negatives,
``VideoTask.activation_match``; workdir suffix ``_match``), ``hide`` (with ``activation``: the language model
neither reads nor caches a standing request's words; the label it announces comes from the request's prompt at
``<speak>``, ``VideoTask.hide_requests``; workdir suffix ``_hide``), ``where3`` (a training curriculum: the
training clips ask where-questions three times as often, weights ``(6, 1, 1, 1, 1, 1, 3)`` for the default mix;
the evaluation streams keep theirs; ``VideoTask.train_question_weights``; workdir suffix ``_where3``), ``contiguous``
(StreamingVLM's contiguous positions in training: each track's tokens at their own indices, a query at the index
of each track's latest token, as ``bench video-qa``'s ``sinks+window, cache_relative`` policy gives them;
``TrainConfig.train_positions``; with ``aligned``, under its window too; workdir suffix ``_contig``), ``mixedpos``
(half of each batch's rows at stream positions, half at the contiguous ones, one model for both kinds of policy;
``train_positions="mixed"``; workdir suffix ``_mixedpos``), ``exits`` (a training curriculum: digits stay 4 to 16
frames in the training clips instead of 6 to 30, so that each clip holds about 2.6 exits instead of 1.2 and the
scenes after them; the evaluation streams keep theirs; ``VideoTask.train_stay``; workdir suffix ``_exits``),
``steady`` (``exits`` and digits entering at twice the rate, ``VideoTask.train_enter_prob``: the training clips'
canvas as full as a long stream's steady state, ``experiments.scene_stats``; workdir suffix ``_steady``),
``midstream`` (each training stream cut into 4 consecutive clips, 3 in 4 of them from a long stream's steady state
as it is, ``VideoTask.self_contained``: no target in a clip needs the ticks before it; evaluated with 128-token
windows, ``VideoTask.eval_window``; workdir suffix ``_midstream``). Flags
combine (``long,aligned``). Any field can be overridden as ``key=value`` (``model.<field>=...``,
``video.<field>=...``). The model and run are shared through ``jstream.presets``.
"""

import dataclasses

from jstream import presets
from jstream.train import TrainConfig, VideoTask

EXIT_STAY = (4, 16)
"""The training clips' stays (frames) of ``exits`` and ``steady``: about 2.6 exits a clip instead of 1.2."""


def get_config(*flags: str) -> TrainConfig:
  known = {"quick", "long", "aligned", "overlapped", "questions", "asked", "where", "frame_pos", "carrier"}
  known |= {"labels", "places", "state", "delta", "entries", "request", "fulfil", "activation", "encoder", "augment"}
  known |= {"heads", "data", "cnn", "proj", "pnorm", "layout", "match", "hide", "where3", "contiguous", "mixedpos"}
  known |= {"exits", "steady", "midstream"}
  unknown = set(flags) - known
  if unknown:
    raise ValueError(f"unknown flags {sorted(unknown)} for configs/video_lm.py")
  cfg = presets.video_lm_run("runs/video_lm", steps=800, checkpoint_every=100)
  if "long" in flags:  # four times the default's joint steps (about 40 CPU minutes)
    cfg = dataclasses.replace(cfg, steps=1400, checkpoint_every=200, workdir="runs/video_lm_long")
  if "aligned" in flags:  # StreamingVLM's inference attention pattern in training (the bench's sinks+window)
    cfg = dataclasses.replace(cfg, train_window=128, train_sinks=4, workdir=cfg.workdir + "_aligned")
  if "contiguous" in flags:  # StreamingVLM's positions in training: each track's own, as the cache_relative policy
    cfg = dataclasses.replace(cfg, train_positions="cache_relative", workdir=cfg.workdir + "_contig")
  if "mixedpos" in flags:  # half of each batch at stream positions, half at each track's own: one model for both
    cfg = dataclasses.replace(cfg, train_positions="mixed", workdir=cfg.workdir + "_mixedpos")
  if "overlapped" in flags:  # StreamingVLM's overlapped chunks: 4 clips per stream sharing 8 ticks
    video = dataclasses.replace(cfg.video, clips_per_stream=4, clip_overlap=8)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_overlapped")
  if "questions" in flags:  # 2.4x the questions per clip, now-questions weighted up (evaluation streams alike)
    video = dataclasses.replace(cfg.video, question_prob=0.6, question_weights=(4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 3.0))
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(video, text_budget=12), workdir=cfg.workdir + "_questions")
  if "asked" in flags:  # VideoLLM-online's baseline: trained to answer only when asked, never speaks unprompted
    video = dataclasses.replace(cfg.video, streaming_objective=False)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_asked")
  if "where" in flags:  # a diagnostic: only where-questions, at 60% of the ticks (evaluation streams alike)
    video = dataclasses.replace(cfg.video, question_prob=0.6, question_weights=(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_where")
  if "frame_pos" in flags:  # a learned place embedding on the frame tokens the language model reads
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, frame_pos=True), workdir=cfg.workdir + "_pos")
  if "carrier" in flags:  # VideoScan: one carrier token per frame stays in the cache, the patches do not
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, carrier=True), workdir=cfg.workdir + "_carrier")
  if "labels" in flags:  # the frame tokens carry their patch label's word embedding
    video = dataclasses.replace(cfg.video, label_words=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_labels")
  if "places" in flags:  # the frame tokens carry their quadrant's words (top / bottom, left / right)
    video = dataclasses.replace(cfg.video, place_words=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_places")
  if "state" in flags:  # dense supervision of the scene state the answers are read from
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, state_loss=1.0), workdir=cfg.workdir + "_state")
  if "delta" in flags:  # the encoder sees what changed since the previous frame, and names the digit entering
    video = dataclasses.replace(cfg.video, frame_delta=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_delta")
  if "fulfil" in flags:  # a curriculum: requests fulfilled sooner and more often in the training clips
    video = dataclasses.replace(cfg.video, fulfil_prob=0.3)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_fulfil")
  if "entries" in flags:  # the frame tokens name the digit entering in words
    video = dataclasses.replace(cfg.video, entry_words=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_entries")
  if "request" in flags:  # dense supervision of the pending proactive request
    video = dataclasses.replace(cfg.video, request_loss=1.0)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_request")
  if "activation" in flags:  # StreamBridge: a small model beside the language model decides when to speak
    video = dataclasses.replace(cfg.video, activation=64)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_activation")
  if "encoder" in flags:  # five times the encoder-only steps (about 0.1 s each), the joint steps unchanged
    extra = 3000 - cfg.video.encoder_steps
    video = dataclasses.replace(cfg.video, encoder_steps=3000)
    cfg = dataclasses.replace(cfg, video=video, steps=cfg.steps + extra, workdir=cfg.workdir + "_encoder")
  if "augment" in flags:  # more handwriting: 9 affine variants of each training digit
    video = dataclasses.replace(cfg.video, augment=9)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_augment")
  if "data" in flags:  # 8x the training clips (16,000): the encoder sees each clip about once
    video = dataclasses.replace(cfg.video, num_train=16000)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_data")
  if "heads" in flags:  # the activation model reads the frame heads' class probabilities
    video = dataclasses.replace(cfg.video, activation_heads=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_heads")
  if "cnn" in flags:  # a small CNN reads the digits: translation-equivariant features, pooled before the patches
    video = dataclasses.replace(cfg.video, stem_channels=(16, 32), stem_pool=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_cnn")
  if "proj" in flags:  # the frame tokens enter the language model at the words' scale
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, projector=True), workdir=cfg.workdir + "_proj")
  if "pnorm" in flags:  # the projector's outputs held at the words' scale: the words stay audible
    video = dataclasses.replace(cfg.video, projector=True, projector_norm=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_pnorm")
  if "layout" in flags:  # the frame's layout, supervised on the mean of its encoder tokens
    video = dataclasses.replace(cfg.video, layout_loss=1.0)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_layout")
  if "match" in flags:  # the activation model scores all ten requests at every entry
    video = dataclasses.replace(cfg.video, activation_match=1.0)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_match")
  if "hide" in flags:  # the language model does not see standing requests: their prompt carries them
    video = dataclasses.replace(cfg.video, hide_requests=True)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_hide")
  if "where3" in flags:  # where-questions three times as often in the training clips only
    where, *others = cfg.video.question_weights  # where is QTYPES' first
    weights = (3.0 * where, *others)
    video = dataclasses.replace(cfg.video, train_question_weights=weights)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_where3")
  if "exits" in flags:  # shorter stays in the training clips only
    video = dataclasses.replace(cfg.video, train_stay=EXIT_STAY)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_exits")
  if "steady" in flags:  # and entries twice as often: training clips as crowded as a long stream's steady state
    video = dataclasses.replace(cfg.video, train_stay=EXIT_STAY, train_enter_prob=2 * cfg.video.enter_prob)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_steady")
  if "midstream" in flags:  # 3 in 4 training clips cut mid-stream: a long stream's steady state, as it is
    video = dataclasses.replace(cfg.video, clips_per_stream=4, clip_overlap=0, self_contained=True, eval_window=128)
    cfg = dataclasses.replace(cfg, video=video, workdir=cfg.workdir + "_midstream")
  if "quick" in flags:
    small = presets.video_lm(num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, mlp_dim=64)
    video = VideoTask(
      frame_size=16,
      patch_size=8,
      digit_size=8,
      clip_frames=6,
      num_train=16,
      encoder_layers=1,
      stem_channels=(4, 4) if cfg.video.stem_pool else cfg.video.stem_channels,
      stem_pool=cfg.video.stem_pool,
      patch_loss=1.0,
      encoder_steps=2,
      frame_pos=cfg.video.frame_pos,  # the model switches survive the shrink
      projector=cfg.video.projector,
      projector_norm=cfg.video.projector_norm,
      carrier=cfg.video.carrier,
      label_words=cfg.video.label_words,
      place_words=cfg.video.place_words,
      state_loss=cfg.video.state_loss,
      layout_loss=cfg.video.layout_loss,
      frame_delta=cfg.video.frame_delta,
      entry_words=cfg.video.entry_words,
      fulfil_prob=cfg.video.fulfil_prob,
      train_question_weights=cfg.video.train_question_weights,
      train_stay=cfg.video.train_stay,
      train_enter_prob=cfg.video.train_enter_prob,
      request_loss=cfg.video.request_loss,
      activation=8 if cfg.video.activation else 0,
      augment=cfg.video.augment,
      activation_heads=cfg.video.activation_heads,
      activation_match=cfg.video.activation_match,
      hide_requests=cfg.video.hide_requests,
      clips_per_stream=2 if cfg.video.self_contained else 1,
      self_contained=cfg.video.self_contained,
    )
    cfg = dataclasses.replace(
      cfg,
      model=small,
      video=video,
      steps=6,
      batch_size=4,
      checkpoint_every=3,
      warmup_steps=2,
      log_every=2,
      workdir=cfg.workdir + "_quick",  # each flag combination its own quick run
    )
  return cfg
