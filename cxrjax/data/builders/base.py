"""What every cxrjax TFDS builder shares: features, encoding, failure accounting, splits.

Each dataset module only parses its own annotation files into `Item`s; this base decodes
the image (PNG/JPEG/DICOM), shrinks it so the longer side is at most the config's
`image_size`, rescales boxes and masks with it, and stores grey 8-bit PNG bytes plus label
tensors in array_record files. Reading needs no TensorFlow (`as_data_source()`).

Features: image (PNG bytes), labels float32 [K] raw (1/0/-1/NaN; see labels.py), id
(text), and per dataset boxes float32 [N, 5] (class, x0, y0, x1, y1 in stored pixels),
seg (PNG bytes of class indices), and text fields (view, report, findings).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import hashlib
import inspect
import io
import logging
import os
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cxrjax.data import decode

CITATION_NOTE = "See the dataset's homepage for its licence and how to cite it."


@dataclasses.dataclass(eq=False)
class CxrConfig(tfds.core.BuilderConfig):
  """image_size: longest side stored (0 keeps the original); variant: dataset-specific."""
  image_size: int = 512
  variant: str = ""


def configs(variants: Iterable[str] = ("",), sizes: Iterable[int] = (512, 1024)
            ) -> list[CxrConfig]:
  """Configs named '512', '1024' or 'VARIANT_512', ... (the first is the default)."""
  out = []
  for variant in variants:
    for size in sizes:
      name = f"{variant}_{size}" if variant else str(size)
      out.append(CxrConfig(name=name, image_size=size, variant=variant,
                           description=f"{variant or 'all'} images, longest side <= {size} px"))
  return out


@dataclasses.dataclass
class Item:
  """One example as parsed from a dataset's own files, before decoding."""
  key: str                      # unique within the split; also the stored id
  image: str                    # path of the PNG/JPEG/DICOM file
  labels: np.ndarray            # raw float32 [K]
  boxes: np.ndarray | None = None   # [N, 5] in the file's own pixels
  # Mask of class indices in the file's pixels: an array, a PNG path, or a function of the
  # image's (height, width) (RLE masks need the size); None when not annotated.
  seg: np.ndarray | str | Callable[[tuple[int, int]], np.ndarray] | None = None
  text: dict[str, str] = dataclasses.field(default_factory=dict)
  # Set when the annotation itself is unusable (unknown class, bad RLE): the example is
  # skipped and counted like an unreadable image.
  error: str = ""


class CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the cxrjax dataset builders (not registered itself)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First cxrjax release."}
  BUILDER_CONFIGS = configs()
  LABEL_NAMES: tuple[str, ...] = ()
  BOX_CLASSES: tuple[str, ...] = ()   # non-empty: the dataset has boxes
  SEG_CLASSES: tuple[str, ...] = ()   # non-empty: the dataset has masks
  TEXT_FIELDS: tuple[str, ...] = ()   # e.g. ('view', 'report')
  HOMEPAGE = ""
  DESCRIPTION = ""
  # Stop a build when more than this share of a split's images cannot be read.
  MAX_FAILURE_FRACTION = 0.01

  # TFDS looks for a checksums file beside the builder's module through importlib
  # resources, which for an editable install needs the extra `importlib_resources`
  # package; our datasets are manual downloads without checksums, so name the file directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def label_names(self) -> tuple[str, ...]:
    return self.LABEL_NAMES

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "labels": tfds.features.Tensor(shape=(len(self.label_names()),), dtype=np.float32),
        "id": tfds.features.Text(),
    }
    if self.BOX_CLASSES:
      features["boxes"] = tfds.features.Tensor(shape=(None, 5), dtype=np.float32)
    if self.SEG_CLASSES:
      features["seg"] = tfds.features.Tensor(shape=(), dtype=np.object_)
    for field in self.TEXT_FIELDS:
      features[field] = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
        citation=CITATION_NOTE, features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(
            label_names=list(self.label_names()), box_classes=list(self.BOX_CLASSES),
            seg_classes=list(self.SEG_CLASSES),
            image_size=self.builder_config.image_size))

  # Subclasses implement this: manual_dir -> {split: items}.
  def _items(self, root: str) -> dict[str, Iterable[Item]]:
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {split: list(items) for split, items in self._items(root).items()}
    # TFDS refuses empty splits; a small download may leave one empty (e.g. a hash split).
    return {split: self._generate_examples(items, split)
            for split, items in splits.items() if items}

  def _generate_examples(self, items: Iterable[Item], split: str = ""
                         ) -> Iterator[tuple[str, dict]]:
    seen = failed = 0
    first: list[str] = []
    for item in items:
      seen += 1
      try:
        example = self._encode(item)
      except decode.DataError as e:
        failed += 1
        if len(first) < 5:
          first.append(str(e))
        logging.warning("%s/%s: skipped %s", self.name, split, e)
        continue
      yield item.key, example
    if failed:
      logging.warning("%s/%s: skipped %d of %d images", self.name, split, failed, seen)
    if failed > self.MAX_FAILURE_FRACTION * seen:
      raise decode.DataError(
          f"{self.name}/{split}: {failed} of {seen} images could not be read, more than "
          f"MAX_FAILURE_FRACTION={self.MAX_FAILURE_FRACTION}; first: " + " | ".join(first))

  def _encode(self, item: Item) -> dict:
    if item.error:
      raise decode.DataError(item.error)
    size = self.builder_config.image_size
    image, (h, w) = decode.decode_with_size(decode.read_file(item.image), item.image, size)
    image = decode.resize_max(image, size)
    sy, sx = image.shape[0] / h, image.shape[1] / w
    example = {"image": decode.encode_png(image),
               "labels": np.asarray(item.labels, np.float32), "id": item.key}
    if self.BOX_CLASSES:
      boxes = (np.zeros((0, 5), np.float32) if item.boxes is None
               else np.array(item.boxes, np.float32).reshape(-1, 5))
      boxes[:, 1:] *= [sx, sy, sx, sy]
      example["boxes"] = boxes
    if self.SEG_CLASSES:
      example["seg"] = decode.encode_png(self._mask(item, (h, w), image.shape))
    for field in self.TEXT_FIELDS:
      example[field] = item.text.get(field, "")
    return example

  def _mask(self, item: Item, original: tuple[int, int], shape) -> np.ndarray:
    seg = item.seg
    if seg is None:
      raise decode.DataError(f"{item.image}: no mask")
    if callable(seg):
      seg = seg(original)
    elif isinstance(seg, str):
      seg = decode.decode_mask(decode.read_file(seg), seg)
    seg = np.asarray(seg, np.uint8)
    if seg.shape != tuple(original):
      # Masks of some releases are stored at another resolution: scale, don't crop.
      seg = np.asarray(Image.fromarray(seg).resize((original[1], original[0]), Image.NEAREST))
    if seg.shape != tuple(shape[:2]):
      seg = np.asarray(Image.fromarray(seg).resize((shape[1], shape[0]), Image.NEAREST))
    return seg


# ----------------------------------------------------------------------------
# Helpers for the dataset modules.
# ----------------------------------------------------------------------------


def find(root: str, *candidates: str, what: str = "file") -> str:
  """The first existing root/candidate (also searched one and two folders down)."""
  for cand in candidates:
    for pattern in (cand, os.path.join("*", cand), os.path.join("*", "*", cand)):
      hits = sorted(glob.glob(os.path.join(root, pattern)))
      if hits:
        return hits[0]
  raise FileNotFoundError(f"{what} not found in the manual folder {root!r}: expected one of "
                          f"{', '.join(candidates)}")


def open_text(path: str):
  """Opens CSV/TXT, transparently gunzipping *.gz (MIMIC ships .csv.gz)."""
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
  return open(path, encoding="utf-8-sig", newline="")


def read_csv(path: str, required: Iterable[str] = ()) -> list[dict[str, str]]:
  """Rows as dicts keyed by the (stripped) header; required columns checked by name."""
  with open_text(path) as f:
    reader = csv.reader(f)
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration:
      raise ValueError(f"{path}: empty CSV, expected a header") from None
    missing = [c for c in required if c not in header]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; has {header}")
    rows = []
    for lineno, r in enumerate(reader, start=2):
      if not any(c.strip() for c in r):
        continue
      if len(r) < len(header):  # short rows: pad (trailing empty cells are often dropped)
        r = r + [""] * (len(header) - len(r))
      row = dict(zip(header, r))
      row["__line__"] = f"{path}:{lineno}"
      rows.append(row)
  return rows


def index_files(root: str, extensions: Iterable[str] = decode.IMAGE_EXTENSIONS
                ) -> dict[str, str]:
  """basename -> path of every file under root with one of the extensions."""
  extensions = tuple(e.lower() for e in extensions)
  out = {}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for f in filenames:
      if f.lower().endswith(extensions):
        out.setdefault(f, os.path.join(dirpath, f))
  return out


def hash_split(key: str, fractions=(("train", 0.8), ("validation", 0.1), ("test", 0.1))
               ) -> str:
  """Deterministic split of a group key (e.g. a patient) for datasets without official
  splits: the same key always lands in the same split, across machines and versions."""
  u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
  total = 0.0
  for name, share in fractions:
    total += share
    if u < total:
      return name
  return fractions[-1][0]
