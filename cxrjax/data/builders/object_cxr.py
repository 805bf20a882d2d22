"""object-CXR (JF Healthcare, MIDL 2020): 10,000 CXRs, foreign objects as box/ellipse/polygon."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base


def parse_annotation(text: str, where: str) -> np.ndarray:
  """'0 x1 y1 x2 y2;1 x1 y1 x2 y2;2 x1 y1 x2 y2 x3 y3 ...' -> boxes [N, 5] (class 0).

  Type 0 is a rectangle and 1 an ellipse (both by their bounding corners), 2 a polygon
  (its vertices); each becomes its bounding box.
  """
  boxes = []
  for part in (p.strip() for p in text.split(";")):
    if not part:
      continue
    try:
      values = [float(v) for v in part.split()]
    except ValueError:
      raise ValueError(f"{where}: annotation {part[:40]!r} is not numeric") from None
    kind, coords = int(values[0]), values[1:]
    if kind not in (0, 1, 2) or len(coords) < 4 or len(coords) % 2 or (
        kind in (0, 1) and len(coords) != 4):
      raise ValueError(f"{where}: annotation {part[:40]!r} is not 'type x y x y ...'")
    xs, ys = coords[0::2], coords[1::2]
    boxes.append([0, min(xs), min(ys), max(xs), max(ys)])
  return np.array(boxes, np.float32).reshape(-1, 5)


class ObjectCxr(base.CxrBuilder):
  """Label foreign_object = any annotation. Splits: train (train.csv) and validation
  (dev.csv), the released ones; the challenge test set was never released."""

  name = "cxrjax_object_cxr"
  LABEL_NAMES = labels_lib.OBJECT_CXR
  BOX_CLASSES = labels_lib.OBJECT_CXR
  HOMEPAGE = "https://jfhealthcare.github.io/object-CXR/"
  DESCRIPTION = "object-CXR: foreign objects on CXRs with box/ellipse/polygon annotations."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download object-CXR and extract it so the manual folder holds train.csv, dev.csv,
  train/*.jpg and dev/*.jpg.
  """

  def _items(self, root):
    out = {}
    for split, stem in (("train", "train"), ("validation", "dev")):
      path = base.find(root, f"{stem}.csv")
      rows = base.read_csv(path, required=("image_name", "annotation"))
      folder = os.path.join(os.path.dirname(path), stem)
      items = []
      for row in rows:
        name = row["image_name"].strip()
        item = base.Item(key=name, image=os.path.join(folder, name),
                         labels=np.zeros(1, np.float32), boxes=np.zeros((0, 5), np.float32))
        text = row["annotation"].strip()
        if text and text.lower() != "nan":
          try:
            item.boxes = parse_annotation(text, row["__line__"])
            item.labels[0] = 1.0
          except ValueError as e:
            item.error = str(e)
        items.append(item)
      out[split] = items
    return out
