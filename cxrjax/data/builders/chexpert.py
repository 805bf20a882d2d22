"""CheXpert (Irvin et al. 2019): 224,316 CXRs of 65,240 patients, 14 labeller observations."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base


class Chexpert(base.CxrBuilder):
  """CheXpert v1.0 (full or small) with raw labeller values (1, 0, -1 uncertain, blank).

  Configs: `512`/`1024` keep all 14 observations; `competition_512`/`competition_1024` keep
  the 5 competition tasks. Uncertainty policies (U-Ignore/Ones/Zeros/smoothing) apply when
  reading (config.data.label_policy), not here. Splits: train (train.csv), validation
  (valid.csv, radiologist consensus) and test when the 500-study test labels
  (test_labels.csv / test.csv from CheXlocalize) are present.
  """

  name = "cxrjax_chexpert"
  BUILDER_CONFIGS = base.configs(("", "competition"))
  TEXT_FIELDS = ("view",)
  HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
  DESCRIPTION = "CheXpert: 14 observations labelled positive/negative/uncertain/blank."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Register and download CheXpert-v1.0 (or CheXpert-v1.0-small) from
  https://stanfordmlgroup.github.io/competitions/chexpert/ and extract it so the manual
  folder holds CheXpert-v1.0[-small]/{train.csv,valid.csv,train/,valid/}. Optionally add
  the test set (test_labels.csv and test/) from the CheXlocalize release.
  """

  def label_names(self):
    return (labels_lib.CHEXPERT_5 if self.builder_config.variant == "competition"
            else labels_lib.CHEXPERT_14)

  def _items(self, root):
    names = self.label_names()
    out = {}
    for split, candidates in (("train", ("train.csv",)), ("validation", ("valid.csv",)),
                              ("test", ("test_labels.csv", "test.csv"))):
      try:
        path = base.find(root, *candidates)
      except FileNotFoundError:
        if split == "test":
          continue  # the test labels are a separate, optional release
        raise
      rows = base.read_csv(path, required=("Path",) + names)
      out[split] = [self._item(root, os.path.dirname(path), row, names) for row in rows]
    return out

  @staticmethod
  def _item(root, csv_dir, row, names):
    rel = row["Path"].strip()
    # Paths start with the dataset folder ('CheXpert-v1.0-small/train/...') in train/valid
    # and without it ('test/...') in the test release: try both anchors.
    candidates = [os.path.join(root, rel), os.path.join(os.path.dirname(csv_dir), rel),
                  os.path.join(csv_dir, rel)]
    image = next((c for c in candidates if os.path.exists(c)), candidates[0])
    item = base.Item(key=rel, image=image, labels=np.zeros(len(names), np.float32),
                     text={"view": " ".join(v for v in (row.get("Frontal/Lateral", "").strip(),
                                                        row.get("AP/PA", "").strip()) if v)})
    try:
      item.labels = np.array([labels_lib.parse_raw_value(row[n], f"{row['__line__']} {n!r}")
                              for n in names], np.float32)
    except ValueError as e:
      item.error = str(e)
    return item
