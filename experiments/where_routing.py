"""Why ``where`` stayed at chance: can the video model's language model pick a frame's quadrant by the question?

  python -m experiments.where_routing [--quick] [--steps 500] [--seeds 0,1] [--arms A,B] --out DIR

A *where* question ("which digit is in the top left now ?") is answered by the label of the frame token(s) in the
named quadrant of the latest frame: an attention that selects frame tokens by the question's words. Every video-QA
run so far left it at the majority answer (``none``), with the frame tokens naming their patch label and quadrant
in words (``VideoLMConfig.label_words`` / ``place_words``) and with the scene-state loss asking for each quadrant's
digit after every frame (``VideoTask.state_loss``). This experiment isolates that step on the same language model
(``presets.video_lm()``: 4 layers, width 128, the video vocabulary) with synthetic frames whose labels are known:

* a tick is a frame of 4 x 4 patch tokens (one stream position for all, as in ``VideoLM``) then the text slot
  ``<silent> <q> which digit is in the {v} {h} now ? <a>``; each frame holds 0-3 digits, at most one per quadrant,
  at random patches, drawn afresh every tick (so older frames are distractors);
* a frame token is ``scale * (p[label] + 0.5 * noise)`` (a fixed random prototype per label with coordinates of
  standard deviation one: the frame encoder's RMS-normed tokens at ``scale`` 1, a projector to the words' scale at
  ``scale = embed_dim ** -0.5``, ``VideoLMConfig.projector``), plus the input embeddings of its quadrant's two words
  and of its label's word (``none`` for an empty patch), as the real model's ``placed`` adds them;
* the answer loss on a ``--question-share`` of the ticks (the real clips ask a where-question at about 5% of the
  ticks, the ``where`` diagnostic at 60%), and with ``state`` a linear head on the final features of each frame's
  last token trained on all four quadrants' answers at every tick (the ``where_*`` targets of ``state_loss``).

Arms: ``{encoder,word}_scale[_state]``, ``projector_state`` (a trained linear projector), ``projector_norm_state``
(its outputs held at the words' scale, ``VideoLMConfig.projector_norm``) and ``projector_norm_state_noisy`` (the
same with the label words of an imperfect patch head: each patch's word is another label's with probability 0.2,
``with_word_labels``; the frame features keep the true label). Each trains ``--steps`` steps of 16 streams of 8
ticks (AdamW 2e-3, warm-up 30 steps, cosine decay) and is scored on 64 held-out streams (every tick's question):
accuracy where the answer is a digit, where it is ``none``, and overall against the majority share. Writes
``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jstream import presets
from jstream.data import video_qa
from jstream.models.lm import StreamingTransformer
from jstream.nn.layers import rms_normalize

ARMS = {  # name: (token scale relative to unit-variance features, state loss, projector, label-word noise)
  "encoder_scale": (1.0, False, None, 0.0),
  "encoder_scale_state": (1.0, True, None, 0.0),
  "word_scale": (None, False, None, 0.0),  # None: embed_dim ** -0.5, the word embeddings' initial scale
  "word_scale_state": (None, True, None, 0.0),
  "projector_state": (1.0, True, "free", 0.0),  # VideoLMConfig.projector: a trained linear map, init std 1 / embed_dim
  "projector_norm_state": (1.0, True, "norm", 0.0),  # and its outputs held at embed_dim ** -0.5 (projector_norm)
  # the same with the label words of an imperfect patch head: each patch's word is a wrong label's with
  # probability 0.2 (the real patch head names 0.77-0.93 of the digit patches)
  "projector_norm_state_noisy": (1.0, True, "norm", 0.2),
}
GRID = 4  # patch rows and columns
QUADS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
NONE = 10  # label of an empty patch (video_lm.NO_DIGIT)


def quadrant_of_patch() -> np.ndarray:
  """``[GRID * GRID]`` the index in ``QUADS`` of each patch (row-major)."""
  r, c = np.divmod(np.arange(GRID * GRID), GRID)
  return (r >= GRID // 2) * 2 + (c >= GRID // 2)


def draw(rng: np.random.Generator, batch: int, ticks: int) -> dict[str, np.ndarray]:
  """Synthetic ticks: ``labels [b, n, 16]`` (``NONE`` for empty patches), the asked quadrant ``q [b, n]``, its
  answer ``answer [b, n]`` and all four quadrants' answers ``layout [b, n, 4]``."""
  quad = quadrant_of_patch()
  labels = np.full((batch, ticks, GRID * GRID), NONE, np.int32)
  layout = np.full((batch, ticks, 4), NONE, np.int32)
  for i in range(batch):
    for t in range(ticks):
      for qd in rng.choice(4, int(rng.integers(0, 4)), replace=False):
        patch = rng.choice(np.flatnonzero(quad == qd))
        labels[i, t, patch] = layout[i, t, qd] = rng.integers(0, 10)
  q = rng.integers(0, 4, (batch, ticks)).astype(np.int32)
  return {"labels": labels, "q": q, "answer": np.take_along_axis(layout, q[..., None], -1)[..., 0], "layout": layout}


