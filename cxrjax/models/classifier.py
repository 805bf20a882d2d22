"""Encoder + task head: the model of the fine-tuning and evaluation binaries.

`Classifier(model_cfg, head_cfg, num_classes)` holds `encoder` (the VisionTransformer of
any pretraining run; its params keep the names `checkpoint.load_encoder` returns) and
`head` (cxrjax/models/heads.py). It hands the head one feature dict:

  pooled [B,D]      the encoder's own pooled, normed output (cls or mean + fc_norm)
  cls_token [B,D]   normed class token (models with one)
  patch [B,N,D]     normed patch tokens of the last block
  blocks            outputs of the blocks the head asked for (heads.required_blocks),
                    each [B,P+N,D] passed through the encoder's final norm, as DINOv2's
                    get_intermediate_layers(norm=True) does for its linear evaluation
  num_prefix_tokens P (class token + registers), grid (h, w), image_hw (H, W)

`backbone_from(init_from, config)` reads the encoder of a pretraining (or imported) run and
resamples its learned position embedding to the fine-tuning resolution once, at load time
(EVA-X fine-tunes COVIDx at 480 px, CheXFound probes at 512 px).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cxrjax import checkpoint as ckpt_lib
from cxrjax.config_lib import ConfigError
from cxrjax.models import heads as heads_lib
from cxrjax.models import registry
from cxrjax.models.layers import resample_pos_embed
from cxrjax.models.vit import parse_variant

# Fine-tuning settings that replace the pretraining run's (the architecture stays its own).
FINETUNE_MODEL_KEYS = ("img_size", "drop_path_rate", "dtype")


class Classifier(nnx.Module):
  """`encoder` + `head`; `__call__` returns the head's output dict (at least `logits`)."""

  def __init__(self, model_cfg: Mapping[str, Any], head_cfg: ml_collections.ConfigDict,
               num_classes: int, *, rngs: nnx.Rngs, extra_blocks: tuple[int, ...] = ()):
    """extra_blocks: more block outputs to return, raw, in features()['raw_blocks'] (e.g.
    the block Grad-CAM explains); they do not change the parameters."""
    depth = parse_variant(model_cfg["variant"])[0].depth
    self.head_blocks = tuple(i % depth for i in heads_lib.required_blocks(head_cfg, depth))
    extra = tuple(i % depth for i in extra_blocks)
    model_cfg = dict(model_cfg, return_blocks=tuple(sorted(set(self.head_blocks + extra))))
    self.encoder = registry.build(model_cfg, rngs=rngs)
    self.head = heads_lib.build(head_cfg, num_classes=num_classes, width=self.encoder.width,
                                depth=depth, rngs=rngs)

  def features(self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None,
               perturb: Mapping[int, jax.Array] | None = None) -> dict[str, Any]:
    enc = self.encoder
    out = enc(images, train=train, rngs=rngs, perturb=perturb)
    final_norm = enc.norm if enc.norm is not None else enc.fc_norm
    raw = dict(zip(enc.return_blocks, out["blocks"]))
    feats = {
        "pooled": out["cls"],
        "patch": out["patch"],
        "blocks": tuple(final_norm(raw[i]).astype(jnp.float32) for i in self.head_blocks),
        "raw_blocks": raw,
        "num_prefix_tokens": enc.num_prefix_tokens,
        "grid": enc.grid_size(images.shape[1:3]),
        "image_hw": tuple(images.shape[1:3]),
    }
    if "cls_token" in out:
      feats["cls_token"] = out["cls_token"]
    return feats

  def __call__(self, images: jax.Array, *, train: bool = False, encoder_train: bool | None = None,
               rngs: nnx.Rngs | None = None, perturb: Mapping[int, jax.Array] | None = None
               ) -> dict[str, Any]:
    """encoder_train (default: train) turns off drop path for frozen-backbone probes."""
    encoder_train = train if encoder_train is None else encoder_train
    feats = self.features(images, train=encoder_train, rngs=rngs, perturb=perturb)
    return self.head(feats, train=train, rngs=rngs)


def finetune_model_config(source_model: Mapping[str, Any],
                          config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The pretraining run's architecture with the fine-tuning resolution/drop path/dtype."""
  model = dict(source_model)
  for key in FINETUNE_MODEL_KEYS:
    model[key] = config.model[key]
  model["return_blocks"] = ()
  return model


def resample_encoder_pos_embed(encoder: dict, model_cfg: Mapping[str, Any],
                               src_img_size: int, dst_img_size: int) -> dict:
  """Encoder params with the learned patch pos-embed resampled to another image size."""
  pos = encoder.get("pos_embed")
  if pos is None or src_img_size == dst_img_size:
    return encoder
  patch = parse_variant(model_cfg["variant"])[1]
  for size in (src_img_size, dst_img_size):
    if size % patch:
      raise ConfigError(f"image size {size} is not divisible by the patch size {patch} of "
                        f"{model_cfg['variant']}")
  n_cls = 1 if model_cfg.get("class_token", True) else 0
  src, dst = (src_img_size // patch,) * 2, (dst_img_size // patch,) * 2
  if pos.shape[1] != n_cls + src[0] * src[1]:
    raise ConfigError(f"pos_embed {pos.shape} does not fit a {src[0]}x{src[1]} grid with "
                      f"{n_cls} class token(s)")
  patches = np.asarray(resample_pos_embed(jnp.asarray(pos[:, n_cls:]), src, dst))
  logging.info("Resampled the position embedding from %dx%d to %dx%d patches", *src, *dst)
  return dict(encoder, pos_embed=np.concatenate([pos[:, :n_cls], patches], axis=1))


def backbone_from(init_from: str, config: ml_collections.ConfigDict
                  ) -> tuple[dict[str, Any], dict | None]:
  """(model config, encoder params or None) for `config.init_from`.

  init_from: a cxrjax workdir[:step] (pretraining run, or weights imported with
  `python -m cxrjax.convert`), or 'random' (config.model as given, random init: a baseline).
  """
  if init_from == "random":
    return dict(config.model, return_blocks=()), None
  if not init_from:
    raise ConfigError("config.init_from is empty: give a pretraining workdir[:step], an "
                      "imported checkpoint directory (python -m cxrjax.convert), or 'random' "
                      "for a randomly initialised baseline")
  source_model, encoder = ckpt_lib.load_encoder(init_from)
  model = finetune_model_config(source_model.to_dict(), config)
  encoder = resample_encoder_pos_embed(encoder, model, source_model.img_size, model["img_size"])
  return model, encoder
