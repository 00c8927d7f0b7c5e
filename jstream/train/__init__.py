"""Training: configs, optimizer, losses, streaming-aligned examples, checkpoints, the loop."""

from jstream.train.aligned import forward_mask, forward_masks, make_example
from jstream.train.checkpoint import Checkpointer, CheckpointError, ConfigMismatchError
from jstream.train.config import (
  DistillTask,
  DraftHeadsTask,
  TrainConfig,
  VideoGenTask,
  VideoTask,
  apply_overrides,
  load_config,
)
from jstream.train.loop import (
  TrainResult,
  TrainState,
  heldout_tokens,
  load_model,
  make_train_step,
  train,
  train_iterator,
)
from jstream.train.optim import make_optimizer, schedule

__all__ = [
  "CheckpointError",
  "Checkpointer",
  "ConfigMismatchError",
  "DistillTask",
  "DraftHeadsTask",
  "TrainConfig",
  "TrainResult",
  "TrainState",
  "VideoGenTask",
  "VideoTask",
  "apply_overrides",
  "forward_mask",
  "forward_masks",
  "heldout_tokens",
  "load_config",
  "load_model",
  "make_example",
  "make_optimizer",
  "make_train_step",
  "schedule",
  "train",
  "train_iterator",
]
