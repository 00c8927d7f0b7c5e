"""Training that matches streaming inference: a learned sink token, the inference mask, overlapped chunks.

Each is a switch of ``TrainConfig`` and acts on a batch of token windows ``[b, L + 1]`` (inputs and their next
tokens):

* ``sink_token`` (StreamingLLM section 3.3): a dedicated token, id ``vocab_size - 1``, is prepended to every
  sample, so that the model learns to park surplus attention on it; at inference the stream starts with it and a
  single sink slot keeps it.
* ``train_window`` / ``train_sinks``: the model is trained under the sink + window mask that the cache policy
  imposes at inference (``model.forward(..., window=, num_sinks=)``), instead of full causal attention.
* ``overlap`` (StreamingVLM): samples are overlapping chunks of a long stream; a sample's first ``overlap`` tokens
  repeat the end of the previous chunk and are attended with full attention but excluded from the loss, so each
  token is learnt once, with context.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jstream.train.config import TrainConfig
from jstream.typing import Array


def make_example(cfg: TrainConfig, tokens: Array) -> tuple[Array, Array, Array]:
  """``tokens [b, L + 1] -> (inputs, targets, loss_mask)``, each ``[b, L]`` (``[b, L + 1]`` with a sink token)."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = jnp.ones(targets.shape, bool)
  if cfg.overlap:
    mask = mask.at[:, : cfg.overlap].set(False)
  if cfg.sink_token:
    b = tokens.shape[0]
    sink = jnp.full((b, 1), cfg.sink_id, tokens.dtype)
    inputs = jnp.concatenate([sink, inputs], axis=1)
    targets = jnp.concatenate([tokens[:, :1], targets], axis=1)
    first = jnp.full((b, 1), cfg.overlap == 0)  # with overlap, the first real token is context too
    mask = jnp.concatenate([first, mask], axis=1)
  return inputs, targets, mask


def forward_mask(cfg: TrainConfig) -> dict:
  """Keyword arguments of ``model.forward`` (text) or ``VideoLM.training_outputs`` (video QA) for the training
  mask (one mask for the whole batch: see ``forward_masks`` for ``train_positions="mixed"``)."""
  if cfg.train_positions == "mixed":
    raise ValueError("a train_positions='mixed' run has one mask per half batch: use forward_masks")
  if cfg.data == "video_qa" and cfg.train_window is not None:
    return {"policy": video_policy(cfg.train_window, cfg.train_sinks, cfg.train_positions)}
  if cfg.data == "video_qa" and cfg.train_positions != "absolute":  # full attention at the tracks' own positions
    from jstream import cache as C

    return {"policy": C.Segmented((C.Dense(_UNBOUNDED), C.Dense(_UNBOUNDED)), positions=cfg.train_positions)}
  if cfg.train_window is None:
    return {}
  sinks = cfg.train_sinks + (1 if cfg.sink_token else 0)
  return dict(window=cfg.train_window, num_sinks=sinks)


def forward_masks(cfg: TrainConfig) -> tuple[dict, ...]:
  """``forward_mask`` per group of a batch's rows, in order: one group, or for ``train_positions="mixed"`` the
  first half of the rows at ``absolute`` positions and the second at ``cache_relative`` ones."""
  if cfg.train_positions == "mixed":
    return tuple(forward_mask(dataclasses.replace(cfg, train_positions=p)) for p in ("absolute", "cache_relative"))
  return (forward_mask(cfg),)


_UNBOUNDED = 2**30  # a Dense track's capacity in an offline mask (which allocates nothing)


def video_policy(window: int, sinks: int = 0, positions: str = "absolute"):
  """The bounded video-QA cache policy with ``window`` tokens per track and ``sinks`` text sinks (inside the text
  window): ``Segmented((SinkWindow(sinks, window - sinks), Window(window)), positions=positions)``, or ``Window``
  text without sinks."""
  from jstream import cache as C

  text = C.SinkWindow(sinks, window - sinks) if sinks else C.Window(window)
  return C.Segmented((text, C.Window(window)), positions=positions)
