"""Every TFDS builder on tiny fixtures in its dataset's real on-disk format.

Each test writes the CSV/TXT/JSON annotation files with the real column names, file names
and split lists, plus small PNG/JPEG/DICOM images, builds array_record files and reads
them back with `as_data_source()` (no TensorFlow).
"""

from __future__ import annotations

import csv
import gzip
import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from cxrjax import config_blocks  # noqa: E402
from cxrjax.data import builders, decode, labels as L, pipeline  # noqa: E402
from cxrjax.data.builders import base as builders_base  # noqa: E402
from test_data_fixtures import grey, write_dicom, write_jpeg, write_png, write_png16  # noqa: E402


def write_csv(path, header, rows, gz=False):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  opener = (lambda: gzip.open(path, "wt", newline="")) if gz else (
      lambda: open(path, "w", newline=""))
  with opener() as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def build(name, manual, tmp_path, config=None):
  """Builds `name` from `manual`; returns ({split: {id: record}}, builder)."""
  cls = builders.builder_class(name)
  builder = cls(data_dir=str(tmp_path / "tfds"), config=config, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  out = {}
  for split, source in builder.as_data_source().items():
    records = [source[i] for i in range(len(source))]
    out[split] = {r["id"].decode(): r for r in records}
  return out, builder


def image_of(record):
  return decode.decode_image(record["image"])


def same(a, b):
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ----------------------------------------------------------------------------


def test_nih_cxr14_official_lists_labels_and_boxes(tmp_path):
  root = tmp_path / "nih"
  header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
            "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
            "OriginalImagePixelSpacing[x", "y]"]
  rows = [["00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA", 48, 40, 0.14, 0.14],
          ["00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", 48, 40, .14, .14],
          ["00000002_000.png", "No Finding", 0, 2, 81, "M", "AP", 48, 40, 0.14, 0.14],
          ["00000003_000.png", "Hernia|Infiltration", 0, 3, 74, "F", "PA", 1024, 1024, .14, .14],
          ["00000099_000.png", "Mass", 0, 99, 30, "F", "PA", 48, 40, 0.14, 0.14]]  # in no list
  write_csv(root / "Data_Entry_2017_v2020.csv", header, rows)
  (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n"
                                           "00000002_000.png\n")
  (root / "test_list.txt").write_text("00000003_000.png\n")
  write_csv(root / "BBox_List_2017.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w",
                                         "h]", "", "", ""],
            [["00000003_000.png", "Infiltrate", 100.0, 200.0, 300.0, 100.0, "", "", ""]])
  for r in rows[:3]:
    write_png(str(root / "images_001" / "images" / r[0]), seed=hash(r[0]) % 100)
  write_png(str(root / "images_002" / "images" / rows[3][0]), grey(1024, 1024))
  data, builder = build("nih_cxr14", root, tmp_path)
  assert set(data) <= {"train", "validation", "test"}
  assert set(data["train"]) | set(data.get("validation", {})) == {r[0] for r in rows[:3]}
  assert list(data["test"]) == ["00000003_000.png"]
  train = {**data["train"], **data.get("validation", {})}
  expect = np.zeros(14, np.float32)
  expect[[L.CXR14.index("Cardiomegaly"), L.CXR14.index("Emphysema")]] = 1
  same(train["00000001_001.png"]["labels"], expect)
  same(train["00000002_000.png"]["labels"], np.zeros(14))
  test = data["test"]["00000003_000.png"]
  assert image_of(test).shape == (512, 512)  # 1024 px stored at the 512 config
  # Box: x, y, w, h = 100, 200, 300, 100 in 1024 px -> corners halved at 512 px.
  same(test["boxes"], [[L.CXR14.index("Infiltration"), 50, 100, 200, 150]])
  assert test["view"] == b"PA"
  assert builder.info.metadata["label_names"] == list(L.CXR14)


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + list(L.CHEXPERT_14)


def chexpert_fixture(root):
  base = root / "CheXpert-v1.0-small"

  def row(path, view, values):
    cells = {n: "" for n in L.CHEXPERT_14}
    cells.update(values)
    write_jpeg(str(root / path), seed=len(path))
    return [path, "Female", 68, view, "AP" if view == "Frontal" else "",
            *[cells[n] for n in L.CHEXPERT_14]]

  train = [row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal",
               {"No Finding": "1.0"}),
           row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Frontal",
               {"Edema": "-1.0", "Cardiomegaly": "1.0", "Atelectasis": "0.0"}),
           row("CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg", "Lateral",
               {"Pleural Effusion": "1.0", "Support Devices": "-1.0"})]
  valid = [row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal",
               {n: "0.0" for n in L.CHEXPERT_14} | {"Consolidation": "1.0"})]
  write_csv(base / "train.csv", CHEXPERT_HEADER, train)
  write_csv(base / "valid.csv", CHEXPERT_HEADER, valid)
  return train


