"""A video-language model for streaming video QA: frames and text interleaved in one causal transformer.

A *tick* is one frame followed by a text slot (``jstream.data.video_qa``): the frame becomes
``tokens_per_frame`` patch tokens (a patch embedding and a small per-frame encoder with full attention inside the
frame), the slot's words are embedded by the language model, and both run through the engine's
``StreamingTransformer`` (``extend_embeddings``) against an explicit cache. The frame's tokens are one *group*
(``jstream.cache.plan``): they share a stream position and attend to each other, and causally to everything before
them. Frame tokens go to cache track ``VISION`` and text to ``TEXT``, so a ``Segmented`` policy keeps text sinks, a
text window and a vision window apart (StreamingVLM); ``<pad>`` words are padding (not attended, not cached, no
position).

The word predicted after position ``i`` of a tick is read from the logits at ``i``: the decision (``<silent>`` /
``<speak>``) from the frame's last token, then each slot word from the word before it (``tick_loss``).

**Patch labels.** Real video-language models start from a pretrained vision tower (StreamingVLM, VideoLLM-online
and Flash-VStream use SigLIP / CLIP encoders); a model trained from scratch on a CPU in minutes learns to read
digits from answers alone far too slowly. ``patch_logits`` is the stand-in: a linear head on the frame encoder's
tokens, trained (``patch_loss``, a training switch) to name the digit whose centre lies in each patch
(``centre_labels``, from the data's per-frame object list), so that the frame tokens the language model reads carry
the digits' identities and places. It is training-only supervision; the stream never uses the head, unless the
model reads its patch labels as words (``VideoLMConfig.label_words``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jstream import cache as cache_lib
from jstream.config import TransformerConfig
from jstream.models.lm import StreamingTransformer
from jstream.nn import cached_attention
from jstream.nn.layers import Block, RMSNorm, rms_normalize
from jstream.typing import Array, Bool, Float, Int, Logits

TEXT, VISION, FRAME = 0, 1, 2
"""Cache tracks of a tick's tokens: ``Segmented((text_policy, vision_policy))``; a model with carrier tokens
(``VideoLMConfig.carrier``) adds ``FRAME``, a window of one frame's patch tokens, and keeps its carriers in
``VISION``."""
PAD = 0
"""The id of the ``<pad>`` word (``jstream.data.video_qa.PAD``)."""
SILENT, SPEAK = 1, 2
"""The ids of the ``<silent>`` / ``<speak>`` decisions (``jstream.data.video_qa``)."""
QUESTION, ANSWER = 3, 4
"""The ids of the ``<q>`` / ``<a>`` markers (``jstream.data.video_qa``): a question that no ``<a>`` follows in its slot
asks for a later answer, a *standing request* (``Activation``)."""
NO_DIGIT = 10
"""The patch label of a patch that holds no digit's centre (labels 0-9 name a digit; -1: two centres, ignored)."""
QUADRANT_ORDER = ((True, True), (True, False), (False, True), (False, False))
"""The quadrants as ``(top, left)`` flags, in the order of ``layout_labels`` and ``scene_state``: top left, top
right, bottom left, bottom right."""
STATE_NAMES = (
  *(f"where_{v}_{h}" for v in ("top", "bottom") for h in ("left", "right")),
  "count_now",
  "entered",
  "first_in",
  "first_out",
  *(f"count_{d}" for d in range(10)),
  *(f"rank_{d}" for d in range(10)),
)
"""The scene-state targets of a tick (``scene_state``), each a class in ``0 .. STATE_CLASSES - 1``: the digit in
each quadrant (``NO_DIGIT``: none), the digits on screen, the digit that entered in this frame, the first digit to
enter and the first to leave so far (``NO_DIGIT``: none yet), how many times each digit has entered (10: ten or
more, the answer ``many``) and each digit's rank in the order of first entries (``NO_DIGIT``: not seen yet)."""
STATE_GROUPS, STATE_CLASSES = len(STATE_NAMES), NO_DIGIT + 1


