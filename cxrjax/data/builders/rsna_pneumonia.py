"""RSNA Pneumonia Detection Challenge (2018): 26,684 DICOM CXRs, lung-opacity boxes."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base


class RsnaPneumonia(base.CxrBuilder):
  """Label Lung Opacity = Target; boxes (class 0) from x, y, width, height rows. The
  challenge's stage-2 test labels are not public: patientIds are hashed 80/10/10 into
  train/validation/test (one image per patientId, so splits are patient-disjoint).
  The detailed class (Lung Opacity / No Lung Opacity / Not Normal / Normal) is kept as text.
  """

  name = "cxrjax_rsna_pneumonia"
  LABEL_NAMES = labels_lib.RSNA_PNEUMONIA
  BOX_CLASSES = labels_lib.RSNA_PNEUMONIA
  TEXT_FIELDS = ("detailed_class",)
  HOMEPAGE = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"
  DESCRIPTION = "RSNA pneumonia: boxes around lung opacities in DICOM CXRs."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the RSNA Pneumonia Detection Challenge data (Kaggle) into the manual folder:
  stage_2_train_labels.csv, optionally stage_2_detailed_class_info.csv, and
  stage_2_train_images/<patientId>.dcm. Reading DICOM needs `pip install 'cxrjax[dicom]'`.
  """

  def _items(self, root):
    path = base.find(root, "stage_2_train_labels.csv", "stage_1_train_labels.csv")
    rows = base.read_csv(path, required=("patientId", "x", "y", "width", "height", "Target"))
    try:
      detailed = {r["patientId"].strip(): r["class"].strip() for r in base.read_csv(
          base.find(root, "stage_2_detailed_class_info.csv", "stage_1_detailed_class_info.csv"),
          required=("patientId", "class"))}
    except FileNotFoundError:
      detailed = {}
    files = base.index_files(root, (".dcm",))
    per_image: dict[str, base.Item] = {}
    for row in rows:
      pid = row["patientId"].strip()
      item = per_image.get(pid)
      if item is None:
        item = per_image[pid] = base.Item(
            key=pid, image=files.get(pid + ".dcm", os.path.join(root, pid + ".dcm")),
            labels=np.zeros(1, np.float32), boxes=np.zeros((0, 5), np.float32),
            text={"detailed_class": detailed.get(pid, "")})
      try:
        target = labels_lib.parse_raw_value(row["Target"], f"{row['__line__']} 'Target'")
        if target == 1.0:
          x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
          if w <= 0 or h <= 0:
            raise ValueError(f"{row['__line__']}: box of size {w}x{h}")
          item.boxes = np.concatenate([item.boxes, [[0, x, y, x + w, y + h]]]).astype(np.float32)
          item.labels[0] = 1.0
        elif target != 0.0:
          raise ValueError(f"{row['__line__']}: Target {row['Target']!r} is not 0 or 1")
      except ValueError as e:
        item.error = str(e)
    out = {"train": [], "validation": [], "test": []}
    for pid, item in per_image.items():
      out[base.hash_split(pid)].append(item)
    return out
