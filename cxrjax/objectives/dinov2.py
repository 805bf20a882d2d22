"""DINOv2 self-distillation with an EMA teacher (CheXFound's pretraining).

Follows facebookresearch/dinov2 (dinov2/train/ssl_meta_arch.py, dinov2/loss/*, configs/
ssl_default_config.yaml) and RPIDIAL/CheXFound (chexfound/configs/train/vitl16_ibot333*.yaml):

- Student and teacher are the same ViT + heads; the teacher starts as a copy of the student
  and follows it as an EMA, momentum 0.992 (dinov2 default; CheXFound 0.994) -> 1 on a
  cosine over training. No gradient reaches the teacher.
- DINO head on the cls token, iBOT head on masked patch tokens (shared with the DINO head,
  dinov2's default, or separate: `ibot.separate_head`, CheXFound). A head is a 3-layer GELU
  MLP (hidden 2048, bottleneck 256/384), L2 normalisation, then a weight-normalised
  prototype layer (K prototypes; CheXFound K = 131072, sharded on the 'vocab' axis).
- Teacher targets: softmax centering (`centering`, center momentum 0.9) or Sinkhorn-Knopp
  (`sinkhorn_knopp`, 3 iterations; CheXFound), sharpened by the teacher temperature, which
  warms up linearly 0.04 -> 0.07 over 30 epochs; student temperature 0.1.
- Multi-crop: 2 global crops (the student's are iBOT-masked: probability 0.5, ratio
  U(0.1, 0.5), blockwise) and N local crops (8 at 96 px); DINO loss over every (student
  crop, other teacher global crop) pair; KoLeo (weight 0.1) on each global crop's student
  cls tokens; iBOT loss weight 1 (CheXFound: 3).

Layout. The trainable model is DinoModel (encoder, dino_head, ibot_head); the frozen module
is DinoFrozen (teacher: a DinoModel, the two centers, and a step counter that drives the
teacher-temperature warm-up inside the loss). Both are built from the same seed by main,
so the teacher starts equal to the student, as dinov2 copies it in
`prepare_for_distributed_training`.

Masked tokens. dinov2 gathers all masked tokens of the batch into one buffer whose size is
known because it draws masks per batch. Here masks are drawn per crop in the data
pipeline, so each crop's masked tokens go to a fixed-size row of int(N * max_ratio) slots
(max_ratio = ibot.mask_ratio[1]) with a validity mask: exact (no token is ever dropped),
and the buffer stays batch-sharded. It holds about 3x the tokens of dinov2's buffer.

High-resolution continuation (CheXFound highres336/448/512): `init_from='workdir[:step]'`
of a dinov2 run reads its student params and teacher, resampling the learned pos-embed
bicubically to the new grid (CheXFound instead drops the pos-embed and re-learns it), and
restarts schedules at step 0. The teacher comes through `frozen_weights()`; the student
through `params_weights()`, which cxrjax.main places into state['params'].
"""

from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cxrjax import checkpoint, models, optim
from cxrjax import optim_extras  # noqa: F401  (registers optim.name='adamw_dinov2')
from cxrjax.config_lib import ConfigError
from cxrjax.data import multiview  # noqa: F401  (registers multi_crop, ibot_mask)
from cxrjax.models.layers import resample_pos_embed
from cxrjax.objectives import losses, register
from cxrjax.objectives.contrastive import _check_views_not_normalised

CENTERINGS = ("centering", "sinkhorn_knopp")


class DinoBuffer(nnx.Variable):
  """Non-trainable state of the frozen side (centers, step counter)."""


