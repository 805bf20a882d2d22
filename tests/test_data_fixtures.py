"""Writers of tiny fixture files in the real on-disk formats (PNG, JPEG, 16-bit PNG, DICOM),
shared by the data tests, and checks that they decode as written."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from cxrjax.data import decode


def grey(h=40, w=48, seed=0, dtype=np.uint8, high=None) -> np.ndarray:
  """A non-constant grey image (a gradient plus noise, like a tiny radiograph)."""
  rng = np.random.default_rng(seed)
  high = high or np.iinfo(dtype).max
  y, x = np.mgrid[:h, :w]
  base = (x / max(w - 1, 1) * 0.5 + y / max(h - 1, 1) * 0.3) * high
  return np.clip(base + rng.uniform(0, 0.2 * high, (h, w)), 0, high).astype(dtype)


def _mkdir(path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return path


def write_png(path, array=None, **kw) -> str:
  array = grey(**kw) if array is None else array
  Image.fromarray(array).save(_mkdir(path), format="PNG")
  return path


def write_png16(path, array=None, **kw) -> str:
  """16-bit greyscale PNG (as PadChest and DICOM exports store them)."""
  array = grey(dtype=np.uint16, high=4095, **kw) if array is None else array
  Image.fromarray(array.astype(np.uint16)).save(_mkdir(path), format="PNG")
  return path


def write_jpeg(path, array=None, **kw) -> str:
  array = grey(**kw) if array is None else array
  Image.fromarray(array).save(_mkdir(path), format="JPEG", quality=95)
  return path


def dicom_bytes(array=None, *, photometric="MONOCHROME2", bits_stored=12, slope=None,
                intercept=None, center=None, width=None, voi_lut=None, syntax=None,
                pixel_data=True, signed=False, **kw) -> bytes:
  """A DX DICOM file as pydicom writes it, with a (fake) patient name that tests check
  never appears in errors or logs."""
  pydicom = pytest.importorskip("pydicom")
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  if array is None:
    array = grey(dtype=np.uint16, high=2 ** bits_stored - 1, **kw)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.PatientName = "Fixture^Secret"
  ds.PatientID = "PHI-12345"
  ds.Rows, ds.Columns = array.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated = 16 if bits_stored > 8 else 8
  ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
  ds.PixelRepresentation = 1 if signed else 0
  if slope is not None:
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
  if center is not None:
    ds.WindowCenter, ds.WindowWidth = center, width
  if voi_lut is not None:
    item = Dataset()
    item.LUTDescriptor = [len(voi_lut), 0, 16]
    item.LUTData = np.asarray(voi_lut, "<u2").tobytes()
    ds.VOILUTSequence = [item]
  dtype = (np.int16 if signed else np.uint16) if bits_stored > 8 else np.uint8
  if pixel_data:
    ds.PixelData = array.astype(dtype).tobytes()
    if syntax is not None:
      ds.compress(syntax, array.astype(dtype))
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True)
  return buf.getvalue()


def write_dicom(path, array=None, **kw) -> str:
  with open(_mkdir(path), "wb") as f:
    f.write(dicom_bytes(array, **kw))
  return path


def test_fixture_writers_round_trip(tmp_path):
  a = grey(seed=3)
  np.testing.assert_array_equal(decode.decode_file(write_png(tmp_path / "a.png", a)), a)
  assert np.abs(decode.decode_file(write_jpeg(tmp_path / "a.jpg", a)).astype(int)
                - a).mean() < 3
  wide = decode.decode_file(write_png16(tmp_path / "a16.png"))
  assert wide.dtype == np.uint8 and wide.min() == 0 and wide.max() == 255


def test_dicom_fixture_round_trip(tmp_path):
  path = write_dicom(str(tmp_path / "x.dcm"))
  out = decode.decode_file(path)
  assert out.dtype == np.uint8 and out.shape == (40, 48) and out.min() == 0 and out.max() == 255
