"""Masked autoencoder (MAE; CXRBase-style pretraining on radiographs).

facebookresearch/mae models_mae.py: a random 75% of the patches is removed; the encoder
sees only the visible patches (plus its cls/register tokens); a light decoder (512 wide,
8 blocks, 16 heads, fixed 2-D sin-cos positions) gets the encoded tokens with a shared
mask token at every removed position and predicts each patch's pixels; the loss is the
MSE on removed patches only, against per-patch normalised pixels (`norm_pix_loss`).

The mask comes from the data pipeline (`random_mask`, a fixed count per image), so the
visible sequence has a static length. The encoder is the ordinary cxrjax ViT, run block by
block on the gathered visible tokens; RoPE models are refused (their tables would have to
be gathered per token too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxrjax import models
from cxrjax.config_lib import ConfigError
from cxrjax.data import multiview  # registers random_mask
from cxrjax.models.layers import INIT_STD, dense_init, layer_norm, sincos_pos_embed, zeros_init
from cxrjax.models.vit import Block
from cxrjax.objectives import losses, register


class MAEDecoder(nnx.Module):
  def __init__(self, enc_width: int, num_prefix: int, patch_dim: int,
               cfg: ml_collections.ConfigDict, *, dtype: str, rngs: nnx.Rngs):
    width = cfg.decoder_width
    dtype = jnp.dtype(dtype)
    self.width, self.num_prefix, self.dtype = width, num_prefix, dtype
    self.embed = nnx.Linear(enc_width, width, rngs=rngs,
                            kernel_init=dense_init(("embed", "embed")),
                            bias_init=zeros_init(("embed",)))
    # MAE initialises the mask token with normal(std=0.02).
    self.mask_token = nnx.Param(dense_init((None, None, None))(rngs.params(), (1, 1, width)))
    self.blocks = nnx.List([
        Block(width, cfg.decoder_heads, mlp="gelu", mlp_hidden=int(width * cfg.decoder_mlp_ratio),
              sub_ln=False, qkv_bias=True, layerscale_init=0.0, drop_path=0.0,
              num_prefix_tokens=num_prefix, out_std=INIT_STD, eps=1e-6, dtype=dtype,
              param_dtype=jnp.float32, rngs=rngs)
        for _ in range(cfg.decoder_depth)])
    self.norm = layer_norm(width, "embed", eps=1e-6, dtype=dtype, param_dtype=jnp.float32,
                           rngs=rngs)
    self.pred = nnx.Linear(width, patch_dim, rngs=rngs, kernel_init=dense_init(("embed", None)),
                           bias_init=zeros_init((None,)))

  def __call__(self, tokens: jax.Array, keep_idx: jax.Array, grid: tuple[int, int]
               ) -> jax.Array:
    """tokens [B, prefix + n_keep, D_enc] -> pixel predictions [B, N, patch_dim]."""
    x = self.embed(tokens.astype(jnp.float32))
    prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
    batch, num = x.shape[0], grid[0] * grid[1]
    full = jnp.broadcast_to(self.mask_token[...], (batch, num, self.width))
    full = jax.vmap(lambda f, i, v: f.at[i].set(v))(full, keep_idx, visible)
    # Fixed sin-cos positions for the patches; prefix tokens get none (MAE: zeros for cls).
    full = full + jnp.asarray(sincos_pos_embed(grid, grid, self.width))
    x = jnp.concatenate([prefix, full], axis=1).astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    return self.pred(self.norm(x).astype(jnp.float32))[:, self.num_prefix:]


class MAEModel(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.encoder = models.build(config.model, rngs=rngs)
    patch_dim = self.encoder.patch_size ** 2 * self.encoder.in_chans
    self.decoder = MAEDecoder(self.encoder.width, self.encoder.num_prefix_tokens, patch_dim,
                              config.objective, dtype=config.model.dtype, rngs=rngs)

  def encode_visible(self, images: jax.Array, keep_idx: jax.Array, *, train: bool, rngs
                     ) -> jax.Array:
    """Runs the encoder on prefix tokens + the patches at keep_idx [B, n_keep]."""
    enc = self.encoder
    x, _ = enc.embed(images)  # pos-embed already added, as MAE adds it before masking
    prefix = enc.num_prefix_tokens
    visible = jnp.take_along_axis(x[:, prefix:], keep_idx[..., None], axis=1)
    x = jnp.concatenate([x[:, :prefix], visible], axis=1)
    for block in enc.blocks:
      key = rngs.dropout() if train and block.drop_path > 0 else None
      x = block(x, key=key)
    return enc.norm(x) if enc.norm is not None else enc.fc_norm(x)

  def __call__(self, images, keep_idx, *, train, rngs):
    grid = self.encoder.grid_size(images.shape[1:3])
    return self.decoder(self.encode_visible(images, keep_idx, train=train, rngs=rngs),
                        keep_idx, grid)


@register("mae")
class MAE:
  batch_keys = ("image", "mae_mask")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg = config.objective
    self.patch_size = int(config.model.variant.split("/")[1])

  @classmethod
  def validate(cls, config):
    cfg = config.objective
    if not 0.0 < cfg.mask_ratio < 1.0:
      raise ConfigError(f"config.objective.mask_ratio={cfg.mask_ratio} must be in (0, 1)")
    if config.model.rope:
      raise ConfigError("config.model.rope=True is not supported by objective 'mae' (the "
                        "encoder runs on a gathered subset of tokens); valid: rope=False")
    for key in ("decoder_width", "decoder_depth", "decoder_heads"):
      if cfg[key] <= 0:
        raise ConfigError(f"config.objective.{key}={cfg[key]} must be positive")
    if cfg.decoder_width % cfg.decoder_heads or cfg.decoder_width % 4:
      raise ConfigError(f"config.objective.decoder_width={cfg.decoder_width} must be "
                        f"divisible by decoder_heads={cfg.decoder_heads} and by 4 (sin-cos)")

  def preprocess(self) -> str:
    return f"random_mask({self.cfg.mask_ratio}, patch_size={self.patch_size})"

  def build_model(self, rngs: nnx.Rngs) -> MAEModel:
    return MAEModel(self.config, rngs=rngs)

  def build_frozen(self, rngs: nnx.Rngs):
    return None

  def frozen_weights(self):
    return None

  def loss(self, model: MAEModel, frozen, batch, *, train: bool, rngs):
    del frozen
    images, mask = batch["image"], batch["mae_mask"]
    num_patches = mask.shape[1]
    num_keep = multiview.mae_num_visible(num_patches, self.cfg.mask_ratio)
    # Stable sort puts the visible (False) patches first, in image order.
    keep_idx = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)[:, :num_keep]
    pred = model(images, keep_idx, train=train, rngs=rngs)
    loss = losses.mae_loss(pred, images, mask, self.patch_size, self.cfg.norm_pix_loss)
    return loss, {"mask_ratio": mask.astype(jnp.float32).mean()}


def mae_objective(**overrides) -> ml_collections.ConfigDict:
  """facebookresearch/mae defaults (mae_vit_*_dec512d8b, --mask_ratio 0.75 --norm_pix_loss)."""
  block = ml_collections.ConfigDict(dict(
      name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=512, decoder_depth=8,
      decoder_heads=16, decoder_mlp_ratio=4.0))
  block.update(overrides)
  return block

