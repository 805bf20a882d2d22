"""Classification metrics and reports (multi-label findings, multi-class diagnoses).

Every number agrees with scikit-learn on the same rows, but the metrics are written over
*row weights*: the point estimate uses weight 1 per row and a bootstrap resample uses how
often each row was drawn. Scores are sorted once per class, so a report with 1000 patient-
level resamples of every metric costs a few matrix products per resample, not 1000 sorts.

Conventions (shared by every report):
- A metric a class cannot define on the rows at hand is None (JSON null), never a stand-in
  0.5 or NaN, and the class is listed under "undefined": AUROC needs positives and negatives;
  AUPRC, F1 and sensitivity need positives; specificity needs negatives; accuracy and ECE
  need at least one labelled row.
- Class means are over the classes where the metric is defined; inside each bootstrap
  resample they are re-computed over the classes defined in that resample.
- A row is predicted positive when prob >= threshold (the sklearn roc_curve convention).
- Calibration uses equal-width bins on [0, 1]; bin b holds edges[b] <= p < edges[b + 1],
  the last bin also holds p = 1. ECE = sum over bins of (bin count / N) * |mean p - frequency|.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from scipy import sparse
from sklearn import metrics as sk_metrics

from cxrjax.metrics import bootstrap

_LOG = logging.getLogger(__name__)

MULTILABEL_METRICS = ("auroc", "auprc", "f1", "sensitivity", "specificity", "accuracy", "ece")
MULTICLASS_PER_CLASS = ("auroc", "auprc", "f1", "sensitivity", "specificity")


# ----------------------------------------------------------------------------- validation


def _finite_array(name: str, value: Any, ndim: int, allow_empty: bool = False) -> np.ndarray:
  array = np.asarray(value)
  if array.ndim != ndim:
    expected = {1: "[N]", 2: "[N, K]"}[ndim]
    raise ValueError(f"{name} has shape {array.shape}; expected {expected}")
  if array.shape[0] == 0 and not allow_empty:
    raise ValueError(f"{name} has shape {array.shape}; expected at least one row")
  if array.dtype == bool:
    array = array.astype(np.float64)
  if not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"{name} has dtype {array.dtype}; expected numbers")
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(array)))} NaN/inf values; "
                     f"expected finite numbers")
  return array


def _probabilities(name: str, value: Any, ndim: int) -> np.ndarray:
  probs = _finite_array(name, value, ndim)
  if probs.min() < 0.0 or probs.max() > 1.0:
    raise ValueError(f"{name} spans [{probs.min():.4g}, {probs.max():.4g}]; expected "
                     f"probabilities in [0, 1] (apply sigmoid/softmax to logits first)")
  return probs


def _binary_labels(name: str, value: Any, shape: tuple[int, ...],
                   valid: np.ndarray | None = None) -> np.ndarray:
  """labels == 1 as bool; entries outside `valid` may hold anything (e.g. -1 uncertain)."""
  labels = np.asarray(value)
  if labels.shape != shape:
    raise ValueError(f"{name} has shape {labels.shape}; expected {shape} like the scores")
  if labels.dtype == bool:
    return labels if valid is None else labels & valid
  if not np.issubdtype(labels.dtype, np.number):
    raise ValueError(f"{name} has dtype {labels.dtype}; expected 0/1 numbers or bools")
  checked = labels if valid is None else labels[valid]
  bad = ~np.isin(checked, (0, 1))
  if np.any(bad):
    raise ValueError(f"{name} holds values {np.unique(checked[bad])[:5].tolist()} where labels "
                     f"count; expected 0 or 1 (mask out uncertain/missing labels)")
  positive = labels == 1
  return positive if valid is None else positive & valid


def _label_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
  if mask is None:
    return np.ones(shape, dtype=bool)
  mask = np.asarray(mask)
  if mask.shape != shape:
    raise ValueError(f"mask has shape {mask.shape}; expected {shape} like probs "
                     f"(1 = label counts, 0 = missing/uncertain)")
  if mask.dtype != bool and not np.all(np.isin(mask, (0, 1))):
    raise ValueError(f"mask holds values {np.unique(mask[~np.isin(mask, (0, 1))])[:5].tolist()}; "
                     f"expected 0/1 or bools")
  return mask.astype(bool)


def _class_name_list(class_names: Sequence[str], num_classes: int) -> list[str]:
  names = [str(name) for name in class_names]
  if len(names) != num_classes:
    raise ValueError(f"class_names has {len(names)} names; expected {num_classes}, one per "
                     f"column of probs")
  if len(set(names)) != len(names):
    duplicates = sorted({name for name in names if names.count(name) > 1})
    raise ValueError(f"class_names repeats {duplicates}; expected distinct names (report keys)")
  return names


def _check_n_bins(n_bins: int) -> None:
  if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
    raise ValueError(f"n_bins={n_bins!r}; expected a positive integer")


def _check_bootstrap_settings(n_resamples: int, level: float) -> None:
  if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) \
      or n_resamples < 0:
    raise ValueError(f"n_resamples={n_resamples!r}; expected an integer >= 0 (0 = no CIs)")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level={level!r}; expected a confidence level in (0, 1), e.g. 0.95")


# ------------------------------------------------------------------ weighted core metrics


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, NaN (undefined) where the denominator is 0."""
  out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def _mean_over_defined(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean over the last axis ignoring NaN (no warning), and how many entries were defined."""
  defined = np.isfinite(values)
  count = defined.sum(axis=-1)
  return _divide(np.where(defined, values, 0.0).sum(axis=-1), count), count


class _RankedScores:
  """Scores of each class sorted once, with their tie groups, for weighted AUROC and AP.

  With row weights w (resample counts), AUROC is the Mann-Whitney statistic
  sum_pos w * (negative weight below + half the tied negative weight) / (W+ * W-), and AP is
  sum_pos w * precision(at that score) / W+, exactly sklearn's values on duplicated rows.
  """

  def __init__(self, scores: np.ndarray, positive: np.ndarray, negative: np.ndarray):
    num_rows = scores.shape[0]
    self.order = np.argsort(scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, self.order, axis=0)
    positions = np.broadcast_to(np.arange(num_rows)[:, None], scores.shape)
    opens_group = np.ones(scores.shape, dtype=bool)
    opens_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
    # First sorted position of each row's tie group (ties share AUROC credit and a PR point).
    self.group_start = np.maximum.accumulate(np.where(opens_group, positions, 0), axis=0)
    self.positive = np.take_along_axis(positive, self.order, axis=0).astype(np.float64)
    self.negative = np.take_along_axis(negative, self.order, axis=0).astype(np.float64)
    closes_group = np.ones(scores.shape, dtype=bool)
    closes_group[:-1] = opens_group[1:]
    # One past the last sorted position of each row's tie group.
    self.group_stop = np.minimum.accumulate(
        np.where(closes_group, positions, num_rows - 1)[::-1], axis=0)[::-1] + 1

  def auroc_and_ap(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AP [R, K] for row weights [R, N]; NaN where undefined."""
    num_resamples = weights.shape[0]
    num_classes = self.order.shape[1]
    auroc = np.empty((num_resamples, num_classes))
    ap = np.empty((num_resamples, num_classes))
    leading_zero = np.zeros((num_resamples, 1))
    for k in range(num_classes):
      sorted_weights = weights[:, self.order[:, k]]
      pos = sorted_weights * self.positive[:, k]
      neg = sorted_weights * self.negative[:, k]
      # cum_x[:, i] = weight of x strictly before sorted position i.
      cum_pos = np.concatenate([leading_zero, np.cumsum(pos, axis=1)], axis=1)
      cum_neg = np.concatenate([leading_zero, np.cumsum(neg, axis=1)], axis=1)
      start, stop = self.group_start[:, k], self.group_stop[:, k]
      total_pos, total_neg = cum_pos[:, -1], cum_neg[:, -1]
      neg_below = cum_neg[:, start]
      neg_tied = cum_neg[:, stop] - neg_below
      pairs_won = np.sum(pos * (neg_below + 0.5 * neg_tied), axis=1)
      auroc[:, k] = _divide(pairs_won, total_pos * total_neg)
      # Precision when thresholding at this row's score: everything scored >= it is positive.
      pos_at_or_above = total_pos[:, None] - cum_pos[:, start]
      called_positive = pos_at_or_above + (total_neg[:, None] - cum_neg[:, start])
      precision = np.zeros_like(pos)
      np.divide(pos_at_or_above, called_positive, out=precision, where=called_positive > 0)
      ap[:, k] = _divide(np.sum(pos * precision, axis=1), total_pos)
    return auroc, ap


def _bin_index(probs: np.ndarray, n_bins: int) -> np.ndarray:
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  return np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, n_bins - 1)


