"""Dice and Jaccard (IoU) of label maps, under both conventions papers use.

Segmentation papers disagree on how to average: some average per-image scores, some pool
pixels over the split. The two differ most for small structures (an image with a tiny
missed lesion scores 0 per image but barely moves the pooled count), so both are reported,
each under its own name, instead of one number of unstated meaning.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

CONVENTIONS = (
    "per_image: per class, the mean over images of that image's Dice (Jaccard); an image where "
    "the class is absent from both prediction and target is skipped for that class "
    "(num_images counts the images used). dataset: per class, Dice = 2TP / (2TP + FP + FN) "
    "and Jaccard = TP / (TP + FP + FN) with TP/FP/FN pooled over all pixels of the split. "
    "Pixels whose target equals ignore_index are left out of both. Class index = position in "
    "class_names; means are over classes where the value is defined, excluding index 0 "
    "(background) unless include_background.")


def _label_maps(name: str, value: Any, num_classes: int,
                ignore_index: int | None) -> np.ndarray:
  maps = np.asarray(value)
  if maps.ndim != 3:
    raise ValueError(f"{name} has shape {maps.shape}; expected [N, H, W] integer label maps")
  if maps.size == 0:
    raise ValueError(f"{name} has shape {maps.shape}; expected at least one non-empty image")
  if not np.issubdtype(maps.dtype, np.integer) and maps.dtype != bool:
    raise ValueError(f"{name} has dtype {maps.dtype}; expected integer class indices")
  maps = maps.astype(np.int64)
  outside = (maps < 0) | (maps >= num_classes)
  if ignore_index is not None:
    outside &= maps != ignore_index
  if np.any(outside):
    allowed = f"[0, {num_classes - 1}]" + (f" or ignore_index={ignore_index}"
                                           if ignore_index is not None else "")
    raise ValueError(f"{name} holds class indices {np.unique(maps[outside])[:5].tolist()}; "
                     f"expected {allowed} (one per entry of class_names)")
  return maps


def _optional(value: float) -> float | None:
  return float(value) if np.isfinite(value) else None


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def _mean_defined(values: np.ndarray) -> float | None:
  defined = values[np.isfinite(values)]
  return float(defined.mean()) if defined.size else None


def dice_jaccard(pred: Any, target: Any, class_names: Sequence[str], *,
                 ignore_index: int | None = None,
                 include_background: bool = False) -> dict[str, Any]:
  """Per-class and mean Dice/Jaccard of predicted vs target label maps [N, H, W].

  Returns:
    {"per_class": {name: {"dice_per_image", "jaccard_per_image", "dice_dataset",
    "jaccard_dataset", "num_images"}}, "mean": {the four scores}, "conventions": str};
    None where a score is undefined (class absent from every prediction and target).
  """
  names = [str(name) for name in class_names]
  num_classes = len(names)
  if num_classes < 1 or len(set(names)) != num_classes:
    raise ValueError(f"class_names={names!r}; expected distinct names, index 0 = background")
  if ignore_index is not None and 0 <= ignore_index < num_classes:
    raise ValueError(f"ignore_index={ignore_index} is a class index (class_names has "
                     f"{num_classes}); expected a value outside [0, {num_classes - 1}], e.g. 255")
  pred = _label_maps("pred", pred, num_classes, None)
  target = _label_maps("target", target, num_classes, ignore_index)
  if pred.shape != target.shape:
    raise ValueError(f"pred has shape {pred.shape} but target has {target.shape}; expected "
                     f"the same [N, H, W]")
  num_images = pred.shape[0]
  counted = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
  # Confusion matrix per image [N, K(target), K(pred)] from one bincount.
  image_index = np.broadcast_to(np.arange(num_images)[:, None, None], target.shape)
  cells = (image_index * num_classes + target) * num_classes + pred
  confusion = np.bincount(cells[counted], minlength=num_images * num_classes ** 2)
  confusion = confusion.reshape(num_images, num_classes, num_classes).astype(np.float64)
  tp = np.diagonal(confusion, axis1=1, axis2=2)
  fn = confusion.sum(axis=2) - tp
  fp = confusion.sum(axis=1) - tp
  union = tp + fp + fn  # [N, K]; 0 = class absent from both pred and target in that image
  image_dice, image_jaccard = _ratio(2 * tp, tp + union), _ratio(tp, union)
  present = union > 0
  num_present = present.sum(axis=0)
  dice_per_image = _ratio(np.where(present, image_dice, 0.0).sum(axis=0), num_present)
  jaccard_per_image = _ratio(np.where(present, image_jaccard, 0.0).sum(axis=0), num_present)
  total_tp, total_union = tp.sum(axis=0), union.sum(axis=0)
  dice_dataset, jaccard_dataset = _ratio(2 * total_tp, total_tp + total_union), \
      _ratio(total_tp, total_union)
  scores = {"dice_per_image": dice_per_image, "jaccard_per_image": jaccard_per_image,
            "dice_dataset": dice_dataset, "jaccard_dataset": jaccard_dataset}
  per_class = {}
  for k, name in enumerate(names):
    per_class[name] = {key: _optional(values[k]) for key, values in scores.items()}
    per_class[name]["num_images"] = int(num_present[k])
  first_counted = 0 if include_background else 1
  return {"per_class": per_class,
          "mean": {key: _mean_defined(values[first_counted:]) for key, values in scores.items()},
          "mean_classes": names[first_counted:],
          "conventions": CONVENTIONS}
