"""Needle in a stream: does a bounded cache still recall a fact planted far back? Score eviction vs recency.

  python -m experiments.bench_needle [--quick] [--out DIR] [--budget 128] [--distances 32,128,512,2048]
  (also: jstream bench needle ...)

The small byte-level LM trained with planted needles (``configs/lm_tiny.py:needle``: half its 256-byte training
samples carry a ``name = "value"`` line and, later, its recall, so it learns to copy; trained here if its
checkpoint is missing, reused otherwise; ``--config`` picks another run) reads held-out text into which a *needle*
line (a random 5-letter name and 6-character value, ``jstream.data.text.needle_lines``) is planted; ``distance``
bytes of text later the stream repeats ``name = "`` and the benchmark scores the model's prediction of the value's
bytes (teacher-forced, from ``jstream.rollout.stream_nll``): bits per value byte and *recall*, the share of value
bytes the model gives probability > 0.5 (so they are its first choice). A *control* row scores values the stream
never showed (the needle line holds another value): what the model knows without the needle. First, a *copy probe*
(``copy_probe``): bits per byte of a random string repeated, over its first occurrence and over the repeats; a
model that does not copy there cannot recall a needle either.

Policies at one KV budget (tokens kept per layer and kv head, sinks included): ``SinkWindow`` (recency,
StreamingLLM), ``H2O``, ``SnapKV`` and ``AgeNormalized`` (``jstream.cache.scored``: half the budget a recent
window, 4 sinks), all with cache-relative positions, and ``Dense`` (everything, absolute positions) as the
unbounded reference. Streams are read in chunks of ``--chunk`` tokens; each (policy, distance) is one batch of
``--trials`` streams (and as many control streams). At the largest distance each bounded policy's compiled scan
runs a second time for its throughput (tokens/s over the batch). Prints a table, writes ``results.json`` and
``recall.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from experiments.machine import device_line

LEAD = 64  # text bytes before the needle (it is not in the sinks)


def _policies(budget: int, stream_len: int) -> dict:
  from jstream import cache as C

  recent, sinks = budget // 2, 4
  return {
    "dense": C.Dense(stream_len),
    "sinkwindow": C.SinkWindow(sinks, budget - sinks, positions="cache_relative"),
    "h2o": C.H2O(budget, recent, sinks, positions="cache_relative"),
    "snapkv": C.SnapKV(budget, recent, sinks, positions="cache_relative"),
    "agenorm": C.AgeNormalized(budget, recent, sinks, positions="cache_relative"),
  }


def make_streams(text: np.ndarray, distance: int, trials: int, seed: int, *, control: bool = False):
  """``trials`` streams ``[trials, n]`` of ``text`` bytes with a needle ``distance`` bytes before its recall, and
  the ``[trials, 6]`` positions of the recalled value bytes. ``control``: the needle line holds another value."""
  from jstream.data.text import needle_lines, random_needle

  rng = np.random.default_rng(seed)
  rows, where = [], []
  span = LEAD + distance
  for _ in range(trials):
    name, value = random_needle(rng)
    shown = random_needle(rng)[1] if control else value
    start = int(rng.integers(0, len(text) - span))
    filler = text[start : start + span]
    line, cue = needle_lines(name, shown)
    needle, cue = np.frombuffer(line, np.uint8), np.frombuffer(cue, np.uint8)
    stream = np.concatenate([filler[:LEAD], needle, filler[LEAD:], cue, np.frombuffer(value + b'"\n', np.uint8)])
    rows.append(stream)
    first = LEAD + len(needle) + distance + len(cue)
    where.append(np.arange(first, first + 6))
  return np.stack(rows).astype(np.int32), np.stack(where)


def copy_probe(model, *, periods=(16, 32, 48), length: int = 256, seed: int = 0) -> list[dict]:
  """Does the model copy at all? Bits per byte of a random string of letters and digits repeated to ``length``
  bytes (``jstream.data.text.repeated_string``'s alphabet), per period: over its first occurrence (nothing to copy:
  about log2(36) = 5.17) and over the repeats (near 0 for a model that copies; an induction circuit), offline
  forward with every byte in view."""
  import jax
  import jax.numpy as jnp

  from jstream.data.text import VALUE_CHARS

  rng = np.random.default_rng(seed)
  rows = np.stack([np.resize(rng.choice(VALUE_CHARS, p), length) for p in periods]).astype(np.int32)
  logp = jax.nn.log_softmax(model.forward(jnp.asarray(rows)), axis=-1)
  bits = -np.asarray(jnp.take_along_axis(logp[:, :-1], jnp.asarray(rows)[:, 1:, None], axis=-1)[..., 0]) / np.log(2)
  return [
    {"period": p, "first_bits": float(bits[i, : p - 1].mean()), "repeat_bits": float(bits[i, p - 1 :].mean())}
    for i, p in enumerate(periods)
  ]


def run(args) -> dict:
  import jax

  from jstream import rollout
  from jstream.train import heldout_tokens, load_config, train

  spec = args.config + (("," if ":" in args.config else ":") + "quick" if args.quick else "")
  cfg = load_config(spec)
  t0 = time.time()
  trained = train(cfg, progress=args.progress)
  print(f"model: {cfg.workdir} step {trained.step} ({time.time() - t0:.0f} s)")
  text, skip = heldout_tokens(cfg, args.text_bytes)
  if skip:
    raise ValueError(f"{spec}: the needle benchmark reads models trained without a sink token")
  probe = copy_probe(trained.model)
  for r in probe:
    print(
      f"  copy probe: a string of {r['period']} bytes repeated: {r['first_bits']:.2f} bits per byte the first "
      f"time, {r['repeat_bits']:.2f} on the repeats"
    )
  rows = []
  for distance in args.distances:
    streams, where = make_streams(text, distance, args.trials, args.seed + distance)
    control, cwhere = make_streams(text, distance, args.trials, args.seed + distance, control=True)
    n = streams.shape[1]
    for name, policy in _policies(args.budget, n + args.chunk).items():
      if name not in args.policies:
        continue
      t1 = time.time()
      chunk = min(args.chunk, policy.capacity)
      pad = (-n) % chunk  # whole chunks: pad the end (after the value, so nothing scored depends on it)
      batch = np.concatenate([streams, control])
      batch = np.pad(batch, ((0, 0), (0, pad)), constant_values=ord(" "))
      nll = np.asarray(jax.device_get(rollout.stream_nll(trained.model, batch, policy, chunk_size=chunk)))
      seen = np.take_along_axis(nll[: args.trials], where, axis=1)
      ctrl = np.take_along_axis(nll[args.trials :], cwhere, axis=1)
      row = {
        "policy": name,
        "distance": distance,
        "stream_bytes": n,
        "kept_share": min(policy.capacity, n) / n,
        "value_bits": float(np.mean(seen) / np.log(2)),
        "recall": float(np.mean(seen < np.log(2))),
        "control_bits": float(np.mean(ctrl) / np.log(2)),
        "control_recall": float(np.mean(ctrl < np.log(2))),
        "seconds": time.time() - t1,
      }
      if distance == max(args.distances) and name != "dense":  # throughput: the compiled scan run again
        t2 = time.time()
        jax.block_until_ready(rollout.stream_nll(trained.model, batch, policy, chunk_size=chunk))
        row["tokens_per_s"] = batch.size / (time.time() - t2)
      rows.append(row)
      print(
        f"  distance {distance:6d}  {name:<11} kept {row['kept_share']:6.1%}  value {row['value_bits']:5.2f} bits "
        f"(control {row['control_bits']:5.2f})  recall {row['recall']:5.1%} (control {row['control_recall']:5.1%})"
        f"  {row['seconds']:5.1f} s" + (f"  {row['tokens_per_s']:7.0f} tok/s" if "tokens_per_s" in row else ""),
        flush=True,
      )
  return {"model": {"workdir": cfg.workdir, "steps": trained.step}, "copy_probe": probe, "rows": rows}


def plot(results: dict, out: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for name in dict.fromkeys(r["policy"] for r in results["rows"]):
    pts = [r for r in results["rows"] if r["policy"] == name]
    ax.plot([r["distance"] for r in pts], [r["recall"] for r in pts], marker="o", label=name)
  ax.set_xscale("log")
  ax.set_xlabel("distance from needle to recall (bytes)")
  ax.set_ylabel("recall (value bytes with p > 0.5)")
  ax.set_title(f"needle in a stream, budget {results['args']['budget']} tokens")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "recall.png", dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jstream bench needle", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/bench_needle", help="output folder")
  parser.add_argument("--quick", action="store_true", help="the quick model, short distances, few trials")
  parser.add_argument(
    "--config",
    default=str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "lm_tiny.py") + ":needle",
    help="the training run of the model (default: configs/lm_tiny.py:needle; --quick adds the quick flag)",
  )
  parser.add_argument("--budget", type=int, default=128, help="KV tokens kept per layer and kv head")
  parser.add_argument("--distances", default="32,128,512,2048", help="bytes between the needle and its recall")
  parser.add_argument("--trials", type=int, default=16, help="streams per (policy, distance)")
  parser.add_argument("--chunk", type=int, default=16, help="tokens per step")
  parser.add_argument("--policies", default="dense,sinkwindow,h2o,snapkv,agenorm")
  parser.add_argument("--text-bytes", type=int, default=100_000, help="held-out text the filler is cut from")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args = parser.parse_args(argv)
  args.distances = [int(d) for d in str(args.distances).split(",") if d]
  args.policies = [p for p in args.policies.split(",") if p]
  if args.quick:
    args.distances = [min(args.distances)]
    args.budget, args.trials, args.text_bytes = min(args.budget, 24), min(args.trials, 2), min(args.text_bytes, 6000)
  unknown = set(args.policies) - set(_policies(8, 16))
  if unknown:
    parser.error(f"unknown policies {sorted(unknown)}; choose from {sorted(_policies(8, 16))}")
  if args.budget < 12:
    parser.error("--budget must be >= 12 (4 sinks + a recent window of half the budget + scored slots)")
  import jax

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = device_line()
  print(f"bench_needle on {device}, jax {jax.__version__}")
  t0 = time.time()
  res = run(args)
  res.update(device=device, jax=jax.__version__, args=vars(args), seconds=time.time() - t0)
  (out / "results.json").write_text(json.dumps(res, indent=2))
  plot(res, out)
  print(f"wrote {out / 'results.json'}, {out / 'recall.png'} ({res['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