class _CalibrationGaps:
  """Per (class, bin) sums of (p - outcome) as a sparse [N, K * n_bins] matrix, so the ECE
  of any row weighting is one sparse product: sum_bins |sum w (p - y)| / sum w."""

  def __init__(self, probs: np.ndarray, outcomes: np.ndarray, valid: np.ndarray, n_bins: int):
    num_rows, num_classes = probs.shape
    self.n_bins = n_bins
    columns = np.arange(num_classes)[None, :] * n_bins + _bin_index(probs, n_bins)
    rows = np.broadcast_to(np.arange(num_rows)[:, None], probs.shape)
    gaps = (probs - outcomes) * valid
    self.gaps = sparse.csr_matrix((gaps.ravel(), (rows.ravel(), columns.ravel())),
                                  shape=(num_rows, num_classes * n_bins))
    self.valid = valid.astype(np.float64)

  def ece(self, weights: np.ndarray) -> np.ndarray:
    """ECE [R, K] for row weights [R, N]; NaN for a class without weighted rows."""
    binned = np.asarray((self.gaps.T @ weights.T).T).reshape(weights.shape[0], -1, self.n_bins)
    return _divide(np.abs(binned).sum(axis=-1), weights @ self.valid)


# ------------------------------------------------------------------------ single metrics


