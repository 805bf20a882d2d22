"""SIIM-ACR Pneumothorax Segmentation (2019): DICOM CXRs with RLE pneumothorax masks."""

from __future__ import annotations

import os

import numpy as np

from cxrjax.data import labels as labels_lib
from cxrjax.data.builders import base


def rle_decode(rle: str, shape: tuple[int, int], relative: bool = True) -> np.ndarray:
  """SIIM run-length code -> uint8 mask [H, W].

  Pairs of (start, length) over the image flattened column by column (the masks are
  transposed). In the original release each start is an offset from the end of the
  previous run (`relative`); in the stage-2 file starts are absolute.
  """
  h, w = shape
  values = rle.split()
  if len(values) % 2:
    raise ValueError(f"RLE has an odd number of values ({len(values)})")
  try:
    numbers = np.array(values, np.int64).reshape(-1, 2)
  except ValueError:
    raise ValueError("RLE values are not integers") from None
  flat = np.zeros(h * w, np.uint8)
  position = 0
  for start, length in numbers:
    begin = position + start if relative else start - 1
    if begin < 0 or length < 0 or begin + length > h * w:
      raise ValueError(f"RLE run ({start}, {length}) is outside a {w}x{h} image")
    flat[begin:begin + length] = 1
    position = begin + length
  return flat.reshape(w, h).T


class SiimAcrPneumothorax(base.CxrBuilder):
  """Masks: 1 = pneumothorax (union of all rows of an image); label Pneumothorax = any mask.
  Configs `512`/`1024` use the original relative RLE (train-rle.csv); `stage2_*` read
  stage_2_train.csv with absolute starts. No labelled official test set is public, so
  images are hashed 80/10/10 into train/validation/test.
  """

  name = "cxrjax_siim_acr_pneumothorax"
  BUILDER_CONFIGS = base.configs(("", "stage2"))
  LABEL_NAMES = labels_lib.SIIM_PNEUMOTHORAX
  SEG_CLASSES = ("background", "pneumothorax")
  HOMEPAGE = "https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation"
  DESCRIPTION = "SIIM-ACR pneumothorax: DICOM CXRs with run-length-encoded masks."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the SIIM-ACR Pneumothorax Segmentation data (Kaggle) into the manual folder:
  train-rle.csv (or stage_2_train.csv for the stage2 configs) and the DICOM files
  (<ImageId>.dcm, in any sub-folders, e.g. dicom-images-train/<study>/<series>/).
  Reading DICOM needs `pip install 'cxrjax[dicom]'`.
  """

  def _items(self, root):
    stage2 = self.builder_config.variant == "stage2"
    path = base.find(root, "stage_2_train.csv" if stage2 else "train-rle.csv")
    rows = base.read_csv(path, required=("ImageId",))
    rle_column = next((c for c in rows[0] if c.strip() == "EncodedPixels"), None) if rows else None
    if rows and rle_column is None:
      raise ValueError(f"{path}: no EncodedPixels column; has {list(rows[0])}")
    runs: dict[str, list[str]] = {}
    for row in rows:
      runs.setdefault(row["ImageId"].strip(), []).append(row[rle_column].strip())
    files = base.index_files(root, (".dcm",))
    out = {"train": [], "validation": [], "test": []}
    for image_id, codes in runs.items():
      positive = [c for c in codes if c not in ("-1", "")]
      out[base.hash_split(image_id)].append(base.Item(
          key=image_id, image=files.get(image_id + ".dcm", os.path.join(root, image_id + ".dcm")),
          labels=np.array([1.0 if positive else 0.0], np.float32),
          seg=_MaskFromRle(positive, not stage2, image_id)))
    return out


class _MaskFromRle:
  """Decodes an image's runs once its size is known (from the DICOM)."""

  def __init__(self, codes, relative, image_id):
    self.codes, self.relative, self.image_id = codes, relative, image_id

  def __call__(self, shape):
    mask = np.zeros(shape, np.uint8)
    for code in self.codes:
      try:
        mask |= rle_decode(code, shape, self.relative)
      except ValueError as e:
        from cxrjax.data.decode import DataError  # pylint: disable=import-outside-toplevel
        raise DataError(f"{self.image_id}: {e}") from None
    return mask
