"""The training loop: a jitted step with donated state, orbax checkpoints, JSONL metrics, exact resume.

``train(cfg)`` builds the model, the optimizer and the data iterator, resumes from the newest checkpoint in
``cfg.workdir`` if there is one (parameters, optimizer state, step and the data iterator's position), and runs to
``cfg.steps``. Metrics go to ``workdir/metrics.jsonl`` (and to TensorBoard event files when ``tensorboardX`` is
installed); a tqdm bar shows the loss and tokens/s. The host reads metrics back only every ``log_every`` steps.

Resume is exact: a run of N steps and a run stopped at N/2 and resumed to N end with bit-identical parameters on
CPU (``tests/test_train.py``). Randomness comes only from the seed and the data iterator, whose state is part of
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import typing
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jstream.models.lm import StreamingTransformer
from jstream.models.self_forcing import SelfForcing
from jstream.models.video_dit import VideoDiT
from jstream.models.video_lm import VideoLM
from jstream.speculative import DraftHeads, TargetWithHeads
from jstream.train import aligned
from jstream.train.checkpoint import Checkpointer, saved_config, saved_run
from jstream.train.config import TrainConfig
from jstream.train.losses import distill_loss, next_token_loss
from jstream.train.optim import lm_schedule, make_optimizer, schedule


# A pytree node that JAX and orbax rebuild with placeholder leaves: not checked at run time (see jstream.typing).
@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a training step reads and writes (all arrays; donated to the step)."""

  params: Any
  opt_state: Any
  step: jax.Array


