"""Localisation runs in the evaluation pipeline's pixel frame: boxes and maps must agree.

The evaluation binary compares saliency maps computed on preprocessed images with the
boxes the same preprocessing carried along (cxrjax/data/transforms.py moves boxes with
every resize/crop/flip). A map equal to a ground-truth box must then score IoU 1.
"""

import ml_collections
import numpy as np
import pytest

from cxrjax import evaluate, metrics
from cxrjax.data import phantom, pipeline


def phantom_eval_data(image_size, source_size):
  return ml_collections.ConfigDict(dict(
      source="phantom", num_examples=64, num_eval_examples=48, phantom_seed=0,
      source_size=source_size, image_size=image_size, batch_size=8, num_workers=0,
      num_threads=1, prefetch=1, max_boxes=8, max_decode_failure_fraction=0.0,
      failure_check_after=10))


@pytest.mark.parametrize("image_size,source_size", [(64, 64), (64, 96)])
def test_map_equal_to_each_box_scores_iou_one(image_size, source_size):
  data = phantom_eval_data(image_size, source_size)
  pp = f"resize({image_size})|to_channels(3)|normalize('evax')"
  ds = pipeline.make_dataset(data, split="test", pp=pp, seed=0, global_batch=8, repeat=False)
  checked = 0
  for index in range(48):
    batch = ds[index // ds.batch_size]  # unshuffled: example i is row i % B of batch i // B
    example = {k: v[index % ds.batch_size] for k, v in batch.items() if not k.startswith("_")}
    # The images localisation and overlays use are those rows.
    np.testing.assert_array_equal(
        example["image"], evaluate._example_images(ds, [index])[0])  # pylint: disable=protected-access
    assert example["image"].shape[:2] == (image_size, image_size)
    for row in example["boxes"]:
      cls, x0, y0, x1, y1 = row
      if cls < 0:
        continue
      # The pipeline's box must be the rendered box rescaled to the network input.
      truth = phantom.render(phantom.SPLIT_OFFSETS["test"] + index, size=source_size)["boxes"]
      match = truth[truth[:, 0] == cls]
      scale = image_size / source_size
      assert np.min(np.abs(match[:, 1:] * scale - row[1:]).max(axis=1)) < 1e-3
      # An axis-aligned integer box and a map equal to it: IoU 1 at every threshold.
      box = np.array([cls, np.floor(x0), np.floor(y0), np.ceil(x1), np.ceil(y1)], np.float32)
      saliency = np.zeros((1, len(phantom.FINDINGS), image_size, image_size), np.float32)
      saliency[0, int(cls), int(box[2]):int(box[4]), int(box[1]):int(box[3])] = 1.0
      report = metrics.localization_report(saliency, box[None, None], phantom.FINDINGS)
      overall = report["overall"]
      assert overall["mean_iou"] == pytest.approx(1.0)
      assert overall["iou_accuracy"]["0.7"] == 1.0 and overall["pointing_accuracy"] == 1.0
      checked += 1
  assert checked >= 10
