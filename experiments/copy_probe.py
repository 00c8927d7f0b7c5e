"""Can the byte LM's architecture learn to copy? An induction probe on random strings (issue 11's needle benchmark).

  python -m experiments.copy_probe [--quick] [--steps 1000] [--layers 2] [--batch 64] [--lr 1e-3] [--vocab 64]
      [--periods 8,48] [--length 128] --out DIR

The needle benchmark (``jstream bench needle``) can rank eviction policies only with a model that copies a value it
saw earlier, and no byte LM trained on the text corpus has learnt that so far (``benchmarks/RESULTS.md``). This
probe takes the text out: the model of ``presets.byte_lm`` (``--layers`` layers, width 128, 4 query / 2 kv heads,
RoPE) with a vocabulary of ``--vocab`` symbols trains on sequences of ``--length + 1`` tokens, each one random
string of a length drawn uniformly from ``--periods`` repeated to fill it, so that every token after the first
period is predictable by copying and only by content (the period varies, so attending a fixed distance back does
not work: an induction head is needed). AdamW at ``--lr`` (no weight decay, no schedule), batches of ``--batch``
sequences. Every ``--every`` steps it prints the training batch's mean loss over the positions from
``--periods``'s upper bound on (all repeats, ``repeat_nats``) and over the first string's (``first_nats``; log of
the vocabulary is chance), and writes ``DIR/results.json`` with the curve and the first step at which the repeats
cost under 0.1 nats.
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

from experiments.machine import device_line


def repeated_strings(
  rng: np.random.Generator, batch: int, length: int, vocab: int, periods: tuple[int, int]
) -> np.ndarray:
  """``[batch, length]`` int32: per row a random string of ``vocab`` symbols, its length uniform in ``periods``
  (inclusive), repeated (the last copy cut): ``jstream.data.text.repeated_string`` over the symbols ``0..vocab-1``."""
  from jstream.data.text import repeated_string

  lo, hi = periods
  if not 1 <= lo <= hi < length:
    raise ValueError(f"periods must satisfy 1 <= lo <= hi < length, got {periods} and length {length}")
  return np.stack([repeated_string(length, rng, periods, symbols=np.arange(vocab)) for _ in range(batch)])


def run(*, steps: int, layers: int, batch: int, lr: float, vocab: int, periods: tuple[int, int], length: int,
        every: int, seed: int) -> dict:  # fmt: skip
  import jstream
  from jstream import presets

  cfg = presets.byte_lm(vocab_size=vocab, num_layers=layers)
  model = jstream.StreamingTransformer(cfg, rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.0), wrt=nnx.Param)
  start = periods[1]  # from here on every target is a repeat

  @nnx.jit
  def step(model, opt, x):
    def loss_fn(model):
      logp = jax.nn.log_softmax(model.forward(x[:, :-1]).astype(jnp.float32))
      nll = -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]  # nll[:, i] predicts token i + 1
      return nll[:, start - 1 :].mean(), nll[:, : periods[0] - 1].mean()

    (repeat, first), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return repeat, first

  rng = np.random.default_rng(seed)
  curve, learnt_at, t0 = [], None, time.time()
  for i in range(1, steps + 1):
    repeat, first = step(model, opt, jnp.asarray(repeated_strings(rng, batch, length + 1, vocab, periods)))
    if i % every == 0 or i == steps:
      row = {"step": i, "repeat_nats": float(repeat), "first_nats": float(first), "seconds": time.time() - t0}
      curve.append(row)
      print(f"  step {i:>5}: repeats {row['repeat_nats']:.3f} nats, first string {row['first_nats']:.3f}", flush=True)
      if learnt_at is None and row["repeat_nats"] < 0.1:
        learnt_at = i
  return {"curve": curve, "learnt_at": learnt_at, "chance_nats": float(np.log(vocab))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--vocab", type=int, default=64)
  parser.add_argument("--periods", default="8,48", help="shortest and longest string, inclusive")
  parser.add_argument("--length", type=int, default=128, help="tokens per sequence (inputs)")
  parser.add_argument("--every", type=int, default=100, help="steps between logged points")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  periods = tuple(int(x) for x in args.periods.split(","))
  if len(periods) != 2:
    raise ValueError(f"--periods takes two numbers, got {args.periods!r}")
  if args.quick:
    args.steps, args.batch, args.length, args.every, periods = 4, 4, 32, 2, (4, 12)
  print(f"copy_probe on {device_line()}, jax {jax.__version__}: {args.layers} layers, batch {args.batch}, lr {args.lr}")
  kw = dict(steps=args.steps, layers=args.layers, batch=args.batch, lr=args.lr, vocab=args.vocab, periods=periods)
  result = {"args": vars(args), "device": device_line(), "jax": jax.__version__}
  result.update(run(**kw, length=args.length, every=args.every, seed=args.seed))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2))
  print(f"repeats under 0.1 nats from step {result['learnt_at']}; wrote {out / 'results.json'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
