"""How often the target accepts each draft, measured on many rows instead of inside speculative decoding.

  python -m experiments.draft_acceptance [--drafts draft,distilled,onpolicy] [--rows 64] [--prompt-len 32]
      [--tokens 256] [--quick] [--out DIR]

The acceptance rate of speculative sampling at a position is ``sum_x min(p(x), q(x))`` for the target's and the
draft's next-token distributions there, and the text before the position is the target's own output (accepted
drafts and resampled tokens follow the target's distribution exactly). So the rate a draft will get is the mean of
``sum min(p, q)`` over text the target writes: this script continues ``--rows`` held-out corpus prompts with the
target's samples (temperature 1; ``jstream.train.loop.continue_rows``) and, for the greedy case, with its argmax
continuations, then scores every draft on every continued position in one forward pass each. Each row is an
independent sample, so the spread over rows gives a standard error: what the benchmark's in-loop estimate (one
128-token row at batch 1) lacks. The same on the corpus' own held-out text shows how far each draft's training
text is from the target's. The models are ``configs/speculative.py``'s runs (trained if missing, as
``bench_speculative`` does). Prints a table; writes ``acceptance.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from experiments.machine import machine


def sum_min(target_logits, draft_logits, temperature: float):
  """Per position: ``sum min(p, q)`` at ``temperature`` (> 0; ``jstream.train.losses.acceptance``), or argmax
  agreement (0)."""
  import jax.numpy as jnp

  from jstream.train.losses import acceptance

  if temperature == 0:
    return (jnp.argmax(target_logits, -1) == jnp.argmax(draft_logits, -1)).astype(jnp.float32)
  return acceptance(jnp.asarray(target_logits), jnp.asarray(draft_logits), temperature)


def run(args) -> dict:
  import jax
  import jax.numpy as jnp

  from jstream.train import heldout_tokens, load_config, train
  from jstream.train.loop import continue_rows

  suffix = ",quick" if args.quick else ""
  drafts = [d for d in args.drafts.split(",") if d]
  models = {}
  for role in ["target", *drafts]:
    cfg = load_config(f"{args.config}:{role}{suffix}")
    res = train(cfg, progress=False)
    models[role] = (res.model, cfg, res.step)
  target = models["target"][0]
  n = args.prompt_len + args.tokens
  stream, _ = heldout_tokens(models["target"][1], args.rows * n + 1)
  corpus = jnp.asarray(stream[: args.rows * n].reshape(args.rows, n), jnp.int32)
  texts = {
    "target samples, T = 1": (continue_rows(target, corpus, args.prompt_len, jax.random.key(args.seed), 1.0), 1.0),
    "target greedy, T = 0": (continue_rows(target, corpus, args.prompt_len, jax.random.key(args.seed), 0.0), 0.0),
    "corpus text, T = 1": (corpus, 1.0),
  }
  rows = []
  for text_name, (text, temp) in texts.items():
    inputs = text[:, :-1]
    p_logits = target.forward(inputs)[:, args.prompt_len - 1 :]  # the positions that predict continued tokens
    for name in drafts:
      q_logits = models[name][0].forward(inputs)[:, args.prompt_len - 1 :]
      per_row = np.asarray(sum_min(p_logits, q_logits, temp).mean(-1))
      mean, se = float(per_row.mean()), float(per_row.std(ddof=1) / np.sqrt(len(per_row)))
      rows.append(dict(text=text_name, temperature=temp, draft=name, acceptance=mean, standard_error=se))
      print(f"{text_name:24s} {name:14s} {mean:.4f} +- {se:.4f}")
  info = {r: dict(workdir=m[1].workdir, steps=m[2]) for r, m in models.items()}
  return dict(models=info, rows_of_text=args.rows, prompt_len=args.prompt_len, tokens=args.tokens, rows=rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="draft_acceptance", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/speculative.py")
  parser.add_argument("--drafts", default="draft,distilled,onpolicy")
  parser.add_argument("--rows", type=int, default=64, help="independent rows of text")
  parser.add_argument("--prompt-len", type=int, default=32, help="corpus bytes before the continuation")
  parser.add_argument("--tokens", type=int, default=256, help="continued tokens per row")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="the quick runs, 4 rows of 16 tokens")
  parser.add_argument("--out", default="runs/draft_acceptance")
  args = parser.parse_args(argv)
  if args.rows < 2 or args.prompt_len < 1 or args.tokens < 1:
    parser.error("--rows must be >= 2, --prompt-len and --tokens >= 1")
  if args.quick:
    args.rows, args.prompt_len, args.tokens = 4, 8, 16
  if not pathlib.Path(args.config).exists():
    args.config = str(pathlib.Path(__file__).resolve().parent.parent / args.config)
  t0 = time.time()
  result = run(args)
  result["seconds"] = time.time() - t0  # training included where a run was missing or unfinished
  result["machine"] = machine()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "acceptance.json").write_text(json.dumps(result, indent=2))
  print(f"wrote {out / 'acceptance.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