def test_chexpert_raw_uncertain_labels_and_competition_config(tmp_path):
  root = tmp_path / "chexpert"
  chexpert_fixture(root)
  data, _ = build("chexpert", root, tmp_path)
  assert set(data) == {"train", "validation"} and len(data["train"]) == 3
  rec = data["train"]["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
  raw = rec["labels"]
  assert raw[L.CHEXPERT_14.index("Edema")] == -1 and raw[L.CHEXPERT_14.index("Cardiomegaly")] == 1
  assert raw[L.CHEXPERT_14.index("Atelectasis")] == 0
  assert np.isnan(raw[L.CHEXPERT_14.index("Pneumonia")])  # blank stays "not mentioned"
  assert rec["view"] == b"Frontal AP"
  comp, _ = build("chexpert", root, tmp_path, config="competition_512")
  rec = comp["train"]["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"]
  same(rec["labels"][[0, 1, 3]], [0, 1, -1])  # Atelectasis, Cardiomegaly, Edema
  assert np.isnan(rec["labels"][[2, 4]]).all()  # Consolidation, Pleural Effusion blank


@pytest.mark.parametrize("policy,missing,edema,edema_mask,pneumonia_mask", [
    ("u_ignore", "mask", 0.0, 0.0, 0.0), ("u_ones", "mask", 1.0, 1.0, 0.0),
    ("u_zeros", "negative", 0.0, 1.0, 1.0), ("u_smooth_ones", "mask", None, 1.0, 0.0)])
def test_chexpert_through_the_pipeline_applies_policies(tmp_path, policy, missing, edema,
                                                        edema_mask, pneumonia_mask):
  root = tmp_path / "chexpert"
  chexpert_fixture(root)
  build("chexpert", root, tmp_path)
  cfg = config_blocks.pretrain_base().data
  cfg.update(source="chexpert", data_dir=str(tmp_path / "tfds"), source_size=32,
             label_policy=policy, missing_label=missing, num_examples=3)
  ds = pipeline.make_dataset(cfg, split="train", pp="to_channels(3)|normalize('evax')",
                             seed=0, global_batch=3, repeat=False)
  batch = ds[0]
  assert batch["image"].shape == (3, 32, 32, 3) and batch[pipeline.FAILURES_KEY].size == 0
  row = list(batch["id"]).index("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg")
  e, p = L.CHEXPERT_14.index("Edema"), L.CHEXPERT_14.index("Pneumonia")
  if edema is None:
    assert 0.55 <= batch["labels"][row, e] <= 0.85
  else:
    assert batch["labels"][row, e] == edema
  assert batch["label_mask"][row, e] == edema_mask
  assert batch["label_mask"][row, p] == pneumonia_mask


def test_mimic_cxr_jpg_split_view_filter_and_reports(tmp_path):
  root = tmp_path / "mimic"
  mimic_order = sorted(L.CHEXPERT_14)  # the CSV's own (alphabetical) column order
  write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *mimic_order],
            [[10000032, 50414267, *["1.0" if n == "Pneumothorax" else "" for n in mimic_order]],
             [10000764, 57375967, *["-1.0" if n == "Edema" else "0.0" for n in mimic_order]]],
            gz=True)
  images = [("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", 10000032, 50414267, "PA", "train"),
            ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", 10000032, 50414267, "LATERAL",
             "train"),
            ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", 10000764, 57375967, "AP", "test")]
  write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
            [[d, st, su, sp] for d, su, st, _, sp in images], gz=True)
  write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
             "ViewPosition", "Rows", "Columns"],
            [[d, su, st, "CHEST (PA AND LAT)", v, 40, 48] for d, su, st, v, _ in images], gz=True)
  for d, su, st, _, _ in images:
    write_jpeg(str(root / "files" / f"p{str(su)[:2]}" / f"p{su}" / f"s{st}" / f"{d}.jpg"))
  report = root / "mimic-cxr-reports" / "files" / "p10" / "p10000032" / "s50414267.txt"
  report.parent.mkdir(parents=True)
  report.write_text("FINAL REPORT\n FINDINGS: Small right apical pneumothorax.\n")
  data, _ = build("mimic_cxr_jpg", root, tmp_path)
  assert set(data["train"]) == {images[0][0]}  # the lateral view is filtered out
  assert set(data["test"]) == {images[2][0]} and "validation" not in data
  rec = data["train"][images[0][0]]
  assert rec["labels"][L.CHEXPERT_14.index("Pneumothorax")] == 1
  assert np.isnan(rec["labels"][L.CHEXPERT_14.index("Edema")])
  assert b"apical pneumothorax" in rec["report"] and rec["view"] == b"PA"
  assert data["test"][images[2][0]]["labels"][L.CHEXPERT_14.index("Edema")] == -1
  everything, _ = build("mimic_cxr_jpg", root, tmp_path, config="all_512")
  assert len(everything["train"]) == 2


