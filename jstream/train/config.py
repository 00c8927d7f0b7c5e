"""Training configs: a frozen dataclass, Python config files with ``get_config(arg)``, typed overrides.

A config file (``configs/lm_tiny.py``) defines ``get_config(*flags) -> TrainConfig``. On the command line a config
is named as ``path[:arg]`` where ``arg`` is a comma-separated list of bare flags, passed to ``get_config``
(``quick``), and ``key=value`` overrides applied afterwards, typed by the field they replace
(``configs/lm_tiny.py:quick,steps=200,model.embed_dim=128``; ``window`` and ``sinks`` stand for ``train_window``
and ``train_sinks``). An unknown key or a value of the wrong type is an
error that names the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import types
import typing
from typing import Any, ClassVar

from jstream.checks import check_int
from jstream.config import TransformerConfig
from jstream.train.losses import DIVERGENCES


@dataclasses.dataclass(frozen=True)
class VideoTask:
  """The streaming video-QA task (``TrainConfig.data == "video_qa"``): the frame side of the model
  (``jstream.models.video_lm``) and the training clips (``jstream.data.video_qa``).

  Attributes:
    frame_size: side of the square frames.
    patch_size: side of a square patch (``frame_size`` a multiple of it).
    patch_window: side of the pixel square each patch token embeds (``VideoLMConfig.patch_window``).
    stem_channels: the convolutional stem before the patches (``VideoLMConfig.stem_channels``).
    stem_pool: 2x2 max pooling after each stem convolution (``VideoLMConfig.stem_pool``).
    encoder_layers: blocks of the per-frame encoder.
    frame_pos: a learned place embedding on the frame tokens the language model reads
      (``VideoLMConfig.frame_pos``).
    projector: a linear map of the encoder's tokens into the words' scale (``VideoLMConfig.projector``).
    projector_norm: the projector's outputs held at the words' initial scale (``VideoLMConfig.projector_norm``).
    carrier: VideoScan's carrier token after each frame (``VideoLMConfig.carrier``): only it stays in the cache.
    label_words: the frame tokens the language model reads carry the word embedding of their patch label (the
      digits' names and ``none``; ``VideoLMConfig.label_words``).
    place_words: the frame tokens the language model reads carry the word embeddings of their quadrant (``top`` /
      ``bottom``, ``left`` / ``right``; ``VideoLMConfig.place_words``).
    digit_size, max_on_screen, enter_prob, question_prob: the streams (``video_qa_config``).
    question_weights: relative frequency of each question type in ``video_qa.QTYPES`` order (``None``: the data's
      default).
    clip_frames: ticks per training clip.
    clips_per_stream, clip_overlap: StreamingVLM's overlapped chunks: cut each training stream into this many
      consecutive clips that share ``clip_overlap`` ticks with the clip before them (context only: no targets
      there), so that most clips start mid-stream, after digits came and went that the clip does not show
      (``video_qa.stream_clips``). Default: each clip is a stream's first ticks.
    self_contained: clips cut mid-stream hold only targets that their own ticks tell
      (``video_qa.VideoQAConfig.self_contained``: no announcement of a request asked before the clip, no question
      whose answer needs the stream before it), and the dense targets that need the stream's start (the scene
      state's history, what entered in the clip's first frame) are left out of the loss for them: a training
      curriculum whose clips show a long stream's steady state as it is (``clips_per_stream > 1``), for the models
      with dense targets (``state_loss``, ``frame_delta``, ``request_loss``, ``activation``), which need it to train
      on clips cut mid-stream. The evaluation streams are unchanged.
    num_train: training clips (``clips_per_stream`` from each of the streams ``0, 1, ...`` of the train split).
    patch_loss: weight of the patch-label loss on the frame encoder (``video_lm.patch_loss``, the stand-in for a
      pretrained vision tower); 0 turns it off.
    speak_weight: weight of a ``<speak>`` decision in the answer loss (``video_lm.tick_loss``); other targets
      weigh 1.
    encoder_steps: the run's first steps train the frame encoder alone on the patch labels (needs ``patch_loss``
      > 0): the language model is not run, so a step costs a fraction of a joint one, and the encoder reads digits
      before the language model starts learning from its tokens (a stand-in for starting from a pretrained vision
      tower). Counted in ``TrainConfig.steps``.
    streaming_objective: VideoLLM-online's streaming objective: the model decides ``<silent>`` / ``<speak>`` after
      every frame and announces proactive events (the default). ``False``: the baseline that answers only when
      asked (``video_lm.answers_only``: no decision or announcement is a target; evaluate with the runner's
      ``proactive=False``, which ``jstream bench video-qa`` does for such a run).
    text_budget: pack each clip's tokens without the slots' ``<pad>`` words, into ``clip_frames * (tokens per
      frame + text_budget)`` tokens (``VideoLM.training_outputs``); ``None``: run whole slots. Words past the
      budget (a clip with unusually many questions) leave the loss; the ``dropped_targets`` metric counts them.
    state_loss: weight of the scene-state loss (``video_lm.state_loss``): a head on the language model's features
      at each tick's decision position is trained to name what the questions ask about after that frame (the
      digit in each quadrant, the digits on screen, the one entering, the first in and out, each digit's entries
      and order of first entry; ``video_lm.scene_state``, from the clip's drawn digits). Dense supervision of
      the state the answers are read from: every tick has ~28 targets where a question gives one answer word in
      four ticks. Needs clips from their stream's start (``clips_per_stream == 1``) or ``self_contained``; 0 turns
      it off.
    layout_loss: weight, within the frame heads' loss (itself weighted by ``patch_loss``), of a head on the mean of
      each frame's encoder tokens that names the digit in each quadrant (``VideoLMConfig.layout_head``,
      ``video_lm.layout_labels``): the frame's layout written where an even attention over its tokens reads it.
      Needs ``patch_loss`` > 0; 0 turns it off.
    frame_delta: the frame encoder sees the frame minus the previous one beside it, and an entry head on it is
      trained (with the patch loss's weight) to name the digit that entered in each frame at its centre's patch
      (``VideoLMConfig.frame_delta``, ``video_lm.entry_labels``). Needs clips from their stream's start (or
      ``self_contained``) and ``patch_loss`` > 0.
    entry_words: the frame tokens the language model reads carry the word embedding of the digit the entry head
      sees entering there (``VideoLMConfig.entry_words``). Needs ``frame_delta``.
    fulfil_prob: a training curriculum for proactive requests: the probability that a digit entering while a
      request is pending in a training clip is the requested one (``video_qa.VideoQAConfig.fulfil_prob``). The
      evaluation streams (``data_config(curriculum=False)``) keep uniform entries.
    train_question_weights: a training curriculum for the question mix: the relative frequency of each type in
      the training clips (``video_qa.QTYPES`` order; ``()``: ``question_weights``). The evaluation streams
      (``data_config(curriculum=False)``) keep ``question_weights``. A question type whose answer needs a circuit
      the other types do not train (``where``: attending to one quadrant of the latest frame by the question's
      words) can be asked more often in training without changing what the benchmark asks.
    train_stay: a training curriculum for exits: the ``(min, max)`` frames a digit stays on screen in the training
      clips (``video_qa.VideoQAConfig.stay``; ``()``: the dataset's 6 to 30). A clip from its stream's start holds
      about one exit with the default stay, and the scenes after exits, which a long stream is full of, are rare;
      shorter stays put several in each clip. The evaluation streams (``data_config(curriculum=False)``) keep the
      dataset's stays.
    train_enter_prob: a training curriculum for a full canvas: the probability that a digit enters in a tick of
      the training clips (``None``: ``enter_prob``). With shorter stays (``train_stay``) the canvas empties more
      often than in a long stream's steady state; entries twice as frequent fill it as that steady state does
      (``python -m experiments.scene_stats``). The evaluation streams keep ``enter_prob``.
    request_loss: weight of the request loss: a head on the language model's features at each tick's decision
      position is trained to name the digit of the proactive request pending then (``VideoLMConfig.request_head``,
      ``video_lm.pending_requests``). Needs clips from their stream's start (or ``self_contained``) and the
      streaming objective; 0 turns it off.
    activation: width of StreamBridge's activation model (``VideoLMConfig.activation``, ``video_lm.Activation``; 0:
      off): it decides when to speak from the standing request and the frame encoder's tokens (behind a stop-gradient:
      ``VideoLM.activation_logits``), trained with a binary cross-entropy at the ticks where a request stands
      (``video_lm.activation_loss``, ``<speak>`` ticks weighing ``speak_weight``) from the first step, the encoder-only
      steps included. Needs clips from their stream's start (or ``self_contained``) and the streaming objective.
    activation_heads: the activation model also reads the frame heads' class log-probabilities, matched bilinearly
      against the request (``VideoLMConfig.activation_heads``). Needs ``activation``.
    activation_match: weight of the activation model's matching loss (``video_lm.match_loss``): at every frame where
      a digit enters, each of the ten requests ``tell me when a {d} appears`` is scored, the one for the entering
      digit a positive and the nine others negatives, whether or not a request stands in the clip. Needs
      ``activation`` (so clips from their stream's start: an entry is a digit not drawn in the frame before); 0
      turns it off.
    hide_requests: the language model neither reads nor caches a standing request's words, which the activation
      model holds; it says an announcement's label from the request's prompt at ``<speak>``
      (``VideoLMConfig.hide_requests``). Needs ``activation``.
    augment: random affine variants of each training digit added to the training clips' digit pool
      (``video_qa.VideoQAConfig.augment``): more handwriting for the frame encoder to generalise from. The evaluation
      streams (the test split) are unchanged.
    eval_window: tokens per track of the bounded policies that ``jstream bench video-qa`` and ``jstream video-qa
      show`` run this model under when ``--window`` is not given (0: 256). A text window that reaches much further
      back than the training clips' text holds contexts the model never saw (``benchmarks/RESULTS.md``): 128 tokens
      hold about 33 ticks of text, a 24-tick training clip's and more. Evaluation only: a checkpoint written under
      another value is the same run (``checkpoint.RESUMABLE_FIELDS``).
  """

  dataset: str = "digits"
  frame_size: int | tuple[int, int] = 32
  patch_size: int = 8
  patch_window: int | None = None
  stem_channels: tuple[int, ...] = ()
  stem_pool: bool = False
  encoder_layers: int = 1
  frame_pos: bool = False
  projector: bool = False
  projector_norm: bool = False
  carrier: bool = False
  label_words: bool = False
  place_words: bool = False
  digit_size: int = 12
  max_on_screen: int = 3
  enter_prob: float = 0.2
  question_prob: float = 0.25
  question_weights: tuple[float, ...] | None = None
  clip_frames: int = 48
  clips_per_stream: int = 1
  clip_overlap: int = 0
  self_contained: bool = False
  num_train: int = 2000
  patch_loss: float = 0.0
  speak_weight: float = 1.0
  text_budget: int | None = None
  encoder_steps: int = 0
  streaming_objective: bool = True
  state_loss: float = 0.0
  layout_loss: float = 0.0
  frame_delta: bool = False
  entry_words: bool = False
  fulfil_prob: float = 0.0
  train_question_weights: tuple[float, ...] = ()
  train_stay: tuple[int, ...] = ()
  train_enter_prob: float | None = None
  request_loss: float = 0.0
  activation: int = 0
  activation_heads: bool = False
  activation_match: float = 0.0
  hide_requests: bool = False
  augment: int = 0
  eval_window: int = 0

  def __post_init__(self):
    object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
    object.__setattr__(self, "train_question_weights", tuple(float(w) for w in self.train_question_weights))
    object.__setattr__(self, "train_stay", tuple(int(f) for f in self.train_stay))
    if self.train_stay and not (len(self.train_stay) == 2 and 1 <= self.train_stay[0] <= self.train_stay[1]):
      raise ValueError(f"train_stay must be (min, max) frames with 1 <= min <= max, or (); got {self.train_stay}")
    if self.train_enter_prob is not None and not 0.0 < self.train_enter_prob <= 1.0:
      raise ValueError(f"train_enter_prob must be in (0, 1] (or None), got {self.train_enter_prob}")
    tw = self.train_question_weights
    if tw:
      from jstream.data.video_qa import QTYPES

      if len(tw) != len(QTYPES) or min(tw) < 0 or sum(tw) <= 0:
        raise ValueError(
          f"train_question_weights must be {len(QTYPES)} non-negative numbers (one per video_qa.QTYPES: {QTYPES}), "
          f"not all 0, or () for question_weights; got {tw}"
        )
    if self.eval_window < 0:
      raise ValueError(f"eval_window must be >= 0 (0: the benchmark's default), got {self.eval_window}")
    if self.state_loss < 0 or self.request_loss < 0:
      raise ValueError(f"state_loss and request_loss must be >= 0, got {self.state_loss}, {self.request_loss}")
    cut = self.clips_per_stream > 1 and not self.self_contained  # clips cut mid-stream that need what came before
    if self.self_contained and self.clips_per_stream == 1:
      raise ValueError("self_contained needs clips_per_stream > 1 (it rewrites the clips cut mid-stream)")
    for name, on in (("state_loss", self.state_loss), ("frame_delta", self.frame_delta)):
      if on and cut:
        raise ValueError(
          f"{name} needs clips that start at their stream's first frame (clips_per_stream == 1) or self_contained "
          "ones: the targets of a clip cut mid-stream depend on frames it does not show"
        )
    if self.request_loss and (cut or not self.streaming_objective):
      raise ValueError(
        "request_loss needs clips from their stream's start (clips_per_stream == 1: a request may be pending from "
        "before a clip cut mid-stream) or self_contained ones, and the streaming objective (requests are announced)"
      )
    if self.activation < 0:
      raise ValueError(f"activation must be a width >= 1 (0: off), got {self.activation}")
    if self.activation and (cut or not self.streaming_objective):
      raise ValueError(
        "activation needs clips from their stream's start (clips_per_stream == 1: a request may stand from before a "
        "clip cut mid-stream) or self_contained ones, and the streaming objective (requests are announced)"
      )
    if self.entry_words and not self.frame_delta:
      raise ValueError("entry_words needs frame_delta (the entry head that names the digit entering)")
    if self.activation_heads and not (self.activation and self.patch_loss > 0):
      raise ValueError("activation_heads needs an activation model (activation > 0) and trained heads (patch_loss > 0)")
    if self.hide_requests and not self.activation:
      raise ValueError("hide_requests needs an activation model (activation > 0) to hold the requests")
    if self.hide_requests and self.request_loss:
      raise ValueError("request_loss trains the language model to hold the request, which hide_requests keeps from it")
    if self.activation_match < 0 or (self.activation_match and not self.activation):
      raise ValueError(f"activation_match must be >= 0 and needs activation > 0, got {self.activation_match}")
    if self.layout_loss < 0 or (self.layout_loss and self.patch_loss == 0):
      raise ValueError(f"layout_loss must be >= 0 and needs patch_loss > 0, got {self.layout_loss}, {self.patch_loss}")
    if self.frame_delta and self.patch_loss == 0:
      raise ValueError("frame_delta trains its entry head with the patch loss: it needs patch_loss > 0")
    if self.question_weights is not None:
      object.__setattr__(self, "question_weights", tuple(float(x) for x in self.question_weights))
    if self.patch_loss < 0 or self.speak_weight <= 0:
      raise ValueError(f"patch_loss must be >= 0 and speak_weight > 0, got {self.patch_loss}, {self.speak_weight}")
    if self.encoder_steps < 0 or (self.encoder_steps and self.patch_loss == 0):
      raise ValueError(
        f"encoder_steps must be >= 0 and needs patch_loss > 0, got {self.encoder_steps}, {self.patch_loss}"
      )
    if self.clips_per_stream < 1 or not 0 <= self.clip_overlap < self.clip_frames:
      raise ValueError(
        f"clips_per_stream must be >= 1 and clip_overlap in [0, clip_frames={self.clip_frames}), got "
        f"{self.clips_per_stream}, {self.clip_overlap}"
      )
    if self.clip_overlap and self.clips_per_stream == 1:
      raise ValueError("clip_overlap needs clips_per_stream > 1 (it is what a clip shares with the one before it)")
    if self.text_budget is not None and self.text_budget < 1:
      raise ValueError(f"text_budget must be >= 1 word per tick (or None), got {self.text_budget}")

  def data_config(self, *, curriculum: bool = True):
    """The ``VideoQAConfig`` of the training clips; ``curriculum=False``: of the evaluation streams (without the
    training-only ``fulfil_prob``, ``train_question_weights``, ``train_stay`` and ``train_enter_prob``)."""
    from jstream.data import video_qa

    stay = {"stay": self.train_stay} if curriculum and self.train_stay else {}
    return video_qa.video_qa_config(
      **stay,
      frame_size=self.frame_size,
      digit_size=self.digit_size,
      max_on_screen=self.max_on_screen,
      enter_prob=self.train_enter_prob if curriculum and self.train_enter_prob is not None else self.enter_prob,
      question_prob=self.question_prob,
      question_weights=(self.train_question_weights or self.question_weights) if curriculum else self.question_weights,
      clip_frames=self.clip_frames,
      clips_per_stream=self.clips_per_stream,
      clip_overlap=self.clip_overlap,
      self_contained=self.self_contained,
      num_train=self.num_train,
      fulfil_prob=self.fulfil_prob if curriculum else 0.0,
      augment=self.augment,
    )

  def model_config(self, lm: TransformerConfig):
    """The ``VideoLMConfig`` around the language model ``lm``."""
    from jstream.models.video_lm import VideoLMConfig

    fs = (self.frame_size, self.frame_size)
    from jstream.data.video_qa import LABEL_WORDS, PLACE_WORDS

    return VideoLMConfig(
      lm,
      frame_size=fs,
      patch_size=self.patch_size,
      patch_window=self.patch_window,
      stem_channels=self.stem_channels,
      stem_pool=self.stem_pool,
      encoder_layers=self.encoder_layers,
      frame_pos=self.frame_pos,
      projector=self.projector,
      projector_norm=self.projector_norm,
      carrier=self.carrier,
      label_words=LABEL_WORDS if self.label_words else (),
      place_words=PLACE_WORDS if self.place_words else (),
      layout_head=self.layout_loss > 0,
      state_head=self.state_loss > 0,
      frame_delta=self.frame_delta,
      entry_words=LABEL_WORDS if self.entry_words else (),
      request_head=self.request_loss > 0,
      activation=self.activation,
      activation_heads=self.activation_heads,
      hide_requests=self.hide_requests,
    )


@dataclasses.dataclass(frozen=True)
class VideoGenTask:
  """The streaming video generation task (``TrainConfig.data == "video_gen"``): the block-causal video diffusion
  transformer (``jstream.models.video_dit``) on moving-digit clips (``jstream.data.digits``).

  ``TrainConfig.model`` gives the transformer's sizes (layers, heads, widths, dtypes); its ``vocab_size`` must be
  the patch size squared (a token's pixels: ``VideoDiTConfig.patch_dim``).

  Attributes:
    dataset: ``"digits"`` (moving digits, ``jstream.data.digits``; optionally class-conditioned) or ``"cartpole"``
      (gymnasium's CartPole, ``jstream.data.cartpole``: every frame conditioned on the action that led to it, 3
      action ids; ``class_conditioned`` must be off).
    frame_size, patch_size, frames_per_chunk: the frames and their tokens (``VideoDiTConfig``); ``frame_size`` an
      int (square) or ``(H, W)`` (digits: square only).
    digit_size, num_digits, speed, num_train: the digit clips (``digits_config``); ``num_train`` also counts
      CartPole's training episodes (of ``episode_frames``).
    clip_frames: frames per training clip (a multiple of ``frames_per_chunk``).
    class_conditioned: condition on the digit's label (one digit per clip only).
    label_dropout: share of training clips whose label is dropped (``video_dit.NULL_LABEL``), so that the model
      also learns the unconditional velocity and can be sampled with classifier-free guidance (0: never; DiT
      and the video models after it drop 10%).
    objective: ``"diffusion_forcing"`` (every chunk of a clip at its own noise level, one block-causal forward, the
      loss on every chunk; Chen et al. 2024, CausVid's initialisation) or ``"teacher_forcing"`` (one chunk per
      clip noised, the chunks before it clean at noise level 0, as a stream's cache holds them; the loss on that
      chunk: the inference pattern exactly, at one chunk of signal per clip), or ``"self_forcing"`` (self-rollout
      training, ``jstream.models.self_forcing``: the student rolls out whole clips with its own cache and sampler,
      trained by distribution matching against the ``teacher`` run and an online critic).
    time_sampling, time_shift: how training noise levels are drawn (``jstream.flow.sample_times``); for
      ``self_forcing``, ``time_shift`` is also the student's sampler grid shift (``flow.schedule``).
    teacher: ``self_forcing`` only: the workdir of a finished ``video_gen`` run with the same model and frames (the
      real-score model; the student and the critic start from its weights).
    rollout_steps: ``self_forcing``: the student's denoising steps per chunk (use the same at inference).
    critic_steps: ``self_forcing``: critic updates per student update (DMD2's two time-scale rule; 1: both every
      step).
    dmd_time_range: ``self_forcing``: the noise levels at which the teacher and the critic score the rollout.
    context_frames: ``self_forcing``: real frames (the first of each training clip) committed to the student's
      cache before it rolls out the rest of the clip; 0: the student generates the whole clip from its label.
    teacher_guidance: ``self_forcing``: the classifier-free guidance scale of the real score (the teacher; 1:
      unguided). DMD distils the guided teacher into the few-step student, as CausVid and Self Forcing do; needs a
      teacher trained with ``label_dropout``.
  """

  dataset: str = "digits"
  frame_size: int | tuple[int, int] = 32
  patch_size: int = 8
  frames_per_chunk: int = 1
  digit_size: int = 16
  num_digits: int = 1
  speed: tuple[float, float] = (1.0, 3.0)
  num_train: int = 2000
  clip_frames: int = 8
  class_conditioned: bool = True
  label_dropout: float = 0.0
  objective: str = "diffusion_forcing"
  time_sampling: str = "logit_normal"
  time_shift: float = 1.0
  teacher: str = ""
  rollout_steps: int = 4
  critic_steps: int = 1
  dmd_time_range: tuple[float, float] = (0.02, 0.98)
  context_frames: int = 0
  episode_frames: int = 64
  teacher_guidance: float = 1.0

  OBJECTIVES: ClassVar[tuple[str, ...]] = ("diffusion_forcing", "teacher_forcing", "self_forcing")

  def __post_init__(self):
    object.__setattr__(self, "speed", tuple(float(v) for v in self.speed))
    object.__setattr__(self, "dmd_time_range", tuple(float(v) for v in self.dmd_time_range))
    if not isinstance(self.frame_size, int):
      object.__setattr__(self, "frame_size", tuple(int(v) for v in self.frame_size))
    if self.dataset not in ("digits", "cartpole"):
      raise ValueError(f"VideoGenTask.dataset must be 'digits' or 'cartpole', got {self.dataset!r}")
    if self.dataset == "cartpole" and self.class_conditioned:
      raise ValueError("CartPole clips have no class label: set class_conditioned=False (their frames take actions)")
    if self.dataset == "digits" and self.frame_hw[0] != self.frame_hw[1]:
      raise ValueError(f"moving digits are square: frame_size must be an int, got {self.frame_size}")
    if self.objective not in self.OBJECTIVES:
      raise ValueError(f"VideoGenTask.objective must be one of {self.OBJECTIVES}, got {self.objective!r}")
    if self.time_sampling not in ("uniform", "logit_normal") or self.time_shift <= 0:
      raise ValueError(
        f"time_sampling must be 'uniform' or 'logit_normal' and time_shift > 0, got {self.time_sampling!r}, "
        f"{self.time_shift}"
      )
    if self.clip_frames < 1 or self.clip_frames % self.frames_per_chunk:
      raise ValueError(
        f"clip_frames ({self.clip_frames}) must be a positive multiple of frames_per_chunk ({self.frames_per_chunk})"
      )
    if self.objective == "self_forcing":
      lo, hi = self.dmd_time_range
      if not self.teacher:
        raise ValueError("objective='self_forcing' needs teacher= the workdir of a trained video_gen run")
      if self.rollout_steps < 1 or self.critic_steps < 1 or not 0.0 <= lo < hi <= 1.0:
        raise ValueError(
          f"self_forcing needs rollout_steps >= 1, critic_steps >= 1 and 0 <= dmd_time_range[0] < [1] <= 1, got "
          f"{self.rollout_steps}, {self.critic_steps}, {self.dmd_time_range}"
        )
    if not 0 <= self.context_frames < self.clip_frames or self.context_frames % self.frames_per_chunk:
      raise ValueError(
        f"context_frames ({self.context_frames}) must be whole chunks of {self.frames_per_chunk}, fewer than "
        f"clip_frames ({self.clip_frames})"
      )
    if self.class_conditioned and self.num_digits != 1:
      raise ValueError(f"class_conditioned needs one digit per clip (its label), got num_digits={self.num_digits}")
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"VideoGenTask.label_dropout must be in [0, 1), got {self.label_dropout}")
    for name in ("label_dropout", "teacher_guidance"):
      unguided = 0.0 if name == "label_dropout" else 1.0
      if getattr(self, name) != unguided and not self.class_conditioned:
        raise ValueError(f"VideoGenTask.{name} = {getattr(self, name)} needs class_conditioned=True")
    if self.teacher_guidance != 1.0 and self.objective != "self_forcing":
      raise ValueError(
        f"VideoGenTask.teacher_guidance is self forcing's (its DMD teacher), got objective {self.objective!r}"
      )

  @property
  def frame_hw(self) -> tuple[int, int]:
    """``frame_size`` as ``(H, W)``."""
    return (self.frame_size, self.frame_size) if isinstance(self.frame_size, int) else tuple(self.frame_size)

  @property
  def num_actions(self) -> int:
    """Action ids the frames are conditioned on (CartPole: none, left, right; digits: 0, unconditioned)."""
    return 3 if self.dataset == "cartpole" else 0

  def data_config(self):
    """The ``DigitsConfig`` or ``CartPoleConfig`` of the training clips."""
    if self.dataset == "cartpole":
      from jstream.data.cartpole import cartpole_config

      return cartpole_config(frame_size=self.frame_hw, episode_frames=self.episode_frames, num_train=self.num_train)
    from jstream.data.digits import digits_config

    return digits_config(
      frame_size=self.frame_hw[0],
      digit_size=self.digit_size,
      num_digits=self.num_digits,
      num_frames=self.clip_frames,
      speed=self.speed,
      num_train=self.num_train,
    )

  def model_config(self, lm: TransformerConfig):
    """The ``VideoDiTConfig`` with the transformer sizes of ``lm``."""
    from jstream.models.video_dit import VideoDiTConfig

    cfg = VideoDiTConfig(
      frame_size=self.frame_hw,
      patch_size=self.patch_size,
      frames_per_chunk=self.frames_per_chunk,
      embed_dim=lm.embed_dim,
      num_layers=lm.num_layers,
      num_heads=lm.num_heads,
      num_kv_heads=lm.num_kv_heads,
      mlp_dim=lm.mlp_dim,
      num_classes=10 if self.class_conditioned else 0,
      num_actions=self.num_actions,
      rope_base=lm.rope_base,
      dtype=lm.dtype,
      param_dtype=lm.param_dtype,
      attention_impl=lm.attention_impl,
      scan_layers=lm.scan_layers,
    )
    if lm.vocab_size != cfg.patch_dim:
      raise ValueError(f"video_gen needs model.vocab_size == {cfg.patch_dim} (a patch's pixels), got {lm.vocab_size}")
    return cfg


@dataclasses.dataclass(frozen=True)
class DraftHeadsTask:
  """Training extra prediction heads (``jstream.speculative.DraftHeads``, Medusa-1) on a trained text LM that
  stays frozen (``TrainConfig.draft_heads``).

  Attributes:
    base: workdir of the trained LM's run; its newest checkpoint is loaded when the run starts (the run's
      ``model`` must be that run's model).
    num_heads: heads (the most drafts a round can take from them).
    decay: head ``i``'s loss weight is ``decay^(i-1)``.
  """

  base: str
  num_heads: int = 4
  decay: float = 0.8

  def __post_init__(self):
    check_int("DraftHeadsTask.num_heads", self.num_heads, 1)
    if not 0.0 < self.decay <= 1.0:
      raise ValueError(f"DraftHeadsTask.decay must be in (0, 1], got {self.decay}")


DISTILL_SAMPLES = ("data", "student", "teacher")
"""Where the text of a distillation step comes from (``DistillTask.samples``)."""


@dataclasses.dataclass(frozen=True)
class DistillTask:
  """Training a text LM (a speculative draft) on another trained LM's next-token distributions instead of the
  corpus' next bytes (``TrainConfig.distill``; DistillSpec, Zhou et al. 2024): the teacher is loaded from its run
  when training starts and stays out of the run's state and checkpoints.

  Attributes:
    teacher: workdir of the teacher's run (a text LM with the same vocabulary): its newest checkpoint when the run
      starts; a resumed run keeps that step (``jstream.train.loop.TEACHER_RECORD``).
    divergence: ``fkl``, ``rkl``, ``jsd`` or ``tvd`` (``jstream.train.losses.DIVERGENCES``); ``tvd`` is one minus
      the acceptance rate at ``temperature``, the quantity speculative decoding's speed rests on.
    temperature: both distributions at this temperature: the one the draft will be sampled at (> 0).
    data_weight: weight of the ordinary next-byte loss on the text the student reads, added to the divergence (0:
      pure distillation); with ``samples="teacher"`` that is sequence-level distillation (Kim and Rush, 2016).
    samples: the text both models read. ``"data"``: the corpus' samples. ``"student"`` (on-policy, DistillSpec's
      best setting) or ``"teacher"``: each row keeps its first ``prompt_len`` corpus tokens and continues them with
      tokens sampled at ``temperature`` from the student (its weights at that step) or the teacher, inside the
      compiled step (one decode scan; noise ``fold_in(key(seed), step)``, so resume stays exact). The teacher's
      samples are the text a speculative draft meets when it verifies against it; the student's cost a fraction
      of a step.
    prompt_len: corpus tokens kept at the start of each row when ``samples`` is not ``"data"`` (1 to ``seq_len``).
  """

  teacher: str
  divergence: str = "fkl"
  temperature: float = 1.0
  data_weight: float = 0.0
  samples: str = "data"
  prompt_len: int = 32

  def __post_init__(self):
    if not self.teacher:
      raise ValueError("DistillTask.teacher must name the teacher run's workdir")
    for name in ("temperature", "data_weight"):  # an int from Python must not make overrides expect ints
      value = getattr(self, name)
      if isinstance(value, int) and not isinstance(value, bool):
        object.__setattr__(self, name, float(value))
    if self.divergence not in DIVERGENCES:
      raise ValueError(f"DistillTask.divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
    if not (math.isfinite(self.temperature) and self.temperature > 0):
      raise ValueError(f"DistillTask.temperature must be a finite number > 0, got {self.temperature}")
    if not (math.isfinite(self.data_weight) and self.data_weight >= 0):
      raise ValueError(f"DistillTask.data_weight must be a finite number >= 0, got {self.data_weight}")
    if self.samples not in DISTILL_SAMPLES:
      raise ValueError(f"DistillTask.samples must be one of {DISTILL_SAMPLES}, got {self.samples!r}")
    check_int("DistillTask.prompt_len", self.prompt_len, 1)
    if self.samples == "student" and self.data_weight:
      raise ValueError(
        "DistillTask: data_weight > 0 with samples='student' would train the student on its own samples; use "
        "samples='data' or 'teacher' for a data loss"
      )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs (hashable; part of every checkpoint).

  Attributes:
    model: the transformer (for ``video_qa``: the language model over frame and word tokens).
    data: ``"text"`` (byte-level text streams; ``corpus``: local files / folders, empty: the default corpus),
      ``"video_qa"`` (moving-digit streams with questions: ``video``) or ``"video_gen"`` (moving-digit clips to
      generate: ``generation``).
    video: the video task (``data == "video_qa"`` only; default ``VideoTask()`` there).
    generation: the video generation task (``data == "video_gen"`` only; default ``VideoGenTask()`` there).
    seq_len, batch_size: training sample length (tokens, before a sink token; text only) and batch size.
    steps, lr, warmup_steps, min_lr_ratio, weight_decay, clip_norm, b1, b2: AdamW with linear warmup and cosine
      decay to ``lr * min_lr_ratio``, global-norm gradient clipping.
    sink_token: prepend a dedicated, learned sink token (id ``vocab_size - 1``) to every sample (StreamingLLM 3.3).
    train_window, train_sinks: train under the sink + window mask that inference uses (None: full causal). Text:
      a window of positions. ``video_qa``: the mask of a stream under ``Segmented((SinkWindow(train_sinks,
      train_window - train_sinks), Window(train_window)))`` (``Window(train_window)`` for the text without sinks),
      windows counted in tokens of each track: ``jstream bench video-qa``'s ``sinks+window`` / ``window``
      policies with ``--window train_window --sinks train_sinks`` (StreamingVLM's inference pattern in training).
    train_positions: ``video_qa`` only: the RoPE positions of training. ``"absolute"`` (stream positions, what the
      ``absolute`` policies give) or ``"cache_relative"`` (each track's contiguous positions, sinks just before the
      window: what ``bench video-qa``'s ``cache_relative`` policy gives, StreamingVLM's positions) or ``"mixed"``
      (the first half of each batch's rows at absolute positions, the second at cache-relative ones: one model
      for both kinds of policy), under the ``train_window`` mask or, without one, full attention.
    overlap: overlapped-chunk training (StreamingVLM): each sample continues the previous one's last ``overlap``
      tokens with full attention, and the loss covers only the new ``seq_len - overlap`` tokens.
    needles: the probability that a text sample carries a planted ``name = "value"`` line and, later, its recall
      (``jstream.data.text.plant_needle``): the associative recall that ``jstream bench needle`` asks for.
    needle_pairs: needles (each with its recall) planted in such a sample, each with its own name and value.
    copies: the probability that a text sample is a random string repeated instead
      (``jstream.data.text.repeated_string``): a copying curriculum.
    seed, log_every, checkpoint_every, keep_checkpoints, workdir: the run.
    draft_heads: train Medusa-style draft heads on the frozen LM of another run (text only; see
      ``DraftHeadsTask``); the run's model is then ``jstream.speculative.TargetWithHeads``.
    distill: train the model on another run's next-token distributions (text only; see ``DistillTask``).
    mesh: ``(data, model)``: shard the run over a device mesh (``jstream.sharding``: parameters and optimizer
      state by the model axis, batches by the data axis); None: one device. The numbers do not change, so a run
      may resume under another mesh. Command line: ``mesh=4;2``.
  """

  model: TransformerConfig
  data: str = "text"
  video: VideoTask | None = None
  generation: VideoGenTask | None = None
  corpus: tuple[str, ...] = ()
  seq_len: int = 256
  batch_size: int = 16
  steps: int = 1000
  lr: float = 3e-3
  warmup_steps: int = 50
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  sink_token: bool = False
  train_window: int | None = None
  train_sinks: int = 0
  train_positions: str = "absolute"
  overlap: int = 0
  needles: float = 0.0
  needle_pairs: int = 1
  copies: float = 0.0
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  workdir: str = "runs/lm_tiny"
  mesh: tuple[int, ...] | None = None
  draft_heads: DraftHeadsTask | None = None
  distill: DistillTask | None = None

  # Short names accepted by command-line overrides (``configs/lm_tiny.py:quick,window=512``).
  ALIASES: ClassVar[dict[str, str]] = {"window": "train_window", "sinks": "train_sinks"}

  def __post_init__(self):
    if not isinstance(self.model, TransformerConfig):
      raise TypeError(f"TrainConfig.model must be a TransformerConfig, got {type(self.model).__name__}")
    for name in ("seq_len", "batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      check_int(f"TrainConfig.{name}", getattr(self, name), 1)
    for name in ("warmup_steps", "train_sinks", "overlap", "seed"):
      check_int(f"TrainConfig.{name}", getattr(self, name), 0)
    if not 0 <= self.overlap < self.seq_len:
      raise ValueError(f"TrainConfig.overlap must be in [0, seq_len), got {self.overlap}")
    if self.train_window is not None and self.train_window < max(1, self.train_sinks):
      raise ValueError(f"train_window ({self.train_window}) must be >= max(1, train_sinks={self.train_sinks})")
    if not 0.0 <= self.needles <= 1.0:
      raise ValueError(f"TrainConfig.needles must be a probability in [0, 1], got {self.needles}")
    check_int("TrainConfig.needle_pairs", self.needle_pairs, 1)
    if not 0.0 <= self.copies <= 1.0:
      raise ValueError(f"TrainConfig.copies must be a probability in [0, 1], got {self.copies}")
    if self.copies and self.overlap:
      raise ValueError("TrainConfig.copies applies to random windows, not to overlapped chunks (overlap)")
    if self.needles and self.overlap:
      raise ValueError("TrainConfig.needles applies to random windows, not to overlapped chunks (overlap)")
    if self.mesh is not None:
      try:
        mesh = tuple(int(x) for x in self.mesh)
      except (TypeError, ValueError):
        raise ValueError(f"TrainConfig.mesh must be (data, model) ints, got {self.mesh!r}") from None
      if len(mesh) != 2 or min(mesh) < 1:
        raise ValueError(f"TrainConfig.mesh must be two positive ints (data, model), got {self.mesh!r}")
      object.__setattr__(self, "mesh", mesh)
    if self.sink_token and self.model.vocab_size < 2:
      raise ValueError("sink_token needs a vocabulary with a spare id")
    if self.data not in ("text", "video_qa", "video_gen"):
      raise ValueError(f"TrainConfig.data must be 'text', 'video_qa' or 'video_gen', got {self.data!r}")
    if self.data == "video_gen":
      if self.generation is None:
        object.__setattr__(self, "generation", VideoGenTask())
      if self.sink_token or self.overlap or self.needles or self.copies or self.train_window is not None:
        raise ValueError("sink_token, overlap, needles, copies and train_window do not apply to video_gen")
    elif self.generation is not None:
      raise ValueError(f"TrainConfig.generation is for data='video_gen', not {self.data!r}")
    if self.train_positions not in ("absolute", "cache_relative", "mixed"):
      raise ValueError(
        f"TrainConfig.train_positions must be 'absolute', 'cache_relative' or 'mixed', got {self.train_positions!r}"
      )
    if self.train_positions == "mixed" and self.batch_size % 2:
      raise ValueError(
        f"train_positions='mixed' splits each batch in halves: an even batch_size, not {self.batch_size}"
      )
    if self.train_positions != "absolute" and self.data != "video_qa":
      raise ValueError(
        f"train_positions={self.train_positions!r} is a video_qa switch (per-track positions); a text stream under "
        "cache_relative keeps its in-window distances, so text trains with absolute positions"
      )
    if self.data == "video_qa":
      if self.video is None:
        object.__setattr__(self, "video", VideoTask())
      if self.sink_token or self.overlap or self.needles or self.copies:
        raise ValueError("sink_token, overlap, needles and copies are text-only switches; video_qa does not take them")
      if self.train_window is not None and self.train_sinks > self.train_window - self.train_sinks:
        raise ValueError(
          f"video_qa: train_sinks ({self.train_sinks}) must be <= train_window - train_sinks "
          f"({self.train_window - self.train_sinks}), the text track's recent window"
        )
    elif self.video is not None:
      raise ValueError(f"TrainConfig.video is for data='video_qa', not {self.data!r}")
    if self.draft_heads is not None and self.distill is not None:
      raise ValueError("TrainConfig.distill and draft_heads are two ways to train a draft: pick one")
    if self.distill is not None and self.distill.samples != "data" and self.distill.prompt_len > self.seq_len:
      raise ValueError(
        f"DistillTask.prompt_len ({self.distill.prompt_len}) must be <= seq_len ({self.seq_len}): a row is "
        f"seq_len + 1 tokens, and at least one of them is sampled"
      )
    for name in ("draft_heads", "distill"):  # both read plain causal text samples through another run's LM
      if getattr(self, name) is None:
        continue
      if self.data != "text":
        raise ValueError(f"TrainConfig.{name} trains on a text LM, not on data={self.data!r}")
      if self.sink_token or self.overlap or self.needles or self.copies or self.train_window is not None:
        raise ValueError(
          f"{name} trains on plain causal text samples: no sink_token, overlap, needles, copies or window"
        )
    object.__setattr__(self, "corpus", tuple(self.corpus))

  @property
  def encoder_steps(self) -> int:
    """How many of the run's first steps train the frame encoder alone (``VideoTask.encoder_steps``; 0 for text)."""
    return self.video.encoder_steps if self.data == "video_qa" else 0

  @property
  def sink_id(self) -> int | None:
    """Token id of the learned sink token (the last id of the vocabulary), or None."""
    return self.model.vocab_size - 1 if self.sink_token else None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> TrainConfig:
    d = dict(d)
    d["model"] = TransformerConfig(**d["model"])
    if d.get("video") is not None:
      d["video"] = VideoTask(**d["video"])
    if d.get("generation") is not None:  # JSON stores tuples as lists
      d["generation"] = VideoGenTask(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["generation"].items()})
    d["corpus"] = tuple(d.get("corpus", ()))
    if d.get("draft_heads") is not None:
      d["draft_heads"] = DraftHeadsTask(**d["draft_heads"])
    if d.get("distill") is not None:
      d["distill"] = DistillTask(**d["distill"])
    if d.get("mesh") is not None:
      d["mesh"] = tuple(d["mesh"])
    return cls(**d)


def _coerce(key: str, text: str, current: Any, annotation) -> Any:
  """Parses ``text`` as the type of the field it overrides."""
  kinds = (
    {a for a in typing.get_args(annotation)}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType)
    else {annotation}
  )
  if text.lower() in ("none", "null") and type(None) in kinds:
    return None
  target = type(current) if current is not None else next(k for k in kinds if k is not type(None))
  try:
    if target is bool:
      if text.lower() in ("1", "true", "yes"):
        return True
      if text.lower() in ("0", "false", "no"):
        return False
      raise ValueError
    if target is tuple or typing.get_origin(target) is tuple:
      items = [p for p in text.split(";") if p]
      tup = next((k for k in kinds if typing.get_origin(k) is tuple), annotation)  # the tuple member of a union
      args = [a for a in typing.get_args(tup) if a is not Ellipsis]
      elem = args[0] if len(args) == 1 and args[0] in (int, float, str) else str
      return tuple(elem(p) for p in items)
    if target is int:
      return int(text)
    if target is float:
      return float(text)
    if target is str:
      return text
  except ValueError:
    pass
  else:
    if target not in (bool, int, float, str, tuple):
      raise TypeError(f"override {key}: cannot set a field of type {target.__name__} from the command line")
  raise TypeError(f"override {key}={text!r}: expected a value of type {target.__name__}")


