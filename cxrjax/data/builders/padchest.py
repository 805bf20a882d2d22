"""PadChest (Bustos et al. 2020): 160,868 CXRs (16-bit PNG), 174 findings + 19 diagnoses."""

from __future__ import annotations

import ast
import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base

PROJECTIONS = {"frontal": ("PA", "AP", "AP_horizontal"), "pa": ("PA",), "all": None}


def parse_terms(text: str, where: str) -> list[str]:
  """The Labels cell: a Python-style list, e.g. "['pleural effusion', ' cardiomegaly']"."""
  text = text.strip()
  if not text or text.lower() == "nan":
    raise ValueError(f"{where}: empty Labels cell")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"{where}: Labels {text[:60]!r} is not a list of strings") from None
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise ValueError(f"{where}: Labels {text[:60]!r} is not a list of strings")
  return [v.strip() for v in value if v.strip()]


class Padchest(base.CxrBuilder):
  """Multi-hot over the frequent findings in labels.PADCHEST; every term of an image is
  also kept in the `findings` text ('|'-joined) so other vocabularies need no rebuild.
  Views by Projection: configs `frontal_*` (default), `pa_*`, `all_*`. PadChest has no
  official split: patients are hashed 80/10/10 into train/validation/test.
  """

  name = "cxrjax_padchest"
  BUILDER_CONFIGS = base.configs(tuple(PROJECTIONS))
  LABEL_NAMES = labels_lib.PADCHEST
  TEXT_FIELDS = ("view", "findings")
  HOMEPAGE = "https://bimcv.cipf.es/bimcv-projects/padchest/"
  DESCRIPTION = "PadChest: multi-label findings from Spanish reports (27% by physicians)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request access at https://bimcv.cipf.es/bimcv-projects/padchest/ and put
  PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz] in the manual folder with the
  image archives extracted into their numbered folders (<ImageDir>/<ImageID>.png) or all
  images in one folder.
  """

  def _items(self, root):
    csv_path = base.find(root, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
                         "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
                         "PADCHEST_chest_x_ray_images_labels_160K.csv", what="PadChest CSV")
    rows = base.read_csv(csv_path, required=("ImageID", "ImageDir", "PatientID", "Projection",
                                             "Labels"))
    keep = PROJECTIONS[self.builder_config.variant]
    folder = os.path.dirname(csv_path)
    out = {"train": [], "validation": [], "test": []}
    for row in rows:
      projection = row["Projection"].strip()
      if keep is not None and projection not in keep:
        continue
      image_id = row["ImageID"].strip()
      nested = os.path.join(folder, row["ImageDir"].strip(), image_id)
      item = base.Item(key=image_id,
                       image=nested if os.path.exists(nested) else os.path.join(folder, image_id),
                       labels=np.zeros(len(self.LABEL_NAMES), np.float32),
                       text={"view": projection})
      try:
        terms = parse_terms(row["Labels"], row["__line__"])
        item.labels = labels_lib.multi_hot(terms, self.LABEL_NAMES, strict=False)
        item.text["findings"] = "|".join(terms)
      except ValueError as e:
        item.error = str(e)
      out[base.hash_split(row["PatientID"].strip())].append(item)
    return out
