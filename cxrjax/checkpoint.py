"""Orbax checkpoints: train state + Grain iterator + config + metadata, per step.

Layout: `workdir/checkpoints/<step>/{state,data,config,meta}`. Orbax writes each step into
a temporary directory and renames it when complete, so a step killed mid-save is never
seen as a checkpoint. The train state is a plain pytree of arrays (pure dicts from
`nnx.split`), so any cxrjax checkpoint can be read without the objective's code.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cxrjax.config_lib import ConfigError

ITEMS = ("state", "data", "config", "meta")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Periodic, async saving and resume for a binary's workdir."""

  def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict):
    self.cfg = ckpt_cfg
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.max_to_keep,
        keep_period=ckpt_cfg.keep_every_steps or None,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int, total_steps: int) -> bool:
    every = self.cfg.save_every_steps
    return step == total_steps or (every > 0 and step % every == 0)

  def save(self, step: int, state: Any, data_iterator, config: ml_collections.ConfigDict,
           meta: dict, metrics: dict | None = None, force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(config.to_dict()),
                 meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
    """Restores `state` onto the shardings given in `abstract_state` (any mesh shape)."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    saved = set(self.manager.item_metadata(step).keys()) if hasattr(
        self.manager, "item_metadata") else set()
    if data_iterator is not None and ("data" in saved or not saved):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored.state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def run_metadata(config: ml_collections.ConfigDict, mesh) -> dict:
  """What a later reader needs to interpret a checkpoint: versions, mesh, code revision."""
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import cxrjax  # pylint: disable=import-outside-toplevel
  try:
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    revision = None
  return {
      "cxrjax": cxrjax.__version__, "git_revision": revision,
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
      "orbax": ocp.__version__, "python": platform.python_version(),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "devices": jax.device_count(), "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "objective": config.objective.name, "model": config.model.to_dict(),
  }


# ----------------------------------------------------------------------------
# Reading another run's encoder (teachers, fine-tuning).
# ----------------------------------------------------------------------------


def parse_workdir_spec(spec: str) -> tuple[str, int | None]:
  """'path/to/workdir[:step]' -> (checkpoints dir, step or None for the latest)."""
  path, _, step = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise ConfigError(f"{spec!r}: no checkpoints directory at {directory}")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  if not steps:
    raise ConfigError(f"{spec!r}: {directory} holds no complete checkpoint")
  if step:
    if int(step) not in steps:
      raise ConfigError(f"{spec!r}: step {step} not found; available steps: {steps}")
    return directory, int(step)
  return directory, steps[-1]


def read_config(spec: str) -> tuple[ml_collections.ConfigDict, int]:
  directory, step = parse_workdir_spec(spec)
  with open(os.path.join(directory, str(step), "config", "metadata"), encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f)), step


def load_encoder(spec: str) -> tuple[ml_collections.ConfigDict, dict]:
  """Returns (model config, encoder params as a pure dict of host arrays) of a run.

  Only `state/params/encoder` is read (partial restore), not the optimizer state.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from cxrjax import models  # pylint: disable=import-outside-toplevel
  directory, step = parse_workdir_spec(spec)
  config, _ = read_config(spec)
  abstract = nnx.eval_shape(lambda: models.build(config.model, rngs=nnx.Rngs(0)))
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
  item = {"params": {"encoder": target}}
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), item)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
        os.path.join(directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                    partial_restore=True))
  except (ValueError, KeyError) as e:
    raise ConfigError(f"{spec!r} (step {step}): cannot read an encoder of model "
                      f"{config.model.variant}: {e}")
  logging.info("Loaded encoder %s (step %d) from %s", config.model.variant, step, directory)
  return config.model, restored["params"]["encoder"]
