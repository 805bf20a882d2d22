"""VinDr-CXR (Nguyen et al. 2022): 18,000 DICOM CXRs, 22 local findings with boxes + 6
global labels, read by 3 radiologists (train) or a consensus of 5 (test)."""

from __future__ import annotations

import math
import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base


class VindrCxr(base.CxrBuilder):
  """PhysioNet VinDr-CXR 1.0.0. Image labels: positive if any radiologist marked the finding
  (train has 3 readers; test one consensus). Boxes: every reader's box, class indices into
  the 22 local findings (the first 22 of labels.VINDR), so a train image can have several
  boxes for one lesion: deduplicate (e.g. weighted box fusion) if a task needs it.
  Splits: the official train (15,000) and test (3,000).
  """

  name = "cxrjax_vindr_cxr"
  LABEL_NAMES = labels_lib.VINDR
  BOX_CLASSES = labels_lib.VINDR_LOCAL
  HOMEPAGE = "https://physionet.org/content/vindr-cxr/"
  DESCRIPTION = "VinDr-CXR: 28 image labels, boxes for 22 local findings, DICOM."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Credentialed PhysioNet access is required. Download vindr-cxr/1.0.0 into the manual
  folder: annotations/{annotations,image_labels}_{train,test}.csv and
  {train,test}/<image_id>.dicom. Reading DICOM needs `pip install 'cxrjax[dicom]'`.
  """

  def _items(self, root):
    out = {}
    for split in ("train", "test"):
      label_rows = base.read_csv(base.find(root, f"annotations/image_labels_{split}.csv",
                                           f"image_labels_{split}.csv"),
                                 required=("image_id",) + self.LABEL_NAMES)
      box_rows = base.read_csv(base.find(root, f"annotations/annotations_{split}.csv",
                                         f"annotations_{split}.csv"),
                               required=("image_id", "class_name", "x_min", "y_min", "x_max",
                                         "y_max"))
      images = base.index_files(os.path.join(root, split) if os.path.isdir(
          os.path.join(root, split)) else root, (".dicom", ".dcm", ".png", ".jpg"))
      labels, errors, order = {}, {}, []
      for row in label_rows:
        image_id = row["image_id"].strip()
        try:
          values = np.array([_binary(row[n], f"{row['__line__']} {n!r}")
                             for n in self.LABEL_NAMES], np.float32)
        except ValueError as e:
          errors[image_id] = str(e)
          values = np.zeros(len(self.LABEL_NAMES), np.float32)
        if image_id not in labels:
          order.append(image_id)
          labels[image_id] = values
        else:
          labels[image_id] = np.maximum(labels[image_id], values)
      boxes: dict[str, list] = {}
      for row in box_rows:
        image_id, cls = row["image_id"].strip(), row["class_name"].strip()
        if cls == "No finding":
          continue
        try:
          coords = [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
          if cls not in self.BOX_CLASSES or any(math.isnan(c) for c in coords):
            raise ValueError
        except ValueError:
          errors[image_id] = (f"{row['__line__']}: box class {cls!r} / coordinates "
                              "not usable")
          continue
        boxes.setdefault(image_id, []).append([self.BOX_CLASSES.index(cls), *coords])
      items = []
      for image_id in order:
        path = next((images[image_id + ext] for ext in (".dicom", ".dcm", ".png", ".jpg")
                     if image_id + ext in images), os.path.join(root, split, image_id + ".dicom"))
        items.append(base.Item(key=image_id, image=path, labels=labels[image_id],
                               boxes=np.array(boxes.get(image_id, []), np.float32).reshape(-1, 5),
                               error=errors.get(image_id, "")))
      out[split] = items
    return out


def _binary(text: str, where: str) -> float:
  value = labels_lib.parse_raw_value(text, where)
  if value not in (0.0, 1.0):
    raise ValueError(f"{where}: expected 0 or 1, got {text!r}")
  return value
