"""Shenzhen and Montgomery County TB sets (Jaeger et al. 2014), with lung masks."""

from __future__ import annotations

import os
import re

import numpy as np

from cxrjax.data import decode, labels as labels_lib
from cxrjax.data.builders import base

_NAME = re.compile(r"^(?P<stem>(CHNCXR|MCUCXR)_\d{4}_(?P<tb>[01]))\.png$", re.IGNORECASE)


def _reading(root, stem):
  for folder in ("ClinicalReadings", "clinical_readings"):
    path = os.path.join(root, folder, stem + ".txt")
    if os.path.isfile(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        return " ".join(f.read().split())
  return ""


class _TbBuilder(base.CxrBuilder, skip_registration=True):
  """Label Tuberculosis from the file name suffix (_1 = TB); seg 1 = lung. Images without
  a lung mask are skipped and counted. No official split: file stems are hashed 80/10/10."""

  LABEL_NAMES = labels_lib.TUBERCULOSIS
  SEG_CLASSES = labels_lib.LUNG_SEG
  TEXT_FIELDS = ("report",)
  MAX_FAILURE_FRACTION = 1.0  # Shenzhen lung masks exist for 566 of 662 images

  def _mask_for(self, root, stem):
    raise NotImplementedError

  def _items(self, root):
    image_dir = base.find(root, "CXR_png", what="CXR_png folder")
    out = {"train": [], "validation": [], "test": []}
    for fname in sorted(os.listdir(image_dir)):
      match = _NAME.match(fname)
      if not match:
        continue
      stem = match["stem"]
      out[base.hash_split(stem)].append(base.Item(
          key=stem, image=os.path.join(image_dir, fname),
          labels=np.array([float(match["tb"])], np.float32), seg=self._mask_for(root, stem),
          text={"report": _reading(root, stem)}))
    return out


class _LungMask:
  """Union of binary mask PNGs (0/255 or 0/1) -> 0/1: all of `paths` (left + right lung) or,
  with require_all=False, whichever of the alternative locations exist."""

  def __init__(self, paths, require_all):
    self.paths, self.require_all = paths, require_all

  def __call__(self, shape):
    found = [p for p in self.paths if os.path.isfile(p)]
    if self.require_all and len(found) < len(self.paths):
      missing = [p for p in self.paths if p not in found]
      raise decode.MissingFileError(f"lung mask missing: {', '.join(missing)}")
    if not found:
      raise decode.MissingFileError(f"no lung mask: expected {' or '.join(self.paths)}")
    mask = None
    for p in found:
      m = decode.decode_mask(decode.read_file(p), p)
      m = (m > 0).astype(np.uint8)
      if m.shape != tuple(shape):
        from PIL import Image  # pylint: disable=import-outside-toplevel
        m = np.asarray(Image.fromarray(m).resize((shape[1], shape[0]), Image.NEAREST))
      mask = m if mask is None else mask | m
    return mask


class ShenzhenTb(_TbBuilder):
  name = "cxrjax_shenzhen_tb"
  HOMEPAGE = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
  DESCRIPTION = "Shenzhen Hospital TB CXRs (662), lung masks where available."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the Shenzhen set (ChinaSet_AllFiles) and extract it so the manual folder holds
  CXR_png/CHNCXR_####_[01].png and ClinicalReadings/; add the lung masks (e.g. the
  'Shenzhen lung masks' release) as mask/CHNCXR_####_[01]_mask.png.
  """

  def _mask_for(self, root, stem):
    return _LungMask([os.path.join(root, d, stem + "_mask.png")
                      for d in ("mask", "masks", "Mask")], require_all=False)


class MontgomeryTb(_TbBuilder):
  name = "cxrjax_montgomery_tb"
  HOMEPAGE = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
  DESCRIPTION = "Montgomery County TB CXRs (138) with left and right lung masks."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the Montgomery County set (MontgomerySet) and extract it so the manual folder
  holds CXR_png/MCUCXR_####_[01].png, ManualMask/leftMask/ and ManualMask/rightMask/ (same
  file names) and ClinicalReadings/.
  """
  MAX_FAILURE_FRACTION = 0.01  # every Montgomery image has masks

  def _mask_for(self, root, stem):
    return _LungMask([os.path.join(root, "ManualMask", side, stem + ".png")
                      for side in ("leftMask", "rightMask")], require_all=True)
