"""Orbax checkpoints of a training run: parameters, optimizer state, step, data-iterator state and config.

``Checkpointer.restore_latest`` resumes from the newest checkpoint that restores; a truncated or corrupt newest
checkpoint is skipped with a warning and the previous one is used. A checkpoint written under a different config
(other than run-length and logging settings) is refused with an error that names the differing fields.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import warnings
from typing import Any

import orbax.checkpoint as ocp

from jstream.errors import CheckpointError, ConfigMismatchError
from jstream.train.config import TrainConfig

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption (the length of the run, how it is logged, the device
# mesh it is sharded over).
RESUMABLE_FIELDS = frozenset(
  {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "workdir", "mesh", "video.eval_window"}
)
"""Config fields (dotted below the top level) that do not change what a run trains: a checkpoint written under other
values resumes and is reused."""


__all__ = ["CheckpointError", "Checkpointer", "ConfigMismatchError", "saved_config", "saved_run"]


def _defaults(prefix: str) -> dict:
  """The JSON defaults of the config fields at ``prefix`` (``""``, ``"model."``, ``"video."``, ``"generation."``,
  ``"draft_heads."`` or ``"distill."``)."""
  from jstream.config import TransformerConfig
  from jstream.train.config import DistillTask, DraftHeadsTask, VideoGenTask, VideoTask

  classes = {"": TrainConfig, "model.": TransformerConfig, "video.": VideoTask, "generation.": VideoGenTask}
  cls = {**classes, "draft_heads.": DraftHeadsTask, "distill.": DistillTask}.get(prefix)
  out = {}
  for f in dataclasses.fields(cls) if cls is not None else ():
    if f.default is not dataclasses.MISSING:
      out[f.name] = json.loads(json.dumps(f.default))
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = json.loads(json.dumps(f.default_factory()))
  return out


def _differences(a: dict, b: dict, prefix="") -> list[str]:
  """Differences between the current config ``a`` and a checkpoint's ``b`` (JSON dicts). A field missing from the
  checkpoint counts as its default: a field added to the config after the checkpoint was written describes the
  same run while it keeps its default."""
  out = []
  defaults = _defaults(prefix)
  for key in sorted(set(a) | set(b)):
    if f"{prefix}{key}" in RESUMABLE_FIELDS:
      continue
    va, vb = a.get(key), b.get(key, defaults.get(key))
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _differences(va, vb, f"{prefix}{key}.")
    elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
      was = repr(vb) if key in b else f"{vb!r} (not recorded: the default)"
      out.append(f"{prefix}{key}: checkpoint {was} vs config {va!r}")
  return out


class Checkpointer:
  """Saves and restores ``{"state": pytree, "data": json, "config": json}`` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str | pathlib.Path, cfg: TrainConfig, *, keep: int | None = None):
    self.dir = pathlib.Path(workdir).absolute() / "checkpoints"
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or cfg.keep_checkpoints, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "data", "config"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(self.cfg.to_json())),
      ),
      force=True,
    )
    self.manager.wait_until_finished()

  def _check_config(self, step: int) -> None:
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    diffs = _differences(json.loads(self.cfg.to_json()), saved)
    if diffs:
      raise ConfigMismatchError(
        f"checkpoint {self.dir}/{step} was written with a different config: "
        + "; ".join(diffs)
        + " (use another workdir, or the config it was trained with)"
      )

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """``(step, state, data_state)`` of the newest checkpoint that restores, or None if there is none."""
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        self._check_config(step)  # a mismatch is an error; an unreadable config falls back like a bad state
        out = self.manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return step, out["state"], out["data"]
      except ConfigMismatchError:
        raise
      except Exception as e:  # a truncated or corrupt checkpoint: fall back to the previous one
        warnings.warn(
          f"checkpoint {self.dir}/{step} could not be restored ({type(e).__name__}: {str(e)[:200]}); "
          "falling back to the previous one",
          RuntimeWarning,
          stacklevel=2,
        )
    if steps:
      raise CheckpointError(f"none of the checkpoints in {self.dir} ({steps}) could be restored")
    return None

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state saved at ``step`` (config checked)."""
    self._check_config(step)
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

  def close(self) -> None:
    self.manager.close()


def saved_config(workdir: str | pathlib.Path) -> TrainConfig:
  """The config a run's newest checkpoint was written with, its ``workdir`` set to ``workdir`` (so that a run can be
  loaded from wherever it now lies), or a clear error when ``workdir`` holds no checkpoint."""
  return saved_run(workdir)[0]


def saved_run(workdir: str | pathlib.Path) -> tuple[TrainConfig, list[int]]:
  """``saved_config(workdir)`` and the steps of the run's checkpoints, oldest first."""
  path = pathlib.Path(workdir).absolute() / "checkpoints"
  manager = ocp.CheckpointManager(path, item_names=("state", "data", "config"))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {path} (train that run first)")
    saved = manager.restore(steps[-1], args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    manager.close()
  return dataclasses.replace(TrainConfig.from_dict(saved), workdir=str(workdir)), steps
