"""The Grain pipeline: determinism, multi-process sharding, exact resume, bad input."""

from __future__ import annotations

import csv
import logging
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cxrjax import config_blocks
from cxrjax.config_lib import ConfigError
from cxrjax.data import pipeline, prepare, sources
from test_data_fixtures import grey, write_jpeg, write_png, write_png16

PP = "random_resized_crop(16, scale=(0.5, 1.0))|to_channels(3)|normalize('evax')"


def data_cfg(**kw):
  cfg = config_blocks.pretrain_base().data
  cfg.update(num_examples=64, num_eval_examples=16, source_size=24, image_size=16,
             batch_size=8, num_threads=2, prefetch=2)
  cfg.update(kw)
  return cfg


def batches(cfg, n, seed=0, pp=PP, global_batch=8, repeat=True, **kw):
  ds = pipeline.make_dataset(cfg, split="train", pp=pp, seed=seed, global_batch=global_batch,
                             repeat=repeat, **kw)
  it = pipeline.make_iterator(ds, cfg)
  return [next(it) for _ in range(n)], it


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_unknown_source_lists_registered_names():
  with pytest.raises(ConfigError, match=r"'chexpret' is not one of: .*array_record.*chexpert.*"
                                        r"folder.*manifest.*mixture.*phantom"):
    pipeline.make_source(data_cfg(source="chexpret"), "train")


def test_deterministic_for_a_seed():
  cfg = data_cfg()
  a, _ = batches(cfg, 3, seed=1)
  b, _ = batches(cfg, 3, seed=1)
  c, _ = batches(cfg, 3, seed=2)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert a[0]["image"].shape == (8, 16, 16, 3) and a[0]["label_mask"].shape == (8, 6)
  assert pipeline.FAILURES_KEY not in a[0]


def test_two_processes_see_disjoint_shards_whose_union_is_the_global_batch():
  cfg = data_cfg()
  one, _ = batches(cfg, 3, process_index=0, process_count=1)
  per = [batches(cfg, 3, process_index=p, process_count=2)[0] for p in range(2)]
  for step in range(3):
    ids = [set(per[p][step]["id"]) for p in range(2)]
    assert not ids[0] & ids[1] and all(len(i) == 4 for i in ids)
    assert ids[0] | ids[1] == set(one[step]["id"])
    merged = {i: img for p in range(2) for i, img in zip(per[p][step]["id"],
                                                         per[p][step]["image"])}
    for i, img in zip(one[step]["id"], one[step]["image"]):
      np.testing.assert_array_equal(merged[i], img)  # same augmentation too


def test_batch_must_divide_over_processes():
  with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the 4 processes"):
    pipeline.make_dataset(data_cfg(), split="train", pp=PP, seed=0, global_batch=6,
                          repeat=True, process_index=0, process_count=4)


# ----------------------------------------------------------------------------
# Private data: manifests with bad files.
# ----------------------------------------------------------------------------

NAMES = ("Cardiomegaly", "Edema", "Nodule")


def expected_labels(i):
  return np.eye(3, dtype=np.float32)[i % 3]


