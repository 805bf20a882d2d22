"""Supervised fine-tuning tasks: the loss and the predicted probabilities of a head's logits.

A task is a class registered by name and constructed from its config block (a ConfigDict;
keys missing from it take the task's `defaults`, so older configs keep working):
  batch_keys: tuple[str, ...]        batch fields the loss reads besides "image"
  loss(logits, batch) -> (scalar loss, dict of scalar metrics)
  predict(logits) -> probabilities   (sigmoid or softmax, float32)
Everything is jax.numpy with static shapes, so both run under jit and on sharded batches;
the reductions are over the whole (global) batch. Logits are computed on in float32.

Masks: `label_mask` (from the pipeline's label policy, labels.py) is 0 where a target is
missing or uncertain-and-ignored; such entries never contribute to a loss or a metric.
Mixed batches (cxrjax.data.mixing) keep this meaning.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cxrjax.config_lib import ConfigError

_TASKS: dict[str, type] = {}


def register(name: str):
  def wrap(cls):
    _TASKS[name] = cls
    cls.name = name
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_TASKS)


def get(name: str, where: str = "config.task.name") -> type:
  """The task class registered as `name`; ConfigError naming `where` and the choices."""
  if name not in _TASKS:
    raise ConfigError(f"{where}={name!r} is not one of: {', '.join(names())}")
  return _TASKS[name]


def build(task_cfg: ml_collections.ConfigDict, where: str = "config.task") -> "Task":
  """get(task_cfg.name)(task_cfg): the task a config block describes."""
  name = task_cfg.get("name", "") if hasattr(task_cfg, "get") else ""
  return get(name, f"{where}.name")(task_cfg, where=where)


def default_config(name: str) -> ml_collections.ConfigDict:
  """A config block with `name` and every key of the task at its default."""
  return ml_collections.ConfigDict(dict(name=name, **get(name).defaults))


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(values * weights) / max(sum(weights), 1): 0, not NaN, when nothing counts."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class Task:
  """Base of the registered tasks: reads the task's keys from its config block (missing
  keys take `defaults`) and checks their values. Subclasses add loss() and predict()."""

  name: str = ""
  batch_keys: tuple[str, ...] = ()
  defaults: dict[str, Any] = {}

  def __init__(self, task_cfg: ml_collections.ConfigDict | None = None,
               where: str = "config.task"):
    self.where = where
    self.cfg = {key: (task_cfg.get(key, default) if task_cfg is not None else default)
                for key, default in self.defaults.items()}

  def _number(self, key: str, low: float, high: float, *, high_open: bool = False) -> float:
    value = self.cfg[key]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        low <= value and (value < high if high_open else value <= high)
    if not ok:
      bracket = ")" if high_open else "]"
      raise ConfigError(f"{self.where}.{key}={value!r} must be a number in [{low}, {high}"
                        f"{bracket}")
    return float(value)

  def _choice(self, key: str, choices) -> str:
    value = self.cfg[key]
    if value not in choices:
      raise ConfigError(f"{self.where}.{key}={value!r} is not one of: "
                        f"{', '.join(sorted(choices))}")
    return value


def _check_same_shape(logits, labels, key: str) -> None:
  if logits.shape != labels.shape:
    raise ValueError(f"logits have shape {logits.shape} but batch[{key!r}] has "
                     f"{labels.shape}; expected equal shapes")


# ----------------------------------------------------------------------------
# Multi-label classification (CheXpert, NIH ChestX-ray14, ...): one sigmoid per class.
# ----------------------------------------------------------------------------


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-entry -[y log sigmoid(x) + (1 - y) log sigmoid(-x)] (stable for any logit)."""
  return optax.sigmoid_binary_cross_entropy(logits, targets)


def _power_with_zero_base(base: jax.Array, exponent: jax.Array) -> jax.Array:
  """base ** exponent for base >= 0 with 0 ** 0 = 1 (as torch.pow) and finite gradients.

  A plain pow has a NaN gradient at base 0 (0 * inf); the double `where` keeps both the
  value and the gradient of the unused branch finite.
  """
  positive = base > 0
  safe = jnp.where(positive, base, 1.0)
  return jnp.where(positive, jnp.power(safe, exponent), jnp.where(exponent == 0, 1.0, 0.0))


