"""DICOM radiographs -> display-ready grey uint8 (pydicom; `pip install 'cxrjax[dicom]'`).

Order of operations follows the DICOM grayscale pipeline (PS3.4 N.2): stored values ->
Modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) -> VOI (VOI LUT Sequence,
else WindowCenter/WindowWidth, else the image's own range) -> MONOCHROME1 inversion ->
8 bits. Compressed transfer syntaxes decode through whichever pydicom plugins are
installed (pylibjpeg-*, gdcm); if none can, the error names the syntax and what to install.

Privacy: errors and logs name the file and technical tags only (transfer syntax,
photometric interpretation, bit depth), never patient, study or institution tags.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from cxrjax.data.decode import DecodeError, MIN_SIDE, to_uint8

PLUGINS_HINT = ("install decoders with `pip install 'cxrjax[dicom]'` (pylibjpeg, "
                "pylibjpeg-libjpeg, pylibjpeg-openjpeg) or `pip install python-gdcm`")


class DicomError(DecodeError):
  pass


def _pydicom():
  try:
    import pydicom  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DicomError("reading DICOM needs pydicom: pip install 'cxrjax[dicom]'") from None
  # pydicom's validation warnings and log lines quote element values, which can be patient
  # names or IDs: we never want those in our logs, so reading does not validate values.
  pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
  return pydicom


def _number(value, default=None):
  """First value of a possibly multi-valued numeric tag."""
  if value is None:
    return default
  try:
    return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str)
                 else value)
  except (TypeError, ValueError, IndexError):
    return default


def window(array: np.ndarray, center: float, width: float, function: str = "LINEAR"
           ) -> np.ndarray:
  """VOI windowing to [0, 1] (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID)."""
  x = np.asarray(array, np.float64)
  function = (function or "LINEAR").upper()
  if function == "SIGMOID":
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  if function == "LINEAR_EXACT":
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)
  if width < 1:
    raise DicomError(f"WindowWidth={width} must be >= 1 for LINEAR")
  if width == 1:  # the standard's degenerate case: a threshold at the centre
    return (x > center - 0.5).astype(np.float64)
  return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def pixels(ds, name: str) -> np.ndarray:
  """Stored pixel values of the first frame as a numeric array (decompressing if needed)."""
  _pydicom()
  if "PixelData" not in ds:
    raise DicomError(f"{name}: DICOM has no pixel data (PixelData missing)")
  meta = getattr(ds, "file_meta", None)
  syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
  syntax_name = getattr(syntax, "name", str(syntax)) if syntax else "unknown"
  try:
    array = ds.pixel_array
  except (NotImplementedError, RuntimeError) as e:
    text = str(e)
    # pydicom says NotImplementedError for syntaxes it has no decoder for at all and
    # RuntimeError "... plugins are missing dependencies" when none is installed.
    if isinstance(e, NotImplementedError) or any(
        w in text.lower() for w in ("plugin", "unavailable", "missing")):
      raise DicomError(f"{name}: transfer syntax {syntax_name} ({syntax}) cannot be decoded "
                       f"by the installed pydicom plugins; {PLUGINS_HINT}") from None
    raise DicomError(f"{name}: cannot decode pixel data ({syntax_name}): "
                     f"{type(e).__name__}: {text}") from None
  except Exception as e:  # corrupt/short pixel data  # pylint: disable=broad-except
    raise DicomError(f"{name}: cannot decode pixel data ({syntax_name}): "
                     f"{type(e).__name__}: {e}") from None
  frames = int(_number(ds.get("NumberOfFrames"), 1) or 1)
  samples = int(ds.get("SamplesPerPixel", 1) or 1)
  if frames > 1:
    array = array[0]
  if samples > 1:  # colour DICOM (secondary capture): luma, as for RGB PNGs
    if array.ndim != 3 or array.shape[-1] < 3:
      raise DicomError(f"{name}: SamplesPerPixel={samples} but pixel array is {array.shape}")
    array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  if array.ndim != 2:
    raise DicomError(f"{name}: pixel array has shape {array.shape}, expected [rows, columns]")
  if min(array.shape) < MIN_SIDE:
    raise DicomError(f"{name}: image is {array.shape[1]}x{array.shape[0]} px")
  return array


def to_display(ds, name: str = "<dicom>", use_voi: bool = True) -> np.ndarray:
  """Dataset -> grey uint8 as a radiologist would see it (bright = dense)."""
  from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pylint: disable=import-outside-toplevel
  stored = pixels(ds, name)
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
  try:
    values = apply_modality_lut(stored, ds)  # RescaleSlope/Intercept or Modality LUT
  except Exception as e:  # pylint: disable=broad-except
    raise DicomError(f"{name}: invalid modality LUT / rescale tags: {type(e).__name__}: {e}"
                     ) from None
  values = np.asarray(values, np.float64)
  center = _number(ds.get("WindowCenter"))
  width = _number(ds.get("WindowWidth"))
  if use_voi and "VOILUTSequence" in ds:
    try:
      # LUTs index integer values; modality output is integral unless slope is fractional.
      lut_input = (values.astype(np.int64) if np.array_equal(values, np.rint(values))
                   else values)
      out = np.asarray(apply_voi_lut(lut_input, ds, index=0, prefer_lut=True), np.float64)
    except Exception as e:  # pylint: disable=broad-except
      raise DicomError(f"{name}: invalid VOI LUT Sequence: {type(e).__name__}: {e}") from None
    unit = to_uint8(out, name=name).astype(np.float64) / 255.0
  elif use_voi and center is not None and width is not None and width > 0:
    function = str(ds.get("VOILUTFunction", "LINEAR"))
    unit = window(values, center, width, function)
  else:
    # No VOI: the full range of the values present. BitsStored bounds stored values, but
    # exports often declare 16 bits for 12-bit data, so the actual range is the safer map.
    unit = to_uint8(values, name=name).astype(np.float64) / 255.0
  if photometric == "MONOCHROME1":  # MONOCHROME1: low values are bright
    unit = 1.0 - unit
  elif photometric not in ("MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
    raise DicomError(f"{name}: PhotometricInterpretation {photometric!r} is not supported; "
                     "expected MONOCHROME1 or MONOCHROME2")
  out = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
  if out.min() == out.max():
    raise DicomError(f"{name}: image is constant after windowing (WindowCenter/Width "
                     "outside the pixel range?)")
  return out


def read(data: bytes, name: str = "<dicom>"):
  pydicom = _pydicom()
  try:
    return pydicom.dcmread(io.BytesIO(data), force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise DicomError(f"{name}: not a readable DICOM file: {type(e).__name__}: {e}") from None


def decode_dicom(data: bytes, name: str = "<dicom>") -> np.ndarray:
  """DICOM bytes -> grey uint8 [H, W]. pydicom's warnings are silenced (see _pydicom)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return to_display(read(data, name), name)


def technical_summary(ds) -> dict:
  """Tags safe to log (no patient/study/institution data): for error reports and tests."""
  meta = getattr(ds, "file_meta", None)
  syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
  return {
      "TransferSyntax": getattr(syntax, "name", str(syntax)),
      "PhotometricInterpretation": str(ds.get("PhotometricInterpretation", "")),
      "BitsAllocated": ds.get("BitsAllocated"), "BitsStored": ds.get("BitsStored"),
      "Rows": ds.get("Rows"), "Columns": ds.get("Columns"),
  }