def _optional(value: float) -> float | None:
  return float(value) if np.isfinite(value) else None


def auroc(scores: Any, labels: Any) -> float | None:
  """Area under the ROC curve (= sklearn roc_auc_score); None without positives or negatives
  (including no rows at all, e.g. a class masked out everywhere)."""
  scores = _finite_array("scores", scores, ndim=1, allow_empty=True)
  positive = _binary_labels("labels", labels, scores.shape)
  ranked = _RankedScores(scores[:, None], positive[:, None], ~positive[:, None])
  return _optional(ranked.auroc_and_ap(np.ones((1, scores.size)))[0][0, 0])


def average_precision(scores: Any, labels: Any) -> float | None:
  """Average precision (= sklearn average_precision_score, step-wise, no interpolation);
  None without positives (or without rows)."""
  scores = _finite_array("scores", scores, ndim=1, allow_empty=True)
  positive = _binary_labels("labels", labels, scores.shape)
  ranked = _RankedScores(scores[:, None], positive[:, None], ~positive[:, None])
  return _optional(ranked.auroc_and_ap(np.ones((1, scores.size)))[1][0, 0])


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
  """Binary ECE of probabilities [N] for 0/1 labels [N] (equal-width bins on [0, 1])."""
  _check_n_bins(n_bins)
  probs = np.asarray(probs)
  if probs.ndim == 2:
    raise ValueError(f"probs has shape {probs.shape}; expected [N] probabilities of the "
                     f"positive class (use top_label_ece for [N, K] multi-class probs)")
  probs = _probabilities("probs", probs, ndim=1)
  positive = _binary_labels("labels", labels, probs.shape)
  calibration = _CalibrationGaps(probs[:, None], positive[:, None].astype(np.float64),
                                 np.ones((probs.size, 1), dtype=bool), n_bins)
  return float(calibration.ece(np.ones((1, probs.size)))[0, 0])


def _class_indices(name: str, labels: Any, num_rows: int, num_classes: int) -> np.ndarray:
  """Integer labels [N] from [N] ints or [N, K] one-hot rows."""
  labels = np.asarray(labels)
  if labels.ndim == 2:
    if labels.shape != (num_rows, num_classes):
      raise ValueError(f"{name} has shape {labels.shape}; expected [N] class indices or "
                       f"one-hot ({num_rows}, {num_classes})")
    if not (np.all(np.isin(labels, (0, 1))) and np.all(labels.sum(axis=1) == 1)):
      raise ValueError(f"{name} is [N, K] but not one-hot; expected exactly one 1 per row")
    return np.argmax(labels, axis=1)
  if labels.shape != (num_rows,):
    raise ValueError(f"{name} has shape {labels.shape}; expected ({num_rows},) class indices")
  if not (np.issubdtype(labels.dtype, np.integer)
          or (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))):
    raise ValueError(f"{name} has dtype {labels.dtype}; expected integer class indices")
  labels = labels.astype(np.int64)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"{name} spans [{labels.min()}, {labels.max()}]; expected class indices "
                     f"in [0, {num_classes - 1}]")
  return labels