def asymmetric_loss(logits: jax.Array, targets: jax.Array, gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05) -> jax.Array:
  """Per-entry asymmetric loss (Ridnik et al. 2021, ICCV; Alibaba-MIIL/ASL `AsymmetricLoss`).

  With p = sigmoid(x) and the shifted probability p_m = max(p - clip, 0):
    loss = -[y log p + (1 - y) log(1 - p_m)] * (1 - p_t) ** (gamma_pos y + gamma_neg (1 - y)),
    1 - p_t = y (1 - p) + (1 - y) p_m,
  which is the reference's xs_neg = min(1 - p + clip, 1) and pt = y p + (1 - y) xs_neg
  written out; the focusing weight carries gradient (as in the reference, whose
  no-grad switch is disabled). gamma = 0 and clip = 0 give binary cross-entropy.
  Difference: the reference clamps probabilities at eps = 1e-8 before the log, which
  caps the loss at 18.4 with zero gradient for logits below -18.4; here log p is
  log_sigmoid(x), exact and with a gradient for every logit.
  """
  x = logits.astype(jnp.float32)
  y = targets.astype(jnp.float32)
  log_p = jax.nn.log_sigmoid(x)
  if clip > 0:
    p_shifted = jnp.maximum(jax.nn.sigmoid(x) - clip, 0.0)
    log_not_p = jnp.log1p(-p_shifted)  # 1 - p_m >= clip: finite
  else:
    p_shifted = jax.nn.sigmoid(x)
    log_not_p = jax.nn.log_sigmoid(-x)
  loss = -(y * log_p + (1.0 - y) * log_not_p)
  if gamma_neg == 0 and gamma_pos == 0:
    return loss
  one_minus_pt = y * jax.nn.sigmoid(-x) + (1.0 - y) * p_shifted
  return loss * _power_with_zero_base(one_minus_pt, gamma_pos * y + gamma_neg * (1.0 - y))


