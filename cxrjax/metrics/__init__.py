"""Evaluation metrics for chest X-ray models: NumPy/scikit-learn only, JSON-ready reports.

Public functions:
  classification: auroc, average_precision, expected_calibration_error, top_label_ece,
    choose_thresholds, multilabel_report, multiclass_report
  bootstrap: bootstrap_ci, bootstrap_ci_weighted
  segmentation: dice_jaccard
  localization: saliency_boxes, box_iou, box_iobb, pointing_hit, localization_report

Conventions:
- Undefined metrics are None (JSON null), never NaN or a stand-in 0.5: AUROC needs positives
  and negatives, AUPRC/F1/sensitivity need positives, specificity needs negatives. Reports
  list such classes under "undefined".
- Class means (mAUROC, mAP, ...) are over the classes where the metric is defined; each
  bootstrap resample re-computes the mean over the classes defined in that resample.
- CIs are percentile bootstrap; with `groups` (patient ids) whole patients are resampled.
  Resamples where a statistic is undefined are dropped; under half valid -> None.
- Decisions: positive when prob >= threshold.
- Dice/Jaccard: "per_image" = mean over images of per-image scores, skipping images where
  the class is absent from both prediction and target; "dataset" = TP/FP/FN pooled over all
  pixels of the split. Background (index 0) is left out of means unless include_background.
- Localisation: IoBB = intersection / area of the *predicted* box (Wang et al. 2017);
  boxes are (x0, y0, x1, y1) in continuous pixel coordinates, pixel i covering [i, i + 1).
"""

from __future__ import annotations

from cxrjax.metrics.bootstrap import bootstrap_ci, bootstrap_ci_weighted
from cxrjax.metrics.classification import (
    auroc, average_precision, choose_thresholds, expected_calibration_error,
    multiclass_report, multilabel_report, top_label_ece)
from cxrjax.metrics.localization import (
    box_iobb, box_iou, localization_report, pointing_hit, saliency_boxes)
from cxrjax.metrics.segmentation import dice_jaccard

__all__ = [
    "auroc", "average_precision", "bootstrap_ci", "bootstrap_ci_weighted", "box_iobb",
    "box_iou", "choose_thresholds", "dice_jaccard", "expected_calibration_error",
    "localization_report", "multiclass_report", "multilabel_report", "pointing_hit",
    "saliency_boxes", "top_label_ece",
]