def top_label_ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
  """Multi-class (top-label) ECE: confidence = max prob, outcome = argmax is correct."""
  _check_n_bins(n_bins)
  probs = _probabilities("probs", probs, ndim=2)
  labels = _class_indices("labels", labels, *probs.shape)
  confidence = probs.max(axis=1)
  correct = (np.argmax(probs, axis=1) == labels).astype(np.float64)
  calibration = _CalibrationGaps(confidence[:, None], correct[:, None],
                                 np.ones((labels.size, 1), dtype=bool), n_bins)
  return float(calibration.ece(np.ones((1, labels.size)))[0, 0])


# ------------------------------------------------------------------------------ thresholds


def choose_thresholds(probs: Any, labels: Any, mask: Any | None = None,
                      method: str | float = "youden", *,
                      class_names: Sequence[str] | None = None) -> np.ndarray:
  """Per-class decision thresholds [K] (predict positive when prob >= threshold).

  method: "youden" maximises sensitivity + specificity - 1 over the ROC thresholds, "f1"
  maximises F1 over the PR thresholds (first maximum, i.e. the lowest such threshold), a
  float in [0, 1] is used for every class. Choose them on a validation split, not the test.
  A class whose labelled rows lack positives or negatives gets 0.5; those classes are
  *logged* (a warning naming them; by class_names when given, else by column index).
  """
  probs = _probabilities("probs", probs, ndim=2)
  valid = _label_mask(mask, probs.shape)
  positive = _binary_labels("labels", labels, probs.shape, valid)
  num_classes = probs.shape[1]
  names = (_class_name_list(class_names, num_classes) if class_names is not None
           else [f"column {k}" for k in range(num_classes)])
  if isinstance(method, (int, float, np.number)) and not isinstance(method, bool):
    if not 0.0 <= float(method) <= 1.0:
      raise ValueError(f"method={method!r}; a fixed threshold must be in [0, 1]")
    return np.full(num_classes, float(method))
  if method not in ("youden", "f1"):
    raise ValueError(f"method={method!r}; expected 'youden', 'f1' or a float threshold")
  thresholds = np.full(num_classes, 0.5)
  fallback = []
  for k in range(num_classes):
    scores, truth = probs[valid[:, k], k], positive[valid[:, k], k]
    if truth.all() or not truth.any():
      fallback.append(names[k])
      continue
    if method == "youden":
      fpr, tpr, candidates = sk_metrics.roc_curve(truth, scores, drop_intermediate=False)
      # candidates[0] is +inf (nothing predicted positive): never a usable threshold.
      thresholds[k] = candidates[1:][np.argmax((tpr - fpr)[1:])]
    else:
      precision, recall, candidates = sk_metrics.precision_recall_curve(truth, scores)
      precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
      f1 = _divide(2 * precision * recall, precision + recall)
      thresholds[k] = candidates[np.argmax(np.nan_to_num(f1, nan=-1.0))]
  if fallback:
    _LOG.warning("choose_thresholds(method=%r): %s lack positives or negatives among "
                 "labelled rows; using threshold 0.5 for them", method, ", ".join(fallback))
  return thresholds


# --------------------------------------------------------------------------------- reports


def _interval_entry(value: float, interval: tuple[float, float, int] | None,
                    **extra: int) -> dict[str, Any]:
  low, high, n_valid = interval if interval is not None else (np.nan, np.nan, 0)
  return {"value": _optional(value), "ci_low": _optional(low), "ci_high": _optional(high),
          **extra, "num_valid_resamples": int(n_valid)}


def _bootstrap_block(groups: Any, n_resamples: int, level: float) -> dict[str, Any]:
  return {"method": "percentile bootstrap", "level": float(level),
          "n_resamples": int(n_resamples),
          "resampling_unit": "image" if groups is None else "patient"}


def _intervals(statistic, num_rows: int, groups: Any, n_resamples: int, seed: int,
               level: float) -> dict[str, tuple[float, float, int]]:
  if n_resamples == 0:
    return {}
  return bootstrap.bootstrap_ci_weighted(statistic, num_rows, groups=groups,
                                         n_resamples=n_resamples, seed=seed, level=level)


