"""One configurable Vision Transformer: standard ViT (timm / DINOv2 / MAE) and EVA-02 / EVA-X.

Standard ViT: GELU MLP, q/k/v biases, cls token, learned pos-embed, pre-LN, final norm,
optional register tokens and LayerScale.

EVA-02 / EVA-X (hustvl/EVA-X `eva_x.py`, built on timm `Eva`):
  mlp='swiglu' (hidden = int(width * 4 * 2/3)), rope=True (2-D RoPE on the patch tokens of
  q and k), qkv_bias='qv' (q and v biases, no k bias), pool='mean' + fc_norm=True (no final
  norm; LayerNorm after mean pooling), learned pos-embed, cls token. EVA-X B additionally
  has sub_ln=True: a LayerNorm on the MLP hidden after the gate product (timm
  `scale_mlp=True`, EVA-02 `ffn_ln`); EVA-X Ti/S have none. The LayerNorm before the
  attention output projection (timm `scale_attn_inner`) is used only by EVA-CLIP towers,
  not by EVA-02 MIM or EVA-X models, and is not implemented.

Token layout: [cls?, registers..., patches...]; patches are row-major. The learned pos-embed
covers the cls token and the patches of the `img_size` grid; registers get none (DINOv2
with registers). Other input sizes resample the patch pos-embed bicubically and rescale the
RoPE / sin-cos coordinates onto the `img_size` grid, EVA-02 style.

Parameter names (for weight conversion): patch_embed.{kernel,bias}, cls_token, reg_tokens,
pos_embed, mask_token, blocks.<i>.{norm1, attn.{q,k,v,proj}, ls1.gamma, norm2,
mlp.{fc1, inner_norm, fc2} | mlp.{w1, w2, inner_norm, w3}, ls2.gamma}, norm, fc_norm.
patch_embed is a Dense on patches flattened in (ph, pw, C) order: a PyTorch conv weight
[D, C, ph, pw] becomes kernel = weight.transpose(2, 3, 1, 0).reshape(ph * pw * C, D).
q/k/v kernels are [embed, heads, kv] and proj [heads, kv, embed].
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from cxrjax.config_lib import ConfigError
from cxrjax.models import registry
from cxrjax.models.layers import (
    INIT_STD, Attention, LayerScale, Mlp, SwiGLU, dense_init, drop_path, layer_norm,
    resample_pos_embed, rope_sin_cos, sincos_pos_embed, zeros_init)


class Variant(NamedTuple):
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float  # for mlp='gelu'; mlp='swiglu' defaults to 2/3 of it


# Ti/S/B/L as in ViT/DeiT; g is DINOv2's ViT-g (1536/40/24). With mlp='swiglu' the default
# hidden is int(1536 * 4 * 2/3) = 4096, DINOv2 ViT-g's SwiGLU width; with 'gelu', 6144.
# micro and nano are CPU-sized for tests and the quickstart (not published models).
VARIANTS: dict[str, Variant] = {
    "micro": Variant(64, 2, 2, 4.0),
    "nano": Variant(128, 4, 2, 4.0),
    "Ti": Variant(192, 12, 3, 4.0),
    "S": Variant(384, 12, 6, 4.0),
    "B": Variant(768, 12, 12, 4.0),
    "L": Variant(1024, 24, 16, 4.0),
    "g": Variant(1536, 40, 24, 4.0),
}

CONFIG_KEYS = (
    "name", "variant", "img_size", "in_chans", "mlp", "mlp_ratio", "sub_ln", "rope",
    "qkv_bias", "class_token", "num_registers", "pos_embed", "layerscale_init", "pool",
    "fc_norm", "drop_path_rate", "dtype", "mask_token", "return_blocks", "norm_eps")
OPTIONAL_CONFIG_KEYS = ("drop_path_uniform",)

MLPS = ("gelu", "swiglu")
POOLS = ("cls", "mean")
POS_EMBEDS = ("learned", "sincos", "none")
QKV_BIASES = (True, False, "qv")
DTYPES = ("bfloat16", "float32")


def parse_variant(variant: str) -> tuple[Variant, int]:
  """'B/16' -> (VARIANTS['B'], 16)."""
  size, _, patch = str(variant).partition("/")
  if size not in VARIANTS or not patch.isdigit() or int(patch) <= 0:
    raise ConfigError(
        f"model.variant={variant!r} is invalid; expected '<size>/<patch>' with size one of "
        f"{', '.join(VARIANTS)} (e.g. 'B/16', 'S/14')")
  return VARIANTS[size], int(patch)


def default_mlp_ratio(mlp: str, gelu_ratio: float = 4.0) -> float:
  """EVA-02 keeps SwiGLU's parameter count near a GELU MLP's: ratio 4 * 2/3."""
  return gelu_ratio * 2 / 3 if mlp == "swiglu" else gelu_ratio


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
  # `is` for bools, so that 1 and 0 are not taken for True and False.
  if not any(value is c if isinstance(c, bool) else value == c for c in choices):
    raise ConfigError(f"model.{key}={value!r} is invalid; valid choices: "
                      f"{', '.join(map(repr, choices))}")


class Block(nnx.Module):
  """Pre-LN transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)), each
  residual branch dropped per sample with probability `drop_path` during training."""

  def __init__(self, dim: int, num_heads: int, *, mlp: str, mlp_hidden: int, sub_ln: bool,
               qkv_bias: bool | str, layerscale_init: float, drop_path: float,
               num_prefix_tokens: int, out_std: float, eps: float, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    self.drop_path = drop_path
    self.norm1 = layer_norm(dim, "embed", eps=eps, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
    self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias,
                          num_prefix_tokens=num_prefix_tokens, out_std=out_std,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ls1 = (LayerScale(dim, layerscale_init, param_dtype=param_dtype, rngs=rngs)
                if layerscale_init > 0 else None)
    self.norm2 = layer_norm(dim, "embed", eps=eps, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)
    mlp_cls = SwiGLU if mlp == "swiglu" else Mlp
    self.mlp = mlp_cls(dim, mlp_hidden, sub_ln=sub_ln, eps=eps, out_std=out_std,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ls2 = (LayerScale(dim, layerscale_init, param_dtype=param_dtype, rngs=rngs)
                if layerscale_init > 0 else None)

  def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
               key: jax.Array | None = None) -> jax.Array:
    """`key` (only passed when training with drop_path > 0) drives stochastic depth."""
    attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
    x = x + self._branch(self.attn(self.norm1(x), rope), self.ls1, attn_key)
    return x + self._branch(self.mlp(self.norm2(x)), self.ls2, mlp_key)

  def _branch(self, y: jax.Array, scale: LayerScale | None, key: jax.Array | None):
    if scale is not None:
      y = scale(y)
    if key is not None:
      y = drop_path(y, self.drop_path, key)
    return y


class VisionTransformer(nnx.Module):
  """Configurable ViT; see the module docstring for the standard and EVA-02 settings.

  Call: model(images [B, H, W, C], *, mask=None, train=False, rngs=None) -> dict of fp32:
    'cls'        [B, D]     pooled embedding: the cls token (pool='cls') or the mean of the
                            patch tokens (pool='mean'), through `norm`, or through `fc_norm`
                            when fc_norm=True (then applied after pooling, timm/EVA style).
    'patch'      [B, N, D]  patch tokens through `norm`; with fc_norm=True there is no final
                            norm, and fc_norm is applied per token (EVA-02's
                            forward_features(return_patch_tokens=True)).
    'cls_token'  [B, D]     (class_token) the cls token, normalised like 'patch'.
    'registers'  [B, R, D]  (num_registers > 0) register tokens, normalised like 'patch'.
    'blocks'     tuple of [B, T, D] raw outputs of the blocks in `return_blocks` (T counts
                            the prefix tokens), in the order given.
  `mask` [B, N] bool replaces the masked patch embeddings by `mask_token` before the
  pos-embed is added (masked image modelling). `rngs` needs a 'dropout' stream when
  train=True and drop_path_rate > 0; no RNG state lives in the module, so a train step stays
  a pure function of (params, batch, key).
  """

  def __init__(self, *, width: int, depth: int, num_heads: int, patch_size: int,
               img_size: int = 224, in_chans: int = 3, mlp: str = "gelu",
               mlp_ratio: float | None = None, sub_ln: bool = False, rope: bool = False,
               qkv_bias: bool | str = True, class_token: bool = True,
               num_registers: int = 0, pos_embed: str = "learned",
               layerscale_init: float = 0.0, pool: str = "cls", fc_norm: bool = False,
               drop_path_rate: float = 0.0, drop_path_uniform: bool = False,
               dtype: Any = "float32",
               param_dtype: Any = jnp.float32, mask_token: bool = False,
               return_blocks: Sequence[int] = (), norm_eps: float = 1e-6,
               rngs: nnx.Rngs):
    _check_choice("mlp", mlp, MLPS)
    _check_choice("pool", pool, POOLS)
    _check_choice("pos_embed", pos_embed, POS_EMBEDS)
    _check_choice("qkv_bias", qkv_bias, QKV_BIASES)
    _check_choice("dtype", dtype if isinstance(dtype, str) else jnp.dtype(dtype).name, DTYPES)
    if img_size <= 0 or img_size % patch_size:
      raise ConfigError(f"model.img_size={img_size!r} is invalid; it must be a positive "
                        f"multiple of the patch size {patch_size} (from model.variant)")
    if pool == "cls" and not class_token:
      raise ConfigError("model.pool='cls' needs model.class_token=True; valid choices "
                        "without a class token: model.pool='mean'")
    if width % num_heads:
      raise ConfigError(f"width {width} is not divisible by {num_heads} heads")
    if rope and (width // num_heads) % 4:
      raise ConfigError(f"model.rope=True needs a head dim divisible by 4, got "
                        f"{width // num_heads}")
    if pos_embed == "sincos" and width % 4:
      raise ConfigError(f"model.pos_embed='sincos' needs a width divisible by 4, got {width}")
    if mlp_ratio is not None and mlp_ratio <= 0:
      raise ConfigError(f"model.mlp_ratio={mlp_ratio!r} is invalid; use a positive float, "
                        "or None for the default (4.0 gelu, 4*2/3 swiglu)")
    if not 0.0 <= drop_path_rate < 1.0:
      raise ConfigError(f"model.drop_path_rate={drop_path_rate!r} must be in [0, 1)")
    if layerscale_init < 0:
      raise ConfigError(f"model.layerscale_init={layerscale_init!r} must be >= 0 (0 = off)")
    if num_registers < 0:
      raise ConfigError(f"model.num_registers={num_registers!r} must be >= 0")
    if norm_eps <= 0:
      raise ConfigError(f"model.norm_eps={norm_eps!r} must be > 0")
    if any(not isinstance(i, int) or not -depth <= i < depth for i in return_blocks):
      raise ConfigError(f"model.return_blocks={tuple(return_blocks)!r} is invalid; indices "
                        f"must be ints in [-{depth}, {depth}) for a depth-{depth} model")

    dtype = jnp.dtype(dtype)
    self.width, self.depth, self.num_heads = width, depth, num_heads
    self.head_dim = width // num_heads
    self.patch_size, self.img_size, self.in_chans = patch_size, img_size, in_chans
    self.ref_grid = (img_size // patch_size,) * 2
    self.num_registers = num_registers
    self.num_prefix_tokens = int(class_token) + num_registers
    self.pool, self.pos_embed_type, self.use_rope = pool, pos_embed, rope
    self.drop_path_rate = drop_path_rate
    self.return_blocks = tuple(i % depth for i in return_blocks)
    mlp_hidden = int(width * (mlp_ratio if mlp_ratio is not None else default_mlp_ratio(mlp)))
    num_patches = self.ref_grid[0] * self.ref_grid[1]

    def token(n: int) -> nnx.Param:
      return nnx.Param(dense_init((None, None, "embed"))(
          rngs.params(), (1, n, width), param_dtype))

    self.patch_embed = nnx.Linear(
        patch_size * patch_size * in_chans, width, dtype=dtype, param_dtype=param_dtype,
        kernel_init=dense_init(("patch", "embed")), bias_init=zeros_init(("embed",)),
        rngs=rngs)
    self.cls_token = token(1) if class_token else None
    self.reg_tokens = token(num_registers) if num_registers else None
    self.mask_token = token(1) if mask_token else None
    self.pos_embed = (token(int(class_token) + num_patches) if pos_embed == "learned"
                      else None)
    # Stochastic depth grows linearly from 0 at the first block to drop_path_rate, or is
    # drop_path_rate in every block (DINOv2's drop_path_uniform, used for ViT-L and up).
    rates = ([drop_path_rate] * depth if drop_path_uniform
             else [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)])
    self.blocks = nnx.List([
        Block(width, num_heads, mlp=mlp, mlp_hidden=mlp_hidden, sub_ln=sub_ln,
              qkv_bias=qkv_bias, layerscale_init=layerscale_init, drop_path=rates[i],
              num_prefix_tokens=self.num_prefix_tokens,
              # BEiT/EVA fix_init_weight: output projections scaled by 1/sqrt(2 * layer).
              out_std=INIT_STD / math.sqrt(2.0 * (i + 1)),
              eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for i in range(depth)])
    final_norm = layer_norm(width, "embed", eps=norm_eps, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.norm = None if fc_norm else final_norm
    self.fc_norm = final_norm if fc_norm else None

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs
                  ) -> "VisionTransformer":
    """Builds from the `config.model` block; every key in CONFIG_KEYS is required."""
    missing = [k for k in CONFIG_KEYS if k not in model_cfg]
    if missing:
      raise ConfigError(f"config.model lacks required key(s) "
                        f"{', '.join('model.' + k for k in missing)}")
    variant, patch_size = parse_variant(model_cfg["variant"])
    mlp_ratio = model_cfg["mlp_ratio"]
    if mlp_ratio is None:
      mlp_ratio = default_mlp_ratio(model_cfg["mlp"], variant.mlp_ratio)
    # Optional keys (added later; older checkpoints' configs lack them).
    optional = {k: model_cfg[k] for k in OPTIONAL_CONFIG_KEYS if k in model_cfg}
    return cls(
        width=variant.width, depth=variant.depth, num_heads=variant.num_heads,
        patch_size=patch_size, mlp_ratio=mlp_ratio, rngs=rngs, **optional,
        **{k: model_cfg[k] for k in CONFIG_KEYS
                      if k not in ("name", "variant", "mlp_ratio")})

  def grid_size(self, img_hw: Sequence[int]) -> tuple[int, int]:
    """Patch grid (rows, cols) for an image of size (H, W)."""
    h, w = (int(s) for s in img_hw)
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"image size {h}x{w} is not divisible by the patch size "
                       f"{self.patch_size}")
    return h // self.patch_size, w // self.patch_size

  def embed(self, images: jax.Array, mask: jax.Array | None = None
            ) -> tuple[jax.Array, tuple[int, int]]:
    """Images [B, H, W, C] -> (tokens [B, prefix + N, D] entering block 0, patch grid)."""
    if images.ndim != 4 or images.shape[-1] != self.in_chans:
      raise ValueError(f"expected images [B, H, W, {self.in_chans}], got {images.shape}")
    grid = self.grid_size(images.shape[1:3])
    x = einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)",
                         p=self.patch_size, q=self.patch_size)
    x = self.patch_embed(x)
    batch, num_patches, width = x.shape
    if mask is not None:
      if self.mask_token is None:
        raise ValueError("a mask was given but the model has no mask token; set "
                         "model.mask_token=True")
      if mask.shape != (batch, num_patches):
        raise ValueError(f"mask must be [B, N] = {(batch, num_patches)}, got {mask.shape}")
      x = jnp.where(jnp.asarray(mask, bool)[..., None],
                    self.mask_token[...].astype(x.dtype), x)

    cls = (None if self.cls_token is None
           else jnp.broadcast_to(self.cls_token[...], (batch, 1, width)))
    if self.pos_embed is not None:
      pos = self.pos_embed[...]
      n_cls = 0 if cls is None else 1
      x = x + resample_pos_embed(pos[:, n_cls:], self.ref_grid, grid).astype(x.dtype)
      if cls is not None:
        cls = cls + pos[:, :1]
    elif self.pos_embed_type == "sincos":
      x = x + jnp.asarray(sincos_pos_embed(grid, self.ref_grid, width), x.dtype)

    prefix = [] if cls is None else [cls.astype(x.dtype)]
    if self.reg_tokens is not None:
      prefix.append(jnp.broadcast_to(self.reg_tokens[...], (batch, self.num_registers, width))
                    .astype(x.dtype))
    return jnp.concatenate([*prefix, x], axis=1), grid

  def __call__(self, images: jax.Array, *, mask: jax.Array | None = None,
               train: bool = False, rngs: nnx.Rngs | None = None,
               perturb: Mapping[int, jax.Array] | None = None) -> dict[str, Any]:
    """Features of `images` [B, H, W, C].

    perturb: {block index: array like that block's output [B, prefix + N, D]} added to the
      block's output. Zeros change nothing; the gradient with respect to them is the
      gradient with respect to the block's tokens (Grad-CAM on any block).
    """
    if train and self.drop_path_rate > 0 and rngs is None:
      raise ValueError(
          f"train=True with drop_path_rate={self.drop_path_rate} needs "
          "rngs=nnx.Rngs(dropout=key) for stochastic depth")
    x, grid = self.embed(images, mask)
    rope = None
    if self.use_rope:
      sin, cos = rope_sin_cos(grid, self.ref_grid, self.head_dim)
      rope = (jnp.asarray(sin), jnp.asarray(cos))

    taken = {}
    for i, block in enumerate(self.blocks):
      key = rngs.dropout() if train and block.drop_path > 0 else None
      x = block(x, rope=rope, key=key)
      if perturb is not None and i in perturb:
        x = x + perturb[i].astype(x.dtype)
      if i in self.return_blocks:
        taken[i] = x

    prefix = self.num_prefix_tokens

    def pool(t: jax.Array) -> jax.Array:
      return t[:, 0] if self.pool == "cls" else _f32(t[:, prefix:]).mean(axis=1)

    if self.fc_norm is None:
      tokens = self.norm(x)
      pooled = pool(tokens)
    else:
      tokens = self.fc_norm(x)
      pooled = self.fc_norm(pool(x))
    out = {
        "cls": _f32(pooled),
        "patch": _f32(tokens[:, prefix:]),
        "blocks": tuple(_f32(taken[i]) for i in self.return_blocks),
    }
    if self.cls_token is not None:
      out["cls_token"] = _f32(tokens[:, 0])
    if self.reg_tokens is not None:
      out["registers"] = _f32(tokens[:, prefix - self.num_registers:prefix])
    return out


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


registry.register("vit")(VisionTransformer.from_config)