def make_train_step(
  graphdef,
  optimizer: optax.GradientTransformation,
  cfg: TrainConfig,
  *,
  encoder_only: bool = False,
  teacher: StreamingTransformer | None = None,
) -> Callable:
  """``step(state, batch) -> (state, metrics)``, jit-compiled, state donated. ``batch``: tokens ``[b, L + 1]``
  (text) or a dict of clips (``video_qa``: ``frames``, ``text``, ``targets``).

  ``teacher`` (``cfg.distill`` runs, required there): the frozen LM whose next-token distributions the model
  learns; its weights are an argument of the compiled step, not part of the state.

  ``encoder_only`` (video QA, the first ``VideoTask.encoder_steps`` steps): the loss is the patch-label loss of
  the frame encoder alone; the language model is not run, and the optimizer (``make_optimizer``) leaves its
  parameters and its AdamW state as they are.
  """
  row_masks = aligned.forward_masks(cfg)  # one per group of rows (two halves for train_positions="mixed")
  lr, lm_lr = schedule(cfg), lm_schedule(cfg)
  if (cfg.distill is None) != (teacher is None):
    raise ValueError("make_train_step: a distill run needs its teacher, and only a distill run takes one")
  teacher_graph, teacher_params = nnx.split(teacher) if teacher is not None else (None, None)

  def loss_fn(params, batch, teacher_logits=None):
    model = nnx.merge(graphdef, params)
    if cfg.data == "video_gen":
      from jstream.models import video_dit

      task = cfg.generation
      frames = batch["frames"][..., None]  # one channel
      labels = batch["labels"][:, 0] if task.class_conditioned else None
      actions = batch["actions"] if task.num_actions else None
      if task.objective == "self_forcing":
        from jstream.models import self_forcing

        n0 = task.context_frames
        gen, critic, m = self_forcing.dmd_losses(
          model,
          batch["rng"],
          frames.shape[0],
          frames.shape[1] - n0,
          steps=task.rollout_steps,
          shift=task.time_shift,
          time_range=task.dmd_time_range,
          context=video_dit.to_model(frames[:, :n0]) if n0 else None,
          labels=labels,
          actions=actions,
          teacher_guidance=task.teacher_guidance,
        )
        return gen + critic, m  # stop-gradients give each model its own loss's gradient
      loss, m = video_dit.training_loss(
        model,
        frames,
        batch["rng"],
        labels=labels,
        actions=actions,
        objective=task.objective,
        time_sampling=task.time_sampling,
        time_shift=task.time_shift,
        label_dropout=task.label_dropout,
      )
      return loss, m
    if cfg.data == "video_qa":
      from jstream.models import video_lm

      video = cfg.video
      # clips cut after their stream's first tick (video.self_contained): what entered in their first frame, and
      # the history before them, are no targets; every other run's clips start at their stream's first tick
      midstream = None
      if video.self_contained:
        if "start" not in batch:
          raise ValueError("self_contained clips need each clip's first tick, batch['start'] (video_qa_dataset's)")
        midstream = batch["start"] > 0

      def patch_term(vis):  # the frame heads: patch labels, and entry labels with frame_delta
        labels = video_lm.centre_labels(batch["objects"], model.config, video.digit_size)
        patch, pm = video_lm.patch_loss(model.patch_logits(vis), labels)
        out = {"patch_loss": patch, **pm}
        if video.frame_delta:
          entry = video_lm.entry_labels(batch["objects"], model.config, video.digit_size, midstream)
          el, ea = video_lm.digit_loss(model.entry_logits(vis), entry)
          patch = patch + el
          out.update({"entry_loss": el, "entry_accuracy": ea})
        if video.layout_loss:
          layout = video_lm.layout_labels(batch["objects"], model.config, video.digit_size)
          ll, la = video_lm.digit_loss(model.layout_logits(vis), layout)
          patch = patch + video.layout_loss * ll
          out.update({"layout_loss": ll, "layout_accuracy": la})
        return patch, out

      def activation_term(loss, out):  # StreamBridge's activation model, on the frame side
        if not video.activation:
          return loss, out
        standing, _ = model.activation.standing(batch["text"])
        act = model.activation_logits(vis, standing.vector)
        speak = batch["text"][:, :, 0] == video_lm.SPEAK
        al, am = video_lm.activation_loss(act, standing, speak, speak_weight=video.speak_weight)
        loss, out = loss + al, {**out, "activation_loss": al, **am}
        if video.activation_match:  # every request scored at every entry: the hard negatives short clips lack
          from jstream.data import video_qa

          requests, _ = model.activation.encode(jnp.asarray(video_qa.request_slots(batch["text"].shape[-1])))
          logits = model.activation_match_logits(vis, requests)
          ml, mm = video_lm.match_loss(logits, video_lm.entering_digits(batch["objects"], midstream))
          loss, out = loss + video.activation_match * ml, {**out, "match_loss": ml, **mm}
        return loss, out

      vis = model.encode(batch["frames"])
      if encoder_only:
        return activation_term(*patch_term(vis))
      p = model.config.frame_len
      packed = None if video.text_budget is None else video.clip_frames * (p + video.text_budget)
      text, targets = batch["text"], batch["targets"]
      if not video.streaming_objective:
        text, targets = video_lm.answers_only(text, targets)
      state, request = video.state_loss > 0, video.request_loss > 0
      frames, rows = batch["frames"], batch["frames"].shape[0] // len(row_masks)
      outputs = [
        model.training_outputs(
          frames[i * rows : (i + 1) * rows],
          text[i * rows : (i + 1) * rows],
          packed_len=packed,
          return_features=state or request,
          vis=vis[i * rows : (i + 1) * rows],
          **kw,
        )
        for i, kw in enumerate(row_masks)
      ]
      outputs = outputs[0] if len(outputs) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)
      logits, kept = outputs[0], outputs[-1]
      loss, m = video_lm.tick_loss(logits, text, targets & kept, p, speak_weight=video.speak_weight)
      dropped = 1.0 - (targets & kept).sum() / jnp.maximum(targets.sum(), 1)
      out = {"tokens": m["targets"], "answer_loss": loss, "dropped_targets": dropped}
      out.update({k: m[k] for k in ("accuracy", "decision_accuracy", "speak_recall", "word_accuracy")})
      if video.patch_loss > 0:
        patch, pm = patch_term(vis)
        loss = loss + video.patch_loss * patch
        out.update(pm)
      if state:  # a tick whose decision word was run had its frame run (ticks past the budget leave the loss)
        truth = video_lm.scene_state(batch["objects"], model.config, video.digit_size, midstream)
        truth = jnp.where(kept[:, :, :1], truth, -1)
        sl, sm = video_lm.state_loss(model.state_logits(outputs[1], text.shape[1]), truth)
        loss = loss + video.state_loss * sl
        out.update({"state_loss": sl, **sm})
      if request:  # the pending request's digit at each decision
        from jstream.data import video_qa

        asked = batch["qtype"] == video_qa.QTYPES.index("proactive")
        pending = video_lm.pending_requests(text, asked, [video_qa.WORD_ID[w] for w in video_qa.NUMBERS])
        pending = jnp.where(kept[:, :, 0], pending, -1)
        rl, ra = video_lm.digit_loss(model.request_logits(outputs[1], text.shape[1]), pending)
        loss = loss + video.request_loss * rl
        out.update({"request_loss": rl, "request_accuracy": ra})
      return activation_term(loss, out)
    if cfg.draft_heads is not None:  # Medusa-1: the heads' loss, the target frozen
      loss, m = model.heads.loss(model.target, batch, decay=cfg.draft_heads.decay)
      return loss, {"tokens": jnp.asarray(batch[:, 2:].size, jnp.float32), **m}
    inputs, targets, mask = aligned.make_example(cfg, batch)
    logits = model.forward(inputs, **row_masks[0])
    loss, count = next_token_loss(logits, targets, mask)
    if cfg.distill is not None:  # DistillSpec: the teacher's distributions are the targets
      task = cfg.distill
      div, m = distill_loss(logits, teacher_logits, mask, divergence=task.divergence, temperature=task.temperature)
      out = {"tokens": count, "data_loss": loss, task.divergence: div, "acceptance": m["acceptance"]}
      return div + task.data_weight * loss, out
    return loss, {"tokens": count}

  def step(state: TrainState, batch, teacher_params=None):
    if cfg.data == "video_gen":  # noise and noise levels: a function of the run's seed and the step (exact resume)
      batch = {**batch, "rng": jax.random.fold_in(jax.random.key(cfg.seed), state.step)}
    teacher_logits = None
    if teacher_params is not None:  # outside the differentiated function: nothing of it is kept for the backward
      teacher = nnx.merge(teacher_graph, teacher_params)
      task = cfg.distill
      if task.samples != "data":  # on-policy text: the corpus prompt continued by the student or the teacher
        sampler = teacher if task.samples == "teacher" else nnx.merge(graphdef, state.params)
        rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        batch = continue_rows(sampler, batch, task.prompt_len, rng, task.temperature)
      teacher_logits = teacher.forward(aligned.make_example(cfg, batch)[0])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, teacher_logits)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree_utils.tree_norm(grads)  # optax >= 0.2.5
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr(state.step), **aux}
    if cfg.encoder_steps:
      metrics["lm_lr"] = jnp.where(state.step < cfg.encoder_steps, 0.0, lm_lr(state.step - cfg.encoder_steps))
    return TrainState(params, opt_state, state.step + 1), metrics

  compiled = jax.jit(step, donate_argnums=(0,))
  if teacher is None:
    return compiled
  return lambda state, batch: compiled(state, batch, teacher_params)


