"""Contrastive teacher stage of EVA-X, and an EVA-X MIM variant with an image-level term.

EVA-X's published tokenizer is an image-text contrastively trained ViT-B/16 (MGCA). This
objective trains such a teacher inside cxrjax, in one of two modes:

  image_text   CLIP: the image encoder and a small byte-level text encoder are trained
               with the symmetric InfoNCE loss on (image, report) pairs. Used when the
               dataset yields a `report` field (MIMIC-CXR).
  image_image  MoCo v3 (facebookresearch/moco-v3 moco/builder.py MoCo_ViT): two augmented
               views; the online encoder + 3-layer projector + 2-layer predictor predicts the
               momentum encoder's projection of the other view, InfoNCE over the batch,
               loss ctr(q1, k2) + ctr(q2, k1), each scaled by 2T. The momentum encoder is
               an EMA of the online one (0.99 -> 1 on a cosine, `--moco-m-cos`).
  auto         image_text when the first training example has a `report`, else image_image.

The temperature is fixed (MoCo v3 ViT: T=0.2) or learnable (`learnable_temperature=True`:
a CLIP logit scale, initialised to 1/temperature and clipped at 100). The run's
`params/encoder` is what `config.objective.teacher=<workdir>` of the EVA-X MIM objective
reads, so teacher -> MIM student runs end to end in cxrjax.

`evax_mim_contrastive` (below) is EVA-X MIM plus an optional image-level term: the
student's pooled feature of the masked image, through its own linear head, is matched to
the frozen teacher's pooled feature of the full image (InfoNCE over the batch, or cosine).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxrjax import models, optim
from cxrjax.config_lib import ConfigError
from cxrjax.data import multiview, pipeline  # multiview registers the view ops
from cxrjax.models.layers import Mlp, dense_init, layer_norm, zeros_init
from cxrjax.objectives import evax_mim, losses, register

MODES = ("auto", "image_image", "image_text")
MAX_LOGIT_SCALE = 100.0   # CLIP clips its learned logit scale at 100


def _check_views_not_normalised(config, name):
  pp = config.data.pp_train
  if "normalize" in pp or "random_resized_crop" in pp:
    raise ConfigError(
        f"config.data.pp_train={pp!r} crops/normalises, but objective {name!r} makes its own "
        "views from the decoded image (see config.objective); set config.data.pp_train='' "
        "(or decoding-only ops)")


# ----------------------------------------------------------------------------
# Heads.
# ----------------------------------------------------------------------------


def batch_norm(x: jax.Array, scale=None, bias=None, eps: float = 1e-5) -> jax.Array:
  """BatchNorm1d in training mode: statistics of this (global) batch, biased variance.

  MoCo v3 trains with SyncBatchNorm; under jit the batch axis is the global batch, so this
  is SyncBN. Running averages are not kept: only the encoder is used after pretraining.
  """
  x = x.astype(jnp.float32)
  mean = x.mean(axis=0, keepdims=True)
  var = jnp.mean((x - mean) ** 2, axis=0, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale[...] + bias[...]
  return y


class MocoMLP(nnx.Module):
  """MoCo v3 `_build_mlp`: (Linear no bias -> BN -> ReLU) x (n-1), Linear [-> BN w/o affine]."""

  def __init__(self, num_layers: int, in_dim: int, hidden: int, out_dim: int, *,
               last_bn: bool, in_axis: str | None, rngs: nnx.Rngs):
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    axes = [in_axis] + ["mlp"] * (num_layers - 1) + [None]
    init = nnx.initializers.lecun_normal()  # PyTorch-like fan-in scale
    self.layers = nnx.List([
        nnx.Linear(dims[i], dims[i + 1], use_bias=False, rngs=rngs,
                   kernel_init=nnx.with_partitioning(init, (axes[i], axes[i + 1])))
        for i in range(num_layers)])
    self.bn_scale = nnx.List([
        nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), ("mlp",))(
            rngs.params(), (hidden,))) for _ in range(num_layers - 1)])
    self.bn_bias = nnx.List([
        nnx.Param(zeros_init(("mlp",))(rngs.params(), (hidden,)))
        for _ in range(num_layers - 1)])
    self.last_bn = last_bn

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(batch_norm(x, self.bn_scale[i], self.bn_bias[i]))
      elif self.last_bn:
        x = batch_norm(x)
    return x


class TextBlock(nnx.Module):
  """Pre-LN transformer block with a key padding mask."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
    head_dim = width // num_heads

    def proj_in():
      return nnx.LinearGeneral(width, (num_heads, head_dim), rngs=rngs,
                               kernel_init=dense_init(("embed", "heads", "kv")),
                               bias_init=zeros_init(("heads", "kv")))

    self.norm1 = layer_norm(width, "embed", eps=1e-6, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=rngs)
    self.q, self.k, self.v = proj_in(), proj_in(), proj_in()
    self.proj = nnx.LinearGeneral((num_heads, head_dim), width, axis=(-2, -1), rngs=rngs,
                                  kernel_init=dense_init(("heads", "kv", "embed")),
                                  bias_init=zeros_init(("embed",)))
    self.norm2 = layer_norm(width, "embed", eps=1e-6, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=rngs)
    self.mlp = Mlp(width, int(width * mlp_ratio), sub_ln=False, eps=1e-6, out_std=0.02,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    h = self.norm1(x)
    attn = jax.nn.dot_product_attention(self.q(h), self.k(h), self.v(h),
                                        mask=valid[:, None, None, :])
    x = x + self.proj(attn)
    return x + self.mlp(self.norm2(x))


class TextEncoder(nnx.Module):
  """Small bidirectional transformer over byte tokens; mean-pooled over non-pad tokens."""

  def __init__(self, *, width: int, depth: int, num_heads: int, max_len: int,
               mlp_ratio: float = 4.0, rngs: nnx.Rngs):
    if width % num_heads:
      raise ConfigError(f"config.objective.text_width={width} is not divisible by "
                        f"text_heads={num_heads}")
    self.embed = nnx.Embed(multiview.ByteTokenizer.vocab_size, width, rngs=rngs,
                           embedding_init=dense_init(("vocab", "embed")))
    self.pos_embed = nnx.Param(dense_init((None, None, "embed"))(
        rngs.params(), (1, max_len, width)))
    self.blocks = nnx.List([TextBlock(width, num_heads, mlp_ratio, rngs=rngs)
                            for _ in range(depth)])
    self.norm = layer_norm(width, "embed", eps=1e-6, dtype=jnp.float32,
                           param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # Position 0 always counts, so an empty report attends somewhere and pools to a value.
    valid = (ids != multiview.ByteTokenizer.PAD) | (jnp.arange(ids.shape[1]) == 0)
    x = self.embed(ids) + self.pos_embed[:, :ids.shape[1]]
    for block in self.blocks:
      x = block(x, valid)
    x = self.norm(x)
    weight = valid.astype(jnp.float32)[..., None]
    return jnp.sum(x * weight, axis=1) / jnp.sum(weight, axis=1)


# ----------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------


class MocoOnline(nnx.Module):
  """Online branch: encoder -> projector -> predictor (+ learnable logit scale)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = config.objective
    # The momentum branch (MocoMomentum) builds encoder and projector in this same order
    # from the same seed, so both start identical, as MoCo v3 copies them at init.
    self.encoder = models.build(config.model, rngs=rngs)
    self.projector = MocoMLP(3, self.encoder.width, cfg.mlp_dim, cfg.proj_dim, last_bn=True,
                             in_axis="embed", rngs=rngs)
    self.predictor = MocoMLP(2, cfg.proj_dim, cfg.mlp_dim, cfg.proj_dim, last_bn=True,
                             in_axis=None, rngs=rngs)
    self.logit_scale = (nnx.Param(jnp.full((), math.log(1.0 / cfg.temperature)))
                        if cfg.learnable_temperature else None)


class MocoMomentum(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = config.objective
    self.encoder = models.build(config.model, rngs=rngs)
    self.projector = MocoMLP(3, self.encoder.width, cfg.mlp_dim, cfg.proj_dim, last_bn=True,
                             in_axis="embed", rngs=rngs)


class ClipModel(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = config.objective
    self.encoder = models.build(config.model, rngs=rngs)
    self.text_encoder = TextEncoder(width=cfg.text_width, depth=cfg.text_depth,
                                    num_heads=cfg.text_heads, max_len=cfg.max_report_len,
                                    rngs=rngs)
    proj_init = nnx.initializers.lecun_normal()
    self.image_proj = nnx.Linear(self.encoder.width, cfg.proj_dim, use_bias=False, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(proj_init, ("embed", None)))
    self.text_proj = nnx.Linear(cfg.text_width, cfg.proj_dim, use_bias=False, rngs=rngs,
                                kernel_init=nnx.with_partitioning(proj_init, ("embed", None)))
    self.logit_scale = (nnx.Param(jnp.full((), math.log(1.0 / cfg.temperature)))
                        if cfg.learnable_temperature else None)


def _logit_scale(model, cfg) -> jax.Array:
  if model.logit_scale is None:
    return jnp.asarray(1.0 / cfg.temperature, jnp.float32)
  return jnp.minimum(jnp.exp(model.logit_scale[...]), MAX_LOGIT_SCALE)


def detect_mode(config) -> str:
  """'image_text' when the training source yields reports, else 'image_image'."""
  example = pipeline.make_source(config.data, "train")[0]
  return "image_text" if "report" in example else "image_image"


# ----------------------------------------------------------------------------
# Objective.
# ----------------------------------------------------------------------------


@register("contrastive")
class Contrastive:

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg = config.objective
    self.mode = self.cfg.mode if self.cfg.mode != "auto" else detect_mode(config)
    steps_per_epoch = config.data.num_examples / config.data.batch_size
    self.total_steps = optim.steps_from(config, "total", steps_per_epoch)
    if self.mode == "image_image":
      self.batch_keys = ("view1", "view2")
      # Only the MoCo mode has a momentum encoder to update (main calls this when present).
      self.update_frozen = self._update_momentum_encoder
    else:
      self.batch_keys = ("image", "report")

  @classmethod
  def validate(cls, config):
    cfg = config.objective
    if cfg.mode not in MODES:
      raise ConfigError(f"config.objective.mode={cfg.mode!r} is not one of: "
                        f"{', '.join(MODES)}")
    if cfg.temperature <= 0:
      raise ConfigError(f"config.objective.temperature={cfg.temperature} must be > 0")
    if not 0.0 <= cfg.momentum <= cfg.final_momentum <= 1.0:
      raise ConfigError(f"config.objective.momentum={cfg.momentum} and final_momentum="
                        f"{cfg.final_momentum} must satisfy 0 <= momentum <= final <= 1")
    _check_views_not_normalised(config, "contrastive")

  def preprocess(self) -> str:
    cfg = self.cfg
    scale, size = tuple(cfg.crop_scale), cfg.view_size
    if self.mode == "image_image":
      return (f"two_views({size}, scale={scale}, flip={cfg.flip}, jitter={cfg.jitter}, "
              f"blur={tuple(cfg.blur)}, solarize={tuple(cfg.solarize)}, stats='{cfg.stats}', "
              f"channels={self.config.model.in_chans})")
    return (f"random_resized_crop({size}, scale={scale})|to_channels("
            f"{self.config.model.in_chans})|normalize('{cfg.stats}')|"
            f"tokenize_report({cfg.max_report_len})")

  def build_model(self, rngs: nnx.Rngs):
    if self.mode == "image_image":
      return MocoOnline(self.config, rngs=rngs)
    return ClipModel(self.config, rngs=rngs)

  def build_frozen(self, rngs: nnx.Rngs):
    return MocoMomentum(self.config, rngs=rngs) if self.mode == "image_image" else None

  def frozen_weights(self):
    return None

  def loss(self, model, frozen, batch, *, train: bool, rngs):
    scale = _logit_scale(model, self.cfg)
    if self.mode == "image_text":
      image = model.image_proj(model.encoder(batch["image"], train=train, rngs=rngs)["cls"])
      text = model.text_proj(model.text_encoder(batch["report"]))
      loss = losses.clip_loss(image, text, scale)
      sims = losses.l2_normalize(image) @ losses.l2_normalize(text).T
      return loss, {"contrastive/accuracy": _top1(sims), "contrastive/temperature": 1 / scale}

    views = jnp.concatenate([batch["view1"], batch["view2"]])
    batch_size = batch["view1"].shape[0]
    feats = model.encoder(views, train=train, rngs=rngs)["cls"]
    # Projector/predictor per view: their BatchNorm statistics are per view, as in MoCo v3.
    q1, q2 = (model.predictor(model.projector(f)) for f in
              (feats[:batch_size], feats[batch_size:]))
    target = frozen.encoder(views, train=False)["cls"]
    k1, k2 = (jax.lax.stop_gradient(frozen.projector(t)) for t in
              (target[:batch_size], target[batch_size:]))
    loss = losses.info_nce(q1, k2, scale) + losses.info_nce(q2, k1, scale)
    if model.logit_scale is None:
      loss = loss * 2.0 * self.cfg.temperature  # MoCo v3: keeps gradients independent of T
    sims = losses.l2_normalize(q1) @ losses.l2_normalize(k2).T
    return loss, {"contrastive/accuracy": _top1(sims), "contrastive/temperature": 1 / scale}

  def momentum(self, step) -> jax.Array:
    return losses.cosine_schedule(step, self.cfg.momentum, self.cfg.final_momentum,
                                  self.total_steps)

  def _update_momentum_encoder(self, frozen, params, aux, step):
    """momentum <- m * momentum + (1 - m) * online, for encoder and projector."""
    del aux
    m = self.momentum(step)
    return {name: jax.tree.map(lambda t, s: m * t + (1 - m) * s, frozen[name], params[name])
            for name in frozen}


def _top1(sims: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0])).astype(jnp.float32))


def contrastive_objective(config: ml_collections.ConfigDict, **overrides
                          ) -> ml_collections.ConfigDict:
  """The `config.objective` block of the contrastive teacher (defaults: MoCo v3 ViT)."""
  block = ml_collections.ConfigDict(dict(
      name="contrastive",
      mode="auto",                  # auto | image_image (MoCo v3) | image_text (CLIP)
      temperature=0.2,              # MoCo v3 ViT --moco-t=.2 (CLIP's init is 0.07)
      learnable_temperature=False,
      momentum=0.99,                # MoCo v3 --moco-m (ViT), cosine to final_momentum
      final_momentum=1.0,
      proj_dim=256,                 # MoCo v3 --moco-dim
      mlp_dim=4096,                 # MoCo v3 --moco-mlp-dim
      crop_scale=(0.08, 1.0),       # MoCo v3 --crop-min=0.08 for ViT
      flip=0.0,                     # off: CXR laterality matters (MoCo v3 flips)
      jitter=0.8,                   # brightness/contrast 0.4 with p=0.8 (BYOL/MoCo v3)
      blur=(1.0, 0.1),              # Gaussian blur probability, view 1 / view 2
      solarize=(0.0, 0.2),          # solarisation probability, view 1 / view 2
      stats="evax",
      max_report_len=256,           # bytes
      text_width=256, text_depth=4, text_heads=4,
  ))
  block.view_size = config.data.get_ref("image_size")
  block.update(overrides)
  return block


# ----------------------------------------------------------------------------
# EVA-X MIM with an image-level term.
# ----------------------------------------------------------------------------

IMAGE_LOSSES = ("infonce", "cosine")


class MIMImageStudent(evax_mim.MIMStudent):
  """EVA-X MIM student plus a linear head from its pooled feature to the teacher's width."""

  def __init__(self, model_cfg, target_width: int, *, rngs: nnx.Rngs):
    super().__init__(model_cfg, target_width, rngs=rngs)
    self.image_head = nnx.Linear(
        self.encoder.width, target_width, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.truncated_normal(0.02),
                                          ("embed", None)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, (None,)))


@register("evax_mim_contrastive")
class EvaxMIMContrastive(evax_mim.EvaxMIM):
  """EVA-X MIM + image_loss_weight * image-level term (student masked view vs teacher).

  Extra keys in config.objective: image_loss ('infonce' | 'cosine'), image_loss_weight,
  image_temperature. With image_loss_weight=0 the loss equals evax_mim's.
  """
  batch_keys = ("image", "mim_mask")

  @classmethod
  def validate(cls, config):
    super().validate(config)
    cfg = config.objective
    for key in ("image_loss", "image_loss_weight", "image_temperature"):
      if key not in cfg:
        raise ConfigError(f"config.objective.{key} is missing; objective "
                          "'evax_mim_contrastive' needs image_loss, image_loss_weight and "
                          "image_temperature (see contrastive.evax_image_term)")
    if cfg.image_loss not in IMAGE_LOSSES:
      raise ConfigError(f"config.objective.image_loss={cfg.image_loss!r} is not one of: "
                        f"{', '.join(IMAGE_LOSSES)}")
    if cfg.image_loss_weight < 0 or cfg.image_temperature <= 0:
      raise ConfigError(f"config.objective.image_loss_weight={cfg.image_loss_weight} must be "
                        f">= 0 and image_temperature={cfg.image_temperature} > 0")

  def build_model(self, rngs: nnx.Rngs) -> MIMImageStudent:
    return MIMImageStudent(self.config.model, self.teacher_width, rngs=rngs)

  def loss(self, model: MIMImageStudent, teacher, batch, *, train: bool, rngs):
    images, mask = batch["image"], batch["mim_mask"]
    target = jax.lax.stop_gradient(teacher(images, train=False))
    image_hw = images.shape[1:3]
    target_patch = evax_mim.resize_tokens(
        target["patch"], teacher.grid_size(image_hw), model.encoder.grid_size(image_hw))
    out = model.encoder(images, mask=mask, train=train, rngs=rngs)
    mim, cosine = evax_mim.masked_cosine_loss(model.head(out["patch"]), target_patch, mask)
    pred = model.image_head(out["cls"])
    if self.cfg.image_loss == "infonce":
      image_term = losses.info_nce(pred, target["cls"], 1.0 / self.cfg.image_temperature)
    else:
      image_term = 1.0 - jnp.mean(jnp.sum(
          losses.l2_normalize(pred) * losses.l2_normalize(target["cls"]), axis=-1))
    loss = mim + self.cfg.image_loss_weight * image_term
    return loss, {"mim_loss": mim, "mim_cosine": cosine, "image_loss": image_term,
                  "mask_ratio": mask.astype(jnp.float32).mean()}


def evax_image_term(block: ml_collections.ConfigDict, weight: float = 0.1,
                    kind: str = "infonce", temperature: float = 0.1
                    ) -> ml_collections.ConfigDict:
  """Turns an evax_objective() block into an evax_mim_contrastive one (in place; returned)."""
  block.name = "evax_mim_contrastive"
  block.image_loss = kind
  block.image_loss_weight = weight
  block.image_temperature = temperature
  return block
