"""Local datasets as TFDS builders (array_record, no TensorFlow) and grain pipelines; nothing is downloaded.

* ``text``: byte-level text (the stdlib's ``.py`` files + pydoc topics, or any local files), split by file;
  ``text_dataset`` yields int32 ``[batch, seq_len]`` windows, ``heldout_stream`` one long int32 stream.
* ``digits``: moving-digit videos from scikit-learn's bundled digits; ``digits_dataset`` yields ``[batch, T, H, W]``.
* ``cartpole``: gymnasium CartPole-v1 episodes (real simulator and renderer, grey frames on black) with the actions
  that drove them; ``cartpole_dataset`` yields clips ``{"frames": [batch, T, H, W], "actions": [batch, T]}`` and
  ``simulate_cartpole`` replays the simulator under any action sequence.

Pipelines are ``grain.IterDataset``s: deterministic given the seed, and resumable from ``iterator.get_state()`` (a
JSON-able dict) with ``iter(ds).set_state(state)``. Builders live under ``data_dir`` (argument, else
``$JSTREAM_DATA_DIR``, else ``~/.cache/jstream/tfds``) and are built once, on first use.

All three datasets subclass ``jstream.data.base.LocalBuilder`` / ``LocalConfig``, whose docstring shows how to add one.
"""

from jstream.data.base import LocalBuilder, LocalConfig, finish_pipeline, resolve_data_dir
from jstream.data.cartpole import (
  CartPoleConfig,
  JstreamCartPole,
  cartpole_builder,
  cartpole_config,
  cartpole_dataset,
  make_episode,
  simulate_cartpole,
)
from jstream.data.digits import (
  DigitsConfig,
  JstreamMovingDigits,
  digits_builder,
  digits_config,
  digits_dataset,
  make_clip,
)
from jstream.data.text import (
  SEPARATOR,
  JstreamText,
  TextConfig,
  heldout_stream,
  split_bytes,
  text_builder,
  text_config,
  text_dataset,
)

__all__ = [
  "SEPARATOR",
  "CartPoleConfig",
  "DigitsConfig",
  "JstreamCartPole",
  "JstreamMovingDigits",
  "JstreamText",
  "LocalBuilder",
  "LocalConfig",
  "TextConfig",
  "cartpole_builder",
  "cartpole_config",
  "cartpole_dataset",
  "digits_builder",
  "digits_config",
  "digits_dataset",
  "finish_pipeline",
  "heldout_stream",
  "make_clip",
  "make_episode",
  "resolve_data_dir",
  "simulate_cartpole",
  "split_bytes",
  "text_builder",
  "text_config",
  "text_dataset",
]