def continue_rows(model: StreamingTransformer, tokens, prompt_len: int, rng, temperature: float):
  """``tokens [b, n]`` with everything after each row's first ``prompt_len`` tokens replaced by tokens that
  ``model`` samples at ``temperature`` (``rollout.generate`` on a ``Dense`` cache of the row's length; traceable,
  as the distillation step runs it). Step ``i`` of the decode draws from ``fold_in(rng, i)``."""
  from jstream import rollout
  from jstream.cache import Dense

  n = tokens.shape[1]
  if not 1 <= prompt_len < n:
    raise ValueError(f"continue_rows: prompt_len must be in [1, {n - 1}] for rows of {n} tokens, got {prompt_len}")
  prompt = tokens[:, :prompt_len]
  out = rollout.generate(
    model, prompt, max_new_tokens=n - prompt_len, policy=Dense(n), rng=rng, temperature=temperature
  )
  return jnp.concatenate([prompt, out.tokens.astype(tokens.dtype)], axis=1)


def _text_config(cfg: TrainConfig):
  from jstream.data import text as text_data

  return text_data.text_config(list(cfg.corpus) or None)


def heldout_tokens(cfg: TrainConfig, n: int) -> tuple[np.ndarray, int]:
  """The first ``n`` held-out bytes of the run's corpus as a stream for evaluation, and how many leading tokens are
  not text: with ``cfg.sink_token`` the stream starts with the sink token (as in training), and ``skip`` is 1."""
  from jstream.data import text as text_data

  stream = text_data.heldout_stream(n, config=_text_config(cfg))
  if cfg.sink_id is None:
    return stream, 0
  return np.concatenate([[cfg.sink_id], stream]).astype(np.int32), 1