def test_padchest_16bit_pngs_terms_and_patient_split(tmp_path):
  root = tmp_path / "padchest"
  header = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
            "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection",
            "Labels", "Localizations", "MethodLabel"]
  rows = [["216840111366964012819207061112010307142602253_04-014-084.png", 0, 20121231, "s1",
           "pat1", 1950, "M", "POSTEROANTERIOR", "PA", "Manual",
           "['pleural effusion', ' cardiomegaly', 'kerley lines']", "[]", "Physician"],
          ["216840111366964012819207061112010307142602253_04-014-085.png", 0, 20121231, "s1",
           "pat1", 1950, "M", "LATERAL", "L", "Manual", "['normal']", "[]", "Physician"],
          ["216840111366964013076187734852011291090445391_00-196-188.png", 1, 20150101, "s2",
           "pat2", 1960, "F", "AP", "AP_horizontal", "Manual", "['normal']", "[]", "RNN_model"]]
  write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", header, rows)
  for r in rows:
    write_png16(str(root / str(r[1]) / r[0]))
  data, _ = build("padchest", root, tmp_path)
  allrec = {k: v for split in data.values() for k, v in split.items()}
  assert set(allrec) == {rows[0][0], rows[2][0]}  # lateral excluded by the frontal config
  rec = allrec[rows[0][0]]
  expect = L.multi_hot(["pleural effusion", "cardiomegaly"], L.PADCHEST)
  same(rec["labels"], expect)
  assert rec["findings"] == b"pleural effusion|cardiomegaly|kerley lines"
  img = image_of(rec)
  assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255  # 16 -> 8 bits
  split_of = {k: s for s, recs in data.items() for k in recs}
  assert split_of[rows[0][0]] == builders_base.hash_split("pat1")  # by patient


def test_vindr_cxr_dicom_reader_union_and_boxes(tmp_path):
  root = tmp_path / "vindr"
  header = ["image_id", "rad_id", *L.VINDR]
  zero = ["0"] * len(L.VINDR)

  def labels_row(image_id, rad, positives):
    cells = list(zero)
    for p in positives:
      cells[L.VINDR.index(p)] = "1"
    return [image_id, rad, *cells]

  write_csv(root / "annotations" / "image_labels_train.csv", header,
            [labels_row("000434271f63a053c4128a0ba6352c7f", "R2", ["Cardiomegaly"]),
             labels_row("000434271f63a053c4128a0ba6352c7f", "R3", ["Aortic enlargement"]),
             labels_row("00053190460d56c53cc3e57321387478", "R1", ["No finding"])])
  write_csv(root / "annotations" / "annotations_train.csv",
            ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
            [["000434271f63a053c4128a0ba6352c7f", "R2", "Cardiomegaly", 10, 20, 30, 35],
             ["000434271f63a053c4128a0ba6352c7f", "R3", "Aortic enlargement", 5, 5, 15, 12],
             ["00053190460d56c53cc3e57321387478", "R1", "No finding", "", "", "", ""]])
  write_csv(root / "annotations" / "image_labels_test.csv", ["image_id", *L.VINDR],
            [["002a34c58c5b758217ed1f584ccbcfe9", *zero[:-1], "1"]])
  write_csv(root / "annotations" / "annotations_test.csv",
            ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
            [["002a34c58c5b758217ed1f584ccbcfe9", "No finding", "", "", "", ""]])
  write_dicom(str(root / "train" / "000434271f63a053c4128a0ba6352c7f.dicom"),
              photometric="MONOCHROME1", seed=1)
  write_dicom(str(root / "train" / "00053190460d56c53cc3e57321387478.dicom"), seed=2)
  write_dicom(str(root / "test" / "002a34c58c5b758217ed1f584ccbcfe9.dicom"), seed=3)
  data, _ = build("vindr_cxr", root, tmp_path)
  rec = data["train"]["000434271f63a053c4128a0ba6352c7f"]
  same(rec["labels"], L.multi_hot(["Cardiomegaly", "Aortic enlargement"], L.VINDR))
  same(sorted(rec["boxes"].tolist()),
       sorted([[L.VINDR_LOCAL.index("Cardiomegaly"), 10, 20, 30, 35],
               [L.VINDR_LOCAL.index("Aortic enlargement"), 5, 5, 15, 12]]))
  # MONOCHROME1: the fixture's gradient rises to the right, so the image falls to the right.
  img = image_of(rec).astype(float)
  assert img[:, :8].mean() > img[:, -8:].mean()
  assert data["train"]["00053190460d56c53cc3e57321387478"]["boxes"].shape == (0, 5)
  assert data["test"]["002a34c58c5b758217ed1f584ccbcfe9"]["labels"][-1] == 1  # No finding


