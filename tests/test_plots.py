"""Every plot writes a readable, non-trivial PNG (creating its directory) and rejects bad
shapes with a ValueError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrjax import plots


def _check_png(path, expected_path, min_width=300, min_height=250):
  assert path == str(expected_path)
  assert expected_path.stat().st_size > 2000
  with Image.open(expected_path) as image:
    assert image.format == "PNG"
    assert image.width >= min_width and image.height >= min_height
    # Not a blank canvas: a drawn figure has many distinct colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def _multilabel(num_rows=200, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  labels = (rng.random((num_rows, num_classes)) < 0.3).astype(int)
  probs = np.clip(0.4 * labels + 0.6 * rng.random((num_rows, num_classes)), 0, 1)
  return probs, labels


def test_roc_pr_curves(tmp_path):
  probs, labels = _multilabel()
  labels[:, 4] = 0  # single label value: skipped and named in the title
  mask = np.ones_like(labels)
  mask[:20, 0] = 0
  path = tmp_path / "new_dir" / "roc.png"
  result = plots.roc_pr_curves(probs, labels, mask, list("abcde"), path,
                               max_classes_per_figure=2)
  _check_png(result, path, min_width=800, min_height=600)  # two rows of panels
  with pytest.raises(ValueError, match="labels has shape"):
    plots.roc_pr_curves(probs, labels[:, :3], None, list("abcde"), tmp_path / "bad.png")
  with pytest.raises(ValueError, match="class_names"):
    plots.roc_pr_curves(probs, labels, None, list("abc"), tmp_path / "bad.png")


def test_calibration_diagram_binary_and_top_label(tmp_path):
  rng = np.random.default_rng(1)
  probs = rng.random(300)
  labels = (rng.random(300) < probs).astype(int)
  _check_png(plots.calibration_diagram(probs, labels, tmp_path / "binary.png", title="Edema"),
             tmp_path / "binary.png")
  logits = rng.normal(size=(300, 3))
  multi = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  path = tmp_path / "top.png"
  _check_png(plots.calibration_diagram(multi, rng.integers(0, 3, 300), path, n_bins=10), path)
  with pytest.raises(ValueError, match="probs has shape"):
    plots.calibration_diagram(np.full((2, 2, 2), 0.5), [0, 1], tmp_path / "bad.png")
  with pytest.raises(ValueError, match="labels"):
    plots.calibration_diagram(probs, labels[:10], tmp_path / "bad.png")


def test_overlay_grid(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.normal(size=(5, 64, 64)) * 100 + 40  # arbitrary range
  maps = rng.random((5, 4, 4))  # coarse patch-grid maps are stretched over the image
  boxes = [np.array([[0, 8, 8, 30, 30], [-1, 0, 0, 0, 0]])] + [np.zeros((0, 5))] * 4
  pred_boxes = [np.array([[0, 10, 6, 28, 33]])] * 5
  path = tmp_path / "cams.png"
  result = plots.overlay_grid(images, maps, path, boxes=boxes, pred_boxes=pred_boxes,
                              titles=[f"image {i}" for i in range(5)], cols=3,
                              class_names=["Nodule"])
  _check_png(result, path)
  rgb = tmp_path / "rgb.png"
  _check_png(plots.overlay_grid(rng.random((2, 32, 32, 3)), None, rgb), rgb)
  with pytest.raises(ValueError, match="images has shape"):
    plots.overlay_grid(rng.random((32, 32)), None, tmp_path / "bad.png")
  with pytest.raises(ValueError, match="maps has shape"):
    plots.overlay_grid(images, maps[:2], tmp_path / "bad.png")
  with pytest.raises(ValueError, match=r"boxes\[0\] has shape"):
    plots.overlay_grid(images, maps, tmp_path / "bad.png", boxes=[np.zeros((2, 4))] * 5)
  with pytest.raises(ValueError, match="titles"):
    plots.overlay_grid(images, maps, tmp_path / "bad.png", titles=["one"])


def test_segmentation_overlay(tmp_path):
  rng = np.random.default_rng(3)
  images = rng.random((3, 48, 48))
  target = np.zeros((3, 48, 48), dtype=int)
  target[:, 10:30, 5:20] = 1
  target[:, 12:40, 28:44] = 2
  pred = np.roll(target, 3, axis=2)
  path = tmp_path / "seg.png"
  _check_png(plots.segmentation_overlay(images, pred, target, ["bg", "left", "right"], path,
                                        cols=2), path)
  no_target = tmp_path / "pred_only.png"
  _check_png(plots.segmentation_overlay(images, pred, None, ["bg", "left", "right"], no_target),
             no_target, min_height=200)
  with pytest.raises(ValueError, match="pred has shape"):
    plots.segmentation_overlay(images, pred[:, :10], target, ["bg", "l", "r"], tmp_path / "x.png")
  with pytest.raises(ValueError, match="target spans"):
    plots.segmentation_overlay(images, np.minimum(pred, 1), target, ["bg", "l"],
                               tmp_path / "x.png")


def test_label_efficiency_curve(tmp_path):
  points = []
  for label, offset in (("EVA-X-S", 0.0), ("ImageNet", -0.05)):
    for fraction, value in ((0.01, 0.72), (0.1, 0.79), (1.0, 0.83)):
      points.append({"fraction": fraction, "value": value + offset, "ci_low": value + offset - 0.02,
                     "ci_high": value + offset + 0.015, "label": label})
  points.append({"fraction": 0.5, "value": 0.8, "ci_low": None, "ci_high": None,
                 "label": "ImageNet"})
  path = tmp_path / "efficiency.png"
  _check_png(plots.label_efficiency_curve(points, path, metric_name="mean AUROC"), path)
  with pytest.raises(ValueError, match="fraction"):
    plots.label_efficiency_curve([{"fraction": 0.0, "value": 0.5, "label": "x"}],
                                 tmp_path / "bad.png")
  with pytest.raises(ValueError, match="points is empty"):
    plots.label_efficiency_curve([], tmp_path / "bad.png")
  with pytest.raises(ValueError, match="ci_low"):
    plots.label_efficiency_curve([{"fraction": 0.5, "value": 0.5, "ci_low": "x", "label": "x"}],
                                 tmp_path / "bad.png")
