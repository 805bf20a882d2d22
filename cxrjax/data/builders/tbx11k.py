"""TBX11K (Liu et al. 2020): 11,200 CXRs, healthy / sick-but-non-TB / TB, TB boxes."""

from __future__ import annotations

import json
import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base

FOLDER_CLASS = {"health": "healthy", "sick": "sick_but_non_tb", "tb": "tb"}


class Tbx11k(base.CxrBuilder):
  """One-hot image class from the image folder (health/sick/tb); boxes from the COCO JSON
  (classes labels.TBX11K_BOX). Splits: the official train and val lists; the test labels
  are withheld by the authors (online evaluation), so there is no test split.
  """

  name = "cxrjax_tbx11k"
  LABEL_NAMES = labels_lib.TBX11K_IMAGE
  BOX_CLASSES = labels_lib.TBX11K_BOX
  HOMEPAGE = "https://mmcheng.net/tb/"
  DESCRIPTION = "TBX11K: TB classification and detection."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download TBX11K (https://mmcheng.net/tb/) and extract it so the manual folder holds
  imgs/{health,sick,tb}/, lists/TBX11K_{train,val}.txt and
  annotations/json/TBX11K_{train,val}.json (a top-level TBX11K/ folder is fine).
  """

  def _items(self, root):
    out = {}
    for split, tag in (("train", "train"), ("validation", "val")):
      list_path = base.find(root, f"lists/TBX11K_{tag}.txt")
      top = os.path.dirname(os.path.dirname(list_path))
      boxes = self._boxes(base.find(root, f"annotations/json/TBX11K_{tag}.json"))
      items = []
      with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
          rel = line.strip()
          if not rel:
            continue
          folder = rel.split("/")[0]
          item = base.Item(key=rel, image=os.path.join(top, "imgs", rel),
                           labels=np.zeros(len(self.LABEL_NAMES), np.float32),
                           boxes=np.array(boxes.get(os.path.basename(rel), []),
                                          np.float32).reshape(-1, 5))
          if folder in FOLDER_CLASS:
            item.labels = labels_lib.one_hot(FOLDER_CLASS[folder], self.LABEL_NAMES)
          else:
            item.error = (f"{list_path}:{lineno}: folder {folder!r} is not one of "
                          f"{', '.join(FOLDER_CLASS)}")
          items.append(item)
      out[split] = items
    return out

  def _boxes(self, path):
    with open(path, encoding="utf-8") as f:
      coco = json.load(f)
    category = {}
    for c in coco.get("categories", []):
      if c["name"] not in self.BOX_CLASSES:
        raise ValueError(f"{path}: unknown category {c['name']!r}; expected "
                         f"{', '.join(self.BOX_CLASSES)}")
      category[c["id"]] = self.BOX_CLASSES.index(c["name"])
    file_of = {im["id"]: os.path.basename(im["file_name"]) for im in coco.get("images", [])}
    out: dict[str, list] = {}
    for a in coco.get("annotations", []):
      x, y, w, h = a["bbox"]
      out.setdefault(file_of[a["image_id"]], []).append(
          [category[a["category_id"]], x, y, x + w, y + h])
    return out
