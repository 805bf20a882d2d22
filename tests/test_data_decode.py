"""Decoding: image modes, 16-bit PNGs, DICOM grayscale pipeline, and a corruption fuzz."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrjax.data import decode, labels as L
from test_data_fixtures import dicom_bytes, grey

pydicom = pytest.importorskip("pydicom")
from cxrjax.data import dicom  # noqa: E402


def encode(array, fmt="PNG", mode=None):
  buf = io.BytesIO()
  img = Image.fromarray(array)
  (img.convert(mode) if mode else img).save(buf, format=fmt)
  return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_modes_become_grey(mode):
  a = grey()
  out = decode.decode_image(encode(a, mode=mode))
  assert out.shape == a.shape and out.dtype == np.uint8
  assert np.abs(out.astype(int) - a).max() <= 3


def test_16bit_png_uses_its_own_range_not_a_fixed_255_clip():
  a = grey(dtype=np.uint16, high=4095)  # 12-bit data in a 16-bit PNG
  out = decode.decode_image(encode(a))
  assert out.min() == 0 and out.max() == 255
  np.testing.assert_allclose(out, (a - a.min()) / (a.max() - a.min()) * 255, atol=1)


def test_jpeg_draft_decodes_at_reduced_scale_but_reports_the_stored_size():
  a = grey(800, 640)
  out, size = decode.decode_with_size(encode(a, "JPEG"), "x.jpg", size_hint=200)
  assert size == (800, 640) and 200 <= min(out.shape) < 640


def test_refused_inputs_name_file_and_reason():
  cases = {
      b"": "empty image",
      b"GIF89a" + bytes(50): "not a PNG, JPEG or DICOM",
      encode((grey() > 90)): "unsupported image mode '1'",
      encode(np.full((30, 30), 3, np.uint8)): "image is constant",
      encode(grey(4, 40)): "smaller than 8 px",
  }
  for data, message in cases.items():
    with pytest.raises(decode.DecodeError, match=f"^scan.png: .*{message}"):
      decode.decode_image(data, "scan.png")


def test_read_file_errors(tmp_path):
  with pytest.raises(decode.MissingFileError, match="nope.png: file not found"):
    decode.read_file(str(tmp_path / "nope.png"))
  (tmp_path / "zero.png").write_bytes(b"")
  with pytest.raises(decode.DecodeError, match="zero.png: empty file"):
    decode.read_file(str(tmp_path / "zero.png"))


# ----------------------------------------------------------------------------
# DICOM.
# ----------------------------------------------------------------------------


def test_monochrome1_is_inverted():
  a = grey(dtype=np.uint16, high=4095)
  m2 = decode.decode_image(dicom_bytes(a, photometric="MONOCHROME2"))
  m1 = decode.decode_image(dicom_bytes(a, photometric="MONOCHROME1"))
  np.testing.assert_array_equal(m1.astype(int), 255 - m2.astype(int))


def test_rescale_then_window_in_modality_units():
  # Stored 0..4095 with slope 1, intercept -1024 (HU-like); window centre 0 width 400:
  # values <= -200 -> 0, >= 200 -> 255, linear between.
  stored = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (16, 1))
  out = decode.decode_image(dicom_bytes(stored, slope=1.0, intercept=-1024.0, center=0.0,
                                        width=400.0))
  hu = stored.astype(float) - 1024
  expect = np.clip(((hu - (0 - 0.5)) / (400 - 1) + 0.5), 0, 1) * 255
  np.testing.assert_allclose(out, np.rint(expect), atol=1)
  assert (out[:, hu[0] <= -200] == 0).all() and (out[:, hu[0] >= 200] == 255).all()


def test_voi_lut_sequence_is_applied():
  stored = np.tile(np.arange(64, dtype=np.uint16) * 16, (16, 1))  # 0..1008
  lut = np.clip(np.arange(1024) - 512, 0, 511) * 128  # dark until 512, then a ramp
  out = decode.decode_image(dicom_bytes(stored, bits_stored=12, voi_lut=lut))
  assert (out[:, stored[0] <= 512] == 0).all() and out[0, -1] == 255


def test_12_bit_stored_without_window_uses_the_full_range():
  a = grey(dtype=np.uint16, high=4095)
  out = decode.decode_image(dicom_bytes(a, bits_stored=12))
  assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_transfer_syntaxes_decode(syntax):
  from pydicom import uid
  if syntax == "JPEG2000Lossless":
    pytest.importorskip("openjpeg")
  a = grey(dtype=np.uint16, high=4095)
  plain = decode.decode_image(dicom_bytes(a))
  packed = decode.decode_image(dicom_bytes(a, syntax=getattr(uid, syntax)))
  np.testing.assert_array_equal(packed, plain)


def test_undecodable_transfer_syntax_says_what_to_install(caplog):
  ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
  ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"  # JPEG XL lossless
  from pydicom.encaps import encapsulate
  ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
  # (pydicom refuses to write an unknown syntax, so decode the dataset in memory)
  with pytest.raises(dicom.DicomError, match=r"x.dcm: transfer syntax .*1\.2\.840\.10008\.1\.2"
                                             r"\.4\.110.*pip install 'cxrjax\[dicom\]'"):
    dicom.to_display(ds, "x.dcm")


def test_dicom_errors_never_contain_patient_tags():
  messages = []
  for data in (dicom_bytes(pixel_data=False), dicom_bytes()[:400],
               dicom_bytes(np.full((16, 16), 9, np.uint16))):
    with pytest.raises(decode.DecodeError) as e:
      decode.decode_image(data, "scan.dcm")
    messages.append(str(e.value))
  assert "no pixel data" in messages[0]
  for m in messages:
    assert "Fixture" not in m and "Secret" not in m and "PHI-12345" not in m
  ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
  assert "PatientName" not in dicom.technical_summary(ds)


# ----------------------------------------------------------------------------
# Fuzz: every corrupted file is decoded or refused with a DataError, nothing else.
# ----------------------------------------------------------------------------


def corrupt(data: bytes, rng: np.random.Generator) -> bytes:
  kind = rng.integers(4)
  if kind == 0:  # truncation
    return data[:int(rng.integers(0, len(data)))]
  data = bytearray(data)
  if kind == 1:  # bit flips
    for _ in range(int(rng.integers(1, 20))):
      i = int(rng.integers(len(data)))
      data[i] ^= 1 << int(rng.integers(8))
  elif kind == 2:  # bad header: overwrite the first bytes
    n = int(rng.integers(1, 32))
    data[:n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
  else:  # a random block zeroed
    i = int(rng.integers(len(data)))
    data[i:i + int(rng.integers(1, 256))] = bytes(min(255, len(data) - i))
  return bytes(data)


def test_fuzz_corrupted_files_are_decoded_or_refused(caplog, recwarn):
  rng = np.random.default_rng(0)
  originals = [encode(grey(seed=1)), encode(grey(seed=2), "JPEG"),
               encode(grey(dtype=np.uint16, high=4095)), dicom_bytes(seed=3),
               dicom_bytes(seed=4, photometric="MONOCHROME1", center=2000.0, width=1000.0),
               dicom_bytes(pixel_data=False)]
  decoded = refused = 0
  for i in range(240):
    data = corrupt(originals[i % len(originals)], rng)
    try:
      out = decode.decode_image(data, f"fuzz{i}")
    except decode.DataError as e:
      assert str(e).startswith(f"fuzz{i}")
      refused += 1
    else:
      assert out.dtype == np.uint8 and out.ndim == 2 and min(out.shape) >= 8
      decoded += 1
  assert decoded + refused == 240 and refused > 60 and decoded > 20
  assert "Secret" not in caplog.text
  assert not [w for w in recwarn if "pydicom" in w.filename]  # they can quote tag values


def test_label_policies():
  raw = np.array([1, 0, -1, np.nan], np.float32)
  lab, mask = L.apply_policy(raw, "u_ignore")
  np.testing.assert_array_equal(lab, [1, 0, 0, 0])
  np.testing.assert_array_equal(mask, [1, 1, 0, 0])
  lab, mask = L.apply_policy(raw, "u_ones", missing="negative")
  np.testing.assert_array_equal(lab, [1, 0, 1, 0])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1])
  lab, _ = L.apply_policy(raw, "u_smooth_zeros", rng=np.random.default_rng(0))
  assert 0 <= lab[2] <= 0.3
  names = ("A", "B", "C", "D")
  lab, mask = L.apply_policy(np.array([-1, -1, -1, 1], np.float32), "u_zeros,B=u_ones,C=ignore",
                             names=names)
  np.testing.assert_array_equal(lab, [0, 1, 0, 1])
  np.testing.assert_array_equal(mask, [1, 1, 0, 1])
  with pytest.raises(ValueError, match="unknown uncertainty policy 'u_maybe'"):
    L.apply_policy(raw, "u_maybe")
  with pytest.raises(ValueError, match="class 'E' is not a label"):
    L.apply_policy(raw, "E=u_ones", names=names)
  with pytest.raises(ValueError, match=r"\[2.0\] at \[0\] are not 1, 0, -1 or NaN"):
    L.apply_policy(np.array([2.0]), "u_ones")