@dataclasses.dataclass(frozen=True)
class VideoLMConfig:
  """A video-language model (frozen, hashable).

  Attributes:
    lm: the causal transformer over interleaved frame and text tokens (its ``vocab_size`` is the word vocabulary).
    frame_size: ``(H, W)`` of the (single-channel) frames.
    patch_size: side of a square patch; ``H`` and ``W`` must be multiples. A frame is one token per patch.
    patch_window: side of the square of pixels each patch token embeds, centred on its patch (``None``: the patch
      itself). A window of twice the patch (overlapping patches, zeros outside the frame) sees a whole digit whose
      centre lies in the patch, so each token can name it without the encoder's help.
    stem_channels: output channels of 3x3 convolutions (stride 1, GELU) run on the frame before the patches are
      taken (a convolutional stem: digits at any offset look alike to it); ``()``: patches of raw pixels.
    stem_pool: each stem convolution is followed by 2x2 max pooling (stride 2), and the patches are taken from the
      pooled map: a small CNN whose features see further and cost less per patch than full-resolution channels
      (the patch embedding reads ``window / 2**len(stem_channels)`` cells of each channel instead of ``window``
      pixels). Needs ``stem_channels``, and ``patch_size`` and the window's margin ``(window - patch_size) / 2``
      divisible by ``2**len(stem_channels)``.
    encoder_layers: transformer blocks of the per-frame encoder (full attention inside a frame).
    frame_pos: add a learned embedding of each patch's place in the frame to the frame tokens the language model
      reads (beside the encoder's own, which its patch-label training may wash out). A frame's tokens share one
      stream position, so without a place signal in their features a question about *where* has nothing to attend
      by (Qwen2-VL gives patches 2D rotary positions for the same reason).
    projector: a linear map (no bias) from the encoder's tokens into the language model's embedding space before
      the words below are added (LLaVA's projector), initialised so that its outputs have the input embeddings'
      scale (weights of standard deviation ``1 / embed_dim``: the encoder's tokens leave an RMS norm at about one
      per coordinate, the word embeddings start at about ``embed_dim ** -0.5``). Without it the frame tokens enter
      the language model about ``sqrt(embed_dim)`` times larger than words, and the words ``label_words``,
      ``place_words`` and ``entry_words`` add to them are a few percent of the token.
    projector_norm: the projector's outputs are RMS-normalised to the word embeddings' initial scale
      (``embed_dim ** -0.5`` per coordinate, no learned gain), so that training cannot grow the frame tokens back
      over the words added to them: trained freely, the projector's weights (initialised at ``1 / embed_dim``)
      grow under AdamW, on synthetic where-questions to outputs five to six times the words' scale within 500
      steps, drowning the ``place_words`` and ``label_words`` again before the language model has learnt to use
      them (``experiments/where_routing.py``). Needs ``projector``.
    carrier: VideoScan's carrier token: each frame's patch tokens are followed by one learned token (its own
      stream position, after the frame's) that attends them; the patches go to track ``FRAME``, a ``Window`` of one
      frame, so they are seen by their own tick and leave the cache at the next frame, and only the carrier stays
      (track ``VISION``): one cached vision token per frame. The model must then be trained and run with the
      frame track in its policy (``VideoLM.tick_policy``, which ``init_cache`` and the training forward apply).
    label_words: the frame tokens speak the language model's words: each token the language model reads gets the
      word embedding of its patch label added, the patch head's probabilities over the ``NO_DIGIT + 1`` classes
      times the input embeddings of the words ``label_words`` (one word id per class: the digits' names and
      ``none``). With tied embeddings a head that copies a frame token onto an answer needs no learnt translation
      from vision features to words, the step the language model takes longest to learn on a CPU budget
      (``experiments/probe_video_qa.py``). ``()``: off. A soft (differentiable) label, so the answer loss also
      trains the patch head.
    place_words: the frame tokens name their place in the language model's words: each token the language model
      reads gets the input embeddings of the two words naming its quadrant added (``place_words`` = the word ids
      of ``top``, ``bottom``, ``left``, ``right``; a patch in the upper half of the patch grid is ``top``, in the
      left half ``left``), the words a where-question names its quadrant by. With tied embeddings, a head that
      picks the frame tokens of the asked quadrant needs only match a question's words against the tokens' words,
      not learn where the encoder's features keep the place. ``()``: off. Needs an even number of patch rows and
      columns.
    layout_head: a linear head on the mean of each frame's encoder tokens that names the digit in each quadrant
      of the frame (``layout_labels``; the where-answers' rule): training-only supervision (``VideoTask.layout_loss``)
      that the frame's layout be written into what an even attention over its tokens reads, so that a where-question
      can be answered by reading the frame as a whole and choosing the quadrant by the question's words, instead of
      attending to one place's tokens.
    state_head: a linear head on the language model's final features at each tick's decision position (the
      frame's last token, where the ``<silent>`` / ``<speak>`` decision is read) that names the scene state the
      questions ask about (``scene_state``): training-only supervision (``state_loss``), like the patch head.
    frame_delta: the encoder sees what changed: its input is two channels, the frame and the frame minus the
      previous one (zeros before a stream's first frame; the stream runner carries the last frame from tick to
      tick, ``qa_stream.run(previous_frame=)``), and a second patch head, the entry head, names the digit that
      *entered* in this frame at the patch holding its centre (``entry_labels``; training-only). A digit that
      enters appears whole in the difference, one that moves only at its edges, so telling which digit is new
      (what a proactive request waits for) is local to the encoder instead of a comparison the language model has
      to learn across frames.
    entry_words: the frame tokens name the digit entering in the words of the language model, as ``label_words``
      name their patch label: each token the language model reads gets the entry head's probabilities over its
      ``NO_DIGIT + 1`` classes times the input embeddings of the words ``entry_words`` (the digits' names and
      ``none``), so that the identity of a new digit, which the entry head reads off the frame difference, reaches
      the decision as the word a request names. ``()``: off. Needs ``frame_delta``.
    request_head: a linear head on the language model's features at each tick's decision position that names the
      digit of the proactive request pending then (``pending_requests``; ``NO_DIGIT``: none): training-only
      supervision that the request, asked in the text many ticks earlier, is held where the decision is made.
    activation: width of StreamBridge's activation model (``Activation``; 0: off): a small model beside the
      language model that decides when to speak. It holds the standing request (the words of the last question
      that no ``<a>`` follows, until the model speaks) and scores each frame's encoder tokens against it; the
      stream runner speaks where the request stands and its probability exceeds the threshold, instead of reading
      the language model's ``<silent>`` / ``<speak>`` logits. The language model still says the announcement: the
      ``<speak>`` word it reads carries the request's encoding (``Activation.prompt``), the query re-posed to the
      responder as StreamBridge does when its activation model fires.
    activation_heads: the activation model also reads the frame heads' class log-probabilities at each token (the
      patch head's, and the entry head's with ``frame_delta``), through a bilinear match with the request
      (``Activation.logits(heads=)``): a request for a digit can then weigh the heads' probability of that digit
      directly, where the token MLP has to learn the match from the tokens. Needs ``activation``.
    hide_requests: a standing request's words (``request_words``: ``<q>`` and the question of a slot that no ``<a>``
      follows) are held by the activation model only: the language model neither reads nor caches them (padding, in
      training and in the stream runner alike), so the label it says at ``<speak>`` must come from the request's
      prompt there (and the frame), which the activation model carries however long the request stands. Without
      it the language model learns to copy the label from the question, and a request that waits longer than the
      text window holds its question (or farther than the training clips reach) is announced with a wrong label.
      Needs ``activation``.
  """

  lm: TransformerConfig
  frame_size: tuple[int, int] = (32, 32)
  patch_size: int = 8
  patch_window: int | None = None
  stem_channels: tuple[int, ...] = ()
  stem_pool: bool = False
  encoder_layers: int = 1
  frame_pos: bool = False
  projector: bool = False
  projector_norm: bool = False
  carrier: bool = False
  label_words: tuple[int, ...] = ()
  place_words: tuple[int, ...] = ()
  layout_head: bool = False
  state_head: bool = False
  frame_delta: bool = False
  entry_words: tuple[int, ...] = ()
  request_head: bool = False
  activation: int = 0
  activation_heads: bool = False
  hide_requests: bool = False

  def __post_init__(self):
    h, w = self.frame_size
    if self.patch_size < 1 or h % self.patch_size or w % self.patch_size:
      raise ValueError(f"frame_size {self.frame_size} must be multiples of patch_size {self.patch_size}")
    if self.window < self.patch_size or (self.window - self.patch_size) % 2:
      raise ValueError(
        f"patch_window {self.patch_window} must be >= patch_size {self.patch_size} and exceed it by an even number"
      )
    if self.encoder_layers < 0:
      raise ValueError(f"encoder_layers must be >= 0, got {self.encoder_layers}")
    if self.activation < 0:
      raise ValueError(f"activation must be a width >= 1 (0: off), got {self.activation}")
    if self.activation_heads and not self.activation:
      raise ValueError("activation_heads needs an activation model (activation = its width)")
    if self.projector_norm and not self.projector:
      raise ValueError("projector_norm needs the projector (projector=True) whose outputs it normalises")
    if self.hide_requests and not self.activation:
      raise ValueError("hide_requests needs an activation model (activation = its width) to hold the requests")
    object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
    if any(c < 1 for c in self.stem_channels):
      raise ValueError(f"stem_channels must be positive, got {self.stem_channels}")
    if self.stem_pool:
      scale = 2 ** len(self.stem_channels)
      margin = (self.window - self.patch_size) // 2
      if not self.stem_channels or self.patch_size % scale or margin % scale:
        raise ValueError(
          f"stem_pool needs stem_channels, and patch_size ({self.patch_size}) and the window's margin around the "
          f"patch ({margin}) divisible by 2**len(stem_channels) = {scale}; got stem_channels={self.stem_channels}"
        )
    self._word_ids("label_words", NO_DIGIT + 1, "one per patch label")
    self._word_ids("place_words", 4, "top, bottom, left, right")
    self._word_ids("entry_words", NO_DIGIT + 1, "one per entry label")
    if self.entry_words and not self.frame_delta:
      raise ValueError("entry_words needs frame_delta (the entry head reads the frame difference)")
    if self.place_words:
      rows, cols = h // self.patch_size, w // self.patch_size
      if rows % 2 or cols % 2:
        raise ValueError(f"place_words needs an even number of patch rows and columns, got {rows} x {cols}")

  def _word_ids(self, name: str, count: int, meaning: str) -> None:
    """Normalises the word-id field ``name`` to a tuple of ints: empty (off) or ``count`` ids in the vocabulary."""
    ids = tuple(int(i) for i in getattr(self, name))
    object.__setattr__(self, name, ids)
    if ids and (len(ids) != count or not all(0 <= i < self.lm.vocab_size for i in ids)):
      raise ValueError(f"{name} must be {count} word ids in [0, {self.lm.vocab_size}) ({meaning}), got {ids}")

  @property
  def window(self) -> int:
    """Side of the pixel square a patch token embeds."""
    return self.patch_size if self.patch_window is None else self.patch_window

  @property
  def tokens_per_frame(self) -> int:
    """Patch tokens per frame."""
    h, w = self.frame_size
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def frame_len(self) -> int:
    """Tokens a frame puts in a tick: its patch tokens, and the carrier if there is one."""
    return self.tokens_per_frame + int(self.carrier)


class RequestState(NamedTuple):
  """The standing request of each row (``Activation``): its encoding ``vector [..., width]`` and whether it stands
  (``open [...]``, bool). A fresh stream's is ``Activation.empty``'s: no request."""

  vector: Float[Array, "*b a"]
  open: Bool[Array, "*b"]


