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


def stream_logits(model, tokens, tracks, segment_ids=None, positions="absolute", start=0):
  """Logits ``[n, v]`` of one stream, token by token.

  Args:
    model: a StreamingTransformer.
    tokens: ``[n]`` ids.
    tracks: per segment id, ``(num_sinks, window)`` (window None = keep everything).
    segment_ids: ``[n]`` segment of each token (default all 0).
    positions: "absolute" (RoPE at stream positions ``start + i``) or "cache_relative" (each track's retained
      keys re-indexed 0..r-1 in stream order, sinks first; a query sits at the index of its track's latest token).
  """
  cfg = model.config
  flat, layers = _params(model)
  emb = flat[("embed", "embedding")]
  n_h, k_h, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  g = n_h // k_h
  segment_ids = np.zeros(len(tokens), int) if segment_ids is None else np.asarray(segment_ids)
  mem = [[[] for _ in tracks] for _ in layers]  # per layer, per track: (track_idx, stream_pos, k, v)
  counts = [0] * len(tracks)
  out = []
  for i, tok in enumerate(np.asarray(tokens)):
    m_tok = int(segment_ids[i])
    my_idx = counts[m_tok]
    counts[m_tok] += 1
    x = emb[tok]
    for li, p in enumerate(layers):
      h = _rms(x, p[("attn_norm", "scale")], cfg.norm_eps)
      qkv = h @ p[("attn", "qkv_proj", "kernel")]
      q = qkv[: n_h * hd].reshape(n_h, hd)
      k = qkv[n_h * hd : (n_h + k_h) * hd].reshape(k_h, hd)
      v = qkv[(n_h + k_h) * hd :].reshape(k_h, hd)
      mem[li][m_tok].append((my_idx, start + i, k, v))
      scores, values = [], []
      for m, (sinks, window) in enumerate(tracks):
        entries = mem[li][m]
        if not entries:
          continue
        latest = entries[-1][0]
        vis = [e for e in entries if window is None or e[0] < sinks or latest - e[0] < window]
        if positions == "absolute":
          qpos, kpos = start + i, [e[1] for e in vis]
        else:
          qpos, kpos = len(vis) - 1, list(range(len(vis)))
        qr = _rope(q, qpos, cfg.rope_base)
        for e, kp in zip(vis, kpos):
          kr = _rope(e[2], kp, cfg.rope_base)
          scores.append(np.array([qr[j] @ kr[j // g] for j in range(n_h)]) / np.sqrt(hd))
          values.append(np.array([e[3][j // g] for j in range(n_h)]))
      s = np.stack(scores)  # [keys, n]
      vals = np.stack(values)  # [keys, n, h]
      extra_logit, extra_val = None, None
      if cfg.learned_sink == "logit":
        extra_logit, extra_val = p[("attn", "sink_logit")], np.zeros((n_h, hd))
      elif cfg.learned_sink == "kv":
        sk, sv = np.repeat(p[("attn", "sink_k")], g, 0), np.repeat(p[("attn", "sink_v")], g, 0)
        extra_logit, extra_val = np.einsum("nh,nh->n", q, sk) / np.sqrt(hd), sv
      if extra_logit is not None:
        s = np.concatenate([s, extra_logit[None]], 0)
        vals = np.concatenate([vals, extra_val[None]], 0)
      w = np.exp(s - s.max(0))
      w /= w.sum(0)
      o = np.einsum("kn,knh->nh", w, vals).reshape(-1)
      x = x + o @ p[("attn", "o", "kernel")]
      h = _rms(x, p[("mlp_norm", "scale")], cfg.norm_eps)
      gu = h @ p[("mlp", "gate_up", "kernel")]
      gate, up = gu[: cfg.mlp_dim], gu[cfg.mlp_dim :]
      x = x + (gate / (1 + np.exp(-gate)) * up) @ p[("mlp", "down", "kernel")]
    x = _rms(x, flat[("final_norm", "scale")], cfg.norm_eps)
    out.append(x @ emb.T if cfg.tie_embeddings else x @ flat[("lm_head", "kernel")])
  return np.stack(out)