def multilabel_report(probs: Any, labels: Any, mask: Any | None, class_names: Sequence[str],
                      *, thresholds: Any | None = None, groups: Any | None = None,
                      n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                      n_bins: int = 15) -> dict[str, Any]:
  """Per-class and class-mean metrics of a multi-label classifier, with bootstrap CIs.

  Args:
    probs: [N, K] probabilities. labels: [N, K] 0/1 where mask is 1 (anything elsewhere,
      e.g. -1 uncertain). mask: [N, K] 1 = label counts, 0 = excluded for that class; None =
      all count. class_names: K distinct names.
    thresholds: [K] decision thresholds (e.g. from choose_thresholds on validation); None
      uses 0.5 for every class ("threshold_source": "fixed 0.5", else "given").
    groups: [N] patient ids for patient-level resampling; None resamples images.
    n_resamples: bootstrap resamples (0: no CIs, ci_low/ci_high None). seed, level: RNG
      seed and confidence level. n_bins: calibration bins of the per-class ECE.

  Returns:
    A JSON-serialisable dict (plain floats/ints/str/None), see the module docstring for the
    undefined-metric and mean conventions; "mean"."auprc" is mAP.
  """
  probs = _probabilities("probs", probs, ndim=2)
  num_rows, num_classes = probs.shape
  valid = _label_mask(mask, probs.shape)
  positive = _binary_labels("labels", labels, probs.shape, valid)
  negative = valid & ~positive
  names = _class_name_list(class_names, num_classes)
  _check_n_bins(n_bins)
  _check_bootstrap_settings(n_resamples, level)
  if thresholds is None:
    threshold_source, thresholds = "fixed 0.5", np.full(num_classes, 0.5)
  else:
    threshold_source, thresholds = "given", np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (num_classes,) or not np.all(np.isfinite(thresholds)):
      raise ValueError(f"thresholds has shape {thresholds.shape}; expected ({num_classes},) "
                       f"finite values, one per class")

  predicted = probs >= thresholds[None, :]
  # Confusion-count indicators [N, 4K]: one matrix product gives TP/FP/FN/TN per resample.
  indicators = np.concatenate([predicted & positive, predicted & negative,
                               ~predicted & positive, ~predicted & negative], axis=1)
  indicators = indicators.astype(np.float64)
  ranked = _RankedScores(probs, positive, negative)
  calibration = _CalibrationGaps(probs, positive.astype(np.float64), valid, n_bins)

  def per_class(weights: np.ndarray) -> dict[str, np.ndarray]:
    auroc_values, ap_values = ranked.auroc_and_ap(weights)
    tp, fp, fn, tn = np.split(weights @ indicators, 4, axis=1)
    has_positives = (tp + fn) > 0
    return {
        "auroc": auroc_values, "auprc": ap_values,
        "f1": np.where(has_positives, _divide(2 * tp, 2 * tp + fp + fn), np.nan),
        "sensitivity": _divide(tp, tp + fn), "specificity": _divide(tn, tn + fp),
        "accuracy": _divide(tp + tn, tp + fp + fn + tn), "ece": calibration.ece(weights)}

  def class_means(weights: np.ndarray) -> dict[str, np.ndarray]:
    return {name: _mean_over_defined(values)[0] for name, values in per_class(weights).items()}

  point = {name: values[0] for name, values in per_class(np.ones((1, num_rows))).items()}
  intervals = _intervals(class_means, num_rows, groups, n_resamples, seed, level)
  num_positive, num_negative = positive.sum(axis=0), negative.sum(axis=0)
  report_per_class = {}
  for k, name in enumerate(names):
    entry = {metric: _optional(point[metric][k]) for metric in MULTILABEL_METRICS}
    entry.update(threshold=float(thresholds[k]), num_positive=int(num_positive[k]),
                 num_negative=int(num_negative[k]))
    report_per_class[name] = entry
  means = {}
  for metric in MULTILABEL_METRICS:
    value, count = _mean_over_defined(point[metric])
    means[metric] = _interval_entry(value, intervals.get(metric), num_classes=int(count))
  return {
      "task": "multilabel", "num_examples": int(num_rows), "num_classes": int(num_classes),
      "threshold_source": threshold_source, "per_class": report_per_class, "mean": means,
      "undefined": {metric: [name for k, name in enumerate(names)
                             if not np.isfinite(point[metric][k])]
                    for metric in MULTILABEL_METRICS},
      "ci": _bootstrap_block(groups, n_resamples, level)}


