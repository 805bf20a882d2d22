"""The augmentation ops added for CXR recipes: affine, intensity, RandAugment, crops,
channel handling (multi-crop and MAE masks live in multiview.py, tested with the objectives)."""

from __future__ import annotations

import numpy as np
import pytest

from cxrjax.data import transforms
from test_data_fixtures import grey


def example(size=64):
  boxes = np.full((4, 5), -1, np.float32)
  boxes[0] = (1, 20, 16, 40, 30)
  seg = np.zeros((size, size), np.uint8)
  seg[16:30, 20:40] = 1  # the box's region, so geometry can be checked against it
  return {"image": grey(size, size), "seg": seg, "boxes": boxes,
          "labels": np.ones(3, np.float32)}


def run(spec, ex=None, seed=0):
  return transforms.Preprocess(spec)(ex or example(), np.random.default_rng(seed))


def test_random_affine_moves_seg_and_boxes_together():
  for seed in range(5):
    out = run("random_affine(degrees=15, translate=0.1, scale=(0.8, 1.2))", seed=seed)
    ys, xs = np.nonzero(out["seg"])
    _, x0, y0, x1, y1 = out["boxes"][0]
    # The box is the hull of the warped rectangle: it contains the warped mask region.
    assert x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1 + 1
    assert (out["boxes"][1:] == -1).all() and out["image"].dtype == np.uint8


def test_intensity_ops_keep_uint8_and_are_deterministic():
  a = run("random_intensity(0.2, 0.2, (0.7, 1.4))", seed=3)
  b = run("random_intensity(0.2, 0.2, (0.7, 1.4))", seed=3)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].dtype == np.uint8 and not np.array_equal(a["image"], example()["image"])
  # monotone: brighter input pixels stay brighter (no solarisation)
  flat, out = example()["image"].ravel(), a["image"].ravel()
  order = np.argsort(flat, kind="stable")
  assert (np.diff(out[order].astype(int)) >= 0).all()


def test_randaugment_is_grey_safe_and_deterministic():
  for seed in range(10):
    a, b = run("randaugment(2, 9)", seed=seed), run("randaugment(2, 9)", seed=seed)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["seg"], b["seg"])
    assert a["image"].shape == (64, 64) and a["image"].dtype == np.uint8
  with pytest.raises(Exception, match="unknown ops \\['solarize'\\]"):
    transforms.parse("randaugment(ops=('solarize',))")
  with pytest.raises(ValueError, match="before to_channels"):
    run("to_channels(3)|randaugment(2, 9)")


def test_center_crop_and_grey_one_channel():
  out = run("resize(48)|center_crop(32)|to_channels(1)|normalize('evax')")
  assert out["image"].shape == (32, 32, 1) and out["seg"].shape == (32, 32)
  np.testing.assert_allclose(out["boxes"][0], (1, 7, 4, 22, 14.5))


def test_preprocess_pickles_with_ops_registered_elsewhere():
  import pickle
  import subprocess
  import sys
  from cxrjax.data import multiview  # noqa: F401  (registers multi_crop)
  data = pickle.dumps(transforms.Preprocess("multi_crop(32, 16, num_local=2)"))
  # A fresh interpreter, as a spawned Grain worker, that never imported multiview.
  code = ("import pickle, sys, numpy as np; p = pickle.loads(sys.stdin.buffer.read()); "
          "out = p({'image': np.tile(np.arange(64, dtype=np.uint8), (64, 1))}, "
          "np.random.default_rng(0)); print(out['local_crops'].shape)")
  result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                          timeout=120, check=True)
  assert b"(2, 16, 16" in result.stdout
