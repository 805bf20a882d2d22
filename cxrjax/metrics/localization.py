"""Weakly supervised localisation from heat maps (Grad-CAM, attention), CXR14-style.

Protocol of Wang et al. 2017 (ChestX-ray8): min-max normalise a class's heat map, keep the
pixels at or above a fraction of its maximum, take the bounding box of each connected
component (8-connectivity), and count a hit when the overlap with a ground-truth box of that
class exceeds T for T in {0.1, ..., 0.7}. Overlap is IoU or IoBB, where IoBB is the
intersection over the *predicted* (detected) box area, as in that paper. The pointing game
(Zhang et al. 2016) counts a hit when the map's maximum lies inside a ground-truth box.

Coordinates are continuous pixel coordinates of the heat map: pixel (row i, column j) covers
[j, j + 1) x [i, i + 1), boxes are (x0, y0, x1, y1) with x along columns. Ground-truth boxes
must be given in the heat map's frame (rescale them, or upsample the maps, first).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

Box = tuple[float, float, float, float]
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# 8-connectivity: diagonal neighbours belong to the same blob.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _heat_map(name: str, value: Any) -> np.ndarray:
  saliency = np.asarray(value, dtype=np.float64)
  if saliency.ndim != 2 or saliency.size == 0:
    raise ValueError(f"{name} has shape {saliency.shape}; expected a non-empty [H, W] map")
  if not np.all(np.isfinite(saliency)):
    raise ValueError(f"{name} holds NaN/inf values; expected a finite heat map")
  return saliency


def _box_array(name: str, value: Any) -> np.ndarray:
  box = np.asarray(value, dtype=np.float64)
  if box.shape != (4,) or not np.all(np.isfinite(box)):
    raise ValueError(f"{name}={value!r}; expected a finite (x0, y0, x1, y1) box")
  if box[2] < box[0] or box[3] < box[1]:
    raise ValueError(f"{name}={tuple(box.tolist())}; expected x1 >= x0 and y1 >= y0")
  return box


def saliency_boxes(saliency: Any, *, threshold: float = 0.5,
                   largest_only: bool = False) -> list[Box]:
  """Bounding boxes of the connected regions where the normalised map >= threshold.

  The map is min-max normalised to [0, 1] first, so `threshold` is a fraction of its range.
  A constant map carries no location and gives no boxes. Boxes are (x0, y0, x1, y1) in
  continuous pixel coordinates, largest component (pixel count) first; largest_only keeps
  just that one.
  """
  saliency = _heat_map("saliency", saliency)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold={threshold!r}; expected a fraction of the map's range in [0, 1]")
  low, high = saliency.min(), saliency.max()
  if high <= low:
    return []
  kept = (saliency - low) / (high - low) >= threshold
  components, num_components = ndimage.label(kept, structure=_CONNECTIVITY)
  sizes = np.bincount(components.ravel(), minlength=num_components + 1)[1:]
  extents = ndimage.find_objects(components)  # (row slice, column slice) of label i + 1
  boxes = []
  for label in np.argsort(-sizes, kind="stable"):
    rows, columns = extents[label]
    boxes.append((float(columns.start), float(rows.start), float(columns.stop), float(rows.stop)))
    if largest_only:
      break
  return boxes


def _intersection(a: np.ndarray, b: np.ndarray) -> float:
  width = min(a[2], b[2]) - max(a[0], b[0])
  height = min(a[3], b[3]) - max(a[1], b[1])
  return max(width, 0.0) * max(height, 0.0)


def _area(box: np.ndarray) -> float:
  return float((box[2] - box[0]) * (box[3] - box[1]))


def box_iou(a: Any, b: Any) -> float:
  """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when both are empty."""
  a, b = _box_array("a", a), _box_array("b", b)
  intersection = _intersection(a, b)
  union = _area(a) + _area(b) - intersection
  return intersection / union if union > 0 else 0.0


def box_iobb(pred: Any, gt: Any) -> float:
  """IoBB (Wang et al. 2017): intersection over the *predicted* box's area; 0 if it is empty."""
  pred, gt = _box_array("pred", pred), _box_array("gt", gt)
  area = _area(pred)
  return _intersection(pred, gt) / area if area > 0 else 0.0


def _gt_box_rows(value: Any) -> np.ndarray:
  boxes = np.asarray(value, dtype=np.float64)
  if boxes.size == 0:
    return np.zeros((0, 4))
  if boxes.ndim == 1:
    boxes = boxes[None, :]
  if boxes.ndim != 2 or boxes.shape[1] not in (4, 5):
    raise ValueError(f"gt_boxes has shape {boxes.shape}; expected [M, 4] (x0, y0, x1, y1) or "
                     f"[M, 5] (class_index, x0, y0, x1, y1)")
  if boxes.shape[1] == 5:
    boxes = boxes[boxes[:, 0] >= 0, 1:]  # class -1 rows are padding
  return boxes


def pointing_hit(saliency: Any, gt_boxes: Any) -> bool:
  """Pointing game: is the centre of the map's argmax pixel inside any gt box?

  gt_boxes: [M, 4] (x0, y0, x1, y1), or [M, 5] rows (class_index, x0, y0, x1, y1) whose
  class -1 rows are padding. Ties for the maximum go to the first pixel in row-major order;
  box edges count as inside. A constant map points nowhere: a miss (as it has no boxes).
  """
  saliency = _heat_map("saliency", saliency)
  boxes = _gt_box_rows(gt_boxes)
  if saliency.max() <= saliency.min():
    return False
  row, column = np.unravel_index(np.argmax(saliency), saliency.shape)
  x, y = column + 0.5, row + 0.5
  return bool(np.any((boxes[:, 0] <= x) & (x <= boxes[:, 2])
                     & (boxes[:, 1] <= y) & (y <= boxes[:, 3])))


