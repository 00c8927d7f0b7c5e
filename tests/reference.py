"""A slow, independent float64 reference for streaming: a Python loop over tokens with explicit lists of
un-rotated keys and values per layer and per cache track, and RoPE positions re-indexed by hand.

It knows the policies only by their definitions (which tokens a query sees, which positions they get), not by
jstream's slots, rings, segments or RoPE frames.
"""

from __future__ import annotations

import numpy as np
from flax import nnx


def _params(model):
  flat = {
    tuple(str(p) for p in path): np.asarray(v.get_value(), np.float64)
    for path, v in nnx.to_flat_state(nnx.state(model))
  }
  cfg = model.config

  def layer(i):
    out = {}
    for path, v in flat.items():
      if path[0] != "blocks":
        continue
      if cfg.scan_layers:
        out[path[1:]] = v[i]
      elif path[1] == str(i):
        out[path[2:]] = v
    return out

  return flat, [layer(i) for i in range(cfg.num_layers)]


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x, pos, base):
  h = x.shape[-1]
  inv = base ** (-np.arange(0, h, 2, dtype=np.float64) / h)
  ang = pos * inv
  c, s = np.cos(ang), np.sin(ang)
  x1, x2 = x[..., : h // 2], x[..., h // 2 :]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _qkv(x, p, cfg):
  """One layer's ``q [r, n, h]``, ``k, v [r, k, h]`` (before RoPE) of inputs ``x [r, d]``."""
  n_h, k_h, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  qkv = _rms(x, p[("attn_norm", "scale")], cfg.norm_eps) @ p[("attn", "qkv_proj", "kernel")]
  q = qkv[:, : n_h * hd].reshape(-1, n_h, hd)
  k = qkv[:, n_h * hd : (n_h + k_h) * hd].reshape(-1, k_h, hd)
  return q, k, qkv[:, (n_h + k_h) * hd :].reshape(-1, k_h, hd)


def _mlp_residual(x, p, cfg):
  h = _rms(x, p[("mlp_norm", "scale")], cfg.norm_eps)
  gu = h @ p[("mlp", "gate_up", "kernel")]
  gate, up = gu[:, : cfg.mlp_dim], gu[:, cfg.mlp_dim :]
  return x + (gate / (1 + np.exp(-gate)) * up) @ p[("mlp", "down", "kernel")]


def stream_logits(model, tokens, tracks, segment_ids=None, positions="absolute", start=0, groups=None):
  """Logits ``[n, v]`` of one stream, group by group (a token is a group of its own unless ``groups`` says).

  Args:
    model: a StreamingTransformer.
    tokens: ``[n]`` ids.
    tracks: per segment id, ``(num_sinks, window)`` (window None = keep everything).
    segment_ids: ``[n]`` segment of each token (default all 0).
    positions: "absolute" (RoPE at stream positions: ``start`` plus the number of groups before) or
      "cache_relative" (each track's retained keys re-indexed 0..r-1 in stream order, sinks first, every key of a
      group at the index of the group's last key, a sink key at most at the last sink's; a query sits at the index
      of its track's latest key).
    groups: ``[n]`` group ids: consecutive tokens with one id >= 0 are a group (one track): they share a position
      and each sees what the last of them sees.
  """
  cfg = model.config
  flat, layers = _params(model)
  emb = flat[("embed", "embedding")]
  n_h, k_h, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  g = n_h // k_h
  n = len(tokens)
  segment_ids = np.zeros(n, int) if segment_ids is None else np.asarray(segment_ids)
  groups = np.full(n, -1) if groups is None else np.asarray(groups)
  runs = []
  for i in range(n):
    if runs and groups[i] >= 0 and groups[i] == groups[i - 1]:
      runs[-1].append(i)
    else:
      runs.append([i])
  mem = [[[] for _ in tracks] for _ in layers]  # per layer, per track: (track_idx, stream_pos, k, v, run)
  counts = [0] * len(tracks)
  out = [None] * n
  for run_no, run in enumerate(runs):
    m_run = int(segment_ids[run[0]])
    my_idx = list(range(counts[m_run], counts[m_run] + len(run)))
    counts[m_run] += len(run)
    pos = start + run_no
    x = emb[np.asarray(tokens)[run]]  # [r, d]
    for li, p in enumerate(layers):
      q, k, v = _qkv(x, p, cfg)
      for j in range(len(run)):
        mem[li][m_run].append((my_idx[j], pos, k[j], v[j], run_no))
      scores, values = [[] for _ in run], [[] for _ in run]
      for m, (sinks, window) in enumerate(tracks):
        entries = mem[li][m]
        if not entries:
          continue
        latest = entries[-1][0]
        vis = [e for e in entries if window is None or e[0] < sinks or latest - e[0] < window]
        if positions == "absolute":
          qpos, kpos = pos, [e[1] for e in vis]
        else:
          last_of_run = {e[4]: r for r, e in enumerate(vis)}
          kpos = [min(last_of_run[e[4]], sinks - 1) if e[0] < sinks else last_of_run[e[4]] for e in vis]
          qpos = len(vis) - 1
        for j in range(len(run)):
          qr = _rope(q[j], qpos, cfg.rope_base)
          for e, kp in zip(vis, kpos):
            kr = _rope(e[2], kp, cfg.rope_base)
            scores[j].append(np.array([qr[a] @ kr[a // g] for a in range(n_h)]) / np.sqrt(hd))
            values[j].append(np.array([e[3][a // g] for a in range(n_h)]))
      outs = []
      for j in range(len(run)):
        s = np.stack(scores[j])  # [keys, n]
        vals = np.stack(values[j])  # [keys, n, h]
        extra_logit, extra_val = None, None
        if cfg.learned_sink == "logit":
          extra_logit, extra_val = p[("attn", "sink_logit")], np.zeros((n_h, hd))
        elif cfg.learned_sink == "kv":
          sk, sv = np.repeat(p[("attn", "sink_k")], g, 0), np.repeat(p[("attn", "sink_v")], g, 0)
          extra_logit, extra_val = np.einsum("nh,nh->n", q[j], sk) / np.sqrt(hd), sv
        if extra_logit is not None:
          s = np.concatenate([s, extra_logit[None]], 0)
          vals = np.concatenate([vals, extra_val[None]], 0)
        w = np.exp(s - s.max(0))
        w /= w.sum(0)
        outs.append(np.einsum("kn,knh->nh", w, vals).reshape(-1))
      x = x + np.stack(outs) @ p[("attn", "o", "kernel")]
      x = _mlp_residual(x, p, cfg)
    x = _rms(x, flat[("final_norm", "scale")], cfg.norm_eps)
    logits = x @ emb.T if cfg.tie_embeddings else x @ flat[("lm_head", "kernel")]
    for j, i in enumerate(run):
      out[i] = logits[j]
  return np.stack(out)


def scored_stream_logits(
  model,
  tokens,
  chunks,
  *,
  budget,
  recent,
  num_sinks=0,
  score="accumulated",
  observation=None,
  kernel=1,
  pooling="max",
  positions="absolute",
):
  """Logits ``[n, v]`` of one stream under score-based eviction (H2O, SnapKV, age-normalised), chunk by chunk.

  The policies by their definition: per layer and kv head a list of kept tokens ``(index, k, v, score)`` in stream
  order; the chunk's queries see the kept tokens and the chunk causally (RoPE at stream positions, or at the index
  among the kept tokens for ``cache_relative``); the attention mass a key receives (summed over the queries and
  the group's query heads; SnapKV: the chunk's last ``observation`` queries only, then pooled over ``kernel``
  neighbours) is added to (or, SnapKV, replaces) its score; then the ``budget`` tokens of highest priority stay:
  the first ``num_sinks`` and the last ``recent`` tokens, then by score (``"mean"``: score / queries since the
  token arrived), earlier tokens first among equals.
  """
  cfg = model.config
  flat, layers = _params(model)
  emb = flat[("embed", "embedding")]
  n_h, k_h, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  g = n_h // k_h
  tokens = np.asarray(tokens)
  kept = [[[] for _ in range(k_h)] for _ in layers]  # [layer][head]: list of [idx, k, v, score]
  out, start = [], 0
  for size in chunks:
    ids = list(range(start, start + size))
    start += size
    count = ids[-1] + 1
    x = emb[tokens[ids]]
    for li, p in enumerate(layers):
      q, k, v = _qkv(x, p, cfg)
      o = np.zeros((size, n_h, hd))
      for head in range(k_h):
        cands = kept[li][head] + [[i, k[j, head], v[j, head], 0.0] for j, i in enumerate(ids)]
        held = len(kept[li][head])
        if positions == "absolute":
          kpos, qpos = [c[0] for c in cands], ids
        else:
          kpos, qpos = list(range(len(cands))), [held + j for j in range(size)]
        mass = np.zeros(len(cands))
        obs_mass = np.zeros(len(cands))
        for j, i in enumerate(ids):
          vis = [c for c in range(len(cands)) if cands[c][0] <= i]
          for a in range(head * g, (head + 1) * g):
            qr = _rope(q[j, a], qpos[j], cfg.rope_base)
            s = np.array([qr @ _rope(cands[c][1], kpos[c], cfg.rope_base) for c in vis]) / np.sqrt(hd)
            w = np.exp(s - s.max())
            w /= w.sum()
            o[j, a] = w @ np.stack([cands[c][2] for c in vis])
            mass[vis] += w
            if observation is not None and i >= count - observation:
              obs_mass[vis] += w
        if score == "observation":
          padded = np.pad(obs_mass, kernel // 2, constant_values=-np.inf if pooling == "max" else 0.0)
          win = np.lib.stride_tricks.sliding_window_view(padded, kernel)
          new = win.max(-1) if pooling == "max" else win.sum(-1) / kernel
        else:
          new = np.array([c[3] for c in cands]) + mass
        for c, val in zip(cands, new):
          c[3] = float(val)

        def priority(c, count=count):
          if c[0] < num_sinks or c[0] >= count - recent:
            return np.inf
          return c[3] / (count - c[0]) if score == "mean" else c[3]

        order = sorted(range(len(cands)), key=lambda c: (-priority(cands[c]), cands[c][0]))
        kept[li][head] = [cands[c] for c in sorted(order[:budget])]
      x = x + o.reshape(size, -1) @ p[("attn", "o", "kernel")]
      x = _mlp_residual(x, p, cfg)
    x = _rms(x, flat[("final_norm", "scale")], cfg.norm_eps)
    out.append(x @ emb.T if cfg.tie_embeddings else x @ flat[("lm_head", "kernel")])
  return np.concatenate(out)


def memory_stream_logits(
  model,
  tokens,
  chunks,
  *,
  window,
  num_sinks=0,
  kind="retrieval",
  block=1,
  top_k=1,
  store_blocks=1,
  slots=1,
  score="sum",
):
  """Logits ``[n, v]`` of one single-track stream under a sinks + window cache with a memory of the tokens that
  leave the window (``jstream.memory``), chunk by chunk, absolute positions, every query a reader.

  The memories by their definition, per layer and kv head: before a chunk's attention, every token that the chunk
  pushes out of the window (index ``<= last index of the chunk - window``, not a sink, not pushed out before) joins
  the memory in stream order. ``"retrieval"``: the ``r``-th such token goes to store slot ``r mod (block *
  store_blocks)``; block ``j`` is slots ``[j * block, (j + 1) * block)``; the chunk's mean rotated query (summed over
  the kv head's query heads) scores each non-empty block by its mean rotated key, and the ``top_k`` best blocks'
  tokens are attended. ``"compressed"``: a token opens a new slot while there are fewer than ``slots``, else joins
  the slot whose mean rotated key has the largest cosine with its rotated key (running means of key and value, count
  + 1, latest index); a slot is attended with ``log(count)`` added to its logit. ``"scored"``: a token joins the
  end of the list of entries with no mass; after the chunk's attention, each entry adds the attention weight every
  query head of its kv head gave it (the softmax over everything the query sees) to its score and the number of
  queries that saw it to its count of readers, and the ``slots`` entries of highest priority stay, in priority order
  (the score, or for ``score="mean"`` the score per reader; for ``score="last"`` an entry scores this chunk's
  mass only; a stable sort: of equal priorities, the one earlier in the list). A query at
  index ``i`` sees its window (``j <= i`` and ``i - j < window`` or ``j < num_sinks``) and memory entries of index
  ``<= i - window``. A learned sink (``TransformerConfig.learned_sink``) is one more key in every query's softmax,
  so the mass a scored entry receives is normalised over it too.
  """
  cfg = model.config
  flat, layers = _params(model)
  emb = flat[("embed", "embedding")]
  n_h, k_h, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  g = n_h // k_h
  rot = lambda x, i: _rope(x, i, cfg.rope_base)
  tokens = np.asarray(tokens)
  hist = [[] for _ in layers]  # per layer: (idx, k [k_h, hd] un-rotated, v)
  # per layer, per head: retrieval {slot: (idx, k_rot, v)}; compressed [[k_rot, v, count, idx], ...]
  memory = [[{} if kind == "retrieval" else [] for _ in range(k_h)] for _ in layers]
  pushed, out, start = num_sinks, [], 0  # tokens num_sinks .. pushed - 1 have joined the memory
  for size in chunks:
    ids = list(range(start, start + size))
    start += size
    gone = list(range(pushed, ids[-1] - window + 1))
    x = emb[tokens[ids]]
    for li, p in enumerate(layers):
      q, k, v = _qkv(x, p, cfg)
      for j, i in enumerate(ids):
        hist[li].append((i, k[j], v[j]))
      o = np.zeros((size, n_h, hd))
      for head in range(k_h):
        mem = memory[li][head]
        before = [(e[4], e[5]) for e in mem] if kind == "scored" else []
        for r, i in enumerate(gone, start=pushed - num_sinks):
          _, ki, vi = hist[li][i]
          kr = rot(ki[head], i)
          if kind == "retrieval":
            mem[r % (block * store_blocks)] = (i, kr, vi[head])
          elif kind == "scored":
            mem.append([kr, vi[head], 1.0, i, 0.0, 0.0])  # + score, readers
          elif len(mem) < slots:
            mem.append([kr, vi[head], 1.0, i])
          else:
            cos = [e[0] @ kr / (np.linalg.norm(e[0]) * np.linalg.norm(kr)) for e in mem]
            e = mem[int(np.argmax(cos))]
            e[2] += 1.0
            e[0] = e[0] + (kr - e[0]) / e[2]
            e[1] = e[1] + (vi[head] - e[1]) / e[2]
            e[3] = max(e[3], i)
        if kind == "retrieval":
          qm = sum(rot(q[j, a], i) for j, i in enumerate(ids) for a in range(head * g, (head + 1) * g)) / size
          scores = {}
          for blk in range(store_blocks):
            ents = [mem[s] for s in range(blk * block, (blk + 1) * block) if s in mem]
            if ents:
              scores[blk] = qm @ np.mean([e[1] for e in ents], axis=0)
          chosen = sorted(scores, key=lambda b_: -scores[b_])[:top_k]
          picked = [s for b_ in chosen for s in range(b_ * block, (b_ + 1) * block) if s in mem]
          entries = [(*mem[s], 1.0) for s in picked]
        else:  # compressed and scored entries: (idx, k_rot, v, count)
          entries = [(e[3], e[0], e[1], e[2]) for e in mem]
        for j, i in enumerate(ids):
          local = [(c, kk[head], vv[head]) for c, kk, vv in hist[li] if c <= i and (i - c < window or c < num_sinks)]
          seen = [m for m, e in enumerate(entries) if e[0] <= i - window]
          for m in seen:
            if kind == "scored":
              mem[m][5] += 1.0
          for a in range(head * g, (head + 1) * g):
            qr = rot(q[j, a], i)
            s = [qr @ rot(kk, c) / np.sqrt(hd) for c, kk, _ in local]
            s += [qr @ entries[m][1] / np.sqrt(hd) + np.log(entries[m][3]) for m in seen]
            vals = [vv for _, _, vv in local] + [entries[m][2] for m in seen]
            if cfg.learned_sink == "logit":  # a key of its own in the softmax, after the memory's
              s.append(p[("attn", "sink_logit")][a])
              vals.append(np.zeros(hd))
            elif cfg.learned_sink == "kv":  # matched against the un-rotated query
              s.append(q[j, a] @ p[("attn", "sink_k")][head] / np.sqrt(hd))
              vals.append(p[("attn", "sink_v")][head])
            s = np.array(s)
            w = np.exp(s - s.max())
            w /= w.sum()
            o[j, a] = w @ np.stack(vals)
            if kind == "scored":
              for m, wm in zip(seen, w[len(local) :]):
                mem[m][4] += wm
        if kind == "scored":
          for e, (old_score, _) in zip(mem, before + [(0.0, 0.0)] * (len(mem) - len(before))):
            if score == "last":  # its score is this chunk's mass
              e[4] -= old_score
          priority = [e[4] / max(e[5], 1.0) if score == "mean" else e[4] for e in mem]
          memory[li][head] = [mem[m] for m in sorted(range(len(mem)), key=lambda m: -priority[m])[:slots]]
      x = x + o.reshape(size, -1) @ p[("attn", "o", "kernel")]
      x = _mlp_residual(x, p, cfg)
    pushed += len(gone)
    x = _rms(x, flat[("final_norm", "scale")], cfg.norm_eps)
    out.append(x @ emb.T if cfg.tie_embeddings else x @ flat[("lm_head", "kernel")])
  return np.concatenate(out)