def train_iterator(cfg: TrainConfig, split: str = "train") -> Iterator:
  """The data iterator of a config, with ``get_state``/``set_state``: text batches ``[b, seq_len + 1]``, or
  video-QA clips (dicts of ``frames [b, T, H, W]`` float32, ``text``, ``targets``, ``qtype``).

  Text windows at random offsets; with ``cfg.overlap``, shuffled chunks that start every ``seq_len - overlap``
  bytes, so each chunk's first ``overlap`` targets (context, outside the loss) are the previous chunk's last ones.
  """
  if cfg.data == "video_qa":
    from jstream.data import video_qa

    ds = video_qa.video_qa_dataset(split, batch_size=cfg.batch_size, seed=cfg.seed, config=cfg.video.data_config())
    return iter(ds)
  if cfg.data == "video_gen" and cfg.generation.dataset == "cartpole":
    from jstream.data import cartpole

    task = cfg.generation
    ds = cartpole.cartpole_dataset(
      split,
      batch_size=cfg.batch_size,
      clip_frames=task.clip_frames,
      seed=cfg.seed,
      dtype=np.float32,
      config=task.data_config(),
    )
    return iter(ds)
  if cfg.data == "video_gen":
    from jstream.data import digits

    ds = digits.digits_dataset(
      split,
      batch_size=cfg.batch_size,
      seed=cfg.seed,
      dtype=np.float32,
      with_metadata=True,
      config=cfg.generation.data_config(),
    )
    return iter(ds)
  from jstream.data import text as text_data

  config = _text_config(cfg)
  if cfg.overlap:  # overlapped chunks of the stream: each target is learnt in exactly one chunk (see aligned.py)
    sampling = dict(sampling="chunks", stride=cfg.seq_len - cfg.overlap)
  else:
    sampling = dict(sampling="random", needles=cfg.needles, needle_pairs=cfg.needle_pairs, copies=cfg.copies)
  ds = text_data.text_dataset(
    split, seq_len=cfg.seq_len + 1, batch_size=cfg.batch_size, seed=cfg.seed, config=config, **sampling
  )
  return iter(ds)


class MetricsWriter:
  """Appends JSON lines to ``workdir/metrics.jsonl``; mirrors to TensorBoard event files in
  ``workdir/tensorboard`` if ``tensorboardX`` is installed (``pip install 'jstream[tensorboard]'``).

  ``resume_step``: the step the run (re)starts from. The rows of later steps are dropped from the JSONL (a run
  stopped between checkpoints logged them once already, and logs them again now; so is a run that died before its
  first checkpoint, ``resume_step=0``), and TensorBoard gets a purge marker at ``resume_step + 1``, which hides the
  earlier event files' values from that step on. One writer per workdir: two processes training in the same
  workdir at once would race here as they would in the checkpoints."""

  def __init__(self, workdir: pathlib.Path, resume_step: int | None = None):
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if resume_step is not None:
      self._drop_after(resume_step)
    try:
      from tensorboardX import SummaryWriter

      purge = None if resume_step is None else resume_step + 1
      self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)
    except ImportError:
      pass

  def write(self, step: int, metrics: dict) -> None:
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None

  def read(self) -> list[dict]:
    """The rows logged, in order; a line that is not JSON (the half-written last line of a killed process) is
    skipped."""
    return _json_rows(self.path.read_text().splitlines()) if self.path.exists() else []

  def _drop_after(self, step: int) -> None:
    if not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    kept = [r for r in _json_rows(lines) if r.get("step", 0) <= step]
    if len(kept) < len(lines):  # rows dropped, or unreadable lines
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      tmp.replace(self.path)


def _json_rows(lines: list[str]) -> list[dict]:
  """The lines that parse as JSON objects (a killed writer leaves a half-written last line)."""
  rows = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


@dataclasses.dataclass
class TrainResult:
  model: StreamingTransformer | VideoLM | VideoDiT | SelfForcing | TargetWithHeads
  step: int
  resumed_from: int | None
  metrics: list[dict]
  seconds: float


