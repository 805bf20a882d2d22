"""COVIDx (COVID-Net, Wang et al. 2020): v3 normal/pneumonia/COVID-19, v4 negative/positive."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base

CLASSES = {"v3": labels_lib.COVIDX_V3, "v4": labels_lib.COVIDX_V4}
# Label-list files per split, as named by the releases (first found is used).
LISTS = {
    "v3": {"train": ("train_COVIDx3.txt", "train_COVIDx_CXR-3.txt", "train.txt"),
           "validation": ("val_COVIDx3.txt", "val.txt"),
           "test": ("test_COVIDx3.txt", "test_COVIDx_CXR-3.txt", "test.txt")},
    "v4": {"train": ("train_COVIDx_CXR-4.txt", "train_COVIDx4.txt", "train.txt"),
           "validation": ("val_COVIDx_CXR-4.txt", "val_COVIDx4.txt", "val.txt"),
           "test": ("test_COVIDx_CXR-4.txt", "test_COVIDx4.txt", "test.txt")},
}


def parse_line(line: str, classes: tuple[str, ...], where: str) -> tuple[str, str]:
  """'patient_id filename class [source]' -> (filename, class). File names may contain
  spaces, so the class is found from the right and the name is what lies between."""
  tokens = line.split()
  for i in range(len(tokens) - 1, 1, -1):
    if tokens[i] in classes:
      return " ".join(tokens[1:i]), tokens[i]
  raise ValueError(f"{where}: no class among {', '.join(classes)} in {line.strip()[:80]!r}")


class Covidx(base.CxrBuilder):
  """One-hot class labels; configs v3_512 (3 classes, default) and v4_512 (2 classes)."""

  name = "cxrjax_covidx"
  BUILDER_CONFIGS = base.configs(("v3", "v4"), sizes=(512,))
  HOMEPAGE = "https://github.com/lindawangg/COVID-Net"
  DESCRIPTION = "COVIDx CXR: v3 normal/pneumonia/COVID-19, v4 COVID-19 negative/positive."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download COVIDx CXR (v3: the COVIDx3 lists; v4: COVIDx CXR-4 from Kaggle) and put the
  split lists (e.g. train.txt, val.txt, test.txt, or train_COVIDx3.txt ...) in the manual
  folder with the images in train/, val/ and test/ folders beside them.
  """

  def label_names(self):
    return CLASSES[self.builder_config.variant]

  def _items(self, root):
    classes = self.label_names()
    out = {}
    for split, candidates in LISTS[self.builder_config.variant].items():
      try:
        path = base.find(root, *candidates)
      except FileNotFoundError:
        if split == "validation":
          continue  # v3 has no validation list
        raise
      folder = os.path.dirname(path)
      image_dir = {"train": "train", "validation": "val", "test": "test"}[split]
      items = []
      with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
          if not line.strip():
            continue
          where = f"{path}:{lineno}"
          try:
            fname, cls = parse_line(line, classes, where)
            items.append(base.Item(key=fname, image=os.path.join(folder, image_dir, fname),
                                   labels=labels_lib.one_hot(cls, classes, where)))
          except ValueError as e:
            items.append(base.Item(key=f"{split}:{lineno}", image="", error=str(e),
                                   labels=np.zeros(len(classes), np.float32)))
      out[split] = items
    return out
