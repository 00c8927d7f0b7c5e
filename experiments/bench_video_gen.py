"""Streaming video generation benchmark (``jstream bench video-gen``): drift, speed and memory of long rollouts.

Trains the model of ``configs/video_gen.py`` (or reuses the checkpoint in ``--workdir``; ``--flags
teacher_forcing`` for the baseline), then rolls out ``--batch`` videos of each length in ``--frames``, each
conditioned on a digit label, under each cache policy (``video_dit.rolling_policy``, cache-relative positions):

* ``window``: the last ``--window`` frames (the training clip's length by default);
* ``sinks+window``: the first ``--sinks`` frames kept for ever plus the window (LongLive / Rolling Forcing).

Drift is scored by a digit classifier trained here on the training clips' frames (a small CNN; its accuracy on
the test split's frames is reported): per frame, whether the classifier reads the label the video was asked for
(*identity*), whether the frame shows one blob as every real frame does (*count*: a fragmented or empty frame does
not), and the frame's mean intensity against the data's (*ink*: 1.0 is the data's, a fading or smeared video
drifts away from it). Per (policy, length): identity and ink over frame ranges, per-frame latency (the
median call, after one that compiles; ``--chunks-per-call`` chunks per call), frames/s, the cache's size and the
process's peak RSS (frames are scored as each call returns them and dropped, but for the first 64 kept for the
GIF: host memory does not grow with the rollout). Then the rolling KV cache against recomputing the context each
chunk (a fresh cache filled with the last ``window - 1`` chunks in one call, then the same denoising steps), both
continuing the same first ``window - 1`` frames: speed per chunk (the rolling figure from the longest ``window``
row) and identity over ``--recompute-frames`` frames. Writes ``results.json``, ``drift.png`` (identity vs frame
index) and ``samples.gif`` (one video per policy) to ``--out``.

With ``--flags cartpole`` (gymnasium's CartPole, action-conditioned) there is no classifier: the model continues
``--context`` real frames of held-out episodes under the actions the controller really took, for ``--horizon``
frames (10x the training clip by default), under the ``sinks+window`` policy, and every generated frame is compared
with the real simulator's (PSNR and SSIM, dm-pix) against a baseline that holds the last real frame; the speed and
memory rows run the same policies under random actions. Self-forcing runs are evaluated through their student.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import bench_video_qa
from experiments.machine import device_line
from jstream import flow, rollout
from jstream.data import digits
from jstream.models import video_dit
from jstream.process_memory import reset_peak_rss, rss_mib, tree_bytes
from jstream.train import load_model, train

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "video_gen.py"


run_config = functools.partial(bench_video_qa.run_config, config=CONFIG)
"""``run_config(quick, workdir, flags)``: the training run of ``configs/video_gen.py``."""


# ---------------------------------------------------------------------------------------------- the classifier


class DigitNet(nnx.Module):
  """Three 3x3 convolutions (two with 2x2 max pooling), a global max pool and a linear layer: which digit a frame
  shows, wherever it is."""

  def __init__(self, rngs: nnx.Rngs):
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in ((1, 16), (16, 32), (32, 64))])
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):  # [n, H, W, 1] in [0, 1]
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i < 2:
        x = nnx.max_pool(x, (2, 2), (2, 2))
    return self.out(jnp.max(x, axis=(1, 2)))


def train_classifier(data_config, *, steps: int, seed: int = 0):
  """A ``DigitNet`` trained on the frames of the training clips; returns ``(predict, test accuracy)`` with
  ``predict(frames [n, H, W] in [0, 1]) -> probabilities [n, 10]``."""
  net = DigitNet(nnx.Rngs(seed))
  opt = nnx.Optimizer(net, optax.adam(2e-3), wrt=nnx.Param)

  @nnx.jit
  def step(net, opt, x, y):
    def loss_fn(net):
      return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(net)
    opt.update(net, grads)
    return loss

  def frames_and_labels(batch):
    f = np.asarray(batch["frames"], np.float32)  # [b, T, H, W]
    y = np.repeat(np.asarray(batch["labels"])[:, 0], f.shape[1])
    return f.reshape(-1, *f.shape[2:], 1), y

  it = iter(digits.digits_dataset("train", batch_size=32, seed=seed, dtype=np.float32, with_metadata=True,
                                  config=data_config))  # fmt: skip
  for _ in range(steps):
    x, y = frames_and_labels(next(it))
    step(net, opt, jnp.asarray(x), jnp.asarray(y))
  predict = nnx.jit(lambda net, x: jax.nn.softmax(net(x[..., None])))
  test = digits.digits_dataset("test", batch_size=32, shuffle=False, num_epochs=1, dtype=np.float32,
                               with_metadata=True, config=data_config)  # fmt: skip
  hits = total = 0
  for batch in test:
    x, y = frames_and_labels(batch)
    hits += int(np.sum(np.argmax(np.asarray(predict(net, jnp.asarray(x[..., 0]))), -1) == y))
    total += len(y)
  return functools.partial(predict, net), hits / max(total, 1)


# ---------------------------------------------------------------------------------------------- rollouts


def random_actions(model, batch: int, frames: int, start: int, seed: int) -> jax.Array | None:
  """Uniform random action ids ``[batch, frames]`` for frames ``start, start + 1, ...`` (an action-conditioned model;
  None otherwise): the same ids for the same frames whatever the call size."""
  n = model.config.num_actions
  if not n:
    return None
  ids = np.random.default_rng([seed, start]).integers(1, n, (batch, frames))  # never "none" (0), the reset frame's
  return jnp.asarray(ids, jnp.int32)


def rollout_policy(
  model, policy, labels, num_frames: int, *, steps: int, chunks_per_call: int, rng, batch: int, on_frames=None,
  keep: int | None = None, guidance: float = 1.0,
):  # fmt: skip
  """Generates ``num_frames`` frames of ``batch`` videos under ``policy`` in calls of ``chunks_per_call`` chunks (an
  action-conditioned model under ``random_actions``), after one call that compiles. Each call's frames (uint8 ``[b,
  frames, H, W]``) go to ``on_frames`` (scoring on the fly), and only the first ``keep`` frames are kept (all by
  default), so that host memory stays flat however long the rollout. ``guidance != 1``: classifier-free guidance
  (a paired cache, ``2 * batch`` rows). Returns ``(kept frames, median seconds per
  call, cache bytes, peak RSS MiB)``."""
  k = model.config.frames_per_chunk
  chunks = num_frames // k
  per_call = min(chunks_per_call, chunks)
  gen = rollout.VideoGenerator(model, chunks=per_call, steps=steps, out_dtype=jnp.uint8, guidance=guidance)
  acts = functools.partial(random_actions, model, batch, per_call * k)
  new_cache = functools.partial(model.init_cache, policy, batch, guided=guidance != 1.0)
  jax.block_until_ready(gen(new_cache(), rng, labels=labels, actions=acts(0, 0)).frames)
  cache = new_cache()
  cache_bytes = tree_bytes(cache)
  out, times = [], []
  reset_peak_rss()
  for start in range(0, chunks, per_call):
    actions = acts(start, 1)
    t0 = time.perf_counter()
    res = gen(cache, rng, start=start, labels=labels, actions=actions)
    frames = np.asarray(res.frames)  # the host copy ends the call
    times.append(time.perf_counter() - t0)
    cache = res.cache
    if on_frames is not None:
      on_frames(frames[..., 0])
    if keep is None or start * k < keep:
      out.append(frames[:, : None if keep is None else keep - start * k, ..., 0])
  return np.concatenate(out, axis=1), float(np.median(times)), cache_bytes, rss_mib()[1]


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 10, 11))
def _recompute(
  graphdef, state, context, labels, context_actions, actions, chunks, steps, policy, rng, guidance, per_step
):  # fmt: skip
  """Recomputes the context every chunk: a fresh cache filled with the last ``W - 1`` chunks (``context`` holds
  them, model range, with their ``context_actions`` for an action-conditioned model) in one call, then the
  denoising steps (the chunk's ``actions``); the new chunk (and its actions) enter the context ring. With
  ``guidance != 1`` the fresh cache is a paired one (both branches recomputed). ``per_step``: no cache at all, the
  way a model without one runs: every denoising step is one offline block-causal forward over the context (at
  noise level 0) and the noisy chunk."""
  model = nnx.merge(graphdef, state)
  b, c = context.shape[:2]
  guided = guidance != 1.0
  k = model.config.frames_per_chunk
  times = flow.schedule(steps)
  acts = None if actions is None else jnp.moveaxis(actions.reshape(b, chunks, k), 1, 0)

  def no_cache(ctx, ctx_act, noise, act):
    def velocity(x, t):
      clip = jnp.concatenate([ctx, x], axis=1)
      tt = jnp.concatenate([jnp.zeros((b, c)), jnp.full((b, k), t)], axis=1)
      clip_act = None if act is None else jnp.concatenate([ctx_act, act], axis=1)
      return model.forward(clip, tt, labels=labels, actions=clip_act, guidance=guidance)[:, c:]

    return flow.euler(velocity, noise, times)

  def per_chunk(ctx, ctx_act, noise, act):
    x, lab, x_act = ctx, labels, ctx_act
    if guided:  # both branches of the paired cache recomputed
      x, (lab, x_act) = video_dit.pair(ctx), video_dit.paired(labels, ctx_act)
    h, cond, groups = model.tokens(x, jnp.zeros(x.shape[:2]), lab, x_act)
    _, cache = model.dit.extend_embeddings(h, model.init_cache(policy, b, guided=guided), groups=groups, cond=cond)
    return model.denoise(cache, noise, times, labels=labels, actions=act, guidance=guidance)

  def step(carry, xs):
    ctx, ctx_act = carry
    i, act = xs
    noise = jax.random.normal(jax.random.fold_in(rng, i), (b, k, *ctx.shape[2:]), jnp.float32)
    x0 = (no_cache if per_step else per_chunk)(ctx, ctx_act, noise, act)
    ctx_act = None if act is None else jnp.concatenate([ctx_act[:, k:], act], axis=1)
    return (jnp.concatenate([ctx[:, k:], x0], axis=1), ctx_act), x0

  xs = (jnp.arange(chunks, dtype=jnp.int32), acts)
  _, frames = jax.lax.scan(step, (context, context_actions), xs)
  return jnp.moveaxis(frames, 0, 1).reshape(b, chunks * k, *context.shape[2:])


def recompute_rollout(
  model, context, labels, num_frames: int, *, steps: int, window: int, rng, context_actions=None, actions=None,
  guidance: float = 1.0, per_step: bool = False,
):  # fmt: skip
  """``num_frames`` frames after ``context`` (``[b, window - k, H, W]`` in [0, 1]; an action-conditioned model
  takes ``context_actions [b, window - k]`` and ``actions [b, num_frames]``) with the context recomputed every
  chunk (``per_step``: with every denoising step, no cache at all); returns ``(frames [b, n, H, W] uint8, seconds
  per chunk)`` (the second call, after compiling)."""
  k = model.config.frames_per_chunk
  policy = video_dit.rolling_policy(model.config, None, window)
  graphdef, state = nnx.split(model)
  ctx = video_dit.to_model(jnp.asarray(context)[..., None])
  args = (graphdef, state, ctx, labels, context_actions, actions, num_frames // k, steps, policy, rng, guidance,
          per_step)  # fmt: skip
  jax.block_until_ready(_recompute(*args))
  t0 = time.perf_counter()
  frames = np.asarray(_recompute(*args))
  seconds = (time.perf_counter() - t0) / (num_frames // k)
  return np.round(np.asarray(video_dit.from_model(frames))[..., 0] * 255).astype(np.uint8), seconds


# ---------------------------------------------------------------------------------------------- scoring


def blob_count(frame: np.ndarray, threshold: float = 0.3, min_pixels: int = 3) -> int:
  """Connected blobs (8-neighbour) of at least ``min_pixels`` pixels at or above ``threshold`` in a frame in [0, 1]:
  a real moving-digit frame of one digit has exactly one at these settings (every frame of the test split)."""
  from scipy import ndimage

  labels, _ = ndimage.label(frame >= threshold, structure=np.ones((3, 3)))
  return int(np.sum(np.bincount(labels.ravel())[1:] >= min_pixels))


def score(predict, frames: np.ndarray, labels: np.ndarray, ink_ref: float, num_digits: int = 1) -> dict:
  """Per-frame identity (classifier argmax == label), count (the frame shows ``num_digits`` blobs: ``blob_count``;
  a fragmented or empty frame does not) and ink (mean intensity / the data's), each a mean over the videos."""
  b, n = frames.shape[:2]
  x = frames.reshape(b * n, *frames.shape[2:]).astype(np.float32) / 255.0
  probs = np.concatenate([np.asarray(predict(jnp.asarray(x[i : i + 4096]))) for i in range(0, len(x), 4096)])
  hit = (np.argmax(probs, -1).reshape(b, n) == labels[:, None]).mean(0)
  count = np.array([blob_count(f) == num_digits for f in x]).reshape(b, n).mean(0)
  ink = x.reshape(b, n, -1).mean(-1).mean(0) / ink_ref
  return {"identity": hit.tolist(), "count": count.tolist(), "ink": ink.tolist()}


def _score_into(parts: list, predict, labels: np.ndarray, ink_ref: float, frames: np.ndarray) -> None:
  parts.append(score(predict, frames, labels, ink_ref))


def ranges(n: int, window: int) -> list[tuple[int, int]]:
  """Frame ranges to summarise: inside the first window, then decades."""
  edges = [0, min(window, n)] + [e for e in (100, 1000, 10_000, 100_000) if window < e < n] + [n]
  return [(a, b) for a, b in itertools.pairwise(edges) if a < b]


def summary(curves: dict, n: int, window: int, edges: list[int] | None = None) -> dict:
  """Mean of each per-frame curve over ``ranges(n, window)``, or between consecutive ``edges`` (clipped to ``n``)."""
  spans = ranges(n, window) if edges is None else [(a, min(b, n)) for a, b in itertools.pairwise(edges) if a < n]
  return {f"{a}-{b}": {k: float(np.mean(v[a:b])) for k, v in curves.items()} for a, b in spans}


GIF_FRAMES = 64
"""Frames of each rollout kept for ``samples.gif`` (the rest are scored as they come and dropped)."""


def write_gif(path: pathlib.Path, videos: dict[str, np.ndarray], frames: int = GIF_FRAMES, scale: int = 4) -> None:
  """One row per policy (its first video), ``frames`` frames from the start, upscaled ``scale`` x."""
  from PIL import Image

  rows = [v[0, :frames] for v in videos.values()]  # [n, H, W] each
  strip = np.concatenate(rows, axis=1)  # [n, rows * H, W]
  strip = np.repeat(np.repeat(strip, scale, axis=1), scale, axis=2)
  images = [Image.fromarray(f) for f in strip]
  images[0].save(path, save_all=True, append_images=images[1:], duration=80, loop=0)


def cartpole_episodes(task, count: int, frames: int) -> dict[str, np.ndarray]:
  """``count`` held-out CartPole episodes of ``frames`` frames (the test split's controller and seeds, at this
  length): ``frames`` uint8 ``[count, frames, H, W]`` and ``actions`` int32 ``[count, frames]``."""
  from jstream.data import cartpole

  config = cartpole.cartpole_config(frame_size=task.frame_hw, episode_frames=frames, num_train=1, num_test=count)
  eps = [cartpole.make_episode(config, "test", i) for i in range(count)]
  return {k: np.stack([e[k] for e in eps]) for k in ("frames", "actions")}


def image_metrics(pred: np.ndarray, real: np.ndarray) -> dict[str, list[float]]:
  """Per-frame PSNR (dB) and SSIM (dm-pix; frames uint8 ``[b, n, H, W]``, compared in [0, 1]), mean over videos.
  Identical frames have infinite PSNR; it is capped at 60 dB so that means stay finite."""
  import dm_pix as pix

  a = jnp.asarray(pred, jnp.float32)[..., None] / 255.0
  b = jnp.asarray(real, jnp.float32)[..., None] / 255.0
  psnr = jnp.minimum(jax.vmap(jax.vmap(pix.psnr))(a, b), 60.0)
  ssim = jax.vmap(jax.vmap(lambda x, y: pix.ssim(x, y, filter_size=7)))(a, b)
  return {"psnr": np.asarray(psnr.mean(0)).tolist(), "ssim": np.asarray(ssim.mean(0)).tolist()}


def cartpole_eval(model, task, policy, *, batch: int, context: int, horizon: int, steps: int, rng) -> dict:
  """Action-conditioned rollouts against the real simulator (see the module docstring): the model continues
  ``context`` real frames under the real actions for ``horizon`` frames; per-frame PSNR / SSIM of the model and of
  holding the last real frame, and their summaries over the training clip's length and beyond it."""
  ep = cartpole_episodes(task, batch, context + horizon)
  real, actions = ep["frames"], jnp.asarray(ep["actions"], jnp.int32)
  out = rollout.generate_video(
    model,
    num_frames=horizon,
    cache=model.init_cache(policy, batch),
    context=jnp.asarray(real[:, :context, ..., None], jnp.float32) / 255.0,
    context_actions=actions[:, :context],
    actions=actions[:, context:],
    steps=steps,
    rng=rng,
    out_dtype=jnp.uint8,
  )
  gen = np.asarray(out.frames)[..., 0]
  target = real[:, context:]
  hold = np.repeat(real[:, context - 1 : context], horizon, axis=1)
  curves = {"model": image_metrics(gen, target), "hold_last_frame": image_metrics(hold, target)}
  clip = task.clip_frames - context
  per_source = {who: summary(c, horizon, clip) for who, c in curves.items()}
  summ = {span: {f"{who}_{m}": v for who, sm in per_source.items() for m, v in sm[span].items()}
          for span in per_source["model"]}  # fmt: skip
  return {"context": context, "horizon": horizon, "curves": curves, "summary": summ, "videos": (gen, target)}


CONTEXT_MODES = ("rolling", "recompute", "no_cache")
"""How a chunk sees its context in ``compare_context``: the rolling KV cache; a fresh cache of the visible frames
recomputed once per chunk; no cache (the visible frames recomputed with every denoising step)."""


def compare_context(
  model, context, labels, frames: int, *, steps: int, window: int, rng, context_actions=None, actions=None,
  guidance: float = 1.0,
):  # fmt: skip
  """The three ``CONTEXT_MODES`` side by side at equal context: each continues the same ``context`` (``[b, window -
  k, H, W]`` in [0, 1], with its ``context_actions``) for ``frames`` frames with the same noise, ``window`` frames
  visible to every chunk. Returns ``(frames per mode [b, frames, H, W] uint8, ms per chunk per mode)``, each timed
  on the second call (the first compiles)."""
  k = model.config.frames_per_chunk
  b = np.shape(context)[0]
  ctx = jnp.asarray(context)[..., None]
  policy = video_dit.rolling_policy(model.config, window)
  guided = guidance != 1.0
  gen = rollout.VideoGenerator(model, chunks=frames // k, steps=steps, out_dtype=jnp.uint8, guidance=guidance)

  def rolling():
    cache = model.init_cache(policy, b, guided=guided)
    cache = rollout.context_frames(model, ctx, cache, labels=labels, actions=context_actions, guided=guided)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    out = np.asarray(gen(cache, rng, labels=labels, actions=actions).frames)[..., 0]
    return out, (time.perf_counter() - t0) / (frames // k)

  rolling()  # compiles
  videos, ms = {}, {}
  videos["rolling"], sec = rolling()
  ms["rolling"] = 1000 * sec
  for mode in ("recompute", "no_cache"):
    videos[mode], sec = recompute_rollout(
      model, context, labels, frames, steps=steps, window=window, rng=rng, context_actions=context_actions,
      actions=actions, guidance=guidance, per_step=mode == "no_cache",
    )  # fmt: skip
    ms[mode] = 1000 * sec
  return videos, ms


def context_record(frames: int, ms: dict[str, float], **extra) -> dict:
  """A ``compare_context`` result as JSON: ``frames``, ms per chunk per mode, the rolling cache's speed-ups
  (``speedup`` over the recompute, ``speedup_no_cache``), and ``extra`` fields (quality per mode)."""
  rec = {"frames": frames, **{f"{mode}_ms_per_chunk": v for mode, v in ms.items()}, **extra}
  rec["speedup"] = ms["recompute"] / ms["rolling"]
  rec["speedup_no_cache"] = ms["no_cache"] / ms["rolling"]
  return rec


def print_context(rec: dict, *metrics: str) -> None:
  """One line of a ``compare_context`` result: ms per chunk, speed-ups over the rolling cache, ``metrics`` per mode."""
  ms = ", ".join(f"{m} {rec[m + '_ms_per_chunk']:.2f}" for m in CONTEXT_MODES)
  quality = "; ".join(f"{q} " + " / ".join(f"{rec[f'{m}_{q}']:.3f}" for m in CONTEXT_MODES) for q in metrics)
  print(
    f"  ms per chunk: {ms} (rolling {rec['speedup']:.1f}x faster than recompute, {rec['speedup_no_cache']:.1f}x than "
    f"no cache); {quality} (rolling / recompute / no cache)"
  )


def cartpole_recompute(model, task, window: int, *, batch: int, frames: int, steps: int, rng) -> dict:
  """``compare_context`` on CartPole: the modes continue the same ``window - k`` real frames under the real
  actions; speed per chunk and PSNR / SSIM against the simulator."""
  k = model.config.frames_per_chunk
  c = window - k
  ep = cartpole_episodes(task, batch, c + frames)
  real, actions = ep["frames"], jnp.asarray(ep["actions"], jnp.int32)
  ctx = jnp.asarray(real[:, :c], jnp.float32) / 255.0
  videos, ms = compare_context(model, ctx, None, frames, steps=steps, window=window, rng=rng,
                               context_actions=actions[:, :c], actions=actions[:, c:])  # fmt: skip
  quality = {}
  for name, f in videos.items():
    m = image_metrics(f, real[:, c:])
    quality.update({f"{name}_psnr": float(np.mean(m["psnr"])), f"{name}_ssim": float(np.mean(m["ssim"]))})
  return context_record(frames, ms, context=c, **quality)


def plot_cartpole(ev: dict, train_frames: int, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, metric in zip(axes, ("psnr", "ssim")):
    for who, c in ev["curves"].items():
      ax.plot(np.arange(1, len(c[metric]) + 1), c[metric], label=who.replace("_", " "))
    ax.axvline(train_frames - ev["context"], color="grey", ls=":", label="training clip")
    ax.set_xlabel("generated frame (after the real context)")
    ax.set_ylabel(metric.upper() + (" (dB)" if metric == "psnr" else ""))
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for r in result["rows"]:
    ident = np.asarray(r["curves"]["identity"])
    w = max(1, len(ident) // 100)
    smooth = np.convolve(ident, np.ones(w) / w, mode="valid")
    ax.plot(np.arange(len(smooth)) + w // 2, smooth, label=f"{r['policy']}, {r['frames']} frames")
  ax.axvline(result["train_frames"], color="grey", ls=":", label="training clip")
  ax.set_xscale("symlog", linthresh=10)
  ax.set_xlim(left=0)  # frames count from 0: no negative half of the symlog axis
  ax.set_xlabel("frame")
  ax.set_ylabel("identity (classifier reads the label)")
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench video-gen", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/bench_video_gen", help="output folder")
  parser.add_argument("--quick", action="store_true", help="the quick model and short rollouts (smoke test)")
  parser.add_argument("--workdir", default=None, help="training run to reuse or create (default: the config's)")
  parser.add_argument("--flags", default="", help="flags of configs/video_gen.py, e.g. teacher_forcing")
  parser.add_argument("--frames", default="100,1000", help="comma-separated rollout lengths")
  parser.add_argument("--batch", type=int, default=4, help="videos per rollout (labels 0, 1, 2, ...)")
  parser.add_argument("--steps", type=int, default=4, help="Euler steps per chunk")
  parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
  parser.add_argument("--window", type=int, default=None, help="frames in the window (default: the training clip)")
  parser.add_argument("--sinks", type=int, default=1, help="frame sinks of the sinks+window policy")
  parser.add_argument("--chunks-per-call", type=int, default=100)
  parser.add_argument("--classifier-steps", type=int, default=300)
  parser.add_argument("--recompute-frames", type=int, default=64, help="frames of the recompute comparison")
  parser.add_argument("--context", type=int, default=2, help="CartPole: real frames the rollouts continue")
  parser.add_argument("--horizon", type=int, default=None, help="CartPole: frames compared (default 10x the clip)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  cfg = run_config(args.quick, args.workdir, args.flags)
  lengths = [int(x) for x in args.frames.split(",") if x]
  if args.quick:
    lengths, args.batch, args.classifier_steps, args.chunks_per_call = [min(lengths[0], 12)], 2, 5, 4
    args.recompute_frames = 8
  task = cfg.generation
  window = args.window or task.clip_frames
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = device_line()
  print(f"bench_video_gen on {device}, jax {jax.__version__}; model {cfg.workdir}")
  t0 = time.time()
  res = train(cfg, progress=not args.no_progress)
  model, step = load_model(cfg)
  model = getattr(model, "generator", model)  # a self-forcing run: its student
  cartpole = task.dataset == "cartpole"
  data_config = task.data_config()
  if not cartpole:
    predict, classifier_acc = train_classifier(data_config, steps=args.classifier_steps, seed=args.seed)
    print(f"  digit classifier: {classifier_acc:.3f} on the test split's frames")
    sample = next(iter(digits.digits_dataset("test", batch_size=32, shuffle=False, dtype=np.float32,
                                             config=data_config)))  # fmt: skip
    ink_ref = float(np.mean(sample))
  labels = np.arange(args.batch) % 10 if task.class_conditioned else None
  jlabels = None if labels is None else jnp.asarray(labels, jnp.int32)
  score_labels = labels if labels is not None else np.full(args.batch, -1)
  rng = jax.random.key(args.seed)
  mc = model.config
  policies = {
    "window": video_dit.rolling_policy(mc, window),
    "sinks+window": video_dit.rolling_policy(mc, window, sink_frames=args.sinks * mc.frames_per_chunk),
  }
  rows, videos = [], {}
  for n in lengths:
    for name, policy in policies.items():
      parts = []  # per call: the identity and ink of its frames (scored as they come)
      on_frames = None if cartpole else functools.partial(_score_into, parts, predict, score_labels, ink_ref)
      frames, sec, cache_bytes, peak = rollout_policy(
        model, policy, jlabels, n, steps=args.steps, chunks_per_call=args.chunks_per_call, rng=rng,
        batch=args.batch, on_frames=on_frames, keep=GIF_FRAMES, guidance=args.guidance,
      )  # fmt: skip
      per_call = min(args.chunks_per_call, n // mc.frames_per_chunk) * mc.frames_per_chunk
      curves = {m: [v for p in parts for v in p[m]] for m in ("identity", "count", "ink")} if parts else {}
      row = {
        "policy": name,
        "frames": n,
        "ms_per_frame": 1000 * sec / per_call,
        "frames_per_s": args.batch * per_call / sec,
        "cache_mib": cache_bytes / 2**20,
        "peak_rss_mib": peak,
        "summary": summary(curves, n, window) if curves else {},
        "curves": curves,
      }
      rows.append(row)
      videos[f"{name}, {n}"] = frames
      s = ", ".join(
        f"{k} id {v['identity']:.2f} count {v['count']:.2f} ink {v['ink']:.2f}" for k, v in row["summary"].items()
      )
      print(
        f"  {name:<13} {n:>6} frames: {s}; {row['ms_per_frame']:.2f} ms/frame, {row['frames_per_s']:.0f} frames/s "
        f"(batch {args.batch}), cache {row['cache_mib']:.2f} MiB, peak RSS {peak:.0f} MiB"
      )
  result = {
    "device": device,
    "jax": jax.__version__,
    "args": vars(args),
    "model_step": step,
    "train_last_metrics": res.metrics[-1] if res.metrics else {},
    "train_frames": task.clip_frames,
    "window": window,
    "rows": rows,
  }
  if cartpole:
    horizon = args.horizon or 10 * task.clip_frames
    ev = cartpole_eval(model, task, policies["sinks+window"], batch=args.batch, context=args.context,
                       horizon=horizon, steps=args.steps, rng=rng)  # fmt: skip
    gen, target = ev.pop("videos")
    for span, v in ev["summary"].items():
      print("  frames " + span + ": " + ", ".join(f"{key} {val:.3f}" for key, val in v.items()))
    ev["recompute"] = rec = cartpole_recompute(model, task, window, batch=args.batch, frames=args.recompute_frames,
                                               steps=args.steps, rng=rng)  # fmt: skip
    print_context(rec, "psnr", "ssim")
    result.update(cartpole=ev, seconds=time.time() - t0)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot_cartpole(ev, task.clip_frames, out / "cartpole.png")
    write_gif(out / "samples.gif", {"model": gen, "simulator": target}, frames=horizon)
    print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
    return 0
  # The rolling KV cache against recomputing the context, from the same first window of generated frames.
  k = mc.frames_per_chunk
  first, _, _, _ = rollout_policy(
    model, policies["window"], jlabels, window - k, steps=args.steps, chunks_per_call=(window - k) // k, rng=rng,
    batch=args.batch, guidance=args.guidance,
  )  # fmt: skip
  videos_c, ms = compare_context(
    model, first.astype(np.float32) / 255.0, jlabels, args.recompute_frames, steps=args.steps, window=window,
    rng=jax.random.fold_in(rng, 1), guidance=args.guidance,
  )  # fmt: skip
  identity = {f"{m}_identity": float(np.mean(score(predict, f, score_labels, ink_ref)["identity"]))
              for m, f in videos_c.items()}  # fmt: skip
  rec = context_record(args.recompute_frames, ms, **identity)
  print_context(rec, "identity")
  result.update(classifier_test_accuracy=classifier_acc, recompute=rec, seconds=time.time() - t0)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  plot(result, out / "drift.png")
  write_gif(out / "samples.gif", {k: v for k, v in videos.items() if k.endswith(f", {lengths[-1]}")})
  print(f"wrote {out / 'results.json'} ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