def _summary(ious: list[float], iobbs: list[float], hits: list[bool], num_boxes: int,
             thresholds: Sequence[float]) -> dict[str, Any]:
  def accuracy(values: list[float], threshold: float) -> float | None:
    return float(np.mean(np.asarray(values) > threshold)) if values else None

  return {
      "num_pairs": len(ious), "num_boxes": int(num_boxes),
      "mean_iou": float(np.mean(ious)) if ious else None,
      "mean_iobb": float(np.mean(iobbs)) if iobbs else None,
      "iou_accuracy": {f"{t:g}": accuracy(ious, t) for t in thresholds},
      "iobb_accuracy": {f"{t:g}": accuracy(iobbs, t) for t in thresholds},
      "pointing_accuracy": float(np.mean(hits)) if hits else None}


def localization_report(saliency: Any, boxes: Any, class_names: Sequence[str], *,
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                        map_threshold: float = 0.5) -> dict[str, Any]:
  """Box accuracy at IoU/IoBB > T and pointing-game accuracy, per class and overall.

  Args:
    saliency: [N, K, H, W] heat maps, one per image and class.
    boxes: [N, M, 5] rows (class_index, x0, y0, x1, y1) in heat-map pixels; rows with class
      -1 are padding.
    class_names: K names. thresholds: the T values. map_threshold: fraction of the normalised
      map kept when drawing predicted boxes (saliency_boxes).

  Every (image, class with >= 1 gt box in that image) is one pair. Its IoU (IoBB) is the best
  over all predicted boxes of that class's map and all gt boxes of that class (0 when the map
  yields no box); a pair is a hit at T when that value is > T. "overall" pools all pairs.
  Classes without any pair have num_pairs 0 and None scores.
  """
  saliency = np.asarray(saliency, dtype=np.float64)
  if saliency.ndim != 4 or saliency.size == 0:
    raise ValueError(f"saliency has shape {saliency.shape}; expected [N, K, H, W] heat maps")
  num_images, num_classes = saliency.shape[:2]
  names = [str(name) for name in class_names]
  if len(names) != num_classes or len(set(names)) != num_classes:
    raise ValueError(f"class_names has {len(names)} names; expected {num_classes} distinct "
                     f"names, one per saliency channel")
  boxes = np.asarray(boxes, dtype=np.float64)
  if boxes.ndim != 3 or boxes.shape[0] != num_images or boxes.shape[2] != 5:
    raise ValueError(f"boxes has shape {boxes.shape}; expected [{num_images}, M, 5] rows "
                     f"(class_index, x0, y0, x1, y1) padded with class -1")
  box_classes = boxes[..., 0]
  real_rows = box_classes >= 0
  bad_classes = real_rows & ((box_classes >= num_classes) | (box_classes != np.round(box_classes)))
  if np.any(bad_classes):
    raise ValueError(f"boxes hold class indices {np.unique(box_classes[bad_classes])[:5].tolist()};"
                     f" expected integers in [0, {num_classes - 1}] or -1 for padding")
  if not 0.0 <= map_threshold <= 1.0:
    raise ValueError(f"map_threshold={map_threshold!r}; expected a fraction in [0, 1]")
  thresholds = tuple(float(t) for t in thresholds)
  if not thresholds or not all(0.0 <= t < 1.0 for t in thresholds):
    raise ValueError(f"thresholds={thresholds!r}; expected overlap thresholds in [0, 1)")

  per_class_values = {k: ([], [], []) for k in range(num_classes)}  # ious, iobbs, hits
  num_boxes = np.zeros(num_classes, dtype=np.int64)
  for image in range(num_images):
    for k in np.unique(box_classes[image][real_rows[image]]).astype(int):
      gt = boxes[image][real_rows[image] & (box_classes[image] == k), 1:]
      num_boxes[k] += len(gt)
      predicted = saliency_boxes(saliency[image, k], threshold=map_threshold)
      ious, iobbs, hits = per_class_values[k]
      ious.append(max((box_iou(p, g) for p in predicted for g in gt), default=0.0))
      iobbs.append(max((box_iobb(p, g) for p in predicted for g in gt), default=0.0))
      hits.append(pointing_hit(saliency[image, k], gt))
  per_class = {name: _summary(*per_class_values[k], num_boxes[k], thresholds)
               for k, name in enumerate(names)}
  pooled = [sum((list(values[part]) for values in per_class_values.values()), [])
            for part in range(3)]
  return {"task": "localization", "num_images": int(num_images),
          "map_threshold": float(map_threshold), "thresholds": list(thresholds),
          "per_class": per_class,
          "overall": _summary(*pooled, int(num_boxes.sum()), thresholds),
          "no_boxes": [name for k, name in enumerate(names) if num_boxes[k] == 0],
          "conventions": ("hit at T: best IoU (IoBB) over predicted x gt boxes > T; IoBB = "
                          "intersection / predicted box area; predicted boxes: connected "
                          "components (8-connectivity) of the min-max normalised map >= "
                          "map_threshold; pointing: argmax pixel centre inside a gt box; "
                          "overall pools (image, class) pairs")}
