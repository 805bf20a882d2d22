"""Optimizer pieces: weight-decay mask, schedules and duration parsing."""

import numpy as np
import pytest
from flax import nnx

from cxrjax import models, optim
from cxrjax.config_lib import ConfigError
from tiny import tiny_pretrain_config


def test_decay_mask_skips_norms_biases_and_embeddings():
  config = tiny_pretrain_config()
  model = nnx.eval_shape(lambda: models.build(config.model, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = optim.decay_mask(params)
  assert mask["pos_embed"] is False and mask["cls_token"] is False
  assert mask["mask_token"] is False
  block = mask["blocks"][0]
  assert block["attn"]["q"]["kernel"] is True and block["attn"]["q"]["bias"] is False
  assert block["norm1"]["scale"] is False
  assert mask["patch_embed"]["kernel"] is True


def test_warmup_cosine_schedule_shape():
  config = tiny_pretrain_config("--config.optim.lr=1e-3", "--config.schedule.warmup_steps=10",
                                "--config.schedule.min_lr_ratio=0.1")
  schedule = optim.make_schedule(config, total_steps=100, steps_per_epoch=10)
  lrs = np.array([schedule(s) for s in range(101)])
  assert lrs[0] == 0 and lrs[10] == pytest.approx(1e-3)
  assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) <= 1e-12)
  assert lrs[100] == pytest.approx(1e-4, rel=1e-3)


def test_durations_in_steps_or_epochs_not_both():
  config = tiny_pretrain_config()
  with config.unlocked():
    config.schedule.warmup_steps, config.schedule.warmup_epochs = 0, 2.5
  assert optim.steps_from(config.schedule, "warmup", steps_per_epoch=40) == 100
  with config.unlocked():
    config.schedule.warmup_steps = 3
  with pytest.raises(ConfigError, match="set only one of warmup_steps=3 and warmup_epochs=2.5"):
    optim.steps_from(config.schedule, "warmup", steps_per_epoch=40)