def make_manifest(tmp_path, n_good=40, bad=True, extra_rows=()):
  """n_good readable images (label = one-hot of i % 3) plus one file of each bad kind."""
  root = tmp_path / "imgs"
  rows = []
  for i in range(n_good):
    writer = (write_png, write_jpeg, write_png16)[i % 3]
    ext = (".png", ".jpg", ".png")[i % 3]
    path = writer(str(root / f"good{i:03d}{ext}"), seed=i)
    rows.append((os.path.relpath(path, tmp_path), f"good{i:03d}", *expected_labels(i), "M", 60))
  if bad:
    good_png = (root / "good000.png").read_bytes()
    good_jpg = (root / "good001.jpg").read_bytes()
    (root / "truncated.png").write_bytes(good_png[:len(good_png) // 2])
    (root / "corrupt.jpg").write_bytes(good_jpg[:20] + bytes(200) + good_jpg[220:300])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_bytes(b"this is not an image at all, it is text")
    from PIL import Image
    Image.fromarray(grey() > 100).save(root / "bilevel.png")  # mode '1'
    write_png(str(root / "constant.png"), np.full((40, 48), 7, np.uint8))
    for name in ("truncated.png", "corrupt.jpg", "empty.png", "text.png", "bilevel.png",
                 "constant.png", "missing.png"):
      rows.append((f"imgs/{name}", f"bad-{name}", 1, 1, 1, "F", 50))
  rows.extend(extra_rows)
  path = tmp_path / "manifest.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "id", *NAMES, "Sex", "Age"])
    w.writerows(rows)
  return str(path)


def test_bad_inputs_are_skipped_counted_and_labels_stay_with_their_image(tmp_path, caplog):
  manifest = make_manifest(tmp_path, extra_rows=[("imgs/good000.png", "badlabel", "yes", 0, 0,
                                                  "M", 1)])
  cfg = data_cfg(source="manifest", manifest=manifest, max_decode_failure_fraction=0.5,
                 failure_check_after=10)
  caplog.set_level(logging.WARNING)
  out, it = batches(cfg, 12, pp="resize(16)|to_channels(1)|normalize('evax')")
  seen = set()
  for b in out:
    assert b["image"].shape == (8, 16, 16, 1) and b["labels"].shape == (8, 3)
    for rid, lab, mask in zip(b["id"], b["labels"], b["label_mask"]):
      assert rid.startswith("good")  # never a bad file, never a replacement
      np.testing.assert_array_equal(lab, expected_labels(int(rid[4:])))
      assert mask.all()
      seen.add(rid)
  assert len(seen) == 40  # 96 examples drawn: every good image at least once
  stats = pipeline.data_stats(it)
  assert stats["data/examples_skipped"] >= 7  # each bad file at least once (2 epochs+)
  assert stats["data/examples_read"] >= 96 + stats["data/examples_skipped"]
  text = caplog.text
  for needle in ("truncated.png: cannot decode PNG", "corrupt.jpg: cannot decode JPEG",
                 "empty.png: empty file", "text.png: not a PNG, JPEG or DICOM",
                 "bilevel.png: unsupported image mode '1'", "constant.png: image is constant",
                 "missing.png: file not found", "column 'Cardiomegaly'"):
    assert needle in text, needle
  assert "Sex" in text  # the unknown columns are reported, not used as labels


def test_too_many_failures_stop_the_run_with_a_clear_error(tmp_path):
  manifest = make_manifest(tmp_path, n_good=12)
  cfg = data_cfg(source="manifest", manifest=manifest, max_decode_failure_fraction=0.1,
                 failure_check_after=16)
  with pytest.raises(pipeline.DataFailureError,
                     match=r"examples \(.*\) could not be read, more than "
                           r"config.data.max_decode_failure_fraction=0.1. Latest failures: .*imgs/"):
    batches(cfg, 10, pp="resize(16)")


def test_manifest_rows_with_bad_fields_count_towards_the_limit(tmp_path):
  manifest = make_manifest(tmp_path, n_good=3, bad=False,
                           extra_rows=[("imgs/x.png", "x", 2, 0, 0, "M", 1),
                                       ("imgs/y.png", "y", 1, 0)])
  with pytest.raises(pipeline.DataFailureError, match=r"2 of 5 rows of .*manifest.csv"):
    pipeline.make_source(data_cfg(source="manifest", manifest=manifest,
                                  label_names=NAMES), "train")


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_resumes_exactly_after_orbax_save_and_restore(tmp_path, workers):
  # Failed files make batches refill from the next one: the saved state must cover that.
  manifest = make_manifest(tmp_path, n_good=30)
  cfg = data_cfg(source="manifest", manifest=manifest, max_decode_failure_fraction=0.5,
                 num_workers=workers)
  pp = "random_resized_crop(16)|to_channels(1)"
  ds = pipeline.make_dataset(cfg, split="train", pp=pp, seed=3, global_batch=8, repeat=True)
  it = pipeline.make_iterator(ds, cfg)
  for _ in range(5):
    next(it)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(6)]
  stats = pipeline.data_stats(it)

  fresh = pipeline.make_iterator(
      pipeline.make_dataset(cfg, split="train", pp=pp, seed=3, global_batch=8, repeat=True), cfg)
  manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal([next(fresh) for _ in range(6)], expected)
  assert pipeline.data_stats(fresh) == stats
  manager.close()


def test_eval_split_without_repeat_ends_with_a_partial_batch(tmp_path):
  manifest = make_manifest(tmp_path, n_good=10)
  cfg = data_cfg(source="manifest", manifest=manifest, max_decode_failure_fraction=0.5)
  ds = pipeline.make_dataset(cfg, split="train", pp="resize(16)", seed=0, global_batch=4,
                             repeat=False)
  out = list(pipeline.make_iterator(ds, cfg))
  assert [len(b["id"]) for b in out] == [4, 4, 2]
  assert sorted(i for b in out for i in b["id"]) == [f"good{i:03d}" for i in range(10)]


# ----------------------------------------------------------------------------
# Manifests, folders, mixtures, prepared shards.
# ----------------------------------------------------------------------------


def test_manifest_csv_label_columns_by_name(tmp_path):
  manifest = make_manifest(tmp_path, n_good=3, bad=False)
  src = sources.ManifestSource(manifest)
  assert src.label_names == NAMES and src.ignored_columns == ["Sex", "Age"]
  np.testing.assert_array_equal(src[1]["labels"], expected_labels(1))
  picked = sources.ManifestSource(manifest, label_names=("Nodule", "Cardiomegaly"))
  np.testing.assert_array_equal(picked[2]["labels"], [1, 0])  # reordered by name, not shifted
  with pytest.raises(sources.ManifestError, match=r"lacks label columns \['Effusion'\]"):
    sources.ManifestSource(manifest, label_names=("Effusion",))
  (tmp_path / "nopath.csv").write_text("file,a\nx.png,1\n")
  with pytest.raises(sources.ManifestError, match="no 'path' column; columns: \\['file', 'a'\\]"):
    sources.ManifestSource(str(tmp_path / "nopath.csv"))


def test_manifest_jsonl_and_split_column(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(
      '{"path": "a.png", "labels": {"Edema": 1, "Mass": -1}, "split": "train"}\n'
      '{"path": "b.png", "labels": {"Mass": 0}, "split": "val"}\n'
      'not json\n'
      '{"path": "c.png", "labels": [1, 0, 0], "split": "train"}\n')
  src = sources.ManifestSource(str(path), split="train")
  assert src.label_names == ("Edema", "Mass") and len(src) == 1
  np.testing.assert_array_equal(src[0]["labels"], [1, -1])
  assert len(src.skipped_rows) == 2  # invalid JSON; list of 3 values for 2 names
  val = sources.ManifestSource(str(path), split="val")
  assert np.isnan(val[0]["labels"][0]) and val[0]["labels"][1] == 0


def test_folder_source_and_weighted_mixture(tmp_path):
  for i in range(10):
    write_png(str(tmp_path / "a" / f"{i}.png"), seed=i)
  for i in range(30):
    write_jpeg(str(tmp_path / "b" / "sub" / f"{i}.jpg"), seed=i)
  folder = sources.FolderSource(str(tmp_path / "b"))
  assert len(folder) == 30 and folder[0]["id"] == os.path.join("sub", "0.jpg")
  cfg = data_cfg(source="mixture", sources=(
      dict(source="folder", data_dir=str(tmp_path / "a"), weight=3.0, name="small"),
      dict(source="folder", data_dir=str(tmp_path / "b"), weight=1.0, name="big")))
  mix = pipeline.make_source(cfg, "train")
  assert len(mix) == 40 and list(mix.counts) == [30, 10]  # small one cycled 3x
  assert {mix[i]["id"] for i in range(30)} == {f"small:{i}.png" for i in range(10)}
  assert len({mix[i]["id"] for i in range(30, 40)}) == 10  # big one: spread subsample
  out, _ = batches(cfg, 5, pp="resize(16)|to_channels(3)|normalize('evax')")
  share = np.mean([s for b in out for s in b["source"]] )
  assert 0.05 < share < 0.5  # ~25% from 'big'
  with pytest.raises(ConfigError, match="config.data.sources"):
    pipeline.make_source(data_cfg(source="mixture"), "train")


def test_prepare_is_restartable_and_feeds_the_array_record_source(tmp_path):
  manifest = make_manifest(tmp_path, n_good=9)
  out_dir = str(tmp_path / "prepared")
  argv = ["--input", manifest, "--output", out_dir, "--image_size", "32", "--shard_size", "4",
          "--workers", "1", "--max_failure_fraction", "0.5", "--quiet"]
  meta = prepare.prepare(prepare.parse_args(argv))
  assert meta["splits"]["train"] == {"num_examples": 9, "num_failed": 7, "num_shards": 4}
  assert meta["label_names"] == list(NAMES)
  shards = sources.shard_paths(out_dir, "train")
  assert len(shards) == 4
  # Simulate an interrupted run: one shard lost, a half-written temporary left behind.
  mtimes = {p: os.path.getmtime(p) for p in shards}
  os.remove(shards[1])
  with open(shards[1] + ".tmp", "wb") as f:
    f.write(b"partial")
  assert prepare.main(argv) == 0
  assert os.path.exists(shards[1]) and not os.path.exists(shards[1] + ".tmp")
  assert all(os.path.getmtime(p) == mtimes[p] for p in shards if p != shards[1])
  with open(os.path.join(out_dir, "failures-train.txt")) as f:
    assert len(f.read().splitlines()) == 7
  src = sources.ArrayRecordSource(out_dir, "train")
  assert len(src) == 9 and src.label_names == NAMES
  cfg = data_cfg(source="array_record", data_dir=out_dir, num_examples=9)
  out, it = batches(cfg, 3, global_batch=4, pp="resize(16)")
  for b in out:
    for rid, lab in zip(b["id"], b["labels"]):
      np.testing.assert_array_equal(lab, expected_labels(int(rid[4:])))
  assert pipeline.data_stats(it)["data/examples_skipped"] == 0
  # Other input into the same folder is refused rather than mixed in.
  other = make_manifest(tmp_path / "other", n_good=2, bad=False)
  with pytest.raises(prepare.PrepareError, match="prepared from other input"):
    prepare.prepare(prepare.parse_args(["--input", other, "--output", out_dir, "--quiet",
                                        "--image_size", "32", "--workers", "1"]))


def test_plus_joined_splits_concatenate_in_order():
  cfg = data_cfg(num_examples=12, num_eval_examples=5)
  source = pipeline.make_source(cfg, "train+val")
  train, val = pipeline.make_source(cfg, "train"), pipeline.make_source(cfg, "val")
  assert len(source) == 17
  assert [source[i]["id"] for i in (0, 11, 12, 16)] == [
      train[0]["id"], train[11]["id"], val[0]["id"], val[4]["id"]]