def test_covidx_v3_and_v4(tmp_path):
  root = tmp_path / "covidx"
  (root / "train.txt").parent.mkdir(parents=True)
  (root / "train.txt").write_text("p1 covid case 1.png COVID-19 cohen\n"
                                  "p2 b.png normal rsna\n")
  (root / "test.txt").write_text("p3 c.png pneumonia rsna\n")
  for split, name in (("train", "covid case 1.png"), ("train", "b.png"), ("test", "c.png")):
    write_png(str(root / split / name))
  data, _ = build("covidx", root, tmp_path, config="v3_512")
  same(data["train"]["covid case 1.png"]["labels"], [0, 0, 1])
  same(data["test"]["c.png"]["labels"], [0, 1, 0])
  root4 = tmp_path / "covidx4"
  (root4 / "val").mkdir(parents=True)
  (root4 / "train.txt").write_text("p1 a.png positive bimcv\n")
  (root4 / "val.txt").write_text("p2 v.png negative sirm\n")
  (root4 / "test.txt").write_text("p3 t.png negative rsna\n")
  for split, name in (("train", "a.png"), ("val", "v.png"), ("test", "t.png")):
    write_png(str(root4 / split / name))
  data4, _ = build("covidx", root4, tmp_path / "v4", config="v4_512")
  same(data4["train"]["a.png"]["labels"], [0, 1])
  same(data4["validation"]["v.png"]["labels"], [1, 0])


def rle_encode_relative(mask):
  """The SIIM encoder (column-major, starts relative to the previous run's end)."""
  flat = mask.T.reshape(-1)
  runs, pos, i = [], 0, 0
  while i < len(flat):
    if flat[i]:
      j = i
      while j < len(flat) and flat[j]:
        j += 1
      runs += [i - pos, j - i]
      pos, i = j, j
    else:
      i += 1
  return " ".join(map(str, runs))


def test_siim_acr_rle_masks_from_dicom(tmp_path):
  root = tmp_path / "siim"
  m1 = np.zeros((40, 48), np.uint8)
  m1[5:15, 10:20] = 1
  m2 = np.zeros((40, 48), np.uint8)
  m2[25:30, 30:44] = 1
  img1 = "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090"
  img2 = "1.2.276.0.7230010.3.1.4.8323329.12515.1517875239.501137"
  write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"],
            [[img1, " " + rle_encode_relative(m1)], [img1, rle_encode_relative(m2)],
             [img2, " -1"]])
  write_dicom(str(root / "dicom-images-train" / "1.2.276.0.7230010.3.1.2.8323329.5597" /
                  "1.2.276.0.7230010.3.1.3.8323329.5597" / f"{img1}.dcm"), seed=4)
  write_dicom(str(root / "dicom-images-train" / "x" / "y" / f"{img2}.dcm"), seed=5)
  data, _ = build("siim_acr_pneumothorax", root, tmp_path)
  allrec = {k: v for split in data.values() for k, v in split.items()}
  same(allrec[img1]["labels"], [1])
  np.testing.assert_array_equal(decode.decode_mask(allrec[img1]["seg"]), m1 | m2)
  same(allrec[img2]["labels"], [0])
  assert decode.decode_mask(allrec[img2]["seg"]).sum() == 0