class DinoHead(nnx.Module):
  """dinov2 DINOHead: MLP -> L2 normalise -> weight-normalised prototypes (no bias).

  The prototype layer is weight_norm(Linear(bottleneck, K, bias=False)) with weight_g
  initialised to 1 (and trained, as in dinov2): logits = g_k * <z, v_k / |v_k|>.
  """

  def __init__(self, in_dim: int, prototypes: int, hidden: int, bottleneck: int,
               num_layers: int, *, rngs: nnx.Rngs):
    if num_layers == 1:
      dims, axes = [in_dim, bottleneck], [("embed", None)]
    else:
      dims = [in_dim] + [hidden] * (num_layers - 1) + [bottleneck]
      axes = [("embed", "mlp")] + [("mlp", None)] * (num_layers - 1)
    # DINOHead._init_weights: trunc_normal(std=0.02) weights, zero biases.
    self.layers = nnx.List([
        nnx.Linear(dims[i], dims[i + 1], rngs=rngs,
                   kernel_init=nnx.with_partitioning(
                       nnx.initializers.truncated_normal(0.02), axes[i]),
                   bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[i][1],)))
        for i in range(len(dims) - 1)])
    self.prototypes = nnx.Param(nnx.with_partitioning(
        nnx.initializers.truncated_normal(0.02), ("embed", "vocab"))(
            rngs.params(), (bottleneck, prototypes)))
    self.prototype_scale = nnx.Param(nnx.with_partitioning(
        nnx.initializers.ones_init(), ("vocab",))(rngs.params(), (prototypes,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.gelu(x, approximate=False)
    z = losses.l2_normalize(x, eps=1e-12)
    v = self.prototypes[...]
    w = v * jax.lax.rsqrt(jnp.sum(v * v, axis=0, keepdims=True))
    return (z @ w) * self.prototype_scale[...]


class DinoModel(nnx.Module):
  """Student (trainable) or teacher: encoder + DINO head [+ separate iBOT head]."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = config.objective
    self.encoder = models.build(config.model, rngs=rngs)
    d, i = cfg.dino, cfg.ibot
    self.dino_head = DinoHead(self.encoder.width, d.prototypes, d.hidden_dim,
                              d.bottleneck_dim, d.num_layers, rngs=rngs)
    self.ibot_head = (DinoHead(self.encoder.width, i.prototypes, i.hidden_dim,
                               i.bottleneck_dim, i.num_layers, rngs=rngs)
                      if i.separate_head else None)

  def patch_head(self) -> DinoHead:
    return self.ibot_head if self.ibot_head is not None else self.dino_head


class DinoFrozen(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    cfg = config.objective
    self.teacher = DinoModel(config, rngs=rngs)
    ibot_k = cfg.ibot.prototypes if cfg.ibot.separate_head else cfg.dino.prototypes
    self.dino_center = DinoBuffer(jnp.zeros((1, cfg.dino.prototypes), jnp.float32))
    self.ibot_center = DinoBuffer(jnp.zeros((1, ibot_k), jnp.float32))
    self.step = DinoBuffer(jnp.zeros((), jnp.int32))


def masked_positions(mask: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
  """Per row, the indices of the first `slots` masked tokens and their validity [M, slots]."""
  idx = jnp.argsort(~mask, axis=1, stable=True)[:, :slots]
  return idx, jnp.take_along_axis(mask, idx, axis=1)


def _crop_major(x: jax.Array) -> jax.Array:
  """[B, C, ...] -> [C * B, ...] with all first crops first (dinov2's collate order)."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@register("dinov2")
class DinoV2:

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg = cfg = config.objective
    self.patch_size = int(config.model.variant.split("/")[1])
    steps_per_epoch = config.data.num_examples / config.data.batch_size
    self.total_steps = optim.steps_from(config, "total", steps_per_epoch)
    self.temp_warmup_steps = optim.steps_from(cfg, "teacher_temp_warmup", steps_per_epoch)
    grid = cfg.global_crop_size // self.patch_size
    # Each crop masks int(N * u) tokens, u < mask_ratio[1]: this many slots always suffice.
    self.ibot_slots = max(1, int(grid * grid * cfg.ibot.mask_ratio[1]))
    self.batch_keys = ("global_crops", "ibot_mask") + (
        ("local_crops",) if cfg.num_local_crops > 0 else ())
    # Read now: main constructs the objective before entering its mesh context, where
    # abstract models with logical axis names cannot be built.
    self._loaded = load_for_continuation(cfg.init_from, self) if cfg.init_from else None

  # ---------------------------------------------------------------- Config.

  @classmethod
  def validate(cls, config):
    cfg, model = config.objective, config.model
    if cfg.centering not in CENTERINGS:
      raise ConfigError(f"config.objective.centering={cfg.centering!r} is not one of: "
                        f"{', '.join(CENTERINGS)}")
    if not model.class_token or not model.mask_token:
      raise ConfigError("objective 'dinov2' needs config.model.class_token=True (DINO head "
                        "input) and config.model.mask_token=True (iBOT masking); got "
                        f"class_token={model.class_token}, mask_token={model.mask_token}")
    patch = int(model.variant.split("/")[1])
    for key in ("global_crop_size", "local_crop_size"):
      if cfg[key] <= 0 or cfg[key] % patch:
        raise ConfigError(f"config.objective.{key}={cfg[key]} must be a positive multiple "
                          f"of the patch size {patch} of config.model.variant={model.variant!r}")
    if cfg.num_local_crops < 0:
      raise ConfigError(f"config.objective.num_local_crops={cfg.num_local_crops} must be >= 0")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
      if cfg[key] <= 0:
        raise ConfigError(f"config.objective.{key}={cfg[key]} must be > 0")
    if not 0.0 <= cfg.momentum <= cfg.final_momentum <= 1.0:
      raise ConfigError(f"config.objective.momentum={cfg.momentum} and final_momentum="
                        f"{cfg.final_momentum} must satisfy 0 <= momentum <= final <= 1")
    if not 0.0 <= cfg.center_momentum < 1.0:
      raise ConfigError(f"config.objective.center_momentum={cfg.center_momentum} must be "
                        "in [0, 1)")
    lo, hi = cfg.ibot.mask_ratio
    if not 0.0 <= lo <= hi < 1.0 or not 0.0 < cfg.ibot.mask_prob <= 1.0:
      raise ConfigError(f"config.objective.ibot.mask_ratio={tuple(cfg.ibot.mask_ratio)} must "
                        f"satisfy 0 <= lo <= hi < 1 and ibot.mask_prob={cfg.ibot.mask_prob} "
                        "must be in (0, 1]")
    for head in ("dino", "ibot"):
      h = cfg[head]
      if h.prototypes <= 0 or h.num_layers < 1 or h.loss_weight < 0:
        raise ConfigError(f"config.objective.{head}: prototypes={h.prototypes} and "
                          f"num_layers={h.num_layers} must be >= 1, loss_weight="
                          f"{h.loss_weight} >= 0")
    if cfg.dino.loss_weight + cfg.ibot.loss_weight <= 0:
      raise ConfigError("config.objective.dino.loss_weight and ibot.loss_weight are both 0")
    _check_views_not_normalised(config, "dinov2")

  def preprocess(self) -> str:
    cfg = self.cfg
    return (f"multi_crop({cfg.global_crop_size}, local_size={cfg.local_crop_size}, "
            f"num_local={cfg.num_local_crops}, global_scale={tuple(cfg.global_crop_scale)}, "
            f"local_scale={tuple(cfg.local_crop_scale)}, flip={cfg.flip}, "
            f"stats='{cfg.stats}', channels={self.config.model.in_chans})|"
            f"ibot_mask({self.patch_size}, ratio={tuple(cfg.ibot.mask_ratio)}, "
            f"prob={cfg.ibot.mask_prob}, min_block={cfg.ibot.min_mask_block})")

  # ---------------------------------------------------------------- Models.

  def build_model(self, rngs: nnx.Rngs) -> DinoModel:
    return DinoModel(self.config, rngs=rngs)

  def build_frozen(self, rngs: nnx.Rngs) -> DinoFrozen:
    return DinoFrozen(self.config, rngs=rngs)

  def frozen_weights(self):
    return None if self._loaded is None else self._loaded["frozen"]

  def params_weights(self):
    """Student params for a continuation run (init_from), or None."""
    return None if self._loaded is None else self._loaded["params"]

  # ---------------------------------------------------------------- Schedules.

  def teacher_temp(self, step) -> jax.Array:
    """dinov2: linear warm-up warmup_teacher_temp -> teacher_temp (np.linspace), then flat."""
    cfg, n = self.cfg, self.temp_warmup_steps
    if n <= 1:
      return jnp.asarray(cfg.teacher_temp, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / (n - 1), 0.0, 1.0)
    return cfg.warmup_teacher_temp + t * (cfg.teacher_temp - cfg.warmup_teacher_temp)

  def momentum(self, step) -> jax.Array:
    return losses.cosine_schedule(step, self.cfg.momentum, self.cfg.final_momentum,
                                  self.total_steps)

  # ---------------------------------------------------------------- Loss.

  def loss(self, model: DinoModel, frozen: DinoFrozen, batch, *, train: bool, rngs):
    cfg = self.cfg
    globals_ = batch["global_crops"]
    batch_size, num_global = globals_.shape[:2]
    images = _crop_major(globals_)
    masks = _crop_major(batch["ibot_mask"])
    temp = self.teacher_temp(frozen.step[...])
    sinkhorn = cfg.centering == "sinkhorn_knopp"
    do_dino, do_ibot = cfg.dino.loss_weight > 0, cfg.ibot.loss_weight > 0
    aux = {}

    # Teacher: unmasked global crops, no drop path, no gradient.
    teacher = frozen.teacher
    t_out = jax.lax.stop_gradient(teacher.encoder(images, train=False))
    t_cls = jax.lax.stop_gradient(teacher.dino_head(t_out["cls_token"]))
    if sinkhorn:
      t_cls_probs = losses.sinkhorn_knopp(t_cls, temp)
    else:
      t_cls_probs = losses.softmax_center(t_cls, frozen.dino_center[...], temp)
      aux["state/dino_center"] = t_cls.mean(axis=0, keepdims=True)
    t_cls_probs = jax.lax.stop_gradient(t_cls_probs)  # targets: nothing flows back

    # Student: masked global crops, then local crops.
    s_out = model.encoder(images, mask=masks, train=train, rngs=rngs)
    s_cls_tokens = s_out["cls_token"]
    loss = 0.0
    if do_dino:
      s_global = model.dino_head(s_cls_tokens).reshape(num_global, batch_size, -1)
      s_local = None
      if cfg.num_local_crops > 0:
        local = _crop_major(batch["local_crops"])
        s_local = model.dino_head(model.encoder(local, train=train, rngs=rngs)["cls_token"])
        s_local = s_local.reshape(cfg.num_local_crops, batch_size, -1)
      dino = losses.dino_multicrop_loss(
          s_global, s_local, t_cls_probs.reshape(num_global, batch_size, -1), cfg.student_temp)
      koleo = sum(losses.koleo_loss(c) for c in
                  s_cls_tokens.reshape(num_global, batch_size, -1))
      loss = cfg.dino.loss_weight * dino + cfg.dino.koleo_weight * koleo
      aux.update({"dino_loss": dino, "koleo_loss": koleo})

    if do_ibot:
      idx, valid = masked_positions(masks, self.ibot_slots)
      t_patch = jnp.take_along_axis(t_out["patch"], idx[..., None], axis=1)
      t_logits = jax.lax.stop_gradient(teacher.patch_head()(t_patch))      # [M, S, K]
      flat_valid = valid.reshape(-1)
      if sinkhorn:
        t_probs = losses.sinkhorn_knopp(t_logits.reshape(-1, t_logits.shape[-1]), temp,
                                        weights=flat_valid).reshape(t_logits.shape)
      else:
        t_probs = losses.softmax_center(t_logits, frozen.ibot_center[...], temp)
        w = flat_valid.astype(jnp.float32)[:, None]
        # Mean over the masked tokens only (dinov2's buffer mean also counts its padding).
        aux["state/ibot_center"] = (jnp.sum(t_logits.reshape(-1, t_logits.shape[-1]) * w,
                                            axis=0, keepdims=True)
                                    / jnp.maximum(w.sum(), 1.0))
      t_probs = jax.lax.stop_gradient(t_probs)
      s_patch = jnp.take_along_axis(s_out["patch"], idx[..., None], axis=1)
      s_logits = model.patch_head()(s_patch)
      ibot = losses.ibot_loss(s_logits, t_probs, valid, cfg.student_temp)
      loss = loss + cfg.ibot.loss_weight * ibot
      aux["ibot_loss"] = ibot

    # Collapse diagnostics on the teacher's raw sharpened outputs (before centering /
    # Sinkhorn, which would hide a collapse by construction).
    raw = jax.nn.softmax(t_cls / temp, axis=-1)
    aux.update({
        "dino/teacher_entropy": losses.entropy(raw).mean() / math.log(raw.shape[-1]),
        "dino/prototype_usage": losses.prototype_usage(raw),
        "dino/teacher_temp": temp,
        "dino/momentum": self.momentum(frozen.step[...]),
        "ibot/masked_fraction": masks.astype(jnp.float32).mean(),
    })
    return loss, aux

  def update_frozen(self, frozen, params, aux, step):
    """teacher <- m * teacher + (1 - m) * student; centers <- EMA of batch means."""
    m = self.momentum(step)
    new = dict(frozen)
    new["teacher"] = jax.tree.map(lambda t, s: m * t + (1 - m) * s, frozen["teacher"], params)
    c = self.cfg.center_momentum
    for name in ("dino_center", "ibot_center"):
      if f"state/{name}" in aux:
        new[name] = c * frozen[name] + (1 - c) * aux[f"state/{name}"]
    # Mirrors the train step (also after steps that nan_policy='skip' dropped).
    new["step"] = jnp.asarray(step, jnp.int32) + 1
    return new


def load_for_continuation(spec: str, objective: DinoV2) -> dict:
  """{'params', 'frozen'} of a dinov2 run as host arrays, pos-embeds resampled to this
  objective's model grid and the step counter reset (schedules restart, as CheXFound's
  high-resolution runs do)."""
  directory, step = checkpoint.parse_workdir_spec(spec)
  source, _ = checkpoint.read_config(spec)
  if source.objective.name != "dinov2":
    raise ConfigError(f"config.objective.init_from={spec!r} is a "
                      f"{source.objective.name!r} run; a dinov2 run is needed")
  source.objective.init_from = ""  # its own starting point is not needed
  src = DinoV2(source)
  target = {
      "params": nnx.to_pure_dict(nnx.state(
          nnx.eval_shape(lambda: src.build_model(nnx.Rngs(0))), nnx.Param)),
      "frozen": nnx.to_pure_dict(nnx.state(
          nnx.eval_shape(lambda: src.build_frozen(nnx.Rngs(0))))),
  }
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    loaded = ocp.PyTreeCheckpointer().restore(
        os.path.join(directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True))
  except (ValueError, KeyError) as e:
    raise ConfigError(f"config.objective.init_from={spec!r} (step {step}): cannot read the "
                      f"dinov2 params/teacher: {e}")
  src_grid = (source.model.img_size // src.patch_size,) * 2
  dst_grid = (objective.config.model.img_size // objective.patch_size,) * 2
  n_cls = int(bool(source.model.class_token))

  def resample(tree):
    pos = tree["encoder"].get("pos_embed")
    if pos is not None and src_grid != dst_grid:
      patches = np.asarray(resample_pos_embed(jnp.asarray(pos[:, n_cls:]), src_grid, dst_grid))
      tree["encoder"]["pos_embed"] = np.concatenate([pos[:, :n_cls], patches], axis=1)
    return tree

  params = resample(loaded["params"])
  frozen = loaded["frozen"]
  frozen["teacher"] = resample(frozen["teacher"])
  frozen["step"] = np.zeros_like(frozen["step"])
  logging.info("dinov2 continuation from %s step %d: pos-embed %s -> %s grid", directory, step,
               src_grid, dst_grid)
  return {"params": params, "frozen": frozen}


def dinov2_objective(config: ml_collections.ConfigDict, **overrides
                     ) -> ml_collections.ConfigDict:
  """dinov2 ssl_default_config.yaml defaults as a config.objective block."""
  head = dict(prototypes=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3)
  block = ml_collections.ConfigDict(dict(
      name="dinov2",
      local_crop_size=96,              # crops.local_crops_size
      num_local_crops=8,               # crops.local_crops_number
      global_crop_scale=(0.32, 1.0),
      local_crop_scale=(0.05, 0.32),
      flip=0.5,                        # DataAugmentationDINO RandomHorizontalFlip(p=0.5)
      stats="evax",
      dino=dict(head, loss_weight=1.0, koleo_weight=0.1),
      ibot=dict(head, separate_head=False, loss_weight=1.0, mask_ratio=(0.1, 0.5),
                mask_prob=0.5, min_mask_block=4),
      centering="centering",           # train.centering: centering | sinkhorn_knopp
      center_momentum=0.9,             # DINOLoss / iBOTPatchLoss center_momentum
      student_temp=0.1,
      teacher_temp=0.07,
      warmup_teacher_temp=0.04,
      teacher_temp_warmup_steps=0,
      teacher_temp_warmup_epochs=30.0,  # teacher.warmup_teacher_temp_epochs
      momentum=0.992,                  # teacher.momentum_teacher
      final_momentum=1.0,              # teacher.final_momentum_teacher
      init_from="",                    # dinov2 workdir[:step] to continue from (high-res)
  ))
  block.global_crop_size = config.data.get_ref("image_size")
  block.update(overrides)
  return block
