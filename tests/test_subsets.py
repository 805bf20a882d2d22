"""Label-efficiency subsets: coverage, stratification, nesting, determinism, the pipeline."""

from __future__ import annotations

import logging
import pickle

import ml_collections
import numpy as np
import pytest

from cxrjax import config_blocks
from cxrjax.config_lib import ConfigError
from cxrjax.data import phantom, pipeline, sources, subsets

RATES = np.array([0.002, 0.005, 0.01, 0.03, 0.08, 0.15, 0.3, 0.45])


def skewed_labels(num=5000, seed=0):
  """Multi-label matrix with positive rates from 0.2% to 45% and correlated classes."""
  rng = np.random.default_rng(seed)
  severity = rng.random(num)[:, None]
  return (rng.random((num, len(RATES))) < RATES * (0.5 + severity)).astype(np.float32)


@pytest.fixture(scope="module")
def labels5000():
  return skewed_labels()


def test_same_seed_same_subset_other_seed_other_subset(labels5000):
  a = subsets.stratified_subset(labels5000, 0.1, seed=3)
  b = subsets.stratified_subset(labels5000.copy(), 0.1, seed=3)
  c = subsets.stratified_subset(labels5000, 0.1, seed=4)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.int64 and np.all(np.diff(a) > 0)  # sorted, no repeats
  # Different seeds give different draws (about a random 10% overlap, not the same set).
  assert len(set(a) & set(c)) < 0.3 * len(a)


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_per_class_positive_counts_follow_the_full_split(labels5000, fraction):
  """Within 3 positives (0.006 in positive rate at 10%) of fraction x the full count."""
  idx = subsets.stratified_subset(labels5000, fraction, seed=0)
  assert len(idx) == round(fraction * len(labels5000))
  kept, full = labels5000[idx].sum(0), labels5000.sum(0)
  np.testing.assert_array_less(np.abs(kept - fraction * full), 3.0 + 1e-6)
  if fraction == 0.1:
    rate_error = np.abs(kept / len(idx) - full / len(labels5000))
    assert rate_error.max() <= 0.006, rate_error
    # Simple random sampling is much worse on the same data.
    random_idx = np.random.default_rng(0).permutation(len(labels5000))[:len(idx)]
    assert np.abs(labels5000[random_idx].sum(0) - fraction * full).max() > 3


def test_every_prefix_of_the_order_is_stratified(labels5000):
  order = subsets.stratified_order(labels5000, seed=1, length=1000)
  full = labels5000.sum(0)
  worst = max(np.abs(labels5000[order[:n]].sum(0) - n / len(labels5000) * full).max()
              for n in range(50, 1001, 25))
  assert worst <= 2.0, worst


def test_subsets_of_one_seed_are_nested(labels5000):
  one, ten, half = (set(subsets.stratified_subset(labels5000, f, seed=7))
                    for f in (0.01, 0.1, 0.5))
  everything = set(subsets.stratified_subset(labels5000, 1.0, seed=7))
  assert one < ten < half < everything == set(range(len(labels5000)))


def test_a_class_with_one_positive_among_10000_is_kept():
  rng = np.random.default_rng(0)
  labels = np.zeros((10_000, 4), np.float32)
  labels[:, 0] = rng.random(10_000) < 0.3
  labels[:, 1] = rng.random(10_000) < 0.01
  labels[4321, 2] = 1.0  # the only positive of class 2; class 3 has none
  for seed in range(3):
    idx = subsets.stratified_subset(labels, 0.01, seed=seed)
    assert 4321 in idx and len(idx) == 100
    kept = labels[idx].sum(0)
    assert kept[0] > 0 and kept[1] > 0 and kept[3] == 0


def test_size_is_rounded_and_raised_to_cover_every_class():
  labels = np.eye(3, dtype=np.float32)[np.arange(1000) % 3]
  assert len(subsets.stratified_subset(labels, 0.0105, 0)) == 11  # 10.5 rounds up
  assert len(subsets.stratified_subset(labels, 1e-6, 0)) == 3     # 1 raised to 3 classes
  unlabelled = np.zeros((1000, 0), np.float32)
  assert len(subsets.stratified_subset(unlabelled, 1e-6, 0)) == 1


def test_multiclass_one_hot_is_stratified_exactly():
  y = np.random.default_rng(2).choice(5, size=3000, p=[0.6, 0.2, 0.1, 0.07, 0.03])
  onehot = np.eye(5, dtype=np.float32)[y]
  idx = subsets.stratified_subset(onehot, 0.1, seed=0)
  np.testing.assert_array_less(np.abs(onehot[idx].sum(0) - 0.1 * onehot.sum(0)), 1.0 + 1e-6)


def test_masked_entries_are_not_positives():
  labels = np.zeros((200, 2), np.float32)
  labels[:, 0] = np.arange(200) % 2
  labels[7, 1] = 1.0
  mask = np.ones_like(labels)
  mask[7, 1] = 0.0  # the only "positive" of class 1 is uncertain: nothing to cover
  idx = subsets.stratified_subset(labels, 0.01, 0, mask=mask)
  assert len(idx) == 2


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1, True, "0.1"])
def test_bad_fractions_raise(fraction, labels5000):
  with pytest.raises(ValueError, match="fraction"):
    subsets.stratified_subset(labels5000, fraction, 0)


# ----------------------------------------------------------------------------
# Label matrices of sources.
# ----------------------------------------------------------------------------


def test_phantom_case_labels_match_render():
  for index in [*range(12), 999, 123_456, phantom.SPLIT_OFFSETS["val"] + 5,
                phantom.SPLIT_OFFSETS["test"] + 77]:
    for seed in (0, 3):
      expected = phantom.render(index, seed=seed, size=16)["labels"]
      got = phantom.case_labels(index, seed)
      assert got.dtype == np.float32 and got.shape == (len(phantom.FINDINGS),)
      np.testing.assert_array_equal(got, expected, err_msg=f"index {index} seed {seed}")


