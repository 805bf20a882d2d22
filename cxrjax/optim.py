"""Learning-rate schedules and optimizers (optax), built from `config.schedule`/`config.optim`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from cxrjax.config_lib import ConfigError

_SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {}
_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {}

# Parameters that are never weight-decayed, as in BEiT/EVA/timm: norms, biases (by name:
# per-head q/v biases are 2-D), LayerScale (1-D) and these embedding-like tensors.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_tokens", "mask_token", "bias", "scale")


def register_schedule(name):
  def wrap(fn):
    _SCHEDULES[name] = fn
    return fn
  return wrap


def register_optimizer(name):
  def wrap(fn):
    _OPTIMIZERS[name] = fn
    return fn
  return wrap


def schedule_names():
  return sorted(_SCHEDULES)


def optimizer_names():
  return sorted(_OPTIMIZERS)


def steps_from(cfg: ml_collections.ConfigDict, prefix: str, steps_per_epoch: float) -> int:
  """Reads `<prefix>_steps` or `<prefix>_epochs` (exactly one may be set)."""
  steps, epochs = cfg.get(f"{prefix}_steps", 0), cfg.get(f"{prefix}_epochs", 0.0)
  if steps and epochs:
    raise ConfigError(f"set only one of {prefix}_steps={steps} and {prefix}_epochs={epochs}")
  return int(steps) if steps else int(round(epochs * steps_per_epoch))


@register_schedule("warmup_cosine")
def _warmup_cosine(lr, total_steps, warmup_steps, min_lr_ratio=0.0):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=max(warmup_steps, 1),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * min_lr_ratio)


@register_schedule("warmup_constant")
def _warmup_constant(lr, total_steps, warmup_steps, min_lr_ratio=0.0):
  del total_steps, min_lr_ratio
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
      [max(warmup_steps, 1)])


def make_schedule(config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: float) -> optax.Schedule:
  cfg = config.schedule
  if cfg.name not in _SCHEDULES:
    raise ConfigError(f"config.schedule.name={cfg.name!r} is not one of: "
                      f"{', '.join(schedule_names())}")
  warmup = steps_from(cfg, "warmup", steps_per_epoch)
  return _SCHEDULES[cfg.name](config.optim.lr, total_steps, warmup, cfg.min_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: weight matrices, excluding embeddings/tokens."""
  def wants_decay(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return leaf.ndim > 1 and not any(n in NO_DECAY_NAMES for n in names)
  return jax.tree_util.tree_map_with_path(wants_decay, params)


@register_optimizer("adamw")
def _adamw(cfg, schedule):
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  cfg = config.optim
  if cfg.name not in _OPTIMIZERS:
    raise ConfigError(f"config.optim.name={cfg.name!r} is not one of: "
                      f"{', '.join(optimizer_names())}")
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(_OPTIMIZERS[cfg.name](cfg, schedule))
  return optax.chain(*parts)
