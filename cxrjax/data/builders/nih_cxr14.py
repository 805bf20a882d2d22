"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal CXRs, 14 labels, 984 boxes."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base


class NihCxr14(base.CxrBuilder):
  """ChestX-ray14 with the official train_val / test lists and BBox_List_2017 boxes.

  Splits: `test` is the official test_list.txt; `train` and `validation` divide
  train_val_list.txt by patient (~90/10, deterministic hash of Patient ID), since the
  release defines no validation set.
  """

  name = "cxrjax_nih_cxr14"
  LABEL_NAMES = labels_lib.CXR14
  BOX_CLASSES = labels_lib.CXR14
  TEXT_FIELDS = ("view",)
  HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
  DESCRIPTION = "NIH ChestX-ray14: 14 text-mined labels, official test list, 984 boxes."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download from https://nihcc.app.box.com/v/ChestXray-NIHCC (accept its terms) into one
  folder: Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), train_val_list.txt,
  test_list.txt, BBox_List_2017.csv, and the images_001..images_012 archives extracted
  anywhere below it (images are found by file name).
  """

  def _items(self, root):
    entries = base.read_csv(base.find(root, "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv",
                                      what="Data_Entry_2017 CSV"),
                            required=("Image Index", "Finding Labels", "Patient ID"))
    lists = {}
    for split, fname in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
      with open(base.find(root, fname), encoding="utf-8") as f:
        lists[split] = {line.strip() for line in f if line.strip()}
    boxes = self._boxes(base.find(root, "BBox_List_2017.csv"))
    files = base.index_files(root, (".png",))
    out = {"train": [], "validation": [], "test": []}
    for row in entries:
      image = row["Image Index"].strip()
      if image in lists["test"]:
        split = "test"
      elif image in lists["train_val"]:
        split = base.hash_split(row["Patient ID"].strip(),
                                (("train", 0.9), ("validation", 0.1)))
      else:
        continue  # not in either official list
      item = base.Item(key=image, image=files.get(image, os.path.join(root, "images", image)),
                       labels=np.zeros(len(self.LABEL_NAMES), np.float32),
                       boxes=np.array(boxes.get(image, []), np.float32).reshape(-1, 5),
                       text={"view": row.get("View Position", "").strip()})
      findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
      try:
        item.labels = labels_lib.multi_hot([f for f in findings if f != "No Finding"],
                                           self.LABEL_NAMES, row["__line__"])
      except ValueError as e:
        item.error = str(e)
      out[split].append(item)
    return out

  def _boxes(self, path):
    """Image Index, Finding Label, Bbox [x, y, w, h] (the header splits it in 4 columns)."""
    rows = base.read_csv(path, required=("Image Index", "Finding Label"))
    out: dict[str, list] = {}
    for row in rows:
      cells = list(row.values())  # dict keeps column order: x, y, w, h follow the label
      try:
        x, y, w, h = (float(v) for v in cells[2:6])
      except ValueError:
        raise ValueError(f"{row['__line__']}: expected numeric x, y, w, h, got {cells[2:6]}"
                         ) from None
      label = labels_lib.CXR14_BBOX_ALIASES.get(row["Finding Label"].strip(),
                                                row["Finding Label"].strip())
      if label not in self.LABEL_NAMES:
        raise ValueError(f"{row['__line__']}: unknown box label {label!r}")
      out.setdefault(row["Image Index"].strip(), []).append(
          [self.LABEL_NAMES.index(label), x, y, x + w, y + h])
    return out