def build_model(
  cfg: TrainConfig, *, load_teacher: bool = True
) -> StreamingTransformer | VideoLM | VideoDiT | SelfForcing | TargetWithHeads:
  """A fresh model of the run: the language model, for ``video_qa`` the video LM around it, for ``video_gen`` the
  video diffusion transformer, and for its ``self_forcing`` objective the student, critic and teacher, all three
  with the teacher run's weights; for ``draft_heads`` the base run's LM and new heads (``load_teacher``; otherwise
  fresh, e.g. to be restored from a checkpoint)."""
  rngs = nnx.Rngs(cfg.seed)
  if cfg.data == "video_gen":
    config = cfg.generation.model_config(cfg.model)
    if cfg.generation.objective != "self_forcing":
      return VideoDiT(config, rngs=rngs)
    model = SelfForcing(config, rngs=rngs)
    if load_teacher:
      teacher, _ = load_model(saved_config(cfg.generation.teacher))
      if isinstance(teacher, SelfForcing):
        teacher = teacher.generator
      model.load_teacher(teacher)
    return model
  if cfg.data == "video_qa":
    from jstream.data.video_qa import WORDS

    if cfg.model.vocab_size != len(WORDS):
      raise ValueError(
        f"video_qa needs model.vocab_size == {len(WORDS)} (the word vocabulary), got {cfg.model.vocab_size}"
      )
    return VideoLM(cfg.video.model_config(cfg.model), rngs=rngs)
  if cfg.draft_heads is not None:
    task = cfg.draft_heads
    if not load_teacher:  # to be restored from the run's own checkpoint
      target = StreamingTransformer(cfg.model, rngs=rngs)
      return TargetWithHeads(target, DraftHeads(cfg.model.embed_dim, cfg.model.vocab_size, task.num_heads, rngs=rngs))
    base = saved_config(task.base)
    if base.model != cfg.model:
      raise ValueError(
        f"draft_heads: the run's model must be the base run's ({task.base}): {base.model} vs {cfg.model}"
      )
    target, _ = load_model(base)
    if not isinstance(target, StreamingTransformer):
      raise ValueError(f"draft_heads: the base run {task.base} is not a text LM")
    return TargetWithHeads(target, DraftHeads.for_model(target, task.num_heads, rngs=rngs))
  return StreamingTransformer(cfg.model, rngs=rngs)


def _device_batch(cfg: TrainConfig, batch) -> Any:
  if cfg.data == "video_gen":
    return {k: jnp.asarray(batch[k]) for k in ("frames", "labels", "actions") if k in batch}
  if cfg.data == "video_qa":
    return {k: jnp.asarray(batch[k]) for k in ("frames", "text", "targets", "qtype", "objects", "start")}
  return jnp.asarray(np.asarray(batch, np.int32))


def tokens_per_batch(cfg: TrainConfig) -> int:
  """Input tokens a training step processes (video: frame and slot tokens of every tick)."""
  if cfg.data == "video_gen":
    return cfg.batch_size * cfg.generation.clip_frames * cfg.generation.model_config(cfg.model).tokens_per_frame
  if cfg.data == "video_qa":
    per_tick = cfg.video.model_config(cfg.model).frame_len + cfg.video.data_config().text_len
    return cfg.batch_size * cfg.video.clip_frames * per_tick
  return cfg.batch_size * cfg.seq_len


def init_state(cfg: TrainConfig, *, load_teacher: bool = True):
  """A fresh model, its graphdef, the optimizer and the initial ``TrainState``."""
  model = build_model(cfg, load_teacher=load_teacher)
  graphdef, params = nnx.split(model)
  optimizer = make_optimizer(cfg)
  return graphdef, optimizer, TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def train(
  cfg: TrainConfig,
  *,
  data: Iterator | None = None,
  progress: bool = True,
  stop_after: int | None = None,
) -> TrainResult:
  """Trains (or resumes) ``cfg`` in ``cfg.workdir``.

  Args:
    cfg: the run's config.
    data: a batch iterator with ``get_state``/``set_state`` (default: ``train_iterator(cfg)``).
    progress: show a tqdm progress bar.
    stop_after: stop (with a checkpoint) after this many steps of this call, as if interrupted.

  Returns:
    ``TrainResult`` with the trained model (parameters merged back into an NNX module).
  """
  teacher_run = distill_teacher_run(cfg) if cfg.distill is not None else None  # checked before anything is written
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  graphdef, optimizer, state = init_state(cfg)
  data = train_iterator(cfg) if data is None else data
  ckpt = Checkpointer(workdir, cfg)
  resumed_from = None
  restored = ckpt.restore_latest(state)
  if restored is not None:
    resumed_from, state, data_state = restored
    data.set_state(data_state)
  mesh = None
  if cfg.mesh is not None:
    from jstream import sharding

    mesh = sharding.make_mesh(*cfg.mesh)
    state = sharding.shard_train_state(state, mesh)
  start = int(state.step)
  end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
  teacher = None
  if teacher_run is not None:
    teacher = load_distill_teacher(cfg, *teacher_run, resumed=resumed_from is not None)
    if mesh is not None:  # sharded like the model it is (Megatron-style by the model axis)
      teacher = sharding.shard_model(teacher, mesh)
  step_fn = make_train_step(graphdef, optimizer, cfg, teacher=teacher)
  encoder_steps = cfg.encoder_steps
  encoder_fn = make_train_step(graphdef, optimizer, cfg, encoder_only=True) if encoder_steps else None
  writer = MetricsWriter(workdir, resume_step=start)
  tokens_per_step = tokens_per_batch(cfg)
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=pathlib.Path(cfg.workdir).name, unit="step", leave=False)
  t0 = time.perf_counter()
  t_log, s_log = t0, start
  for step in range(start, end):
    batch = _device_batch(cfg, next(data))
    if mesh is not None:
      batch = sharding.shard_batch(batch, mesh)
    state, metrics = (encoder_fn if step < encoder_steps else step_fn)(state, batch)
    done = step + 1
    if done % cfg.log_every == 0 or done == end:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      metrics["tokens_per_s"] = tokens_per_step * (done - s_log) / max(now - t_log, 1e-9)
      t_log, s_log = now, done
      writer.write(done, metrics)
      if bar is not None:
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    if bar is not None:
      bar.update(1)
    if done % cfg.checkpoint_every == 0 or done == end:
      ckpt.save(done, state, data.get_state())
  if bar is not None:
    bar.close()
  ckpt.close()
  writer.close()
  model = nnx.merge(graphdef, state.params)
  return TrainResult(model, int(state.step), resumed_from, writer.read(), time.perf_counter() - t0)