@register("multilabel")
class MultiLabel(Task):
  """Independent sigmoid per class; batch `labels` [B, K] (0/1, soft allowed), `label_mask`.

  Keys: loss 'bce' | 'asl'; label_smoothing eps (targets y (1 - eps) + eps / 2); ASL's
  asl_gamma_neg, asl_gamma_pos, asl_clip (Ridnik et al. 2021 defaults for multi-label:
  4, 0, 0.05).
  Normalisation: the per-entry losses are summed over entries with label_mask 1 and
  divided by max(number of such entries, 1): a mean per *labelled entry*, the same scale
  as torch's BCEWithLogitsLoss(reduction='mean') when nothing is masked (and B K times
  smaller than the ASL reference's plain sum). Metrics: loss, frac_labels_used (share of
  the B K entries that counted).
  """

  batch_keys = ("labels", "label_mask")
  defaults = dict(loss="bce", label_smoothing=0.0, asl_gamma_neg=4.0, asl_gamma_pos=0.0,
                  asl_clip=0.05)

  def __init__(self, task_cfg=None, where: str = "config.task"):
    super().__init__(task_cfg, where)
    self.smoothing = self._number("label_smoothing", 0.0, 1.0, high_open=True)
    gamma_neg = self._number("asl_gamma_neg", 0.0, 100.0)
    gamma_pos = self._number("asl_gamma_pos", 0.0, 100.0)
    clip = self._number("asl_clip", 0.0, 1.0, high_open=True)
    per_entry: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
        "bce": binary_cross_entropy,
        "asl": lambda x, y: asymmetric_loss(x, y, gamma_neg, gamma_pos, clip),
    }
    self.per_entry = per_entry[self._choice("loss", per_entry)]

  def loss(self, logits, batch):
    labels = batch["labels"]
    _check_same_shape(logits, labels, "labels")
    mask = batch.get("label_mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    targets = labels.astype(jnp.float32) * (1.0 - self.smoothing) + self.smoothing / 2
    loss = _masked_mean(self.per_entry(logits.astype(jnp.float32), targets), mask)
    return loss, {"loss": loss, "frac_labels_used": jnp.mean(mask)}

  def predict(self, logits):
    return jax.nn.sigmoid(logits.astype(jnp.float32))


# ----------------------------------------------------------------------------
# Multi-class classification (COVIDx, TBX11K, ...): one softmax over K classes.
# ----------------------------------------------------------------------------


@register("multiclass")
class MultiClass(Task):
  """Softmax cross-entropy; batch `labels` one-hot [B, K] (mixed rows allowed), optional
  `label_mask` [B, K].

  A row counts when its labels are not all zero and (with a mask) its mask row is not all
  zero; the loss is the mean over counted rows (0 when none). label_smoothing eps gives
  targets (1 - eps) y + eps / K (optax.smooth_labels; linear, so smoothing a mixed row
  equals mixing smoothed rows as timm does). Targets are not renormalised.
  Metrics: loss, accuracy (argmax of logits == argmax of labels, on counted rows),
  frac_rows_used.
  """

  batch_keys = ("labels", "label_mask")
  defaults = dict(label_smoothing=0.0)

  def __init__(self, task_cfg=None, where: str = "config.task"):
    super().__init__(task_cfg, where)
    self.smoothing = self._number("label_smoothing", 0.0, 1.0, high_open=True)

  def loss(self, logits, batch):
    labels = batch["labels"].astype(jnp.float32)
    _check_same_shape(logits, labels, "labels")
    logits = logits.astype(jnp.float32)
    rows = jnp.any(labels != 0, axis=-1)
    mask = batch.get("label_mask")
    if mask is not None:
      rows &= jnp.any(mask != 0, axis=-1)
    rows = rows.astype(jnp.float32)
    targets = optax.smooth_labels(labels, self.smoothing) if self.smoothing else labels
    loss = _masked_mean(optax.softmax_cross_entropy(logits, targets), rows)
    correct = (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)
    return loss, {"loss": loss, "accuracy": _masked_mean(correct, rows),
                  "frac_rows_used": jnp.mean(rows)}

  def predict(self, logits):
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------
# Semantic segmentation (lungs, heart, pneumothorax masks).
# ----------------------------------------------------------------------------


@register("segmentation")
class Segmentation(Task):
  """Per-pixel softmax over num_classes; logits [B, H, W, C], batch `seg` [B, H, W] int.

  loss = ce_weight * CE + dice_weight * (1 - Dice):
    CE    mean over counted pixels of -log softmax(logits)[seg];
    Dice  mean over the foreground classes 1..C-1 of the soft Dice
          (2 sum p_c g_c + 1) / (sum p_c + sum g_c + 1), the sums over every counted pixel
          of the batch (a "batch Dice", as nnU-Net's batch_dice: stable for small or absent
          structures) with smoothing 1, so a class absent from both prediction and target
          scores 1.
  Counted pixels: seg != ignore_index and 0 <= seg < num_classes; values outside that range
  are ignored too (see frac_pixels_used). Logits must already have the mask's resolution.
  Metrics: loss, ce, dice_loss, pixel_accuracy, frac_pixels_used.
  """

  batch_keys = ("seg",)
  defaults = dict(num_classes=0, dice_weight=1.0, ce_weight=1.0, ignore_index=255)

  def __init__(self, task_cfg=None, where: str = "config.task"):
    super().__init__(task_cfg, where)
    num_classes = self.cfg["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
        or num_classes < 2:
      raise ConfigError(f"{where}.num_classes={num_classes!r} must be an integer >= 2 "
                        "(background plus at least one structure)")
    self.num_classes = int(num_classes)
    self.dice_weight = self._number("dice_weight", 0.0, float("inf"))
    self.ce_weight = self._number("ce_weight", 0.0, float("inf"))
    ignore = self.cfg["ignore_index"]
    if isinstance(ignore, bool) or not isinstance(ignore, numbers.Integral):
      raise ConfigError(f"{where}.ignore_index={ignore!r} must be an integer (e.g. 255 or -1)")
    self.ignore_index = int(ignore)

  def loss(self, logits, batch):
    seg = batch["seg"]
    if logits.shape != (*seg.shape, self.num_classes):
      raise ValueError(f"logits have shape {logits.shape}; expected batch['seg'].shape + "
                       f"(num_classes,) = {(*seg.shape, self.num_classes)}")
    seg = seg.astype(jnp.int32)
    counted = (seg != self.ignore_index) & (seg >= 0) & (seg < self.num_classes)
    weight = counted.astype(jnp.float32)
    target = jnp.where(counted, seg, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = _masked_mean(-jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0], weight)
    probs = jnp.exp(logp) * weight[..., None]
    onehot = jax.nn.one_hot(target, self.num_classes, dtype=jnp.float32) * weight[..., None]
    axes = tuple(range(seg.ndim))
    overlap = jnp.sum(probs * onehot, axis=axes)
    total = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = (2.0 * overlap + 1.0) / (total + 1.0)
    dice_loss = 1.0 - jnp.mean(dice[1:])
    loss = self.ce_weight * ce + self.dice_weight * dice_loss
    correct = (jnp.argmax(logp, axis=-1) == target).astype(jnp.float32)
    return loss, {"loss": loss, "ce": ce, "dice_loss": dice_loss,
                  "pixel_accuracy": _masked_mean(correct, weight),
                  "frac_pixels_used": jnp.mean(weight)}

  def predict(self, logits):
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
