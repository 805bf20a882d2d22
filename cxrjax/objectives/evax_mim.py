"""EVA-X / EVA-02 masked image modelling: regress a frozen teacher's patch features.

The student sees the image with ~40% of its patches replaced by a learned mask token
(block-wise masks), maps its final patch tokens through a linear head to the teacher's
width, and is trained to maximise cosine similarity with the frozen teacher's features of
the *unmasked* image at the masked positions only.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxrjax import checkpoint, models
from cxrjax.config_lib import ConfigError
from cxrjax.objectives import register

RANDOM_TEACHER = "random"


class MIMStudent(nnx.Module):
  """Encoder plus the linear head that predicts teacher features."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, target_width: int, *,
               rngs: nnx.Rngs):
    self.encoder = models.build(model_cfg, rngs=rngs)
    self.head = nnx.Linear(
        self.encoder.width, target_width, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.truncated_normal(0.02),
                                          ("embed", None)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, (None,)))

  def __call__(self, images, mask, *, train, rngs):
    patch = self.encoder(images, mask=mask, train=train, rngs=rngs)["patch"]
    return self.head(patch)


def masked_cosine_loss(pred: jax.Array, target: jax.Array, mask: jax.Array):
  """Mean (1 - cos) over masked positions; returns (loss, mean cosine)."""
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  cos = jnp.sum(_l2_normalize(pred) * _l2_normalize(target), axis=-1)   # [B, N]
  weight = mask.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  mean_cos = jnp.sum(cos * weight) / count
  return 1.0 - mean_cos, mean_cos


def _l2_normalize(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def resize_tokens(tokens: jax.Array, src_grid, dst_grid) -> jax.Array:
  """Bilinearly resamples [B, h*w, D] patch tokens to another grid (teacher != student)."""
  if tuple(src_grid) == tuple(dst_grid):
    return tokens
  b, _, d = tokens.shape
  grid = tokens.reshape(b, *src_grid, d)
  grid = jax.image.resize(grid, (b, *dst_grid, d), method="bilinear")
  return grid.reshape(b, -1, d)


@register("evax_mim")
class EvaxMIM:
  batch_keys = ("image", "mim_mask")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg = config.objective
    self._teacher_weights = None
    spec = self.cfg.teacher
    if spec == RANDOM_TEACHER:
      logging.warning(
          "EVA-X teacher: a RANDOMLY INITIALISED %s (config.objective.teacher='random', "
          "seed %d). This is a smoke-test choice, not the published recipe; set "
          "config.objective.teacher to a contrastive/DINOv2 cxrjax workdir[:step] or an "
          "imported checkpoint for real pretraining.",
          self.cfg.teacher_model.variant, self.cfg.teacher_seed)
      self.teacher_cfg = self.cfg.teacher_model
    else:
      self.teacher_cfg, self._teacher_weights = checkpoint.load_encoder(spec)
      logging.info("EVA-X teacher: %s from %s (frozen)", self.teacher_cfg.variant, spec)
    self.teacher_width = nnx.eval_shape(
        lambda: models.build(self.teacher_cfg, rngs=nnx.Rngs(0))).width

  @classmethod
  def validate(cls, config):
    cfg = config.objective
    if not cfg.teacher:
      raise ConfigError(
          "config.objective.teacher is empty: EVA-X regresses a frozen teacher's features. "
          "Set it to a cxrjax workdir[:step] (e.g. from configs/teacher_*.py or "
          "python -m cxrjax.convert), or to 'random' for a smoke test")
    if not 0.0 < cfg.mask_ratio < 1.0:
      raise ConfigError(f"config.objective.mask_ratio={cfg.mask_ratio} must be in (0, 1)")
    if not config.model.mask_token:
      raise ConfigError("config.model.mask_token=False, but the EVA-X student needs a "
                        "learned mask token; set config.model.mask_token=True")

  def preprocess(self) -> str:
    patch_size = int(self.config.model.variant.split("/")[1])
    return (f"block_mask({self.cfg.mask_ratio}, patch_size={patch_size}, "
            f"min_block={self.cfg.min_mask_block})")

  def build_model(self, rngs: nnx.Rngs) -> MIMStudent:
    return MIMStudent(self.config.model, self.teacher_width, rngs=rngs)

  def build_frozen(self, rngs: nnx.Rngs):
    seeded = nnx.Rngs(self.cfg.teacher_seed) if self._teacher_weights is None else rngs
    return models.build(self.teacher_cfg, rngs=seeded)

  def frozen_weights(self):
    return self._teacher_weights

  def loss(self, model: MIMStudent, teacher, batch, *, train: bool, rngs):
    images, mask = batch["image"], batch["mim_mask"]
    target = jax.lax.stop_gradient(teacher(images, train=False)["patch"])
    image_hw = images.shape[1:3]
    target = resize_tokens(target, teacher.grid_size(image_hw), model.encoder.grid_size(image_hw))
    pred = model(images, mask, train=train, rngs=rngs)
    loss, cosine = masked_cosine_loss(pred, target, mask)
    return loss, {"mim_cosine": cosine, "mask_ratio": mask.astype(jnp.float32).mean()}
