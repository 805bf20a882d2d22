"""Metric library checks: agreement with scikit-learn and hand-computed values, the
undefined/None and mask conventions, and patient-level bootstrap behaviour."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from sklearn import metrics as sk

from cxrjax import metrics
from cxrjax.metrics import classification


def _reference_ece(confidence, outcome, n_bins):
  """Straightforward loop: bins [e_b, e_b+1), the last one closed."""
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  total = 0.0
  for b in range(n_bins):
    upper = confidence <= edges[b + 1] if b == n_bins - 1 else confidence < edges[b + 1]
    in_bin = (confidence >= edges[b]) & upper
    if in_bin.any():
      total += in_bin.mean() * abs(confidence[in_bin].mean() - outcome[in_bin].mean())
  return total


def _multilabel_data(seed, num_rows=300, num_classes=4, prevalence=0.3):
  rng = np.random.default_rng(seed)
  labels = (rng.random((num_rows, num_classes)) < prevalence).astype(np.int64)
  # Rounded scores create ties, which AUROC/AP must handle like sklearn.
  probs = np.round(np.clip(0.35 * labels + 0.65 * rng.random((num_rows, num_classes)), 0, 1), 2)
  return probs, labels


# ------------------------------------------------------------------------- single metrics


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_average_precision_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  num_rows = int(rng.integers(5, 80))
  scores = np.round(rng.random(num_rows), int(rng.integers(1, 3)))
  labels = rng.integers(0, 2, num_rows)
  labels[:2] = (0, 1)
  assert metrics.auroc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores),
                                                        abs=1e-12)
  assert metrics.average_precision(scores, labels) == pytest.approx(
      sk.average_precision_score(labels, scores), abs=1e-12)


def test_auroc_and_ap_undefined_cases_are_none():
  scores = np.array([0.1, 0.4, 0.8])
  assert metrics.auroc(scores, [0, 0, 0]) is None
  assert metrics.auroc(scores, [1, 1, 1]) is None
  assert metrics.average_precision(scores, [0, 0, 0]) is None
  assert metrics.average_precision(scores, [1, 1, 1]) == pytest.approx(1.0)
  assert metrics.auroc([], []) is None and metrics.average_precision([], []) is None
  # Scores need not be probabilities for ranking metrics.
  assert metrics.auroc([-3.0, 5.0], [0, 1]) == 1.0


def test_ece_matches_reference_loop():
  rng = np.random.default_rng(1)
  probs = rng.random(500)
  probs[:3] = (0.0, 1.0, 0.5)  # edges: 1.0 lands in the last bin
  labels = (rng.random(500) < probs ** 1.5).astype(int)
  for n_bins in (1, 10, 15):
    assert metrics.expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        _reference_ece(probs, labels, n_bins), abs=1e-12)
  # Perfectly calibrated constant predictions.
  assert metrics.expected_calibration_error(np.full(4, 0.5), [0, 1, 0, 1]) == pytest.approx(0.0)


def test_top_label_ece_matches_reference_loop():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(400, 5)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  labels = rng.integers(0, 5, 400)
  correct = (probs.argmax(axis=1) == labels).astype(float)
  assert metrics.top_label_ece(probs, labels, n_bins=15) == pytest.approx(
      _reference_ece(probs.max(axis=1), correct, 15), abs=1e-12)
  one_hot = np.eye(5, dtype=int)[labels]
  assert metrics.top_label_ece(probs, one_hot) == metrics.top_label_ece(probs, labels)


def test_bad_inputs_raise_value_errors_naming_the_argument():
  with pytest.raises(ValueError, match="probs"):
    metrics.expected_calibration_error(np.array([0.2, 1.3]), [0, 1])
  with pytest.raises(ValueError, match="top_label_ece"):
    metrics.expected_calibration_error(np.full((3, 2), 0.5), [0, 1, 1])
  with pytest.raises(ValueError, match="labels"):
    metrics.auroc([0.1, 0.2], [0, 2])
  with pytest.raises(ValueError, match="labels has shape"):
    metrics.auroc([0.1, 0.2], [0, 1, 1])
  with pytest.raises(ValueError, match="scores"):
    metrics.auroc([0.1, np.nan], [0, 1])
  with pytest.raises(ValueError, match="labels spans"):
    metrics.top_label_ece(np.full((2, 3), 1 / 3), [0, 3])
  probs, labels = _multilabel_data(0, num_rows=20, num_classes=2)
  with pytest.raises(ValueError, match="class_names"):
    metrics.multilabel_report(probs, labels, None, ["a"], n_resamples=0)
  with pytest.raises(ValueError, match="mask has shape"):
    metrics.multilabel_report(probs, labels, np.ones((20, 3)), ["a", "b"], n_resamples=0)
  with pytest.raises(ValueError, match="thresholds"):
    metrics.multilabel_report(probs, labels, None, ["a", "b"], thresholds=[0.5], n_resamples=0)
  with pytest.raises(ValueError, match="groups"):
    metrics.multilabel_report(probs, labels, None, ["a", "b"], groups=np.arange(3))
  with pytest.raises(ValueError, match="method"):
    metrics.choose_thresholds(probs, labels, None, method="best")


# ------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_more_data():
  rng = np.random.default_rng(3)
  small, large = rng.normal(size=100), rng.normal(size=1600)
  low, high, valid = metrics.bootstrap_ci(np.mean, [small], n_resamples=300, seed=1)
  assert valid == 300 and low < small.mean() < high
  low_large, high_large, _ = metrics.bootstrap_ci(np.mean, [large], n_resamples=300, seed=1)
  assert (high_large - low_large) < 0.5 * (high - low)
  # Same seed, same resamples.
  assert metrics.bootstrap_ci(np.mean, [small], n_resamples=300, seed=1) == (low, high, valid)


def test_bootstrap_ci_drops_undefined_resamples():
  labels = np.zeros(40, dtype=int)
  labels[0] = 1  # about 37% of resamples miss the only positive
  scores = np.linspace(0, 1, 40)
  low, high, valid = metrics.bootstrap_ci(metrics.auroc, [scores, labels], n_resamples=200)
  assert 100 <= valid < 200 and np.isfinite(low) and np.isfinite(high)
  # Under half valid -> (nan, nan, n_valid).
  always_none = metrics.bootstrap_ci(lambda x: None, [scores], n_resamples=20)
  assert np.isnan(always_none[0]) and np.isnan(always_none[1]) and always_none[2] == 0


def test_bootstrap_ci_resamples_whole_groups_of_any_dtype():
  values = np.array([0.0, 0.0, 10.0, 10.0, 10.0])
  patients = np.array(["a", "a", "b", "b", "b"])
  # Every resample takes patients whole: the mean is one of 0, 6 (both), or 10.
  seen = []
  metrics.bootstrap_ci(lambda v: seen.append(len(v)) or float(np.mean(v)), [values],
                       groups=patients, n_resamples=50)
  assert set(seen) <= {4, 5, 6}
  with pytest.raises(ValueError, match="arrays\\[1\\]"):
    metrics.bootstrap_ci(np.mean, [values, values[:3]])


# ----------------------------------------------------------------------------- thresholds


def test_choose_thresholds_maximise_youden_and_f1(caplog):
  probs, labels = _multilabel_data(4, num_rows=200, num_classes=3)
  labels[:, 2] = 0  # no positives -> 0.5, logged
  names = ["a", "b", "c"]
  with caplog.at_level(logging.WARNING):
    youden = metrics.choose_thresholds(probs, labels, None, "youden", class_names=names)
  assert youden[2] == 0.5 and "c" in caplog.text
  f1 = metrics.choose_thresholds(probs, labels, None, "f1")
  for k in range(2):
    candidates = np.unique(probs[:, k])
    positive = labels[:, k] == 1

    def youden_j(t):
      predicted = probs[:, k] >= t
      return predicted[positive].mean() + (~predicted[~positive]).mean() - 1

    def f1_at(t):
      return sk.f1_score(positive, probs[:, k] >= t)

    assert youden_j(youden[k]) == pytest.approx(max(youden_j(t) for t in candidates))
    assert f1_at(f1[k]) == pytest.approx(max(f1_at(t) for t in candidates))
  assert np.all(metrics.choose_thresholds(probs, labels, None, 0.3) == 0.3)


# ------------------------------------------------------------------------------- reports


def test_multilabel_report_matches_sklearn_per_class():
  probs, labels = _multilabel_data(5)
  names = ["w", "x", "y", "z"]
  thresholds = np.array([0.5, 0.4, 0.6, 0.55])
  report = metrics.multilabel_report(probs, labels, None, names, thresholds=thresholds,
                                     n_resamples=0)
  assert report["threshold_source"] == "given" and report["ci"]["resampling_unit"] == "image"
  for k, name in enumerate(names):
    entry = report["per_class"][name]
    predicted = probs[:, k] >= thresholds[k]
    tn, fp, fn, tp = sk.confusion_matrix(labels[:, k], predicted).ravel()
    assert entry["auroc"] == pytest.approx(sk.roc_auc_score(labels[:, k], probs[:, k]))
    assert entry["auprc"] == pytest.approx(sk.average_precision_score(labels[:, k], probs[:, k]))
    assert entry["f1"] == pytest.approx(sk.f1_score(labels[:, k], predicted))
    assert entry["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert entry["specificity"] == pytest.approx(tn / (tn + fp))
    assert entry["accuracy"] == pytest.approx(sk.accuracy_score(labels[:, k], predicted))
    assert entry["ece"] == pytest.approx(_reference_ece(probs[:, k], labels[:, k], 15))
    assert entry["num_positive"] == labels[:, k].sum() and entry["threshold"] == thresholds[k]
  assert report["mean"]["auprc"]["value"] == pytest.approx(
      np.mean([sk.average_precision_score(labels[:, k], probs[:, k]) for k in range(4)]))
  assert report["mean"]["auroc"]["ci_low"] is None
  assert report["mean"]["auroc"]["num_classes"] == 4


def test_single_valued_class_is_undefined_and_left_out_of_the_mean():
  probs, labels = _multilabel_data(6)
  labels[:, 1] = 0  # no positives in this split
  names = ["a", "b", "c", "d"]
  report = metrics.multilabel_report(probs, labels, None, names, n_resamples=50)
  json.dumps(report, allow_nan=False)  # plain types, no NaN
  assert report["threshold_source"] == "fixed 0.5"
  entry = report["per_class"]["b"]
  assert entry["auroc"] is None and entry["auprc"] is None and entry["f1"] is None
  assert entry["sensitivity"] is None and entry["specificity"] is not None
  assert report["undefined"]["auroc"] == ["b"] and report["undefined"]["specificity"] == []
  others = [sk.roc_auc_score(labels[:, k], probs[:, k]) for k in (0, 2, 3)]
  assert report["mean"]["auroc"]["value"] == pytest.approx(np.mean(others))
  assert report["mean"]["auroc"]["num_classes"] == 3
  low, high = report["mean"]["auroc"]["ci_low"], report["mean"]["auroc"]["ci_high"]
  assert low < report["mean"]["auroc"]["value"] < high


def test_masked_labels_are_excluded():
  probs, labels = _multilabel_data(7)
  rng = np.random.default_rng(7)
  mask = (rng.random(labels.shape) < 0.8).astype(int)
  names = ["a", "b", "c", "d"]
  report = metrics.multilabel_report(probs, labels, mask, names, n_resamples=40, seed=3)
  flipped = np.where(mask == 1, labels, 1 - labels)
  assert metrics.multilabel_report(probs, flipped, mask, names, n_resamples=40,
                                   seed=3) == report
  uncertain = np.where(mask == 1, labels, -1)  # CheXpert-style -1 where masked is accepted
  assert metrics.multilabel_report(probs, uncertain, mask, names, n_resamples=40,
                                   seed=3) == report
  counted = mask[:, 2] == 1
  assert report["per_class"]["c"]["auroc"] == pytest.approx(
      sk.roc_auc_score(labels[counted, 2], probs[counted, 2]))
  assert report["per_class"]["c"]["num_positive"] + report["per_class"]["c"][
      "num_negative"] == counted.sum()


def test_fully_masked_class_has_no_metrics():
  probs, labels = _multilabel_data(14, num_rows=60, num_classes=3)
  mask = np.ones_like(labels)
  mask[:, 0] = 0
  report = metrics.multilabel_report(probs, labels, mask, ["a", "b", "c"], n_resamples=20)
  entry = report["per_class"]["a"]
  assert entry["num_positive"] == entry["num_negative"] == 0
  assert all(entry[metric] is None for metric in classification.MULTILABEL_METRICS)
  assert all("a" in names for names in report["undefined"].values())
  assert report["mean"]["ece"]["num_classes"] == 2


def _sklearn_class_mean(probs, labels, mask, metric):
  """Class mean of one metric (F1 at threshold 0.5) computed with sklearn or a loop."""
  values = []
  for k in range(probs.shape[1]):
    rows = mask[:, k] == 1
    truth, scores = labels[rows, k], probs[rows, k]
    if metric == "auroc" and truth.any() and not truth.all():
      values.append(sk.roc_auc_score(truth, scores))
    elif metric == "auprc" and truth.any():
      values.append(sk.average_precision_score(truth, scores))
    elif metric == "f1" and truth.any():
      values.append(sk.f1_score(truth, scores >= 0.5))
    elif metric == "ece" and rows.any():
      values.append(_reference_ece(scores, truth, 15))
  return float(np.mean(values)) if values else None


@pytest.mark.parametrize("use_groups", [False, True])
def test_report_intervals_equal_bootstrap_ci_of_sklearn_statistics(use_groups):
  """The vectorised weight-based resampling equals resampling rows and calling sklearn."""
  probs, labels = _multilabel_data(8, num_rows=120, num_classes=3, prevalence=0.1)
  rng = np.random.default_rng(8)
  mask = (rng.random(labels.shape) < 0.9).astype(int)
  groups = rng.integers(0, 50, 120).astype(str) if use_groups else None
  report = metrics.multilabel_report(probs, labels, mask, ["a", "b", "c"], groups=groups,
                                     n_resamples=30, seed=5)
  for metric in ("auroc", "auprc", "f1", "ece"):
    low, high, valid = metrics.bootstrap_ci(
        lambda p, y, m, metric=metric: _sklearn_class_mean(p, y, m, metric), [probs, labels, mask],
        groups=groups, n_resamples=30, seed=5)
    entry = report["mean"][metric]
    assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert entry["num_valid_resamples"] == valid
  assert report["ci"]["resampling_unit"] == ("patient" if use_groups else "image")


def test_patient_level_interval_is_wider_for_duplicated_patients():
  probs, labels = _multilabel_data(9, num_rows=80, num_classes=2)
  probs, labels = np.repeat(probs, 3, axis=0), np.repeat(labels, 3, axis=0)
  patients = np.repeat(np.arange(80), 3)
  by_image = metrics.multilabel_report(probs, labels, None, ["a", "b"], n_resamples=300)
  by_patient = metrics.multilabel_report(probs, labels, None, ["a", "b"], groups=patients,
                                         n_resamples=300)
  assert by_patient["mean"]["auroc"]["value"] == by_image["mean"]["auroc"]["value"]
  for metric in ("auroc", "auprc", "accuracy"):
    image_width = by_image["mean"][metric]["ci_high"] - by_image["mean"][metric]["ci_low"]
    patient_width = by_patient["mean"][metric]["ci_high"] - by_patient["mean"][metric]["ci_low"]
    assert patient_width >= image_width
  image_width = by_image["mean"]["auroc"]["ci_high"] - by_image["mean"]["auroc"]["ci_low"]
  patient_width = by_patient["mean"]["auroc"]["ci_high"] - by_patient["mean"]["auroc"]["ci_low"]
  assert patient_width > 1.3 * image_width  # ~sqrt(3) in expectation
  assert by_patient["ci"]["resampling_unit"] == "patient"


def test_multilabel_report_is_fast_enough():
  rng = np.random.default_rng(10)
  labels = (rng.random((2000, 14)) < 0.1).astype(int)
  probs = np.clip(0.3 * labels + 0.7 * rng.random((2000, 14)), 0, 1)
  start = time.perf_counter()
  report = metrics.multilabel_report(probs, labels, None, [f"c{k}" for k in range(14)],
                                     groups=np.arange(2000) // 2, n_resamples=1000)
  assert time.perf_counter() - start < 20.0
  assert report["mean"]["auroc"]["num_valid_resamples"] == 1000


def test_multiclass_report_matches_sklearn():
  rng = np.random.default_rng(11)
  labels = rng.integers(0, 4, 300)
  logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  names = ["n", "p", "c", "t"]
  report = metrics.multiclass_report(probs, labels, names, n_resamples=40)
  json.dumps(report, allow_nan=False)
  predicted = probs.argmax(axis=1)
  overall = report["overall"]
  assert report["task"] == "multiclass"
  assert overall["accuracy"]["value"] == pytest.approx(sk.accuracy_score(labels, predicted))
  assert overall["balanced_accuracy"]["value"] == pytest.approx(
      sk.balanced_accuracy_score(labels, predicted))
  assert overall["macro_f1"]["value"] == pytest.approx(
      sk.f1_score(labels, predicted, average="macro"))
  assert overall["macro_auroc"]["value"] == pytest.approx(
      sk.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
  assert overall["top_label_ece"]["value"] == pytest.approx(metrics.top_label_ece(probs, labels))
  recall = sk.recall_score(labels, predicted, average=None)
  for k, name in enumerate(names):
    assert report["per_class"][name]["sensitivity"] == pytest.approx(recall[k])
    assert report["per_class"][name]["auprc"] == pytest.approx(
        sk.average_precision_score(labels == k, probs[:, k]))
  for metric in overall.values():
    assert metric["ci_low"] <= metric["value"] <= metric["ci_high"]
  one_hot = metrics.multiclass_report(probs, np.eye(4, dtype=int)[labels], names, n_resamples=40)
  assert one_hot == report


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_report_with_an_absent_class_and_bootstrap_agreement():
  rng = np.random.default_rng(12)
  labels = rng.choice([0, 1, 3], size=150)  # class 2 never occurs
  probs = rng.dirichlet(np.ones(4), size=150)
  names = ["a", "b", "c", "d"]
  report = metrics.multiclass_report(probs, labels, names, n_resamples=25, seed=2)
  predicted = probs.argmax(axis=1)
  present = [0, 1, 3]
  assert report["per_class"]["c"]["auroc"] is None and "c" in report["undefined"]["f1"]
  assert report["overall"]["macro_f1"]["value"] == pytest.approx(
      sk.f1_score(labels, predicted, labels=present, average="macro"))
  assert report["overall"]["balanced_accuracy"]["value"] == pytest.approx(
      sk.balanced_accuracy_score(labels, predicted))
  assert report["overall"]["macro_auroc"]["num_classes"] == 3
  expected = metrics.bootstrap_ci(
      lambda y, p: sk.balanced_accuracy_score(y, p.argmax(axis=1)), [labels, probs],
      n_resamples=25, seed=2)
  entry = report["overall"]["balanced_accuracy"]
  assert (entry["ci_low"], entry["ci_high"]) == pytest.approx(expected[:2], abs=1e-12)


# ---------------------------------------------------------------------------- segmentation


def test_dice_jaccard_hand_computed_and_sklearn():
  target = np.zeros((2, 4, 4), dtype=int)
  pred = np.zeros((2, 4, 4), dtype=int)
  target[0, :2, :2] = 1          # 4 px of class 1
  pred[0, :2, :3] = 1            # 6 px: TP 4, FP 2 -> Dice 8/10, Jaccard 4/6
  target[1, 3, 3] = 2            # image 1: class 2 missed entirely, class 1 absent in both
  pred[1, 0, 0] = 2              # ... and one false positive: Dice 0
  report = metrics.dice_jaccard(pred, target, ["background", "lung", "lesion"])
  lung, lesion = report["per_class"]["lung"], report["per_class"]["lesion"]
  assert lung["num_images"] == 1  # image 1 skipped for lung (absent in both)
  assert lung["dice_per_image"] == pytest.approx(0.8)
  assert lung["jaccard_per_image"] == pytest.approx(4 / 6)
  assert lesion["dice_per_image"] == 0.0 and lesion["dice_dataset"] == 0.0
  assert report["mean"]["dice_per_image"] == pytest.approx(0.4)
  assert "background" in report["per_class"] and "per_image" in report["conventions"]
  flat_t, flat_p = target.ravel(), pred.ravel()
  for k, name in enumerate(["background", "lung", "lesion"]):
    assert report["per_class"][name]["dice_dataset"] == pytest.approx(
        sk.f1_score(flat_t, flat_p, labels=[k], average=None)[0])
    assert report["per_class"][name]["jaccard_dataset"] == pytest.approx(
        sk.jaccard_score(flat_t, flat_p, labels=[k], average=None)[0])
  with_background = metrics.dice_jaccard(pred, target, ["background", "lung", "lesion"],
                                         include_background=True)
  assert with_background["mean"]["dice_dataset"] == pytest.approx(np.mean(
      sk.f1_score(flat_t, flat_p, labels=[0, 1, 2], average=None)))


def test_dice_per_image_and_dataset_differ_and_ignore_index():
  rng = np.random.default_rng(13)
  target = rng.integers(0, 3, (5, 16, 16))
  pred = np.where(rng.random((5, 16, 16)) < 0.7, target, rng.integers(0, 3, (5, 16, 16)))
  target[:, :, :4] = 255
  report = metrics.dice_jaccard(pred, target, ["bg", "a", "b"], ignore_index=255)
  kept = target != 255
  assert report["per_class"]["a"]["dice_dataset"] == pytest.approx(
      sk.f1_score(target[kept], pred[kept], labels=[1], average=None)[0])
  per_image = [sk.f1_score(target[i][kept[i]], pred[i][kept[i]], labels=[2], average=None)[0]
               for i in range(5)]
  assert report["per_class"]["b"]["dice_per_image"] == pytest.approx(np.mean(per_image))
  with pytest.raises(ValueError, match="target holds class indices"):
    metrics.dice_jaccard(pred, target, ["bg", "a", "b"])
  with pytest.raises(ValueError, match="pred has shape"):
    metrics.dice_jaccard(pred[:, :8], target, ["bg", "a", "b"], ignore_index=255)
  with pytest.raises(ValueError, match="ignore_index"):
    metrics.dice_jaccard(pred, target, ["bg", "a", "b"], ignore_index=1)


# ---------------------------------------------------------------------------- localisation


def test_saliency_boxes_and_overlaps():
  saliency = np.zeros((12, 12))
  saliency[2:6, 3:8] = 1.0  # rows 2..5, columns 3..7
  assert metrics.saliency_boxes(saliency) == [(3.0, 2.0, 8.0, 6.0)]
  saliency[9:11, 9:10] = 0.8
  assert metrics.saliency_boxes(saliency) == [(3.0, 2.0, 8.0, 6.0), (9.0, 9.0, 10.0, 11.0)]
  assert metrics.saliency_boxes(saliency, threshold=0.9) == [(3.0, 2.0, 8.0, 6.0)]
  assert metrics.saliency_boxes(saliency, largest_only=True) == [(3.0, 2.0, 8.0, 6.0)]
  assert metrics.saliency_boxes(np.full((4, 4), 3.0)) == []
  assert metrics.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
  assert metrics.box_iobb((0, 0, 2, 2), (0, 0, 4, 4)) == 1.0  # predicted box inside gt
  assert metrics.box_iobb((0, 0, 4, 4), (0, 0, 2, 2)) == 0.25
  assert metrics.box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0
  with pytest.raises(ValueError, match="x1 >= x0"):
    metrics.box_iou((2, 0, 1, 1), (0, 0, 1, 1))
  with pytest.raises(ValueError, match="saliency"):
    metrics.saliency_boxes(np.zeros((2, 3, 4)))


def test_pointing_hit():
  saliency = np.zeros((10, 10))
  saliency[7, 2] = 5.0  # centre (2.5, 7.5)
  assert metrics.pointing_hit(saliency, [[2, 7, 3, 8]])
  assert not metrics.pointing_hit(saliency, [[3, 7, 5, 8]])
  assert metrics.pointing_hit(saliency, [[-1, 0, 0, 1, 1], [0, 0, 0, 10, 10]])  # class rows
  assert not metrics.pointing_hit(saliency, [[-1, 0, 0, 10, 10]])  # padding only
  assert not metrics.pointing_hit(saliency, np.zeros((0, 4)))
  assert not metrics.pointing_hit(np.zeros((10, 10)), [[0, 0, 10, 10]])  # constant: no point


def test_localization_report():
  thresholds = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
  saliency = np.zeros((2, 3, 10, 10))
  saliency[0, 0, 2:6, 2:6] = 1.0      # class 0, image 0: exactly the gt box
  saliency[1, 0, 2:6, 3:7] = 1.0      # class 0, image 1: shifted by one column
  saliency[0, 1, 0:2, 0:2] = 1.0      # class 1 map, no class-1 box anywhere
  boxes = np.full((2, 3, 5), -1.0)    # padded with class -1
  boxes[0, 0] = (0, 2, 2, 6, 6)
  boxes[1, 0] = (0, 2, 2, 6, 6)
  boxes[1, 1] = (2, 0, 0, 3, 3)       # class 2 box, its map is empty (constant)
  report = metrics.localization_report(saliency, boxes, ["a", "b", "c"], thresholds=thresholds)
  json.dumps(report, allow_nan=False)
  a = report["per_class"]["a"]
  assert a["num_pairs"] == 2 and a["num_boxes"] == 2
  # Shifted: intersection 3x4 = 12, union 16 + 16 - 12 = 20 -> IoU 0.6; IoBB 12 / 16.
  assert a["mean_iou"] == pytest.approx((1.0 + 0.6) / 2)
  assert a["mean_iobb"] == pytest.approx((1.0 + 0.75) / 2)
  assert a["iou_accuracy"] == {"0.1": 1.0, "0.2": 1.0, "0.3": 1.0, "0.4": 1.0, "0.5": 1.0,
                               "0.6": 0.5, "0.7": 0.5}
  assert all(value == 1.0 for value in a["iobb_accuracy"].values())
  assert a["pointing_accuracy"] == 1.0
  b = report["per_class"]["b"]
  assert b["num_pairs"] == 0 and b["mean_iou"] is None and b["iou_accuracy"]["0.5"] is None
  assert report["no_boxes"] == ["b"]
  c = report["per_class"]["c"]
  assert c["num_pairs"] == 1 and c["mean_iou"] == 0.0 and c["iou_accuracy"]["0.1"] == 0.0
  assert c["pointing_accuracy"] == 0.0  # an all-zero map is a miss, even over pixel (0, 0)
  assert report["overall"]["num_pairs"] == 3
  assert report["overall"]["iou_accuracy"]["0.5"] == pytest.approx(2 / 3)
  exact = metrics.localization_report(saliency[:1, :1], boxes[:1, :1], ["a"])
  assert all(value == 1.0 for value in exact["per_class"]["a"]["iou_accuracy"].values())
  with pytest.raises(ValueError, match="boxes has shape"):
    metrics.localization_report(saliency, boxes[..., :4], ["a", "b", "c"])
  with pytest.raises(ValueError, match="class indices"):
    metrics.localization_report(saliency, np.full((2, 1, 5), 3.0), ["a", "b", "c"])


def test_localization_ignores_boxes_of_other_classes():
  saliency = np.zeros((1, 2, 8, 8))
  saliency[0, 0, 0:2, 0:2] = 1.0
  saliency[0, 1, 4:8, 4:8] = 1.0
  boxes = np.array([[[0, 0, 0, 2, 2], [1, 0, 0, 2, 2], [-1, 4, 4, 8, 8]]], dtype=float)
  report = metrics.localization_report(saliency, boxes, ["a", "b"])
  assert report["per_class"]["a"]["mean_iou"] == 1.0
  # Class b's map sits on class a's/padding's area, not on its own box.
  assert report["per_class"]["b"]["mean_iou"] == 0.0
  assert report["per_class"]["b"]["pointing_accuracy"] == 0.0


def test_public_api_is_exported():
  for name in metrics.__all__:
    assert callable(getattr(metrics, name))
  assert metrics.multilabel_report is classification.multilabel_report