class Activation(nnx.Module):
  """StreamBridge's activation model: a small model beside the language model that decides when to respond.

  A question that no ``<a>`` follows in its slot (``<q> tell me when a seven appears``) asks for a later answer: it
  becomes the row's *standing request* (``RequestState``), its words encoded by an attention pool over a word table
  of its own (``encode``: each word scores itself, the softmax of the scores weighs the words' vectors), and stands
  until the row speaks (``advance``, after each tick's slot). At each frame the model scores the frame encoder's
  tokens against the request (``logits``: an MLP of each token, dotted with a projection of the request, pooled
  over the tokens by log-sum-exp, plus a bias): the log-odds that the request is fulfilled now. It reads the
  frame encoder's tokens, not the language model's features, so it trains from the first step
  (``VideoTask.activation``) at the encoder-only steps' cost; ``VideoLM.activation_logits`` is what the model
  decides by. ``prompt`` maps the request into the language model's embedding space, added to the ``<speak>`` word
  that opens an announcement.

  Args:
    vocab_size: the language model's word vocabulary.
    embed_dim: width of the frame encoder's tokens and of the language model's embeddings.
    width: width of the request encoding and of the token scores.
    head_classes: the number of frame-head classes whose log-probabilities ``logits`` also reads (0: none).
  """

  def __init__(
    self, vocab_size: int, embed_dim: int, width: int, *, head_classes: int = 0, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.width, self.head_classes = width, head_classes
    if head_classes:  # the request's weight on each head class
      self.match = nnx.Linear(width, head_classes, param_dtype=param_dtype, rngs=rngs)
    self.words = nnx.Embed(vocab_size, width, param_dtype=param_dtype, rngs=rngs)
    self.score = nnx.Linear(width, 1, param_dtype=param_dtype, rngs=rngs)
    self.query = nnx.Linear(width, width, param_dtype=param_dtype, rngs=rngs)
    self.key_in = nnx.Linear(embed_dim, width, param_dtype=param_dtype, rngs=rngs)
    self.key_out = nnx.Linear(width, width, param_dtype=param_dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((), param_dtype))
    self.prompt = nnx.Linear(width, embed_dim, param_dtype=param_dtype, rngs=rngs)

  def empty(self, batch_size: int) -> RequestState:
    """No standing request, for ``batch_size`` rows."""
    return RequestState(jnp.zeros((batch_size, self.width), jnp.float32), jnp.zeros((batch_size,), bool))

  def encode(self, words: Int[Array, "*b l"]) -> tuple[Float[Array, "*b a"], Bool[Array, "*b"]]:
    """The encoding of the question in each slot ``words`` (the words after ``<q>`` and before any ``<a>``; zeros
    without one) and whether it is a standing request (a ``<q>`` and no ``<a>``)."""
    asked = jnp.cumsum(words == QUESTION, axis=-1) > 0
    before = jnp.cumsum(words == ANSWER, axis=-1) == 0
    inside = asked & before & (words != QUESTION) & (words != PAD)
    e = self.words(words).astype(jnp.float32)
    w = jnp.where(inside, jax.nn.softmax(jnp.where(inside, self.score(e)[..., 0], -1e30), axis=-1), 0.0)
    return jnp.einsum("...l,...la->...a", w, e), request_words(words).any(-1)

  def advance(self, state: RequestState, words: Int[Array, "b l"], spoke: Bool[Array, " b"]) -> RequestState:
    """The standing request after a tick whose decision was ``spoke`` (speaking answers the request) and whose
    slot (or question) words are ``words`` (a standing request asked there replaces the one before)."""
    vector, standing = self.encode(words)
    return RequestState(jnp.where(standing[:, None], vector, state.vector), (state.open & ~spoke) | standing)

  def standing(self, text: Int[Array, "b n l"], start: RequestState | None = None) -> tuple[RequestState, RequestState]:
    """The request standing at each tick's decision ``[b, n]`` of teacher-forced slots (the decision is each slot's
    first word), from ``start`` (default: none) before the first tick, and the one standing after the last tick
    ``[b]`` (the next chunk's ``start``: ``VideoLM.__call__(request=)``)."""
    start = self.empty(text.shape[0]) if start is None else start

    def tick(state, words):
      return self.advance(state, words, words[:, 0] == SPEAK), state

    after, states = jax.lax.scan(tick, start, jnp.swapaxes(text, 0, 1))
    return RequestState(jnp.swapaxes(states.vector, 0, 1), jnp.swapaxes(states.open, 0, 1)), after

  def logits(
    self, vis: Float[Array, "*b p d"], vector: Float[Array, "*b a"], heads: Float[Array, "*b p c"] | None = None
  ) -> Float[Array, "*b"]:
    """The log-odds that the request ``vector`` is fulfilled in the frame of encoder tokens ``vis`` (``encode``).
    ``heads`` (a model built with ``head_classes``, required there): each token's frame-head log-probabilities,
    whose sum weighted by ``match(vector)`` adds to the token's score."""
    return self.match_logits(vis, vector[..., None, :], heads)[..., 0]

  def match_logits(
    self, vis: Float[Array, "*b p d"], vectors: Float[Array, "*b k a"], heads: Float[Array, "*b p c"] | None = None
  ) -> Float[Array, "*b k"]:
    """``logits`` of each frame ``vis`` for each of ``k`` requests ``vectors`` (``k`` may be 1 and broadcast), the
    frame's token scores computed once."""
    got = 0 if heads is None else heads.shape[-1]
    if got != self.head_classes:
      raise ValueError(f"heads must be log-probabilities of {self.head_classes} classes (0: None), got {got}")
    k = self.key_out(jax.nn.gelu(self.key_in(vis.astype(jnp.float32))))
    q = self.query(vectors)
    s = jnp.einsum("...pa,...ka->...kp", k, q) / np.sqrt(self.width)
    if heads is not None:
      s = s + jnp.einsum("...pc,...kc->...kp", heads.astype(jnp.float32), self.match(vectors))
    return jax.nn.logsumexp(s, axis=-1) + self.bias[...]


def activation_loss(
  logits: Float[Array, "b n"], state: RequestState, speak: Bool[Array, "b n"], *, speak_weight: float = 1.0
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """Weighted binary cross-entropy of the activation model's log-odds at the ticks where a request stands (target:
  the tick's decision is ``<speak>``, weighing ``speak_weight``; ``tick_loss``' rule) and metrics:
  ``activation_recall`` (of the ``<speak>`` ticks, those with log-odds above 0) and ``activation_false`` (of the
  other standing ticks, those above 0)."""
  x = logits.astype(jnp.float32)
  y = speak.astype(jnp.float32)
  nll = jax.nn.softplus(x) - y * x  # -log sigmoid(x) for y = 1, -log(1 - sigmoid(x)) for y = 0
  weight = state.open * (1.0 + (speak_weight - 1.0) * y)
  loss = (nll * weight).sum() / jnp.maximum(weight.sum(), 1e-9)
  pos, neg = state.open & speak, state.open & ~speak
  said = x > 0
  metrics = {
    "activation_recall": (said & pos).sum() / jnp.maximum(pos.sum(), 1),
    "activation_false": (said & neg).sum() / jnp.maximum(neg.sum(), 1),
  }
  return loss, metrics


def match_loss(
  logits: Float[Array, "b n k"], entering: Bool[Array, "b n k"]
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """The activation model's matching loss (``VideoTask.activation_match``): at every frame where a digit enters
  (where ``entering`` holds for some request), the mean binary cross-entropy of its log-odds for each of ``k``
  requests ``logits`` (``VideoLM.activation_match_logits``) against whether that request's digit enters
  (``entering``, ``entering_digits``). Each entry frame teaches the match with one request that it fulfils and
  ``k - 1`` that it does not: the hard negatives (another digit entering while a request stands) that short
  training clips hold few of. Metrics: ``match_recall`` (fulfilled requests above 0) and ``match_false`` (the
  other requests of entry frames above 0)."""
  x = logits.astype(jnp.float32)
  entry = entering.any(-1)
  weight = jnp.broadcast_to(entry[..., None], x.shape).astype(jnp.float32)
  nll = jax.nn.softplus(x) - entering * x
  loss = (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)
  said = x > 0
  pos, neg = entering & entry[..., None], ~entering & entry[..., None]
  metrics = {
    "match_recall": (said & pos).sum() / jnp.maximum(pos.sum(), 1),
    "match_false": (said & neg).sum() / jnp.maximum(neg.sum(), 1),
  }
  return loss, metrics


class VideoLM(nnx.Module):
  """Frames and words in one causal transformer with an explicit cache (see the module docstring).

  Args:
    config: the model configuration.
    rngs: NNX random streams for initialisation.
  """

  def __init__(self, config: VideoLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    lm = config.lm
    d, p = lm.embed_dim, config.window
    self.lm = StreamingTransformer(lm, rngs=rngs)
    channels = (1 + int(config.frame_delta), *config.stem_channels)
    self.stem = nnx.List(
      [
        nnx.Conv(c_in, c_out, (3, 3), padding="SAME", dtype=lm.dtype, param_dtype=lm.param_dtype, rngs=rngs)
        for c_in, c_out in itertools.pairwise(channels)
      ]
    )
    scale = 2 ** len(config.stem_channels) if config.stem_pool else 1
    p, s, m = p // scale, config.patch_size // scale, (config.window - config.patch_size) // 2 // scale
    self.patch = nnx.Conv(  # a linear map of each patch's window: a strided convolution
      channels[-1],
      d,
      (p, p),
      strides=(s, s),
      padding=((m, m), (m, m)),
      dtype=lm.dtype,
      param_dtype=lm.param_dtype,
      rngs=rngs,
    )
    init = nnx.initializers.normal(stddev=d**-0.5)
    self.patch_pos = nnx.Param(init(rngs.params(), (config.tokens_per_frame, d), lm.param_dtype))
    if config.frame_pos:
      self.frame_pos = nnx.Param(init(rngs.params(), (config.tokens_per_frame, d), lm.param_dtype))
    if config.projector:
      self.projector = nnx.Linear(
        d,
        d,
        use_bias=False,
        kernel_init=nnx.initializers.normal(stddev=1.0 / d),
        dtype=lm.dtype,
        param_dtype=lm.param_dtype,
        rngs=rngs,
      )
    if config.carrier:
      self.carrier = nnx.Param(init(rngs.params(), (d,), lm.param_dtype))
    enc = dataclasses.replace(lm, num_layers=max(config.encoder_layers, 1), scan_layers=False, learned_sink="none")
    self.encoder = nnx.List([Block(enc, rngs=rngs) for _ in range(config.encoder_layers)])
    self.encoder_norm = RMSNorm(d, eps=lm.norm_eps, param_dtype=lm.param_dtype)
    self.patch_head = nnx.Linear(d, NO_DIGIT + 1, dtype=lm.dtype, param_dtype=lm.param_dtype, rngs=rngs)
    if config.layout_head:
      width = len(QUADRANT_ORDER) * (NO_DIGIT + 1)
      self.layout_head = nnx.Linear(d, width, dtype=lm.dtype, param_dtype=lm.param_dtype, rngs=rngs)
    if config.state_head:
      width = STATE_GROUPS * STATE_CLASSES
      self.state_head = nnx.Linear(d, width, dtype=lm.dtype, param_dtype=lm.param_dtype, rngs=rngs)
    if config.frame_delta:
      self.entry_head = nnx.Linear(d, NO_DIGIT + 1, dtype=lm.dtype, param_dtype=lm.param_dtype, rngs=rngs)
    if config.request_head:
      self.request_head = nnx.Linear(d, NO_DIGIT + 1, dtype=lm.dtype, param_dtype=lm.param_dtype, rngs=rngs)
    if config.activation:
      classes = (NO_DIGIT + 1) * (1 + config.frame_delta) if config.activation_heads else 0
      self.activation = Activation(
        lm.vocab_size, d, config.activation, head_classes=classes, param_dtype=lm.param_dtype, rngs=rngs
      )

  def init_cache(self, policy: cache_lib.Policy, batch_size: int, dtype=jnp.float32) -> cache_lib.Cache:
    """A cache for ``policy`` (a ``Segmented((text, vision))`` policy, or any single-track policy when ticks are
    fed without segment ids; ``tick_policy(policy)`` for a model with carriers)."""
    return self.lm.init_cache(self.tick_policy(policy), batch_size, dtype=dtype)

  def tick_policy(self, policy: cache_lib.Policy | None, max_len: int = 1) -> cache_lib.Policy | None:
    """The policy this model's ticks need: ``policy`` itself, or for a model with carriers a ``Segmented((text,
    vision))`` policy with the frame track ``Window(tokens_per_frame)`` appended (``None``: ``Dense(max_len)`` text
    and vision tracks, the offline forward's full attention over both). A three-track policy is taken as it is;
    a model with carriers refuses any other (its patch tokens would be padding)."""
    if not self.config.carrier:
      return policy
    if policy is None:
      policy = cache_lib.Segmented((cache_lib.Dense(max_len), cache_lib.Dense(max_len)))
    if isinstance(policy, cache_lib.Segmented) and len(policy.segments) == 2:
      return dataclasses.replace(policy, segments=(*policy.segments, cache_lib.Window(self.config.tokens_per_frame)))
    if len(policy.tracks()) < 3:
      raise ValueError(
        f"a model with carrier tokens needs a Segmented((text, vision)) policy or one with a third (frame) track, "
        f"got {policy}"
      )
    return policy

  # ---------------------------------------------------------------------------------------------- inputs

  def encode(
    self, frames: Float[Array, "b n _ _"], previous: Float[Array, "b _ _"] | None = None
  ) -> Float[Array, "b n p d"]:
    """Patch tokens ``[b, n, tokens_per_frame, d]`` of frames ``[b, n, H, W]`` (values in [0, 1]). ``previous``:
    for a ``frame_delta`` model, the frame before ``frames[:, 0]`` (``None``: zeros, streams that start here);
    ignored otherwise."""
    c = self.config
    b, n, h, w = frames.shape
    if (h, w) != c.frame_size:
      raise ValueError(f"frames must be [b, n, {c.frame_size[0]}, {c.frame_size[1]}], got {frames.shape}")
    if not jnp.issubdtype(frames.dtype, jnp.floating):
      raise ValueError(f"frames must be floats in [0, 1], got {frames.dtype} (divide uint8 frames by 255)")
    x = frames.astype(jnp.float32)
    if c.frame_delta:
      if previous is None:
        previous = jnp.zeros((b, h, w), jnp.float32)
      elif previous.shape != (b, h, w):
        raise ValueError(f"previous must be the frame before frames, [{b}, {h}, {w}], got {previous.shape}")
      before = jnp.concatenate([previous.astype(jnp.float32)[:, None], x[:, :-1]], axis=1)
      x = jnp.stack([x, x - before], axis=-1).reshape(b * n, h, w, 2)
    else:
      x = x.reshape(b * n, h, w, 1)
    for conv in self.stem:
      x = jax.nn.gelu(conv(x))
      if c.stem_pool:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = self.patch(x).reshape(b * n, c.tokens_per_frame, -1) + self.patch_pos[...]
    zeros = jnp.zeros(x.shape[:2], jnp.int32)  # one position: every patch sees every patch of its frame
    lm = c.lm

    def attend(attn, q, k, v):
      o = cached_attention.offline(q, k, v, zeros, window=None, num_sinks=0, rope_base=lm.rope, impl=lm.attention_impl)
      return o, None

    for block in self.encoder:
      x, _ = block(x, attend)
    return self.encoder_norm(x).reshape(b, n, c.tokens_per_frame, lm.embed_dim)

  def placed(self, vis: Float[Array, "*b p d"]) -> Float[Array, "*b p d"]:
    """The frame tokens the language model reads: ``encode``'s tokens (through the ``projector`` and
    ``projector_norm``, if any) plus the place embedding (``frame_pos``), the word embedding of each token's patch
    label (``label_words``), those of its quadrant (``place_words``) and that of the digit entering there
    (``entry_words``)."""
    out = self.frame_features(vis)
    if self.config.frame_pos:
      out = out + self.frame_pos[...].astype(vis.dtype)
    if self.config.place_words:
      out = out + self.lm.embed(self.quadrant_words()).sum(-2).astype(vis.dtype)
    if self.config.label_words:
      probs = jax.nn.softmax(self.patch_logits(vis).astype(jnp.float32), axis=-1)
      words = self.lm.embed(jnp.asarray(self.config.label_words, jnp.int32)).astype(jnp.float32)  # [11, d]
      out = out + (probs @ words).astype(vis.dtype)
    if self.config.entry_words:
      probs = jax.nn.softmax(self.entry_logits(vis).astype(jnp.float32), axis=-1)
      words = self.lm.embed(jnp.asarray(self.config.entry_words, jnp.int32)).astype(jnp.float32)
      out = out + (probs @ words).astype(vis.dtype)
    return out

  def frame_features(self, vis: Float[Array, "*b p d"]) -> Float[Array, "*b p d"]:
    """``encode``'s tokens as they enter the language model, before ``placed`` adds its words: through the
    ``projector`` and ``projector_norm``, if any."""
    out = self.projector(vis) if self.config.projector else vis
    if self.config.projector_norm:  # RMS embed_dim ** -0.5 per coordinate: the words' initial scale, held
      out = rms_normalize(out, 1e-12) * jnp.asarray(out.shape[-1] ** -0.5, out.dtype)
    return out

  def quadrant_words(self) -> Int[Array, "p 2"]:
    """The two words naming each patch token's quadrant (``place_words``): ``[tokens_per_frame, 2]`` word ids,
    the row's (``top`` / ``bottom``) then the column's (``left`` / ``right``), patches in row-major order."""
    c = self.config
    top, bottom, left, right = c.place_words
    rows, cols = c.frame_size[0] // c.patch_size, c.frame_size[1] // c.patch_size
    r, k = np.divmod(np.arange(rows * cols), cols)
    return jnp.asarray(np.stack([np.where(r < rows // 2, top, bottom), np.where(k < cols // 2, left, right)], -1))

  def patch_logits(self, vis: Float[Array, "*b p d"]) -> Float[Array, "*b p 11"]:
    """The patch-label logits (``NO_DIGIT + 1`` classes) of frame tokens from ``encode``."""
    return self.patch_head(vis)

  def layout_logits(self, vis: Float[Array, "*b p d"]) -> Float[Array, "*b 4 11"]:
    """The layout head's logits (``NO_DIGIT + 1`` classes for each quadrant, in ``QUADRANT_ORDER``) of frames'
    tokens from ``encode``, read from their mean. Needs ``VideoLMConfig.layout_head``."""
    if not self.config.layout_head:
      raise ValueError("layout_logits needs a model built with VideoLMConfig(layout_head=True)")
    out = self.layout_head(vis.mean(axis=-2))
    return out.reshape(*out.shape[:-1], len(QUADRANT_ORDER), NO_DIGIT + 1)

  def entry_logits(self, vis: Float[Array, "*b p d"]) -> Float[Array, "*b p 11"]:
    """The entry-head logits (``entry_labels``' ``NO_DIGIT + 1`` classes) of frame tokens from ``encode``. Needs
    ``VideoLMConfig.frame_delta``."""
    if not self.config.frame_delta:
      raise ValueError("entry_logits needs a model built with VideoLMConfig(frame_delta=True)")
    return self.entry_head(vis)

  def tick_inputs(
    self,
    frames: Float[Array, "b n _ _"],
    text: Int[Array, "b n l"],
    vis: Float[Array, "b n p d"] | None = None,
    request: RequestState | None = None,
  ) -> tuple[Float[Array, "b s d"], Int[Array, "b s"], Int[Array, "b s"]]:
    """The token sequence of ``n`` ticks: ``(x [b, n * (P + L), d], segment_ids, groups)``.

    Each tick is its frame's ``P`` patch tokens (track ``VISION``, one group per frame) then its ``L`` words (track
    ``TEXT``; ``<pad>`` words are padding, segment -1, and so are a standing request's words with
    ``hide_requests``). ``vis``: the frames' ``encode``, if already computed. With an ``Activation``, a slot's
    opening ``<speak>`` carries the standing request's ``prompt``; ``request``: the request standing before the
    first tick (default: none, streams that start here).
    """
    b, n, ln = text.shape
    if frames.shape[:2] != (b, n):
      raise ValueError(f"frames {frames.shape} and text {text.shape} must have the same [batch, ticks]")
    p, f = self.config.tokens_per_frame, self.config.frame_len
    vis = self.placed(self.encode(frames) if vis is None else vis)  # [b, n, p, d]
    seg_v = jnp.full((b, n, p), FRAME if self.config.carrier else VISION, jnp.int32)
    group_v = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :, None], (b, n, p))
    if self.config.carrier:
      vis = jnp.concatenate([vis, jnp.broadcast_to(self.carrier[...].astype(vis.dtype), (b, n, 1, vis.shape[-1]))], 2)
      seg_v = jnp.concatenate([seg_v, jnp.full((b, n, 1), VISION, jnp.int32)], axis=2)
      group_v = jnp.concatenate([group_v, jnp.full((b, n, 1), -1, jnp.int32)], axis=2)
    words = self.lm.embed(text).astype(vis.dtype)  # [b, n, l, d]
    if self.config.activation:  # the request re-posed at the <speak> that opens an announcement
      standing, _ = self.activation.standing(text, request)
      cue = jnp.where((text[:, :, 0] == SPEAK)[..., None], self.activation.prompt(standing.vector), 0.0)
      words = words.at[:, :, 0].add(cue.astype(words.dtype))
    x = jnp.concatenate([vis, words], axis=2).reshape(b, n * (f + ln), -1)
    shown = text != PAD
    if self.config.hide_requests:
      shown &= ~request_words(text)
    seg_t = jnp.where(shown, TEXT, -1).astype(jnp.int32)
    segs = jnp.concatenate([seg_v, seg_t], axis=2).reshape(b, -1)
    groups = jnp.concatenate([group_v, jnp.full((b, n, ln), -1, jnp.int32)], axis=2).reshape(b, -1)
    return x, segs, groups

  # ------------------------------------------------------------------------------------------------ calls

  def __call__(
    self,
    frames: Float[Array, "b n _ _"],
    text: Int[Array, "b n l"],
    cache: cache_lib.Cache,
    previous: Float[Array, "b _ _"] | None = None,
    request: RequestState | None = None,
  ) -> tuple[Logits, cache_lib.Cache]:
    """Runs ``n`` ticks (frames ``[b, n, H, W]`` in [0, 1] and their text slots ``[b, n, L]``) against the cache;
    returns ``(logits [b, n * (F + L), v], cache)`` (``F = frame_len``). Compiles once per ``(n, L)``.
    ``previous``: the frame before ``frames[:, 0]`` for a ``frame_delta`` model (``encode``); ``request``: the
    request standing before the first tick for a model with an ``Activation`` (``tick_inputs``; the previous
    chunk's is ``Activation.standing(its text)[1]``)."""
    x, segs, groups = self.tick_inputs(frames, text, self.encode(frames, previous), request)
    return self.lm.extend_embeddings(x, cache, segment_ids=segs, groups=groups)

  def forward(
    self, frames: Float[Array, "b n _ _"], text: Int[Array, "b n l"], *, policy: cache_lib.Policy | None = None
  ) -> Logits:
    """Offline forward of whole ticks: what a stream under ``policy`` computes (``absolute`` positions; default
    full causal attention, the stream under a policy that keeps everything)."""
    return self.training_outputs(frames, text, policy=policy)[0]

  def training_outputs(
    self,
    frames: Float[Array, "b n _ _"],
    text: Int[Array, "b n l"],
    *,
    packed_len: int | None = None,
    policy: cache_lib.Policy | None = None,
    return_features: bool = False,
    vis: Float[Array, "b n p d"] | None = None,
  ) -> (
    tuple[Logits, Float[Array, "b n p 11"], Bool[Array, "b n l"]]
    | tuple[Logits, Float[Array, "b s d"], Float[Array, "b n p 11"], Bool[Array, "b n l"]]
  ):
    """The training forward: ``forward``'s logits, the frames' ``patch_logits`` (one encoder pass) and which slot
    words were run (``kept``); with ``return_features``, ``(logits, features [b, s, d], patch_logits, kept)``,
    the features being the language model's final ones (the unembedding's input; zeros where not run).

    ``packed_len``: run only the first ``packed_len`` non-padding tokens of each row, packed together (``<pad>``
    words take no compute; a slot is mostly padding). Attention depends on positions alone, so the logits of the
    tokens run are exactly ``forward``'s; the words past the budget are not run (``kept`` False, their logits 0):
    leave them out of the loss.

    ``policy``: attend with the mask a stream under this cache policy has (``StreamingTransformer.
    forward_embeddings``; e.g. ``Segmented((SinkWindow(4, 252), Window(256)))``), StreamingVLM's training with the
    inference attention pattern; ``None``: full causal attention (with carriers: full attention to the text and
    the carriers, and to the patch tokens of the tick's own frame only).

    ``vis``: the frames' ``encode``, if already computed (for other frame heads on the same pass).
    """
    vis = self.encode(frames) if vis is None else vis
    x, segs, groups = self.tick_inputs(frames, text, vis)
    policy = self.tick_policy(policy, x.shape[1])  # with carriers, the frame track's window even offline
    valid = segs >= 0
    starts, _ = cache_lib.group_starts_and_ends(groups, valid)  # the positions a stream would give them
    positions = jnp.where(valid, jnp.cumsum(starts, axis=1) - 1, -1).astype(jnp.int32)
    b, n, ln = text.shape
    if packed_len is None or packed_len >= x.shape[1]:
      kept = jnp.ones(text.shape, bool)
      mask = {} if policy is None else {"policy": policy, "segment_ids": segs}
      out = self.lm.forward_embeddings(x, positions=positions, return_features=return_features, **mask)
      return (*out, self.patch_logits(vis), kept) if return_features else (out, self.patch_logits(vis), kept)
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :packed_len]  # real tokens first, in stream order
    xp = jnp.take_along_axis(x, order[..., None], axis=1)
    pos = jnp.take_along_axis(positions, order, axis=1)
    mask = {} if policy is None else {"policy": policy, "segment_ids": jnp.take_along_axis(segs, order, axis=1)}
    out = self.lm.forward_embeddings(xp, positions=pos, return_features=return_features, **mask)
    rows = jnp.arange(b)[:, None]
    run = jnp.zeros(valid.shape, bool).at[rows, order].set(pos >= 0)

    def unpack(y):  # back to stream order, zeros where a token was not run
      return jnp.zeros((*x.shape[:2], y.shape[-1]), y.dtype).at[rows, order].set(y)

    kept = run.reshape(b, n, -1)[:, :, -ln:]
    if return_features:
      return unpack(out[0]), unpack(out[1]), self.patch_logits(vis), kept
    return unpack(out), self.patch_logits(vis), kept

  def state_logits(self, features: Float[Array, "b s d"], num_ticks: int) -> Float[Array, "b n g c"]:
    """The scene-state logits ``[b, n, STATE_GROUPS, STATE_CLASSES]`` of ``n`` ticks from the language model's
    final features of their tokens (``training_outputs(return_features=True)``), read at each tick's decision
    position (the frame's last token). Needs ``VideoLMConfig.state_head``."""
    if not self.config.state_head:
      raise ValueError("state_logits needs a model built with VideoLMConfig(state_head=True)")
    at = self.decision_features(features, num_ticks)
    return self.state_head(at).reshape(*at.shape[:2], STATE_GROUPS, STATE_CLASSES).astype(jnp.float32)

  def decision_features(self, features: Float[Array, "b s d"], num_ticks: int) -> Float[Array, "b n d"]:
    """The language model's features at each tick's decision position (the frame's last token): what the state
    and request heads read."""
    b, s, d = features.shape
    return features.reshape(b, num_ticks, s // num_ticks, d)[:, :, self.config.frame_len - 1]

  def activation_logits(self, vis: Float[Array, "*b p d"], vector: Float[Array, "*b a"]) -> Float[Array, "*b"]:
    """The activation model's log-odds that the standing request ``vector`` is fulfilled in the frame of encoder
    tokens ``vis`` (``encode``): it reads the tokens the language model reads (``placed``: with ``entry_words``,
    the entry head's digit among them), behind a stop-gradient, so that its loss leaves the frame encoder to its
    labels (a separate model over frozen features, as StreamBridge's). With ``activation_heads`` it also reads the
    frame heads' log-probabilities (``frame_head_logprobs``), behind the same stop-gradient. Needs
    ``VideoLMConfig.activation``."""
    return self.activation_match_logits(vis, vector[..., None, :])[..., 0]

  def activation_match_logits(
    self, vis: Float[Array, "*b p d"], vectors: Float[Array, "... k a"]
  ) -> Float[Array, "*b k"]:
    """``activation_logits`` of every frame ``vis`` for each of ``k`` requests ``vectors`` (``Activation.encode``
    of each request's words; ``[k, a]`` for the same requests at every frame): ``[*b, k]``, the frame's tokens and
    heads computed once."""
    if not self.config.activation:
      raise ValueError("activation_(match_)logits need a model built with VideoLMConfig(activation=width)")
    if vectors.ndim not in (2, vis.ndim) or vectors.shape[-1] != self.activation.width:
      raise ValueError(f"vectors must be [..., requests, {self.activation.width}], got {vectors.shape}")
    heads = jax.lax.stop_gradient(self.frame_head_logprobs(vis)) if self.config.activation_heads else None
    vectors = jnp.broadcast_to(vectors, (*vis.shape[:-2], *vectors.shape[-2:]))
    return self.activation.match_logits(jax.lax.stop_gradient(self.placed(vis)), vectors, heads)

  def frame_head_logprobs(self, vis: Float[Array, "*b p d"]) -> Float[Array, "*b p c"]:
    """The frame heads' class log-probabilities at each token: the patch head's ``NO_DIGIT + 1``, then with
    ``frame_delta`` the entry head's."""
    heads = [self.patch_logits(vis)] + ([self.entry_logits(vis)] if self.config.frame_delta else [])
    return jnp.concatenate([jax.nn.log_softmax(h.astype(jnp.float32), axis=-1) for h in heads], axis=-1)

  def request_logits(self, features: Float[Array, "b s d"], num_ticks: int) -> Float[Array, "b n 11"]:
    """The pending-request logits ``[b, n, NO_DIGIT + 1]`` (``pending_requests``' classes) of ``n`` ticks, read
    like ``state_logits``. Needs ``VideoLMConfig.request_head``."""
    if not self.config.request_head:
      raise ValueError("request_logits needs a model built with VideoLMConfig(request_head=True)")
    return self.request_head(self.decision_features(features, num_ticks)).astype(jnp.float32)


def centre_labels(objects: Int[Array, "b n m 5"], config: VideoLMConfig, digit_size: int) -> Int[Array, "b n p"]:
  """The patch labels of frames from their drawn digits (``jstream.data.video_qa.Chunk.objects``: rows
  ``(object, label, image, y, x)``, -1 rows pad; a digit's centre is ``(y, x) + digit_size / 2``): per patch
  (row-major), the label of the one digit whose centre lies in it, ``NO_DIGIT`` if none, -1 if several."""
  h, w = config.frame_size
  s = config.patch_size
  valid = objects[..., 0] >= 0
  centre = objects[..., 3:5].astype(jnp.float32) + digit_size / 2
  row = jnp.clip(jnp.floor(centre[..., 0] / s), 0, h // s - 1).astype(jnp.int32)
  col = jnp.clip(jnp.floor(centre[..., 1] / s), 0, w // s - 1).astype(jnp.int32)
  hit = (row * (w // s) + col)[..., None] == jnp.arange(config.tokens_per_frame)  # [b, n, m, p]
  hit &= valid[..., None]
  count = hit.sum(axis=2)
  label = jnp.sum(jnp.where(hit, objects[..., 1:2], 0), axis=2)
  return jnp.where(count == 0, NO_DIGIT, jnp.where(count == 1, label, -1)).astype(jnp.int32)


def entry_labels(
  objects: Int[Array, "b n m 5"], config: VideoLMConfig, digit_size: int, midstream: Bool[Array, " b"] | None = None
) -> Int[Array, "b n p"]:
  """The entry head's labels ``[b, n, tokens_per_frame]`` (``VideoLMConfig.frame_delta``): ``centre_labels`` of the
  digits drawn for the first time in each frame (an object id not drawn in the frame before; at most one a frame),
  ``NO_DIGIT`` at every other patch. ``midstream``: the clips cut after their stream's first tick, whose first
  frame's entries are unknown (-1 at every patch, ignored by the loss)."""
  new = jnp.where(_new_objects(objects)[..., None], objects, -1)
  labels = centre_labels(new, config, digit_size)
  return labels if midstream is None else jnp.where(_first_frame(midstream, labels.shape[1])[..., None], -1, labels)


def _first_frame(midstream: Bool[Array, " b"], n: int) -> Bool[Array, "b n"]:
  """The first frame of each clip cut mid-stream (``midstream``), where what entered cannot be told."""
  return jnp.asarray(midstream, bool)[:, None] & (jnp.arange(n) == 0)


def _new_objects(objects: Int[Array, "b n m 5"], midstream: Bool[Array, " b"] | None = None) -> Bool[Array, "b n m"]:
  """Which rows of ``objects`` are drawn for the first time in their frame: an object id not drawn in the frame
  before (every drawn one in a clip's first frame, none in that of a clip cut mid-stream, ``midstream``)."""
  ids = objects[..., 0]
  before = jnp.pad(ids[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1)
  new = (ids >= 0) & ~(ids[..., :, None] == before[..., None, :]).any(-1)
  return new if midstream is None else new & ~_first_frame(midstream, ids.shape[1])[..., None]


def request_words(text: Int[Array, "*b l"]) -> Bool[Array, "*b l"]:
  """The words of a standing request in each slot ``text`` (``VideoLMConfig.hide_requests``): ``<q>`` and the words
  after it where the slot asks a question that no ``<a>`` follows (``Activation.encode``'s standing request)."""
  asked = jnp.cumsum(text == QUESTION, axis=-1) > 0
  standing = asked[..., -1] & ~jnp.any(text == ANSWER, axis=-1)
  return asked & standing[..., None] & (text != PAD)


def entering_digits(
  objects: Int[Array, "b n m 5"], midstream: Bool[Array, " b"] | None = None
) -> Bool[Array, "b n 10"]:
  """Whether each digit ``0 .. 9`` enters in each frame ``[b, n, 10]``: an object drawn in the frame and not in the
  one before (``entry_labels``' rule; a proactive request for the digit is due there). ``midstream``: the clips
  cut after their stream's first tick, whose first frame has no entry (none that can be told)."""
  new = _new_objects(objects, midstream)
  return ((objects[..., 1, None] == jnp.arange(NO_DIGIT)) & new[..., None]).any(axis=2)


def pending_requests(
  text: Int[Array, "b n l"], asked: Bool[Array, "b n"], digit_words: Sequence[int]
) -> Int[Array, "b n"]:
  """The digit of the proactive request pending at each tick's decision (``NO_DIGIT``: none), the request head's
  target (``VideoLMConfig.request_head``), from the slots of clips that start at their stream's first tick: a
  request asked in tick ``f`` (``asked``; its digit is the last of ``digit_words``, the ids of the words ``zero``
  .. ``nine``, in the slot) is pending from tick ``f + 1`` through the tick that announces it (whose slot starts
  with ``<speak>``)."""
  words = jnp.asarray(digit_words, jnp.int32)
  is_digit = text[..., None] == words  # [b, n, l, 10]
  places = jnp.where(is_digit.any(-1), jnp.arange(text.shape[-1]), -1)
  last = jnp.take_along_axis(is_digit, jnp.argmax(places, -1)[..., None, None], axis=2)[:, :, 0]
  label = jnp.argmax(last, axis=-1).astype(jnp.int32)  # [b, n]
  spoke = text[..., 0] == SPEAK

  def tick(pending, xs):
    ask, lab, said = xs
    nxt = jnp.where(ask, lab, jnp.where(said, NO_DIGIT, pending))
    return nxt, pending

  start = jnp.full(text.shape[:1], NO_DIGIT, jnp.int32)
  _, out = jax.lax.scan(tick, start, (asked.T, label.T, spoke.T))
  return out.T


def digit_loss(logits: Float[Array, "*b c"], labels: Int[Array, "*b"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """Mean cross-entropy of class labels in ``0 .. NO_DIGIT`` (-1 ignored) and the accuracy over the labels that
  name a digit (not ``NO_DIGIT``): the loss of the patch, entry and request heads."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  known = labels >= 0
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  loss = jnp.sum(jnp.where(known, nll, 0.0)) / jnp.maximum(known.sum(), 1)
  digit = known & (labels != NO_DIGIT)
  hit = (jnp.argmax(logp, axis=-1) == labels) & digit
  return loss, hit.sum() / jnp.maximum(digit.sum(), 1)


def patch_loss(
  patch_logits: Float[Array, "b n p c"], labels: Int[Array, "b n p"]
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """Mean cross-entropy of the patch labels (labels -1 ignored) and ``patch_accuracy`` over the patches that hold
  a digit's centre (``digit_loss``)."""
  loss, accuracy = digit_loss(patch_logits, labels)
  return loss, {"patch_accuracy": accuracy}


def layout_labels(objects: Int[Array, "b n m 5"], config: VideoLMConfig, digit_size: int) -> Int[Array, "b n 4"]:
  """The digit in each quadrant of each frame (``QUADRANT_ORDER``; ``NO_DIGIT``: none, -1: two centres), by the
  where-answers' rule: a digit is in the quadrant that holds its centre, against the frame's middle; from the
  digits drawn in each frame (``Chunk.objects``, as ``centre_labels``). The layout head's targets and the first
  four of ``scene_state``'s."""
  h, w = config.frame_size
  valid, labels = objects[..., 0] >= 0, objects[..., 1]
  half = digit_size / 2
  top, left = objects[..., 3] + half < h / 2, objects[..., 4] + half < w / 2
  groups = []
  for v, u in QUADRANT_ORDER:
    inside = valid & (top == v) & (left == u)
    count, label = inside.sum(-1), jnp.sum(jnp.where(inside, labels, 0), -1)
    groups.append(jnp.where(count == 0, NO_DIGIT, jnp.where(count == 1, label, -1)))
  return jnp.stack(groups, -1).astype(jnp.int32)


def scene_state(
  objects: Int[Array, "b n m 5"], config: VideoLMConfig, digit_size: int, midstream: Bool[Array, " b"] | None = None
) -> Int[Array, "b n g"]:
  """The scene state ``[b, n, STATE_GROUPS]`` after each frame of clips, from the digits drawn in each frame
  (``Chunk.objects``, as ``centre_labels``): what the questions of ``jstream.data.video_qa`` ask, in
  ``STATE_NAMES`` order, each a class id, -1 where undefined (a quadrant with two centres). Quadrants follow the
  where-answers' rule (a digit's centre against the frame's middle); an object is entering in the first frame it
  is drawn in and leaving in the first frame after its last. ``midstream``: the clips cut after their stream's
  first tick, whose history groups (first in and out, entries, ranks: they count from the stream's first tick)
  and first frame's entry are unknown (-1); the other clips start at their stream's first frame. For training
  clips: the history is matched by object id over ``[b, n, m, n]``, quadratic in the clip length."""
  n = objects.shape[1]
  valid = objects[..., 0] >= 0
  labels = objects[..., 1]
  groups = list(jnp.moveaxis(layout_labels(objects, config, digit_size), -1, 0))
  groups.append(valid.sum(-1))

  def label_in(event, label):  # the label of the frame's one event, NO_DIGIT without one
    return jnp.where(event.any(-1), jnp.sum(jnp.where(event, label, 0), -1), NO_DIGIT)

  entry = label_in(_new_objects(objects), labels)  # at most one a frame
  groups.append(entry)
  # the history by id: ids count entries from the stream's start, at most one a frame, so a clip of n frames from
  # its stream's first has ids < n
  slot = (objects[..., 0:1] == jnp.arange(n)) & valid[..., None]  # [b, n, m, ids]
  present = slot.any(2)
  label_of = jnp.max(jnp.where(slot, labels[..., None], -1), axis=(1, 2))  # [b, ids]
  before = jnp.pad(present[:, :-1], ((0, 0), (1, 0), (0, 0)))
  left_now = before & ~present  # at most one a frame
  groups.append(jnp.where(jnp.cumsum(present[..., 0], axis=1) > 0, label_of[:, :1], NO_DIGIT))  # object 0
  exits = label_in(left_now, label_of[:, None])
  first_exit = jnp.take_along_axis(exits, jnp.argmax(exits != NO_DIGIT, axis=1)[:, None], axis=1)
  groups.append(jnp.where(jnp.cumsum(exits != NO_DIGIT, axis=1) > 0, first_exit, NO_DIGIT))
  onehot = jax.nn.one_hot(entry, 10, dtype=jnp.int32)  # NO_DIGIT: no entry, all zeros
  counts = jnp.minimum(jnp.cumsum(onehot, axis=1), 10)  # [b, n, 10]
  first = jnp.min(jnp.where(onehot > 0, jnp.arange(n)[None, :, None], n), axis=1)  # [b, 10] frame of first entry
  rank = (first[:, None, :] < first[:, :, None]).sum(-1)  # [b, 10]: digits that first entered earlier
  seen = first[:, None, :] <= jnp.arange(n)[None, :, None]  # [b, n, 10]
  ranks = jnp.where(seen, rank[:, None, :], NO_DIGIT)
  out = jnp.concatenate([jnp.stack(groups, -1), counts, ranks], axis=-1).astype(jnp.int32)
  if midstream is None:
    return out
  cut = jnp.asarray(midstream, bool)[:, None, None]
  g = jnp.arange(out.shape[-1])
  first_frame = (g == STATE_NAMES.index("entered")) & (jnp.arange(n) == 0)[:, None]
  unknown = cut & ((g >= STATE_NAMES.index("first_in")) | first_frame)
  return jnp.where(unknown, -1, out)


def state_loss(logits: Float[Array, "b n g c"], state: Int[Array, "b n g"]) -> tuple[Float[Array, ""], dict]:
  """Mean cross-entropy of the scene-state targets (``scene_state``; -1 ignored) and metrics: ``state_accuracy``
  over every known target, ``state_where_accuracy`` over the quadrants that hold a digit (``where``'s digit
  answers) and ``state_history_accuracy`` over the first-in / first-out / count / rank targets."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  known = state >= 0
  nll = -jnp.take_along_axis(logp, jnp.maximum(state, 0)[..., None], axis=-1)[..., 0]
  loss = jnp.sum(jnp.where(known, nll, 0.0)) / jnp.maximum(known.sum(), 1)
  hit = (jnp.argmax(logp, axis=-1) == state) & known
  g = jnp.arange(STATE_GROUPS)
  where = known & (g < 4) & (state != NO_DIGIT)
  history = known & (g >= STATE_NAMES.index("first_in"))
  metrics = {
    "state_accuracy": hit.sum() / jnp.maximum(known.sum(), 1),
    "state_where_accuracy": (hit & where).sum() / jnp.maximum(where.sum(), 1),
    "state_history_accuracy": (hit & history).sum() / jnp.maximum(history.sum(), 1),
  }
  return loss, metrics


def slot_logits(logits: Float[Array, "b s v"], num_ticks: int, tokens_per_frame: int) -> Float[Array, "b n l v"]:
  """The logits that predict each slot word ``[b, n, L, v]``: word ``j`` of a tick from position
  ``P - 1 + j`` of that tick (the frame's last token for ``j = 0``). ``tokens_per_frame``: the frame's tokens in a
  tick, ``VideoLMConfig.frame_len`` (the carrier included)."""
  b, s, v = logits.shape
  per_tick = s // num_ticks
  slot = per_tick - tokens_per_frame
  x = logits.reshape(b, num_ticks, per_tick, v)
  return x[:, :, tokens_per_frame - 1 : tokens_per_frame - 1 + slot]


def answers_only(
  text: Int[Array, "b n l"], targets: Bool[Array, "b n l"]
) -> tuple[Int[Array, "b n l"], Bool[Array, "b n l"]]:
  """Training slots for a model that speaks only when asked (VideoLLM-online's baseline to its streaming
  objective): every decision reads ``<silent>`` and is no target, and the announcements (``<speak> label <eos>``)
  are gone (their words become ``<pad>``, which takes no position), so only the answers to questions are targets.
  The stream runner's ``proactive=False`` feeds exactly these slots."""
  col = jnp.arange(text.shape[-1])
  spoke = (text[..., :1] == SPEAK) & (col < 3)  # <speak> label <eos>
  text = jnp.where(spoke, PAD, text).at[..., 0].set(SILENT)
  return text, targets & (col > 0) & ~spoke


def tick_loss(
  logits: Float[Array, "b s v"],
  text: Int[Array, "b n l"],
  targets: Bool[Array, "b n l"],
  tokens_per_frame: int,
  *,
  speak_weight: float = 1.0,
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """Weighted mean cross-entropy over the target words of the ticks (decisions, announcements, answers) and
  metrics.

  Every target word weighs 1 except ``<speak>`` decisions, which weigh ``speak_weight`` (speaking is rare: a
  proactive request is fulfilled in well under 1% of ticks, and a model that never speaks is 99% right on
  decisions). Metrics: ``loss``, ``accuracy`` (argmax equals the target, over target words),
  ``decision_accuracy`` (the first word of each slot: ``<silent>`` / ``<speak>``), ``speak_recall`` (of the
  ``<speak>`` decisions, those whose ``<speak>`` logit beats ``<silent>``, the stream runner's rule),
  ``word_accuracy`` (the other target words: announced labels, answers and their ``<eos>``), ``targets`` (how
  many target words)."""
  pred = slot_logits(logits, text.shape[1], tokens_per_frame).astype(jnp.float32)
  logp = jax.nn.log_softmax(pred, axis=-1)
  nll = -jnp.take_along_axis(logp, text[..., None], axis=-1)[..., 0]
  mask = targets.astype(jnp.float32)
  first = jnp.zeros(mask.shape[-1]).at[0].set(1.0)
  speak = mask * first * (text == SPEAK)
  weight = mask + (speak_weight - 1.0) * speak
  loss = (nll * weight).sum() / jnp.maximum(weight.sum(), 1e-9)
  hit = (jnp.argmax(pred, -1) == text).astype(jnp.float32)
  said = (pred[..., SPEAK] > pred[..., SILENT]).astype(jnp.float32)
  words = mask * (1.0 - first)

  def share(x, m):
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)

  metrics = {
    "loss": loss,
    "accuracy": share(hit, mask),
    "decision_accuracy": share(hit, mask * first),
    "speak_recall": share(said, speak),
    "word_accuracy": share(hit, words),
  }
  return loss, {**metrics, "targets": mask.sum()}
