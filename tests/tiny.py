"""Tiny configs shared by tests: depth-2, width-64 models on 32 px phantom images."""

import os

import jax
import numpy as np
from flax import nnx

from cxrjax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_pretrain_config(*overrides: str, evals: bool = False):
  """Quickstart shrunk to seconds: micro/8 student and teacher at 32 px, float32; without
  the quickstart's kNN evaluator unless evals=True."""
  argv = [f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}",
          "--config.model.variant=micro/8", "--config.objective.teacher_model.variant=micro/8",
          "--config.data.image_size=32", "--config.data.source_size=40",
          "--config.data.batch_size=8", "--config.data.num_examples=256",
          "--config.total_steps=4", "--config.log.every_steps=1",
          "--config.checkpoint.async_save=false", "--config.log.memory_analysis=false",
          "--config.objective.min_mask_block=4",
          *overrides]
  config, _ = config_lib.parse_command_line(argv, "test")
  if not evals:
    with config.unlocked():
      for name in list(config.evals):
        del config.evals[name]
  return config


def filled(build, seed: int = 0, std: float = 0.02) -> nnx.Module:
  """build() traced abstractly, its parameters drawn from numpy: N(0, std), norm scales 1.
  (Compiling random initialisers costs seconds per shape on CPU; numpy costs nothing.)"""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)

  def value(path, x):
    if path[-1].key == "scale":
      return np.ones(x.shape, x.dtype)
    return rng.normal(0.0, std, x.shape).astype(x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(state)))