def multiclass_report(probs: Any, labels: Any, class_names: Sequence[str], *,
                      groups: Any | None = None, n_resamples: int = 1000, seed: int = 0,
                      level: float = 0.95, n_bins: int = 15) -> dict[str, Any]:
  """Metrics of a single-label multi-class classifier (argmax predictions), with CIs.

  Args:
    probs: [N, K] class probabilities. labels: [N] class indices or [N, K] one-hot.
    class_names: K distinct names. groups, n_resamples, seed, level, n_bins: as in
      multilabel_report.

  Returns:
    JSON-serialisable dict: "overall" holds accuracy, balanced_accuracy (mean recall over
    classes present in the labels, = sklearn), macro_f1 (mean F1 over classes present in the
    labels, = sklearn f1_score(average="macro", labels=present classes)), macro_auroc
    (one-vs-rest, over classes with positives and negatives) and top_label_ece, each with
    value/ci_low/ci_high; "per_class" holds one-vs-rest auroc/auprc and argmax
    f1/sensitivity/specificity with counts; "undefined" lists classes per metric.
  """
  probs = _probabilities("probs", probs, ndim=2)
  num_rows, num_classes = probs.shape
  labels = _class_indices("labels", labels, num_rows, num_classes)
  names = _class_name_list(class_names, num_classes)
  _check_n_bins(n_bins)
  _check_bootstrap_settings(n_resamples, level)

  predicted = np.argmax(probs, axis=1)
  positive = labels[:, None] == np.arange(num_classes)[None, :]
  ranked = _RankedScores(probs, positive, ~positive)
  # Row i adds to confusion cell (true, predicted): one sparse product per resample batch.
  confusion_cells = sparse.csr_matrix(
      (np.ones(num_rows), (np.arange(num_rows), labels * num_classes + predicted)),
      shape=(num_rows, num_classes * num_classes))
  correct = (predicted == labels).astype(np.float64)
  calibration = _CalibrationGaps(probs.max(axis=1)[:, None], correct[:, None],
                                 np.ones((num_rows, 1), dtype=bool), n_bins)

  def statistics(weights: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    auroc_values, ap_values = ranked.auroc_and_ap(weights)
    confusion = np.asarray((confusion_cells.T @ weights.T).T).reshape(
        -1, num_classes, num_classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    num_true, num_predicted = confusion.sum(axis=2), confusion.sum(axis=1)
    total = confusion.sum(axis=(1, 2))[:, None]
    f1 = np.where(num_true > 0, _divide(2 * tp, num_true + num_predicted), np.nan)
    per_class = {"auroc": auroc_values, "auprc": ap_values, "f1": f1,
                 "sensitivity": _divide(tp, num_true),
                 "specificity": _divide(total - num_true - num_predicted + tp, total - num_true)}
    overall = {"accuracy": _divide(tp.sum(axis=1), total[:, 0]),
               "balanced_accuracy": _mean_over_defined(per_class["sensitivity"])[0],
               "macro_f1": _mean_over_defined(f1)[0],
               "macro_auroc": _mean_over_defined(auroc_values)[0],
               "top_label_ece": calibration.ece(weights)[:, 0]}
    return per_class, overall

  point_per_class, point_overall = statistics(np.ones((1, num_rows)))
  intervals = _intervals(lambda weights: statistics(weights)[1], num_rows, groups,
                         n_resamples, seed, level)
  counted_classes = {"balanced_accuracy": "sensitivity", "macro_f1": "f1",
                     "macro_auroc": "auroc"}
  overall = {}
  for metric, values in point_overall.items():
    extra = {}
    if metric in counted_classes:
      extra["num_classes"] = int(np.isfinite(point_per_class[counted_classes[metric]][0]).sum())
    overall[metric] = _interval_entry(values[0], intervals.get(metric), **extra)
  num_positive = positive.sum(axis=0)
  report_per_class = {}
  for k, name in enumerate(names):
    entry = {metric: _optional(point_per_class[metric][0, k]) for metric in MULTICLASS_PER_CLASS}
    entry.update(num_positive=int(num_positive[k]), num_negative=int(num_rows - num_positive[k]))
    report_per_class[name] = entry
  return {
      "task": "multiclass", "num_examples": int(num_rows), "num_classes": int(num_classes),
      "overall": overall, "per_class": report_per_class,
      "undefined": {metric: [name for k, name in enumerate(names)
                             if not np.isfinite(point_per_class[metric][0, k])]
                    for metric in MULTICLASS_PER_CLASS},
      "ci": _bootstrap_block(groups, n_resamples, level)}
