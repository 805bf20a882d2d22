"""DINOv2-style optimizer features: layer-wise lr decay, patch-embed lr multiplier,
weight-decay schedule and a frozen prototype layer for the first steps.

Registered as `config.optim.name='adamw_dinov2'` (through cxrjax.optim's registry, on
import of this module). It is AdamW as in dinov2 (dinov2/train/train.py, utils/
param_groups.py), where PyTorch param groups carry per-parameter multipliers:

  update = -lr(t) * lr_mult(p) * (adam(g) + wd(t) * wd_mask(p) * p)
  lr_mult(p) = layer_decay ** (num_layers + 1 - layer_id(p)) * (patch_embed_lr_mult if p is
               the patch embedding) * (0 while t < freeze_prototypes_steps, for prototypes)
  layer_id:  0 for the encoder's patch_embed, pos_embed, cls/register/mask tokens;
             i + 1 for encoder block i; num_layers + 1 for everything else (final norm,
             heads), whose multiplier is therefore 1.
  wd(t):     cosine weight_decay -> weight_decay_end over weight_decay_steps (dinov2
             wd_schedule); weight_decay_steps=0 keeps it constant.

Keys read from config.optim: lr (through the schedule), b1, b2, eps, weight_decay,
weight_decay_end, weight_decay_steps, layer_decay, patch_embed_lr_mult,
freeze_prototypes_steps. Weight decay skips the parameters cxrjax.optim.decay_mask skips
(biases, norms, LayerScale, tokens, pos-embed); dinov2 also decays tokens, pos-embed and the
prototype scales (weight_g).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cxrjax import optim
from cxrjax.config_lib import ConfigError

EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "reg_tokens", "mask_token")
PROTOTYPE_NAMES = ("prototypes", "prototype_scale")
EXTRA_KEYS = ("weight_decay_end", "weight_decay_steps", "layer_decay", "patch_embed_lr_mult",
              "freeze_prototypes_steps")


def path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def num_encoder_blocks(params: Any) -> int:
  """Number of `encoder.blocks.<i>` in a params tree (0 if there is no encoder)."""
  ids = set()
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    names = path_names(path)
    for j in range(len(names) - 2):
      if names[j] == "encoder" and names[j + 1] == "blocks" and re.fullmatch(r"\d+", names[j + 2]):
        ids.add(int(names[j + 2]))
  return max(ids) + 1 if ids else 0


def layer_id(names: list[str], num_layers: int) -> int:
  """dinov2 get_vit_lr_decay_rate's layer index of one parameter (see module docstring)."""
  if "encoder" in names:
    rest = names[names.index("encoder") + 1:]
    if rest and rest[0] in EMBEDDING_NAMES:
      return 0
    if len(rest) > 1 and rest[0] == "blocks" and rest[1].isdigit():
      return int(rest[1]) + 1
  return num_layers + 1


def lr_multipliers(params: Any, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
                   ) -> Any:
  """A tree of float lr multipliers matching `params`."""
  num_layers = num_encoder_blocks(params)

  def mult(path, _):
    names = path_names(path)
    m = layer_decay ** (num_layers + 1 - layer_id(names, num_layers))
    if "patch_embed" in names:
      m *= patch_embed_lr_mult
    return m
  return jax.tree_util.tree_map_with_path(mult, params)


def scale_by_lr_multipliers(layer_decay: float, patch_embed_lr_mult: float
                            ) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's lr multiplier (static, from the tree paths)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    mults = lr_multipliers(updates, layer_decay, patch_embed_lr_mult)
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state
  return optax.GradientTransformation(init, update)


class FreezeState(NamedTuple):
  count: jax.Array


def freeze_for_steps(steps: int, predicate: Callable[[list[str]], bool]
                     ) -> optax.GradientTransformation:
  """Zeroes the updates of parameters matching `predicate(path names)` for `steps` steps
  (dinov2 freeze_last_layer_epochs: the prototype layer's lr is 0 at first)."""
  def init(params):
    del params
    return FreezeState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    frozen = state.count < steps

    def apply(path, u):
      return jnp.where(frozen, jnp.zeros_like(u), u) if predicate(path_names(path)) else u
    return (jax.tree_util.tree_map_with_path(apply, updates),
            FreezeState(optax.safe_increment(state.count)))
  return optax.GradientTransformation(init, update)


def weight_decay_schedule(start: float, end: float, steps: int) -> optax.Schedule | float:
  if steps <= 0 or start == end:
    return start
  def schedule(count):  # dinov2 CosineScheduler(base=start, final=end, total_iters=steps)
    t = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0)
    return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * t))
  return schedule


def is_prototype(names: list[str]) -> bool:
  return any(n in PROTOTYPE_NAMES for n in names)


@optim.register_optimizer("adamw_dinov2")
def adamw_dinov2(cfg, schedule) -> optax.GradientTransformation:
  missing = [k for k in EXTRA_KEYS if k not in cfg]
  if missing:
    raise ConfigError(f"config.optim.name='adamw_dinov2' needs config.optim keys "
                      f"{', '.join(missing)} (see cxrjax/optim_extras.py)")
  if cfg.layer_decay <= 0 or cfg.patch_embed_lr_mult < 0 or cfg.freeze_prototypes_steps < 0:
    raise ConfigError(f"config.optim.layer_decay={cfg.layer_decay} must be > 0, "
                      f"patch_embed_lr_mult={cfg.patch_embed_lr_mult} and "
                      f"freeze_prototypes_steps={cfg.freeze_prototypes_steps} >= 0")
  parts = [
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.add_decayed_weights(
          weight_decay_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.weight_decay_steps),
          mask=optim.decay_mask),
      optax.scale_by_learning_rate(schedule),
  ]
  if cfg.layer_decay != 1.0 or cfg.patch_embed_lr_mult != 1.0:
    parts.append(scale_by_lr_multipliers(cfg.layer_decay, cfg.patch_embed_lr_mult))
  if cfg.freeze_prototypes_steps > 0:
    parts.append(freeze_for_steps(cfg.freeze_prototypes_steps, is_prototype))
  return optax.chain(*parts)


def dinov2_optim_block(**overrides) -> dict:
  """config.optim for 'adamw_dinov2' with dinov2 ssl_default_config.yaml values."""
  block = dict(name="adamw_dinov2", lr=4e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.04,
               weight_decay_end=0.4, weight_decay_steps=0, grad_clip_norm=3.0, ema_decay=0.0,
               layer_decay=0.9, patch_embed_lr_mult=0.2, freeze_prototypes_steps=0)
  block.update(overrides)
  return block
