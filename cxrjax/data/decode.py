"""Decoding radiographs from bytes or files: PNG/JPEG (8- and 16-bit) and DICOM.

Every per-example problem raises a `DataError` subclass naming the file (or record) and
what was wrong; the pipeline catches exactly these, skips the example and counts it, while
any other exception is a bug and propagates. Output is always a grey uint8 [H, W] array:
radiographs are single-channel, and 8 bits is what the augmentations and the models use.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# Modes Pillow may report for a radiograph and how each becomes grey. Anything else
# (bilevel '1', float 'F', ...) is not a plausible radiograph export and is refused.
_GREY_MODES = ("L",)
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "LA", "La", "P", "PA", "CMYK", "YCbCr")
MIN_SIDE = 8  # smaller than this is a thumbnail or a broken header, not a radiograph


class DataError(Exception):
  """A problem with one example; the pipeline skips the example and counts it."""


class DecodeError(DataError):
  pass


class MissingFileError(DataError):
  pass


def read_file(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise MissingFileError(f"{path}: file not found") from None
  except IsADirectoryError:
    raise MissingFileError(f"{path}: is a directory, expected an image file") from None
  except PermissionError:
    raise MissingFileError(f"{path}: permission denied") from None
  if not data:
    raise DecodeError(f"{path}: empty file (0 bytes)")
  return data


def sniff(data: bytes, name: str = "") -> str:
  """'png', 'jpeg' or 'dicom' from the magic bytes (extension only as a last resort)."""
  if data.startswith(PNG_MAGIC):
    return "png"
  if data.startswith(JPEG_MAGIC):
    return "jpeg"
  if len(data) > 132 and data[128:132] == b"DICM":
    return "dicom"
  if name.lower().endswith((".dcm", ".dicom")):
    return "dicom"  # DICOM without the preamble (pydicom reads it with force=True)
  return "unknown"


def to_uint8(array: np.ndarray, lo: float | None = None, hi: float | None = None,
             name: str = "") -> np.ndarray:
  """Linearly maps [lo, hi] (default: the image's own min/max) to [0, 255]."""
  array = np.asarray(array, np.float32)
  if not np.isfinite(array).all():
    raise DecodeError(f"{name}: image has non-finite pixel values")
  lo = float(array.min()) if lo is None else lo
  hi = float(array.max()) if hi is None else hi
  if hi <= lo:
    raise DecodeError(f"{name}: image is constant (every pixel = {lo:g}); a blank export?")
  out = (array - lo) * (255.0 / (hi - lo))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pil_to_grey(img: Image.Image, name: str) -> np.ndarray:
  mode = img.mode
  if mode in _GREY_MODES:
    return np.asarray(img)
  if mode in _WIDE_MODES:
    # 16-bit PNGs (PadChest, DICOM exports) hold 10-16 significant bits; a fixed /257
    # would leave 12-bit data nearly black, so map the image's own range like DICOM.
    array = np.asarray(img)
    if array.min() < 0:
      raise DecodeError(f"{name}: {mode} image has negative values ({array.min()}); "
                        "expected unsigned intensities")
    return to_uint8(array, name=name)
  if mode in _COLOUR_MODES:
    return np.asarray(img.convert("L"))
  raise DecodeError(f"{name}: unsupported image mode {mode!r}; expected grey (L), "
                    f"16-bit grey ({', '.join(_WIDE_MODES)}) or colour "
                    f"({', '.join(_COLOUR_MODES)})")


def decode_image(data: bytes, name: str = "<bytes>", size_hint: int = 0) -> np.ndarray:
  """Encoded PNG/JPEG/DICOM -> grey uint8 [H, W].

  `size_hint` > 0 lets JPEG decoding skip DCT scales finer than needed (Pillow's draft
  mode): a 2048-px JPEG feeding a 256-px pipeline decodes ~8x faster.
  """
  return decode_with_size(data, name, size_hint)[0]


def decode_with_size(data: bytes, name: str = "<bytes>", size_hint: int = 0
                     ) -> tuple[np.ndarray, tuple[int, int]]:
  """Like decode_image, plus the (height, width) of the stored image before any draft
  reduction: annotations (boxes, RLE masks) are given in those pixels."""
  if not data:
    raise DecodeError(f"{name}: empty image (0 bytes)")
  kind = sniff(data, name)
  if kind == "dicom":
    from cxrjax.data import dicom  # pylint: disable=import-outside-toplevel
    array = dicom.decode_dicom(data, name)
    return array, array.shape[:2]
  if kind == "unknown":
    raise DecodeError(f"{name}: not a PNG, JPEG or DICOM file (starts with "
                      f"{data[:8].hex()}); expected a radiograph image")
  try:
    img = Image.open(io.BytesIO(data))
    original = (img.size[1], img.size[0])
    if kind == "jpeg" and size_hint > 0:
      img.draft("L", (size_hint, size_hint))
    img.load()
    array = _pil_to_grey(img, name)
  except DataError:
    raise
  except Exception as e:  # Pillow raises many types on corrupt streams  # pylint: disable=broad-except
    raise DecodeError(f"{name}: cannot decode {kind.upper()}: {type(e).__name__}: {e}") from None
  if array.ndim != 2:
    raise DecodeError(f"{name}: decoded to shape {array.shape}, expected [H, W]")
  if min(array.shape) < MIN_SIDE:
    raise DecodeError(f"{name}: image is {array.shape[1]}x{array.shape[0]} px, "
                      f"smaller than {MIN_SIDE} px")
  if array.min() == array.max():
    raise DecodeError(f"{name}: image is constant (every pixel = {array.min()}); "
                      "a blank export?")
  return array, original


def decode_file(path: str, size_hint: int = 0) -> np.ndarray:
  return decode_image(read_file(path), path, size_hint)


def decode_mask(data: bytes | np.ndarray, name: str = "<mask>") -> np.ndarray:
  """PNG mask -> uint8 [H, W] of class indices (bilevel masks become 0/1)."""
  if isinstance(data, np.ndarray):
    return data.astype(np.uint8)
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    raise DecodeError(f"{name}: cannot decode mask: {type(e).__name__}: {e}") from None
  if img.mode == "1":
    return np.asarray(img, np.uint8)
  if img.mode not in ("L", "P"):
    raise DecodeError(f"{name}: mask mode {img.mode!r}, expected 'L', 'P' or '1'")
  return np.asarray(img, np.uint8)


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
  """uint8 [H, W] -> PNG bytes. Level 1: ~3x faster than the default, ~10% larger."""
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG",
                                                    compress_level=compress_level)
  return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def resize_max(array: np.ndarray, max_side: int, resample=Image.BICUBIC) -> np.ndarray:
  """Shrinks so the longer side is <= max_side (aspect kept); never enlarges."""
  h, w = array.shape[:2]
  if max_side <= 0 or max(h, w) <= max_side:
    return array
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(array).resize(size, resample, reducing_gap=3.0))


def is_image_file(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