def test_phantom_source_label_matrix_matches_its_records():
  source = phantom.PhantomSource(12, seed=2, size=16, split="val")
  matrix = source.label_matrix()
  assert matrix.shape == (12, len(phantom.FINDINGS)) and matrix.dtype == np.float32
  for i in (0, 5, 11):
    np.testing.assert_array_equal(matrix[i], source[i]["labels"])


class _ListSource:
  """A source without label_matrix(): subsets must read the records."""

  label_names = ("a", "b")

  def __init__(self, raw):
    self.raw = raw

  def __len__(self):
    return len(self.raw)

  def __getitem__(self, i):
    return {"labels": self.raw[i], "id": f"patient-{i}"}


RAW = np.array([[1, 0], [-1, 1], [np.nan, 0], [0, -1]], np.float32)


def test_label_matrix_reads_records_without_a_policy():
  labels, mask = subsets.label_matrix(_ListSource(RAW))
  np.testing.assert_array_equal(labels, [[1, 0], [0, 1], [0, 0], [0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1], [0, 1], [0, 1], [1, 0]])


def test_manifest_label_matrix_needs_no_images(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text("path,a,b\nx.png,1,0\ny.png,-1,1\nz.png,,0\nw.png,0,-1\n")
  source = sources.ManifestSource(str(path))
  np.testing.assert_array_equal(source.label_matrix(), RAW)
  labels, mask = subsets.label_matrix(source)
  np.testing.assert_array_equal(labels, [[1, 0], [0, 1], [0, 0], [0, 0]])


def test_subset_source_maps_indices_forwards_attributes_and_pickles():
  base = _ListSource(RAW)
  subset = subsets.SubsetSource(base, [3, 1])
  assert len(subset) == 2 and subset.label_names == ("a", "b")
  assert subset[0]["id"] == "patient-3" and subset[1]["id"] == "patient-1"
  np.testing.assert_array_equal(subset.label_matrix(), RAW[[3, 1]])
  copy = pickle.loads(pickle.dumps(subset))
  assert len(copy) == 2 and copy[1]["id"] == "patient-1" and copy.label_names == ("a", "b")
  with pytest.raises(IndexError):
    subset[2]
  with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
    subsets.SubsetSource(base, [0, 4])


# ----------------------------------------------------------------------------
# Config and pipeline.
# ----------------------------------------------------------------------------


def data_cfg(**kw):
  cfg = config_blocks.pretrain_base().data
  cfg.update(num_examples=200, num_eval_examples=16, source_size=16, image_size=16,
             batch_size=4, num_threads=1, prefetch=1)
  cfg.update(kw)
  return cfg


def test_configs_without_the_keys_keep_everything():
  source = _ListSource(RAW)
  assert subsets.subset_for_config(source, config_blocks.pretrain_base().data) is source
  assert subsets.subset_for_config(source, ml_collections.ConfigDict(
      dict(train_fraction=1.0))) is source


@pytest.mark.parametrize("fraction", [0, 1.5, "0.1"])
def test_bad_train_fraction_is_a_config_error(fraction):
  with pytest.raises(ConfigError, match=r"config\.data\.train_fraction="):
    subsets.subset_for_config(_ListSource(RAW), data_cfg(train_fraction=fraction))
  with pytest.raises(ConfigError, match=r"config\.data\.train_fraction="):
    pipeline.make_dataset(data_cfg(train_fraction=fraction), split="train", pp="resize(16)",
                          seed=0, global_batch=4, repeat=True)


def test_bad_fraction_seed_is_a_config_error():
  with pytest.raises(ConfigError, match=r"config\.data\.fraction_seed=-1"):
    subsets.subset_for_config(_ListSource(RAW), data_cfg(train_fraction=0.5,
                                                         fraction_seed=-1))


def test_subset_for_config_logs_counts_by_class_name_only(caplog):
  source = phantom.PhantomSource(300, seed=0, size=16)
  with caplog.at_level(logging.INFO):
    subset = subsets.subset_for_config(source, data_cfg(train_fraction=0.1, fraction_seed=2))
  assert isinstance(subset, subsets.SubsetSource) and len(subset) == 30
  text = caplog.text
  assert "keeping 30 of 300" in text and "cardiomegaly" in text and "phantom-s" not in text
  np.testing.assert_array_equal(
      subset.indices, subsets.stratified_subset(source.label_matrix(), 0.1, 2))


def test_pipeline_trains_on_the_same_20_of_200_examples_every_epoch():
  cfg = data_cfg(train_fraction=0.1, fraction_seed=1)
  ds = pipeline.make_dataset(cfg, split="train", pp="resize(16)", seed=0, global_batch=4,
                             repeat=True)
  assert len(ds.source) == 20
  it = pipeline.make_iterator(ds, cfg)
  epochs = [[i for _ in range(5) for i in next(it)["id"]] for _ in range(2)]
  assert len(set(epochs[0])) == 20 and set(epochs[0]) == set(epochs[1])
  expected = subsets.stratified_subset(
      phantom.PhantomSource(200, seed=cfg.phantom_seed, size=16).label_matrix(), 0.1, 1)
  assert set(epochs[0]) == {f"phantom-s{cfg.phantom_seed}-{i:08d}" for i in expected}
  # Evaluation splits are never subsampled.
  eval_ds = pipeline.make_dataset(cfg, split="val", pp="resize(16)", seed=0, global_batch=4,
                                  repeat=False)
  assert len(eval_ds.source) == cfg.num_eval_examples