def with_word_labels(batch: dict, noise: float, rng: np.random.Generator) -> dict:
  """``batch`` plus ``word_labels``: its patch labels, each replaced with probability ``noise`` by another label
  drawn uniformly (the words an imperfect patch head would add)."""
  labels = batch["labels"]
  if not noise:  # draws nothing: the noiseless arms see the data stream they always did
    return {**batch, "word_labels": labels}
  other = (labels + rng.integers(1, NONE + 1, labels.shape)) % (NONE + 1)  # uniform over the 10 other labels
  return {**batch, "word_labels": np.where(rng.random(labels.shape) < noise, other, labels).astype(np.int32)}


class Router(nnx.Module):
  """The language model over synthetic ticks, with a state head on each frame's last token."""

  def __init__(self, scale: float, seed: int, projector: str | None = None):
    self.lm = StreamingTransformer(presets.video_lm(), rngs=nnx.Rngs(seed))
    d = self.lm.config.embed_dim
    self.norm = projector == "norm"
    init = nnx.initializers.normal(stddev=1.0 / d)
    linear = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=nnx.Rngs(seed + 2))
    self.projector = nnx.data(linear if projector is not None else None)
    self.state = nnx.Linear(d, 4 * (NONE + 1), rngs=nnx.Rngs(seed + 1))
    self.scale = scale
    self.prototypes = jnp.asarray(np.random.default_rng([seed, 7]).normal(size=(NONE + 1, d)), jnp.float32)
    w = video_qa.WORD_ID
    quad = quadrant_of_patch()
    self.place = jnp.asarray([[w[QUADS[k][0]], w[QUADS[k][1]]] for k in quad], jnp.int32)  # [16, 2]
    self.label_words = jnp.asarray(video_qa.LABEL_WORDS, jnp.int32)
    self.texts = jnp.asarray(
      [
        [video_qa.SILENT, video_qa.QUESTION, *video_qa.encode(f"which digit is in the {v} {h} now ?"), video_qa.ANSWER]
        for v, h in QUADS
      ],
      jnp.int32,
    )  # [4, L]

  def features(self, labels, noise):
    """The frame tokens' feature part, before the words: through the projector and its norm (as
    ``VideoLM.frame_features``), if the arm has them."""
    x = self.scale * (self.prototypes[labels] + noise)
    if self.projector is not None:
      x = self.projector(x)
      if self.norm:
        x = rms_normalize(x, 1e-12) * x.shape[-1] ** -0.5
    return x

  def __call__(self, labels, q, noise, word_labels):
    """Answer logits ``[b, n, v]`` and state logits ``[b, n, 4, 11]``; ``word_labels``: the labels whose words the
    frame tokens carry (``with_word_labels``: the true ones, or a noisy patch head's)."""
    emb = self.lm.embed
    b, n, p = labels.shape
    frame = self.features(labels, noise) + emb(self.place).sum(-2) + emb(self.label_words[word_labels])
    text = emb(self.texts[q])  # [b, n, L, d]
    ln = text.shape[2]
    x = jnp.concatenate([frame, text], axis=2).reshape(b, n * (p + ln), -1)
    tick = np.concatenate([np.zeros(p, np.int32), 1 + np.arange(ln, dtype=np.int32)])
    pos = (np.arange(n, dtype=np.int32)[:, None] * (ln + 1) + tick).reshape(-1)
    logits, feats = self.lm.forward_embeddings(x, positions=jnp.broadcast_to(pos, (b, pos.size)), return_features=True)
    answer = logits.reshape(b, n, p + ln, -1)[:, :, -1]
    state = self.state(feats.reshape(b, n, p + ln, -1)[:, :, p - 1]).reshape(b, n, 4, NONE + 1)
    return answer.astype(jnp.float32), state.astype(jnp.float32)


def answer_logits_to_labels(logits):
  """The answer words' logits restricted to the labels' words, ``[..., 11]`` (digits then ``none``)."""
  return logits[..., jnp.asarray(video_qa.LABEL_WORDS)]