TEACHER_RECORD = "distill_teacher.json"
"""In a ``distill`` run's workdir: the teacher run and checkpoint step the run started from."""


def distill_teacher_run(cfg: TrainConfig) -> tuple[TrainConfig, list[int]]:
  """The teacher run of ``cfg.distill`` (its config and checkpoint steps), checked: a plain causal text LM over the
  student's vocabulary, not the run itself."""
  task = cfg.distill
  if pathlib.Path(task.teacher).resolve() == pathlib.Path(cfg.workdir).resolve():
    raise ValueError(f"distill: the teacher run {task.teacher} is this run's own workdir")
  teacher_cfg, steps = saved_run(task.teacher)
  if teacher_cfg.data != "text" or teacher_cfg.draft_heads is not None:
    raise ValueError(f"distill: the teacher run {task.teacher} is not a text LM")
  if teacher_cfg.model.vocab_size != cfg.model.vocab_size:
    raise ValueError(
      f"distill: the teacher's vocabulary ({teacher_cfg.model.vocab_size} ids) is not the student's "
      f"({cfg.model.vocab_size})"
    )
  if teacher_cfg.sink_token or teacher_cfg.train_window is not None:
    raise ValueError(
      f"distill: the teacher run {task.teacher} was trained with a sink token or a window mask; distillation "
      "reads it on plain causal samples"
    )
  return teacher_cfg, steps


def load_distill_teacher(cfg: TrainConfig, teacher_cfg: TrainConfig, steps: list[int], *, resumed: bool):
  """The teacher's LM at the step the run distils from: a resumed run keeps the step it started from (recorded in
  ``TEACHER_RECORD``; a clear error when that checkpoint is gone), so that resuming stays exact while the teacher
  run trains on; a fresh run takes the newest and records it."""
  record = pathlib.Path(cfg.workdir) / TEACHER_RECORD
  step = steps[-1]
  if resumed and record.exists():
    step = json.loads(record.read_text())["step"]
    if step not in steps:
      raise FileNotFoundError(
        f"distill: this run started from step {step} of the teacher {cfg.distill.teacher}, whose checkpoints are now "
        f"{steps}; restore that step or start the run afresh in another workdir"
      )
  else:
    record.write_text(json.dumps({"teacher": cfg.distill.teacher, "step": step}))
  teacher, _ = load_model(teacher_cfg, step)
  return teacher


def load_model(
  cfg: TrainConfig, step: int | None = None
) -> tuple[StreamingTransformer | VideoLM | VideoDiT | SelfForcing | TargetWithHeads, int]:
  """The model of the newest (or the given) checkpoint of ``cfg.workdir``, and its step (a ``self_forcing`` run:
  the ``SelfForcing`` triple, whose ``generator`` is the model to sample with)."""
  graphdef, _, state = init_state(cfg, load_teacher=False)
  ckpt = Checkpointer(cfg.workdir, cfg)
  try:
    if step is None:
      restored = ckpt.restore_latest(state)
      if restored is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.dir}")
      step, state, _ = restored
    else:
      state = ckpt.restore(step, state)
  finally:
    ckpt.close()
  return nnx.merge(graphdef, state.params), step