def test_rsna_pneumonia_boxes(tmp_path):
  root = tmp_path / "rsna"
  a, b = "00436515-870c-4b36-a041-de91049b9ab4", "0004cfab-14fd-4e49-80ba-63a80b6bddd6"
  write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height",
                                                 "Target"],
            [[a, 4.0, 8.0, 10.0, 20.0, 1], [a, 30.0, 8.0, 12.0, 18.0, 1], [b, "", "", "", "", 0]])
  write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"],
            [[a, "Lung Opacity"], [a, "Lung Opacity"], [b, "No Lung Opacity / Not Normal"]])
  write_dicom(str(root / "stage_2_train_images" / f"{a}.dcm"), seed=6)
  write_dicom(str(root / "stage_2_train_images" / f"{b}.dcm"), seed=7)
  data, _ = build("rsna_pneumonia", root, tmp_path)
  allrec = {k: v for split in data.values() for k, v in split.items()}
  same(allrec[a]["labels"], [1])
  same(allrec[a]["boxes"], [[0, 4, 8, 14, 28], [0, 30, 8, 42, 26]])
  same(allrec[b]["labels"], [0])
  assert allrec[b]["boxes"].shape == (0, 5)
  assert allrec[b]["detailed_class"] == b"No Lung Opacity / Not Normal"


