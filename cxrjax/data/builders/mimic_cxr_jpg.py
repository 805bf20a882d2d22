"""MIMIC-CXR-JPG 2.0/2.1 (Johnson et al. 2019): 377,110 JPEGs, CheXpert-labeller labels."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base

VIEWS = {"frontal": ("PA", "AP"), "pa": ("PA",), "all": None}


class MimicCxrJpg(base.CxrBuilder):
  """Labels per study from mimic-cxr-2.0.0-chexpert.csv (raw 1/0/-1/blank), the official
  split (train/validate/test -> train/validation/test) and a view filter from
  ViewPosition in the metadata: configs `frontal_*` (PA+AP, default), `pa_*`, `all_*`.
  Free-text reports are stored when mimic-cxr-reports is extracted in the manual folder.
  Ids are the dicom_id (an image hash), not patient identifiers.
  """

  name = "cxrjax_mimic_cxr_jpg"
  BUILDER_CONFIGS = base.configs(tuple(VIEWS))
  LABEL_NAMES = labels_lib.CHEXPERT_14
  TEXT_FIELDS = ("view", "report")
  HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
  DESCRIPTION = "MIMIC-CXR-JPG with CheXpert-labeller labels, official split, view filter."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Credentialed PhysioNet access is required. Download mimic-cxr-jpg into the manual folder:
  mimic-cxr-2.0.0-chexpert.csv[.gz], mimic-cxr-2.0.0-split.csv[.gz],
  mimic-cxr-2.0.0-metadata.csv[.gz] and files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
  (the 'files' folder may be a symlink). Optional: extract mimic-cxr-reports.zip beside
  them (files/pXX/pXXXXXXXX/sXXXXXXXX.txt) to store reports.
  """

  def _items(self, root):
    find = lambda stem: base.find(root, stem + ".csv", stem + ".csv.gz", what=stem)  # noqa: E731
    labels_rows = base.read_csv(find("mimic-cxr-2.0.0-chexpert"),
                                required=("subject_id", "study_id") + self.LABEL_NAMES)
    split_rows = base.read_csv(find("mimic-cxr-2.0.0-split"),
                               required=("dicom_id", "study_id", "subject_id", "split"))
    meta_rows = base.read_csv(find("mimic-cxr-2.0.0-metadata"),
                              required=("dicom_id", "ViewPosition"))
    study_labels = {}
    for row in labels_rows:
      try:
        study_labels[row["study_id"].strip()] = np.array(
            [labels_lib.parse_raw_value(row[n], f"{row['__line__']} {n!r}")
             for n in self.LABEL_NAMES], np.float32)
      except ValueError as e:
        study_labels[row["study_id"].strip()] = str(e)
    view_of = {r["dicom_id"].strip(): r["ViewPosition"].strip() for r in meta_rows}
    keep = VIEWS[self.builder_config.variant]
    files_root = os.path.dirname(find("mimic-cxr-2.0.0-split"))
    names = {"train": "train", "validate": "validation", "test": "test"}
    out = {s: [] for s in names.values()}
    for row in split_rows:
      dicom_id, study = row["dicom_id"].strip(), row["study_id"].strip()
      subject = row["subject_id"].strip()
      view = view_of.get(dicom_id, "")
      if keep is not None and view not in keep:
        continue
      if row["split"].strip() not in names:
        raise ValueError(f"{row['__line__']}: split {row['split']!r} is not one of "
                         f"{', '.join(names)}")
      study_dir = os.path.join(files_root, "files", f"p{subject[:2]}", f"p{subject}",
                               f"s{study}")
      labels = study_labels.get(study)
      item = base.Item(key=dicom_id, image=os.path.join(study_dir, dicom_id + ".jpg"),
                       labels=(labels if isinstance(labels, np.ndarray) else
                               np.full(len(self.LABEL_NAMES), np.nan, np.float32)),
                       text={"view": view, "report": _report(files_root, subject, study)})
      if isinstance(labels, str):
        item.error = labels
      out[names[row["split"].strip()]].append(item)
    return out


def _report(root, subject, study):
  for folder in ("mimic-cxr-reports", ""):
    path = os.path.join(root, folder, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
    if os.path.isfile(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()
  return ""
