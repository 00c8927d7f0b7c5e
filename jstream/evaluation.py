"""Evaluating a model on a long stream under a cache policy, and the attention-sink ablation grid.

``evaluate_stream(model, tokens, policy, chunk=, segment=)`` streams one sequence through a fresh cache in timed
segments that carry the cache (``rollout.nll_segment``), so that the latency of every part of the stream is
measured, and returns a JSON-able dict. ``jstream eval-stream`` and ``experiments/streaming_llm.py`` (``jstream
demo``) both report through it.

Conventions
  * ``nll[p] = -log p(token p | tokens < p)``. Token 0 has no prediction, and neither do the first ``skip``
    tokens after it (``skip=1`` for a stream that starts with a learned sink token: the first text token is then
    predicted from the sink alone, which no other policy sees): perplexities average the rest.
  * Perplexities are ``exp(mean nll)``: over the whole stream (``ppl``), its second half (``ppl_last_half``), the
    first ``k`` tokens after the skipped ones for each ``k`` in ``prefixes`` (``ppl_first[str(k)]``, so that
    baselines run on a prefix only, such as dense attention or the recompute baseline, compare like for like),
    and over log-spaced position bins (``curve``).
  * Timing: the first segment compiles; it is then run again on a fresh cache, and its compile time
    (``compile_s``) is the difference. ``tokens_per_s`` and the per-segment ``latency`` exclude compilation.
    ``Recompute`` runs in segments of at most 256 tokens (it re-encodes its window for every token).
  * Memory: the cache's bytes (``cache_mib``), the process's RSS at the start and its peak during the evaluation
    (``peak_rss_scope`` says whether the peak could be scoped to the evaluation: Linux only).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import time
from collections.abc import Sequence

import jax
import numpy as np

from jstream import cache as C
from jstream import rollout
from jstream.checks import check_int
from jstream.models.lm import StreamingTransformer
from jstream.process_memory import reset_peak_rss, rss_mib, tree_bytes
from jstream.train.config import TrainConfig

RECOMPUTE_MAX_SEGMENT = 256  # Recompute re-encodes its window per token: short segments keep its latency readable


def evaluate_stream(
  model: StreamingTransformer,
  tokens: np.ndarray,
  policy: C.Policy,
  *,
  chunk: int,
  segment: int,
  skip: int = 0,
  bins: int = 12,
  prefixes: Sequence[int] = (),
) -> dict:
  """Streams ``tokens`` through ``model`` under ``policy`` (batch 1) and measures it.

  Args:
    model: a ``StreamingTransformer``.
    tokens: the stream: a 1-D int array of at least ``skip + 2`` token ids.
    policy: the cache policy (a fresh cache is made for the stream).
    chunk: tokens per step inside a segment (at most the policy's capacity).
    segment: tokens per timed segment, rounded down to a multiple of ``chunk`` (at least one chunk).
    skip: leading tokens without a comparable prediction beyond token 0 (see the module docstring).
    bins: number of log-spaced position bins of ``curve``.
    prefixes: prefix lengths ``k`` of ``ppl_first`` (those longer than the stream are left out).

  Returns:
    A dict with ``tokens``, ``ppl``, ``ppl_last_half``, ``ppl_first``, ``curve`` (``[{"from", "to", "ppl"}]``),
    ``tokens_per_s``, ``latency`` (``[{"from", "ms_per_token"}]`` per segment), ``compile_s``, ``cache_mib``,
    ``rss_start_mib``, ``peak_rss_mib`` and ``peak_rss_scope``.

  Raises:
    ValueError: ``tokens`` is not 1-D with at least ``skip + 2`` tokens, or an argument is out of range.
  """
  tokens = np.asarray(tokens)
  chunk, segment = check_int("chunk", chunk, 1), check_int("segment", segment, 1)
  skip, bins = check_int("skip", skip, 0), check_int("bins", bins, 1)
  prefixes = [check_int("prefixes[i]", k, 1) for k in prefixes]
  if tokens.ndim != 1 or len(tokens) < skip + 2:
    raise ValueError(f"tokens must be a 1-D stream of at least skip + 2 = {skip + 2} tokens, got {tokens.shape}")
  if chunk > policy.capacity:
    raise ValueError(f"chunk ({chunk}) exceeds the capacity of {policy} ({policy.capacity})")
  n = len(tokens)
  seg = max(chunk, min(segment, n) // chunk * chunk)
  if isinstance(policy, C.Recompute):
    seg = min(seg, RECOMPUTE_MAX_SEGMENT)
  padded = int(math.ceil(n / seg) * seg)
  toks = np.zeros((1, padded), np.int32)  # [b, t]
  toks[0, :n] = tokens
  segs = np.full((1, padded), -1, np.int32)  # padding is segment -1: neither attended nor cached
  segs[0, :n] = 0
  targets = np.full((1, padded), -1, np.int32)
  targets[0, : n - 1] = tokens[1:]

  gc.collect()
  scoped = reset_peak_rss()  # the peak below is this evaluation's (compilation included), not the process's
  rss_start = rss_mib()[0]
  cache = model.init_cache(policy, 1)
  pred = np.full(padded, np.nan)  # pred[p] = -log p(token p + 1 | tokens <= p)
  times = []  # (first position, tokens, seconds) per segment
  compile_s = None
  for i in range(0, padded, seg):
    sl = slice(i, i + seg)
    t0 = time.perf_counter()
    out, cache = rollout.nll_segment(
      model, toks[:, sl], targets[:, sl], cache, chunk_size=chunk, segment_ids=segs[:, sl]
    )
    pred[sl] = np.asarray(out)[0]
    dt = time.perf_counter() - t0
    if compile_s is None:  # the first segment compiled: run it again on a fresh cache for its steady-state time
      fresh = model.init_cache(policy, 1)
      t1 = time.perf_counter()
      _, fresh = rollout.nll_segment(
        model, toks[:, sl], targets[:, sl], fresh, chunk_size=chunk, segment_ids=segs[:, sl]
      )
      jax.block_until_ready(fresh)
      steady = time.perf_counter() - t1
      compile_s, dt = max(dt - steady, 0.0), steady
      del fresh
    times.append((i, min(seg, n - i), dt))

  nll = np.concatenate([[np.nan], pred[: n - 1]])
  nll[: skip + 1] = np.nan
  ppl = lambda x: float(np.exp(np.mean(x[np.isfinite(x)])))
  edges = np.unique(np.geomspace(max(skip + 2, 2), n, bins + 1).astype(int))
  curve = [
    {"from": int(lo), "to": int(hi), "ppl": ppl(nll[lo:hi])}
    for lo, hi in itertools.pairwise(edges)
    if np.isfinite(nll[lo:hi]).any()
  ]
  ppl_first = {
    str(k): ppl(nll[: k + skip]) for k in sorted(set(prefixes)) if k + skip <= n and np.isfinite(nll[: k + skip]).any()
  }
  seconds = sum(t for _, _, t in times)
  cache_bytes = tree_bytes(cache)
  return {
    "tokens": int(n),
    "ppl": ppl(nll),
    "ppl_last_half": ppl(nll[n // 2 :]),
    "ppl_first": ppl_first,
    "curve": curve,
    "tokens_per_s": float(n / seconds),
    "latency": [{"from": int(i), "ms_per_token": 1e3 * t / max(c, 1)} for i, c, t in times],
    "compile_s": float(compile_s or 0.0),
    "cache_mib": cache_bytes / 2**20,
    "rss_start_mib": rss_start,
    "peak_rss_mib": rss_mib()[1],
    "peak_rss_scope": "evaluation" if scoped else "process",
  }


@dataclasses.dataclass(frozen=True)
class SinkAblationConfig:
  """StreamingLLM's attention-sink ablation at small scale: two models, every policy of ``policies()``.

  ``configs/streaming_llm.py`` returns one; ``experiments/streaming_llm.py`` (``jstream demo``) trains both
  models and evaluates each under every policy with ``evaluate_stream``.

  Attributes:
    base: the model trained without a sink token; ``sink``: the same with a learned sink token.
    window: recent tokens kept by the bounded caches (StreamingLLM's cache size minus sinks).
    sink_counts: numbers of initial tokens kept.
    eval_tokens: held-out bytes streamed per policy.
    segment: tokens per timed segment; ``chunk``: tokens per step inside a segment.
    dense_tokens / recompute_tokens: prefix lengths for the O(n^2) dense and the recompute baseline (and the
      prefixes every policy's perplexity is also reported on).
    bins: number of log-spaced position bins for the perplexity curves.
  """

  base: TrainConfig
  sink: TrainConfig
  window: int = 128
  sink_counts: tuple[int, ...] = (1, 2, 4, 8)
  eval_tokens: int = 100_000
  segment: int = 4096
  chunk: int = 64
  dense_tokens: int = 4096
  recompute_tokens: int = 1024
  bins: int = 12

  def __post_init__(self):  # bad values fail here, before minutes of training
    for name in ("base", "sink"):
      if not isinstance(getattr(self, name), TrainConfig):
        raise TypeError(f"SinkAblationConfig.{name} must be a TrainConfig, got {type(getattr(self, name)).__name__}")
    for name in ("window", "eval_tokens", "segment", "chunk", "dense_tokens", "recompute_tokens", "bins"):
      check_int(f"SinkAblationConfig.{name}", getattr(self, name), 1)
    if not self.sink_counts:
      raise ValueError("SinkAblationConfig.sink_counts must name at least one sink count")
    for s in self.sink_counts:
      check_int("SinkAblationConfig.sink_counts[i]", s, 1)

  def policies(self) -> list[tuple[str, C.Policy, int]]:
    """``(name, policy, tokens)`` evaluated for each model: dense and the recompute baseline on a prefix; window
    only and every sink count + window on the whole stream, with cache-relative positions (and absolute positions
    for window only and for 4 sinks, or the first sink count)."""
    w, n = self.window, self.eval_tokens
    out = [
      (f"dense (first {self.dense_tokens})", C.Dense(self.dense_tokens + 1), self.dense_tokens),
      (f"window {w}, absolute", C.Window(w), n),
      (f"window {w}, cache-relative", C.Window(w, positions="cache_relative"), n),
    ]
    for s in self.sink_counts:
      out.append((f"{s} sinks + window {w}, cache-relative", C.SinkWindow(s, w, positions="cache_relative"), n))
    s_abs = 4 if 4 in self.sink_counts else self.sink_counts[0]
    out.append((f"{s_abs} sinks + window {w}, absolute", C.SinkWindow(s_abs, w), n))
    out.append((f"recompute window {w} (first {self.recompute_tokens})", C.Recompute(w), self.recompute_tokens))
    return out


__all__ = ["SinkAblationConfig", "evaluate_stream"]