def apply_overrides(cfg, overrides: dict[str, str]):
  """Returns the dataclass ``cfg`` with ``key=value`` overrides, typed by the field they replace.

  Nested dataclass fields are reached with dots (``model.embed_dim=128``, ``train.steps=10``); a dataclass may
  name short aliases of its fields in a ``ALIASES`` class attribute (``TrainConfig``: ``window``, ``sinks``).
  """
  if not overrides:
    return cfg
  aliases = getattr(type(cfg), "ALIASES", {})
  overrides = {aliases.get(k, k): v for k, v in overrides.items()}
  hints = typing.get_type_hints(type(cfg))
  fields = {f.name for f in dataclasses.fields(cfg)}
  direct, nested = {}, {}
  for key, text in overrides.items():
    head, _, rest = key.partition(".")
    if head not in fields:
      raise KeyError(f"unknown config key {key!r}; fields of {type(cfg).__name__}: {sorted(fields)}")
    value = getattr(cfg, head)
    if rest:
      if not dataclasses.is_dataclass(value):
        raise KeyError(f"unknown config key {key!r}: {head} has no fields")
      nested.setdefault(head, {})[rest] = text
    elif dataclasses.is_dataclass(value):
      raise TypeError(f"override {key}: set its fields ({key}.<field>=...), not the whole {type(value).__name__}")
    else:
      direct[head] = _coerce(key, text, value, hints[head])
  for head, sub in nested.items():
    try:
      direct[head] = apply_overrides(getattr(cfg, head), sub)
    except KeyError as e:
      raise KeyError(str(e.args[0]).replace("unknown config key '", f"unknown config key '{head}.")) from None
  return dataclasses.replace(cfg, **direct)


def load_config(spec: str, expect: type | None = TrainConfig):
  """Loads ``path[:flag,key=value,...]`` (see the module docstring); ``expect`` checks the returned type."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"config file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location(f"jstream_config_{file.stem}", file)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} has no get_config()")
  flags, overrides = [], {}
  for part in filter(None, (p.strip() for p in arg.split(","))):
    if "=" in part:
      key, value = part.split("=", 1)
      overrides[key.strip()] = value.strip()
    else:
      flags.append(part)
  cfg = module.get_config(*flags)
  if expect is not None and not isinstance(cfg, expect):
    raise TypeError(f"{path}: get_config() must return a {expect.__name__}, got {type(cfg).__name__}")
  if not dataclasses.is_dataclass(cfg):
    raise TypeError(f"{path}: get_config() must return a dataclass, got {type(cfg).__name__}")
  return apply_overrides(cfg, overrides)