def train_arm(name: str, seed: int, steps: int, share: float, ticks: int, log_every: int) -> dict:
  scale, use_state, projector, label_noise = ARMS[name]
  model = Router(presets.video_lm().embed_dim ** -0.5 if scale is None else scale, seed, projector)
  sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 30, max(steps, 31))
  opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.0), wrt=nnx.Param)
  words = jnp.asarray(video_qa.LABEL_WORDS)

  @nnx.jit
  def step(model, opt, batch, noise, asked):
    def loss_fn(m):
      answer, state = m(batch["labels"], batch["q"], noise, batch["word_labels"])
      ce = optax.softmax_cross_entropy_with_integer_labels(answer, words[batch["answer"]])
      loss = (ce * asked).sum() / jnp.maximum(asked.sum(), 1.0)
      if use_state:
        loss = loss + optax.softmax_cross_entropy_with_integer_labels(state, batch["layout"]).mean()
      return loss

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  @nnx.jit
  def predict(model, batch, noise):
    logits = model(batch["labels"], batch["q"], noise, batch["word_labels"])[0]
    return jnp.argmax(answer_logits_to_labels(logits), axis=-1)

  @nnx.jit
  def rms_frame(model, batch, noise):  # RMS per coordinate of the feature part of the frame tokens (no words)
    return jnp.sqrt(jnp.mean(jnp.square(model.features(batch["labels"], noise))))

  rng = np.random.default_rng([seed, 1])
  d = model.lm.config.embed_dim
  test = with_word_labels(
    draw(np.random.default_rng([seed, 2]), 64, ticks), label_noise, np.random.default_rng([seed, 4])
  )
  test_noise = 0.5 * np.random.default_rng([seed, 3]).normal(size=(64, ticks, GRID * GRID, d)).astype(np.float32)
  curve, start = [], time.perf_counter()
  for s in range(steps):
    batch = {k: jnp.asarray(v) for k, v in with_word_labels(draw(rng, 16, ticks), label_noise, rng).items()}
    noise = jnp.asarray(0.5 * rng.normal(size=(16, ticks, GRID * GRID, d)).astype(np.float32))
    asked = jnp.asarray((rng.random((16, ticks)) < share).astype(np.float32))
    loss = step(model, opt, batch, noise, asked)
    if (s + 1) % log_every == 0 or s + 1 == steps:
      pred = np.asarray(predict(model, {k: jnp.asarray(v) for k, v in test.items()}, jnp.asarray(test_noise)))
      digit = test["answer"] != NONE
      curve.append(
        {"step": s + 1, "loss": float(loss), "digit_accuracy": float((pred == test["answer"])[digit].mean())}
      )
  test_in = {k: jnp.asarray(v) for k, v in test.items()}
  pred = np.asarray(predict(model, test_in, jnp.asarray(test_noise)))
  frame_rms = float(rms_frame(model, test_in, jnp.asarray(test_noise)))
  right, digit = pred == test["answer"], test["answer"] != NONE
  reached = next((c["step"] for c in curve if c["digit_accuracy"] >= 0.8), None)
  return {
    "arm": name,
    "seed": seed,
    "token_scale": float(model.scale),
    "projector": projector,
    "label_noise": label_noise,
    "frame_rms_after_training": frame_rms,
    "state_loss": use_state,
    "accuracy": float(right.mean()),
    "majority_share": float((~digit).mean()),
    "digit_accuracy": float(right[digit].mean()),
    "none_accuracy": float(right[~digit].mean()),
    "questions": int(right.size),
    "step_digit_accuracy_0.8": reached,
    "curve": curve,
    "wall_s": time.perf_counter() - start,
  }


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=500)
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--arms", default=",".join(ARMS))
  ap.add_argument("--question-share", type=float, default=0.25)
  ap.add_argument("--ticks", type=int, default=8)
  ap.add_argument("--log-every", type=int, default=50)
  ap.add_argument("--quick", action="store_true", help="2 steps, 2 ticks (a smoke test)")
  args = ap.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  unknown = set(arms) - set(ARMS)
  if unknown:
    raise ValueError(f"unknown arms {sorted(unknown)}; known: {sorted(ARMS)}")
  if not 0.0 < args.question_share <= 1.0:
    raise ValueError(f"--question-share must be in (0, 1], got {args.question_share}")
  steps, ticks = (2, 2) if args.quick else (args.steps, args.ticks)
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = [train_arm(a, s, steps, args.question_share, ticks, args.log_every) for a in arms for s in seeds]
  print(f"{'arm':<22} {'seed':>4} {'rms':>6} {'digit acc':>9} {'none acc':>8} {'acc (majority)':>15} {'0.8 at':>7}")
  for r in runs:
    print(
      f"{r['arm']:<22} {r['seed']:>4} {r['frame_rms_after_training']:>6.3f} {r['digit_accuracy']:>9.2f} "
      f"{r['none_accuracy']:>8.2f} "
      f"{r['accuracy']:>7.2f} ({r['majority_share']:.2f}) {r['step_digit_accuracy_0.8']!s:>7}"
    )
  out = {
    "config": {"steps": steps, "ticks": ticks, "question_share": args.question_share, "batch": 16},
    "backend": jax.default_backend(),
    "runs": runs,
  }
  path = pathlib.Path(args.out)
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