def test_shenzhen_and_montgomery_lung_masks(tmp_path):
  sz = tmp_path / "shenzhen"
  write_png(str(sz / "CXR_png" / "CHNCXR_0001_0.png"))
  write_png(str(sz / "CXR_png" / "CHNCXR_0336_1.png"), seed=1)
  write_png(str(sz / "CXR_png" / "CHNCXR_0400_1.png"), seed=2)  # no mask: skipped
  mask = np.zeros((40, 48), np.uint8)
  mask[5:35, 4:20] = 255
  write_png(str(sz / "mask" / "CHNCXR_0001_0_mask.png"), mask)
  write_png(str(sz / "mask" / "CHNCXR_0336_1_mask.png"), mask)
  (sz / "ClinicalReadings").mkdir()
  (sz / "ClinicalReadings" / "CHNCXR_0336_1.txt").write_text("male 35yrs\nSTB in the left upper")
  data, _ = build("shenzhen_tb", sz, tmp_path)
  allrec = {k: v for split in data.values() for k, v in split.items()}
  assert set(allrec) == {"CHNCXR_0001_0", "CHNCXR_0336_1"}
  same(allrec["CHNCXR_0336_1"]["labels"], [1])
  same(allrec["CHNCXR_0001_0"]["labels"], [0])
  np.testing.assert_array_equal(decode.decode_mask(allrec["CHNCXR_0001_0"]["seg"]), mask // 255)
  assert allrec["CHNCXR_0336_1"]["report"] == b"male 35yrs STB in the left upper"

  mc = tmp_path / "montgomery"
  write_png(str(mc / "CXR_png" / "MCUCXR_0001_0.png"))
  left, right = np.zeros((40, 48), np.uint8), np.zeros((40, 48), np.uint8)
  left[5:35, 4:20], right[5:35, 28:44] = 255, 255
  write_png(str(mc / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png"), left)
  write_png(str(mc / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png"), right)
  data, _ = build("montgomery_tb", mc, tmp_path / "m")
  rec = next(iter(next(s for s in data.values() if s).values()))
  np.testing.assert_array_equal(decode.decode_mask(rec["seg"]), (left | right) // 255)


def test_cxr_lt_2024_forty_findings_by_name(tmp_path):
  root = tmp_path / "cxrlt"
  shuffled = list(reversed(L.CXR_LT_2024))  # columns in another order than ours
  def row(dicom_id, positives, study):
    return [dicom_id, 10000032, study, f"files/p10/p10000032/s{study}/{dicom_id}.jpg",
            *[1 if n in positives else 0 for n in shuffled]]
  write_csv(root / "train_labeled.csv", ["dicom_id", "subject_id", "study_id", "fpath",
                                         *shuffled],
            [row("d1", {"Azygos Lobe", "Tuberculosis"}, 50000001)])
  write_csv(root / "development_labeled.csv", ["dicom_id", "subject_id", "study_id", "fpath",
                                               *shuffled],
            [row("d2", {"Normal"}, 50000002)])
  write_jpeg(str(root / "files/p10/p10000032/s50000001/d1.jpg"))
  write_jpeg(str(root / "files/p10/p10000032/s50000002/d2.jpg"))
  data, builder = build("cxr_lt_2024", root, tmp_path)
  assert len(L.CXR_LT_2024) == 40 and builder.info.metadata["label_names"] == list(L.CXR_LT_2024)
  same(data["train"]["d1"]["labels"], L.multi_hot(["Azygos Lobe", "Tuberculosis"], L.CXR_LT_2024))
  same(data["validation"]["d2"]["labels"], L.multi_hot(["Normal"], L.CXR_LT_2024))


def test_tbx11k_lists_classes_and_coco_boxes(tmp_path):
  root = tmp_path / "TBX11K"
  for rel in ("health/h0001.png", "sick/s0001.png", "tb/tb0003.png", "tb/tb0010.png"):
    write_png(str(root / "imgs" / rel))
  (root / "lists").mkdir()
  (root / "lists" / "TBX11K_train.txt").write_text("health/h0001.png\ntb/tb0003.png\n")
  (root / "lists" / "TBX11K_val.txt").write_text("sick/s0001.png\ntb/tb0010.png\n")
  cats = [{"id": 1, "name": "ActiveTuberculosis"},
          {"id": 2, "name": "ObsoletePulmonaryTuberculosis"},
          {"id": 3, "name": "PulmonaryTuberculosis"}]
  def coco(images, anns):
    return json.dumps({"images": images, "annotations": anns, "categories": cats})
  (root / "annotations" / "json").mkdir(parents=True)
  (root / "annotations" / "json" / "TBX11K_train.json").write_text(coco(
      [{"id": 7, "file_name": "tb0003.png", "width": 48, "height": 40}],
      [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [3, 4, 10, 12]}]))
  (root / "annotations" / "json" / "TBX11K_val.json").write_text(coco([], []))
  data, _ = build("tbx11k", tmp_path, tmp_path)
  same(data["train"]["health/h0001.png"]["labels"], [1, 0, 0])
  same(data["train"]["tb/tb0003.png"]["labels"], [0, 0, 1])
  same(data["train"]["tb/tb0003.png"]["boxes"], [[1, 3, 4, 13, 16]])
  same(data["validation"]["sick/s0001.png"]["labels"], [0, 1, 0])


def test_object_cxr_shapes_to_boxes(tmp_path):
  root = tmp_path / "object-CXR"
  write_csv(root / "train.csv", ["image_name", "annotation"],
            [["00001.jpg", "0 10 12 20 22;1 30 5 40 9;2 5 30 9 38 2 35"], ["00002.jpg", ""]])
  write_csv(root / "dev.csv", ["image_name", "annotation"], [["08001.jpg", "0 1 1 5 5"]])
  for rel in ("train/00001.jpg", "train/00002.jpg", "dev/08001.jpg"):
    write_jpeg(str(root / rel))
  data, _ = build("object_cxr", root, tmp_path)
  rec = data["train"]["00001.jpg"]
  same(rec["labels"], [1])
  same(rec["boxes"], [[0, 10, 12, 20, 22], [0, 30, 5, 40, 9], [0, 2, 30, 9, 38]])
  same(data["train"]["00002.jpg"]["labels"], [0])
  same(data["validation"]["08001.jpg"]["labels"], [1])


def test_builder_skips_and_counts_bad_images_then_stops_past_the_limit(tmp_path, monkeypatch,
                                                                        caplog):
  root = tmp_path / "covidx"
  (root / "train").mkdir(parents=True)
  (root / "train.txt").write_text("p1 good.png normal x\np2 gone.png normal x\n"
                                  "p3 broken.png pneumonia x\np4 bad.png flu x\n")
  (root / "test.txt").write_text("p5 t.png normal x\n")
  write_png(str(root / "train" / "good.png"))
  (root / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
  write_png(str(root / "test" / "t.png"))
  with pytest.raises(decode.DataError, match=r"3 of 4 images could not be read"):
    build("covidx", root, tmp_path / "a", config="v3_512")
  monkeypatch.setattr(builders.builder_class("covidx"), "MAX_FAILURE_FRACTION", 0.8)
  data, _ = build("covidx", root, tmp_path / "b", config="v3_512")
  assert list(data["train"]) == ["good.png"]
  text = caplog.text
  assert "gone.png: file not found" in text and "cannot decode PNG" in text
  assert "no class among normal, pneumonia, COVID-19" in text  # label 'flu': not shifted


def test_unknown_dataset_names_list_the_builders():
  with pytest.raises(KeyError, match="chexpert.*nih_cxr14"):
    builders.builder_class("chexpret")
