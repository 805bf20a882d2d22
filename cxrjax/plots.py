"""Evaluation figures as PNG files: ROC/PR curves, calibration, heat-map and mask overlays,
label-efficiency curves.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot: no
display is needed, no global backend is switched under a notebook, and no figure stays
registered (each is dropped once saved). Every function validates its inputs (ValueError
naming the argument), creates the parent directory of `path`, and returns `path`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps, patches, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as sk_metrics

from cxrjax.metrics import classification

_DPI = 110


def _save(figure: Figure, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(figure)  # attaches the headless canvas that renders the PNG
  figure.savefig(path, dpi=_DPI, format="png")
  figure.clear()
  return path


def _class_colour(index: int):
  return colormaps["tab20"](index % 20)


def _grid(num_panels: int, cols: int) -> tuple[int, int]:
  if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1:
    raise ValueError(f"cols={cols!r}; expected a positive integer")
  cols = min(int(cols), num_panels)
  return math.ceil(num_panels / cols), cols


# ------------------------------------------------------------------------------ ROC / PR


def roc_pr_curves(probs: Any, labels: Any, mask: Any | None, class_names: Sequence[str],
                  path: str | os.PathLike, *, max_classes_per_figure: int = 16) -> str:
  """ROC (AUROC in the legend) and PR (AP in the legend) curves of every class.

  One figure with a (ROC, PR) pair of panels per group of at most max_classes_per_figure
  classes, stacked in rows so legends stay readable. Masked labels are left out; classes
  without both label values are skipped and named in the figure title.
  """
  probs = classification._probabilities("probs", probs, ndim=2)
  valid = classification._label_mask(mask, probs.shape)
  positive = classification._binary_labels("labels", labels, probs.shape, valid)
  names = classification._class_name_list(class_names, probs.shape[1])
  if isinstance(max_classes_per_figure, bool) or not isinstance(
      max_classes_per_figure, (int, np.integer)) or max_classes_per_figure < 1:
    raise ValueError(f"max_classes_per_figure={max_classes_per_figure!r}; expected a positive "
                     f"integer")
  plotted, skipped = [], []
  for k, name in enumerate(names):
    truth = positive[valid[:, k], k]
    (plotted if truth.any() and not truth.all() else skipped).append(k)
  groups = [plotted[i:i + max_classes_per_figure]
            for i in range(0, len(plotted), max_classes_per_figure)] or [[]]
  figure = Figure(figsize=(13, 5.5 * len(groups)))
  axes = figure.subplots(len(groups), 2, squeeze=False)
  for row, classes in enumerate(groups):
    roc_axis, pr_axis = axes[row]
    for k in classes:
      scores, truth = probs[valid[:, k], k], positive[valid[:, k], k]
      fpr, tpr, _ = sk_metrics.roc_curve(truth, scores)
      precision, recall, _ = sk_metrics.precision_recall_curve(truth, scores)
      colour = _class_colour(k)
      roc_axis.plot(fpr, tpr, color=colour, lw=1.3,
                    label=f"{names[k]} ({classification.auroc(scores, truth):.3f})")
      pr_axis.step(recall, precision, where="post", color=colour, lw=1.3,
                   label=f"{names[k]} ({classification.average_precision(scores, truth):.3f})")
    roc_axis.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    roc_axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
                 ylabel="true positive rate", title="ROC (legend: AUROC)")
    pr_axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
                title="Precision-recall (legend: AP)")
    for axis in (roc_axis, pr_axis):
      axis.grid(alpha=0.3)
      if classes:
        axis.legend(fontsize=7, loc="lower right" if axis is roc_axis else "upper right")
      else:
        axis.text(0.5, 0.5, "no class has both label values", ha="center",
                  transform=axis.transAxes)
  title = f"{len(plotted)} of {len(names)} classes"
  if skipped:
    title += "; skipped (one label value): " + ", ".join(names[k] for k in skipped)
  figure.suptitle(title, fontsize=10, wrap=True)
  figure.tight_layout()
  return _save(figure, path)


# ----------------------------------------------------------------------------- calibration


def calibration_diagram(probs: Any, labels: Any, path: str | os.PathLike, *, n_bins: int = 15,
                        title: str = "") -> str:
  """Reliability diagram with a count histogram; ECE in the title.

  probs [N] with 0/1 labels [N]: binary (frequency of positives per confidence bin).
  probs [N, K] with class indices [N] (or one-hot): top-label (accuracy of the argmax per
  bin of max probability).
  """
  classification._check_n_bins(n_bins)
  array = np.asarray(probs)
  if array.ndim == 1:
    confidence = classification._probabilities("probs", array, ndim=1)
    outcome = classification._binary_labels("labels", labels, confidence.shape)
    ece = classification.expected_calibration_error(confidence, outcome, n_bins)
    kind, outcome_name = "binary", "fraction positive"
  elif array.ndim == 2:
    array = classification._probabilities("probs", array, ndim=2)
    label_index = classification._class_indices("labels", labels, *array.shape)
    confidence = array.max(axis=1)
    outcome = np.argmax(array, axis=1) == label_index
    ece = classification.top_label_ece(array, label_index, n_bins)
    kind, outcome_name = "top-label", "accuracy"
  else:
    raise ValueError(f"probs has shape {array.shape}; expected [N] (binary) or [N, K] "
                     f"(top-label)")
  bins = classification._bin_index(confidence, n_bins)
  counts = np.bincount(bins, minlength=n_bins)
  filled = counts > 0
  mean_outcome = np.bincount(bins, weights=outcome.astype(float), minlength=n_bins)
  mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins)
  mean_outcome[filled] /= counts[filled]
  mean_confidence[filled] /= counts[filled]
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  width = 1.0 / n_bins

  figure = Figure(figsize=(5.5, 6.5))
  reliability, histogram = figure.subplots(2, 1, sharex=True,
                                           gridspec_kw={"height_ratios": (3, 1)})
  reliability.bar(edges[:-1][filled], mean_outcome[filled], width=width, align="edge",
                  color="tab:blue", edgecolor="black", lw=0.5, label=outcome_name)
  reliability.scatter(mean_confidence[filled], mean_outcome[filled], s=12, color="black",
                      zorder=3, label="bin mean confidence")
  reliability.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
  reliability.set(xlim=(0, 1), ylim=(0, 1), ylabel=outcome_name)
  reliability.legend(fontsize=8, loc="upper left")
  reliability.grid(alpha=0.3)
  histogram.bar(edges[:-1], counts, width=width, align="edge", color="tab:grey",
                edgecolor="black", lw=0.5)
  histogram.set(xlabel=f"{'confidence (max prob)' if kind == 'top-label' else 'probability'}",
                ylabel="count")
  heading = f"{title}  " if title else ""
  reliability.set_title(f"{heading}{kind} ECE = {ece:.4f} (N={confidence.size}, "
                        f"{n_bins} bins)", fontsize=10)
  figure.tight_layout()
  return _save(figure, path)


# -------------------------------------------------------------------------------- overlays


def _display_images(images: Any) -> np.ndarray:
  """[N, H, W] or [N, H, W, C] -> floats in [0, 1], min-max per image (grey or RGB)."""
  images = np.asarray(images, dtype=np.float64)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or images.size == 0:
    raise ValueError(f"images has shape {images.shape}; expected [N, H, W] or [N, H, W, C] "
                     f"with C in (1, 3)")
  if not np.all(np.isfinite(images)):
    raise ValueError("images holds NaN/inf values; expected finite pixels")
  axes = tuple(range(1, images.ndim))
  low = images.min(axis=axes, keepdims=True)
  span = images.max(axis=axes, keepdims=True) - low
  return np.divide(images - low, span, out=np.zeros_like(images), where=span > 0)


def _box_rows(name: str, value: Any, num_images: int) -> list[np.ndarray] | None:
  if value is None:
    return None
  if len(value) != num_images:
    raise ValueError(f"{name} has {len(value)} entries; expected {num_images}, one [M, 5] array "
                     f"per image")
  rows = []
  for index, entry in enumerate(value):
    entry = np.asarray(entry, dtype=np.float64)
    if entry.size == 0:
      entry = np.zeros((0, 5))
    if entry.ndim != 2 or entry.shape[1] != 5:
      raise ValueError(f"{name}[{index}] has shape {np.shape(entry)}; expected [M, 5] rows "
                       f"(class_index, x0, y0, x1, y1)")
    rows.append(entry[entry[:, 0] >= 0])  # class -1 rows are padding
  return rows


def _draw_boxes(axis, rows: np.ndarray, class_names: Sequence[str] | None, *,
                dashed: bool) -> None:
  for class_index, x0, y0, x1, y1 in rows:
    colour = "lime" if not dashed else "magenta"
    axis.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                     lw=1.5, ls="--" if dashed else "-"))
    index = int(class_index)
    text = class_names[index] if class_names is not None and index < len(class_names) \
        else str(index)
    axis.text(x0, y0, text, color=colour, fontsize=6, va="bottom")


def overlay_grid(images: Any, maps: Any | None, path: str | os.PathLike, *,
                 boxes: Sequence[Any] | None = None, pred_boxes: Sequence[Any] | None = None,
                 titles: Sequence[str] | None = None, cols: int = 4, alpha: float = 0.45,
                 class_names: Sequence[str] | None = None) -> str:
  """Grid of images with heat maps (Grad-CAM, attention) and boxes drawn over them.

  images: [N, H, W] or [N, H, W, C] in any range (min-max per image for display).
  maps: [N, h, w] heat maps stretched over the image (h, w may be coarser, e.g. patch grid).
  boxes / pred_boxes: per image an [M, 5] array (class_index, x0, y0, x1, y1) in image
  pixels, class -1 rows ignored; gt drawn solid green, predictions dashed magenta, labelled
  with class_names[class_index] when given.
  """
  display = _display_images(images)
  num_images, height, width = display.shape[:3]
  heat = None
  if maps is not None:
    heat = np.asarray(maps, dtype=np.float64)
    if heat.ndim != 3 or heat.shape[0] != num_images or heat.size == 0:
      raise ValueError(f"maps has shape {heat.shape}; expected [{num_images}, h, w], one map "
                       f"per image")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha!r}; expected an opacity in [0, 1]")
  gt_rows = _box_rows("boxes", boxes, num_images)
  pred_rows = _box_rows("pred_boxes", pred_boxes, num_images)
  if titles is not None and len(titles) != num_images:
    raise ValueError(f"titles has {len(titles)} entries; expected {num_images}")
  rows, cols = _grid(num_images, cols)
  figure = Figure(figsize=(3.2 * cols, 3.3 * rows))
  axes = figure.subplots(rows, cols, squeeze=False).ravel()
  extent = (0, width, height, 0)  # pixel i spans [i, i + 1): box coordinates land exactly
  for index, axis in enumerate(axes):
    axis.axis("off")
    if index >= num_images:
      continue
    axis.imshow(display[index], cmap="gray", extent=extent, interpolation="nearest")
    if heat is not None:
      axis.imshow(heat[index], cmap="jet", alpha=alpha, extent=extent, interpolation="bilinear")
    if gt_rows is not None:
      _draw_boxes(axis, gt_rows[index], class_names, dashed=False)
    if pred_rows is not None:
      _draw_boxes(axis, pred_rows[index], class_names, dashed=True)
    axis.set(xlim=(0, width), ylim=(height, 0))
    if titles is not None:
      axis.set_title(str(titles[index]), fontsize=8)
  figure.tight_layout()
  return _save(figure, path)


def segmentation_overlay(images: Any, pred: Any, target: Any | None,
                         class_names: Sequence[str], path: str | os.PathLike, *,
                         cols: int = 4) -> str:
  """Predicted masks as colour fills (background 0 transparent), target masks as contours
  of the same colour, over each image [N, H, W]."""
  display = _display_images(images)
  if display.ndim != 3:
    raise ValueError(f"images has shape {np.shape(images)}; expected [N, H, W] grey images")
  names = [str(name) for name in class_names]
  masks = {}
  for name, value in (("pred", pred), ("target", target)):
    if value is None:
      continue
    mask = np.asarray(value)
    if mask.shape != display.shape:
      raise ValueError(f"{name} has shape {mask.shape}; expected {display.shape} like images")
    if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
      raise ValueError(f"{name} has dtype {mask.dtype}; expected integer class indices")
    if mask.min() < 0 or mask.max() >= len(names):
      raise ValueError(f"{name} spans [{mask.min()}, {mask.max()}]; expected class indices in "
                       f"[0, {len(names) - 1}] (one per class_names entry)")
    masks[name] = mask.astype(np.int64)
  num_images = display.shape[0]
  colours = np.array([colormaps["tab10"](k % 10) for k in range(len(names))])
  rows, cols = _grid(num_images, cols)
  figure = Figure(figsize=(3.2 * cols, 3.3 * rows + 0.6))
  axes = figure.subplots(rows, cols, squeeze=False).ravel()
  for index, axis in enumerate(axes):
    axis.axis("off")
    if index >= num_images:
      continue
    axis.imshow(display[index], cmap="gray", interpolation="nearest")
    fill = colours[masks["pred"][index]].copy()
    fill[..., 3] = np.where(masks["pred"][index] > 0, 0.45, 0.0)
    axis.imshow(fill, interpolation="nearest")
    if "target" in masks:
      for k in range(1, len(names)):
        region = masks["target"][index] == k
        if region.any() and not region.all():
          axis.contour(region.astype(float), levels=[0.5], colors=[colours[k]], linewidths=1.2)
  legend = [patches.Patch(color=colours[k], label=names[k]) for k in range(1, len(names))]
  if legend:
    figure.legend(handles=legend, loc="lower center", ncol=min(len(legend), 6), fontsize=8,
                  title="fill = prediction, line = target", title_fontsize=8)
  figure.tight_layout(rect=(0, 0.08, 1, 1))
  return _save(figure, path)


# ------------------------------------------------------------------------ label efficiency


def _optional_float(point: Mapping[str, Any], key: str, index: int) -> float | None:
  value = point.get(key)
  if value is None:
    return None
  if not isinstance(value, (int, float, np.number)) or not math.isfinite(float(value)):
    raise ValueError(f"points[{index}][{key!r}]={value!r}; expected a finite number or None")
  return float(value)


def label_efficiency_curve(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                           metric_name: str = "mean AUROC") -> str:
  """Metric vs fraction of training labels (log-scale x, in %), one line per "label".

  points: dicts {"fraction": (0, 1], "value": float, "ci_low": float | None,
  "ci_high": float | None, "label": series name}; CIs become error bars.
  """
  if not points:
    raise ValueError("points is empty; expected dicts with fraction, value, label")
  series: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
  for index, point in enumerate(points):
    if not isinstance(point, Mapping) or "fraction" not in point or "value" not in point:
      raise ValueError(f"points[{index}]={point!r}; expected a dict with 'fraction', 'value', "
                       f"'label' and optional 'ci_low'/'ci_high'")
    fraction = _optional_float(point, "fraction", index)
    value = _optional_float(point, "value", index)
    if fraction is None or not 0.0 < fraction <= 1.0:
      raise ValueError(f"points[{index}]['fraction']={point['fraction']!r}; expected a label "
                       f"fraction in (0, 1]")
    if value is None:
      raise ValueError(f"points[{index}]['value'] is None; expected a number")
    low, high = _optional_float(point, "ci_low", index), _optional_float(point, "ci_high", index)
    series.setdefault(str(point.get("label", "")), []).append((fraction, value, low, high))
  figure = Figure(figsize=(6.5, 4.5))
  axis = figure.subplots()
  for index, (label, rows) in enumerate(series.items()):
    rows.sort()
    x = np.array([row[0] for row in rows]) * 100.0
    y = np.array([row[1] for row in rows])
    colour = colormaps["tab10"](index % 10)
    axis.plot(x, y, marker="o", ms=4, lw=1.5, color=colour, label=label or None)
    # Error bars only where an interval was given (a half-open CI draws the known side).
    with_ci = np.array([row[2] is not None or row[3] is not None for row in rows])
    if with_ci.any():
      below = np.array([row[1] - row[2] if row[2] is not None else 0.0 for row in rows])
      above = np.array([row[3] - row[1] if row[3] is not None else 0.0 for row in rows])
      axis.errorbar(x[with_ci], y[with_ci], fmt="none", ecolor=colour, capsize=3,
                    yerr=np.stack([np.maximum(below, 0), np.maximum(above, 0)])[:, with_ci])
  fractions = sorted({row[0] * 100.0 for rows in series.values() for row in rows})
  axis.set_xscale("log")
  axis.set_xticks(fractions)
  axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}%"))
  axis.xaxis.set_minor_formatter(ticker.NullFormatter())
  axis.set(xlabel="fraction of training labels", ylabel=metric_name,
           title=f"Label efficiency: {metric_name}")
  axis.grid(alpha=0.3, which="both")
  if any(label for label in series):
    axis.legend(fontsize=8)
  figure.tight_layout()
  return _save(figure, path)
