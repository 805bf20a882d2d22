"""CXR-LT 2024 (long-tailed multi-label CXR classification on MIMIC-CXR-JPG): 40 findings."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base

# Label files of the PhysioNet release per split (first found is used).
FILES = {"train": ("train_labeled.csv", "train.csv"),
         "validation": ("development_labeled.csv", "development.csv", "val_labeled.csv"),
         "test": ("test_labeled.csv", "test.csv")}


class CxrLt2024(base.CxrBuilder):
  """Binary labels for the 40 findings (labels.CXR_LT_2024), read by column name.
  Images are the MIMIC-CXR-JPG files named by the CSV's `fpath`/`path` column. Splits are
  the challenge's label files; those absent from the manual folder are left out.
  """

  name = "cxrjax_cxr_lt_2024"
  LABEL_NAMES = labels_lib.CXR_LT_2024
  TEXT_FIELDS = ("view",)
  HOMEPAGE = "https://physionet.org/content/cxr-lt-iccv-workshop-cvamd/"
  DESCRIPTION = "CXR-LT 2024: 40 long-tailed findings on MIMIC-CXR-JPG images."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Credentialed PhysioNet access is required. Put the CXR-LT 2024 label CSVs
  (train_labeled.csv, development_labeled.csv, test_labeled.csv) in the manual folder and
  the MIMIC-CXR-JPG 'files' folder (or a symlink to it) beside them.
  """

  def _items(self, root):
    out = {}
    for split, candidates in FILES.items():
      try:
        path = base.find(root, *candidates)
      except FileNotFoundError:
        if split == "train":
          raise
        continue
      rows = base.read_csv(path, required=self.LABEL_NAMES)
      column = next((c for c in ("fpath", "path") if c in rows[0]), None) if rows else "path"
      if column is None:
        raise ValueError(f"{path}: no image path column ('fpath' or 'path'); has {list(rows[0])}")
      folder = os.path.dirname(path)
      items = []
      for row in rows:
        rel = row[column].strip()
        # Paths are 'files/p10/...' or 'p10/...' depending on the release: try both.
        candidates_ = [os.path.join(folder, rel), os.path.join(folder, "files", rel)]
        image = next((c for c in candidates_ if os.path.exists(c)), candidates_[0])
        key = row.get("dicom_id", "").strip() or rel
        item = base.Item(key=key, image=image,
                         labels=np.zeros(len(self.LABEL_NAMES), np.float32),
                         text={"view": row.get("ViewPosition", "").strip()})
        try:
          item.labels = np.array([labels_lib.parse_raw_value(row[n], f"{row['__line__']} {n!r}")
                                  for n in self.LABEL_NAMES], np.float32)
        except ValueError as e:
          item.error = str(e)
        items.append(item)
      out[split] = items
    return out
