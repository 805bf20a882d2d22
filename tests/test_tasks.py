"""Supervised task losses against independent NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxrjax import tasks
from cxrjax.config_lib import ConfigError


def task(name, **cfg):
  return tasks.build(ml_collections.ConfigDict(dict(name=name, **cfg)))


_JITTED = {}


def loss_of(t, logits, batch):
  """t.loss under jit, compiled once per task object and shapes (compiling dominates the
  run time of these tests on CPU)."""
  if id(t) not in _JITTED:
    _JITTED[id(t)] = (t, jax.jit(t.loss))
  return _JITTED[id(t)][1](logits, batch)


BCE = task("multilabel")
SEG = task("segmentation", num_classes=3)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture
def multilabel_batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 5)).astype(np.float32)
  labels = (rng.random((6, 5)) < 0.4).astype(np.float32)
  mask = (rng.random((6, 5)) < 0.7).astype(np.float32)
  return logits, {"labels": labels, "label_mask": mask}


# ----------------------------------------------------------------------------
# Multi-label.
# ----------------------------------------------------------------------------


def test_masked_bce_is_the_mean_over_unmasked_entries(multilabel_batch):
  logits, batch = multilabel_batch
  total, count = 0.0, 0
  for b in range(logits.shape[0]):
    for k in range(logits.shape[1]):
      if batch["label_mask"][b, k]:
        p, y = np_sigmoid(float(logits[b, k])), batch["labels"][b, k]
        total += -(y * np.log(p) + (1 - y) * np.log(1 - p))
        count += 1
  loss, metrics = loss_of(BCE, logits, batch)
  np.testing.assert_allclose(loss, total / count, rtol=1e-5)
  np.testing.assert_allclose(metrics["frac_labels_used"], count / logits.size)
  assert set(metrics) == {"loss", "frac_labels_used"}


def test_masked_labels_do_not_change_the_loss(multilabel_batch):
  logits, batch = multilabel_batch
  flipped = np.where(batch["label_mask"] == 0, 1 - batch["labels"], batch["labels"])
  for t in (BCE, task("multilabel", loss="asl")):
    a, _ = loss_of(t, logits, batch)
    b, _ = loss_of(t, logits, {**batch, "labels": flipped})
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_label_smoothing_targets(multilabel_batch):
  logits, batch = multilabel_batch
  eps = 0.2
  y = batch["labels"] * (1 - eps) + eps / 2
  p = np_sigmoid(logits.astype(np.float64))
  per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  expected = (per * batch["label_mask"]).sum() / batch["label_mask"].sum()
  loss, _ = loss_of(task("multilabel", label_smoothing=eps), logits, batch)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_all_masked_gives_zero_not_nan(multilabel_batch):
  logits, batch = multilabel_batch
  unlabelled = {**batch, "label_mask": 0 * batch["labels"]}
  loss, metrics = loss_of(BCE, logits, unlabelled)
  assert float(loss) == 0.0 and float(metrics["frac_labels_used"]) == 0.0


def test_asl_without_focusing_or_clipping_is_bce(multilabel_batch):
  logits, batch = multilabel_batch
  asl = task("multilabel", loss="asl", asl_gamma_neg=0.0, asl_gamma_pos=0.0, asl_clip=0.0)
  np.testing.assert_allclose(loss_of(asl, logits, batch)[0], loss_of(BCE, logits, batch)[0],
                             rtol=1e-6)


def reference_asl(x, y, gamma_neg, gamma_pos, clip, eps=1e-8):
  """NumPy transcription of Alibaba-MIIL/ASL AsymmetricLoss.forward, per entry."""
  x_sigmoid = np_sigmoid(x.astype(np.float64))
  xs_pos = x_sigmoid
  xs_neg = 1 - x_sigmoid
  if clip is not None and clip > 0:
    xs_neg = np.minimum(xs_neg + clip, 1.0)
  los_pos = y * np.log(np.maximum(xs_pos, eps))
  los_neg = (1 - y) * np.log(np.maximum(xs_neg, eps))
  loss = los_pos + los_neg
  if gamma_neg > 0 or gamma_pos > 0:
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * np.power(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
  return -loss


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4, 0, 0.05), (4, 1, 0.05), (2, 1, 0.0)])
def test_asl_matches_the_reference_formula(multilabel_batch, gamma_neg, gamma_pos, clip):
  logits, batch = multilabel_batch
  per = reference_asl(logits, batch["labels"], gamma_neg, gamma_pos, clip)
  expected = (per * batch["label_mask"]).sum() / batch["label_mask"].sum()
  t = task("multilabel", loss="asl", asl_gamma_neg=float(gamma_neg),
           asl_gamma_pos=float(gamma_pos), asl_clip=clip)
  np.testing.assert_allclose(loss_of(t, logits, batch)[0], expected, rtol=1e-5)
  # Soft targets follow the same formula.
  soft = np.random.default_rng(1).random(logits.shape).astype(np.float32)
  per = reference_asl(logits, soft, gamma_neg, gamma_pos, clip)
  soft_batch = {"labels": soft, "label_mask": np.ones_like(soft)}  # same structure: no recompile
  np.testing.assert_allclose(loss_of(t, logits, soft_batch)[0], per.mean(), rtol=1e-5)


def test_predict_multilabel_is_sigmoid(multilabel_batch):
  logits, _ = multilabel_batch
  np.testing.assert_allclose(task("multilabel").predict(logits), np_sigmoid(logits), rtol=1e-6)


# ----------------------------------------------------------------------------
# Multi-class.
# ----------------------------------------------------------------------------


def test_multiclass_cross_entropy_with_smoothing_and_excluded_rows():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (6, 4)).astype(np.float32)
  labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 1, 2]]
  labels[4] = 0.0                      # no class: excluded
  mask = np.ones_like(labels)
  mask[5] = 0.0                        # masked row: excluded
  eps = 0.1
  logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  targets = labels * (1 - eps) + eps / 4
  per_row = -(targets * logp).sum(-1)
  loss, metrics = loss_of(task("multiclass", label_smoothing=eps), logits,
                          {"labels": labels, "label_mask": mask})
  np.testing.assert_allclose(loss, per_row[:4].mean(), rtol=1e-5)
  correct = (logits.argmax(-1) == labels.argmax(-1))[:4]
  np.testing.assert_allclose(metrics["accuracy"], correct.mean())
  np.testing.assert_allclose(metrics["frac_rows_used"], 4 / 6)
  probs = task("multiclass").predict(logits)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------
# Segmentation.
# ----------------------------------------------------------------------------


def seg_example(ignore=255):
  rng = np.random.default_rng(0)
  seg = rng.integers(0, 3, (2, 8, 8)).astype(np.int32)
  seg[0, :2] = ignore
  logits = rng.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
  return logits, seg


def test_perfect_logits_give_zero_dice_loss_and_cross_entropy():
  _, seg = seg_example()
  logits = 40.0 * np.eye(3, dtype=np.float32)[np.where(seg == 255, 0, seg)]
  loss, metrics = loss_of(SEG, logits, {"seg": seg})
  assert float(metrics["dice_loss"]) < 1e-5 and float(metrics["ce"]) < 1e-5
  assert float(loss) < 1e-5 and float(metrics["pixel_accuracy"]) == 1.0
  assert set(metrics) == {"loss", "ce", "dice_loss", "pixel_accuracy", "frac_pixels_used"}


@pytest.mark.parametrize("ignore", [255, -1])
def test_ignored_pixels_do_not_matter(ignore):
  logits, seg = seg_example(ignore)
  t = SEG if ignore == 255 else task("segmentation", num_classes=3, ignore_index=ignore)
  other = logits.copy()
  other[0, :2] = 100.0 * np.random.default_rng(1).normal(size=other[0, :2].shape)
  a, ma = loss_of(t, logits, {"seg": seg})
  b, _ = loss_of(t, other, {"seg": seg})
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(ma["frac_pixels_used"], 1 - 16 / 128)


def test_segmentation_loss_matches_numpy():
  logits, seg = seg_example()
  valid = seg != 255
  target = np.where(valid, seg, 0)
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(3)[target] * valid[..., None]
  ce = -(np.log(np.take_along_axis(p, target[..., None], -1))[..., 0] * valid).sum() / valid.sum()
  pv = p * valid[..., None]
  dice = (2 * (pv * onehot).sum((0, 1, 2)) + 1) / (pv.sum((0, 1, 2)) + onehot.sum((0, 1, 2)) + 1)
  dice_loss = 1 - dice[1:].mean()
  loss, metrics = loss_of(SEG, logits, {"seg": seg})
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["dice_loss"], dice_loss, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + dice_loss, rtol=1e-5)
  weighted = task("segmentation", num_classes=3, ce_weight=0.5, dice_weight=2.0)
  np.testing.assert_allclose(loss_of(weighted, logits, {"seg": seg})[0],
                             0.5 * ce + 2 * dice_loss, rtol=1e-5)


# ----------------------------------------------------------------------------
# All tasks: jit, gradients, config errors.
# ----------------------------------------------------------------------------


def extreme_cases():
  x = np.array([[-40.0, -18.0, -0.5, 0.0, 0.5, 18.0, 40.0]] * 2, np.float32)
  y = np.array([[0, 1, 0, 1, 0, 1, 1], [1, 0, 1, 0, 1, 0, 0]], np.float32)
  seg_logits = np.zeros((1, 4, 4, 2), np.float32)
  seg_logits[..., 1] = np.linspace(-50, 50, 16).reshape(1, 4, 4)
  seg = (np.arange(16).reshape(1, 4, 4) % 2).astype(np.int32)
  return [
      (task("multilabel"), x, {"labels": y, "label_mask": np.ones_like(y)}),
      (task("multilabel", loss="asl", asl_gamma_pos=1.0), x, {"labels": y}),
      (task("multilabel", loss="asl", asl_clip=0.0), x, {"labels": 0.7 * y + 0.1}),
      (task("multilabel", loss="asl"), x, {"labels": y, "label_mask": 0 * y}),
      (task("multiclass", label_smoothing=0.1), x, {"labels": np.eye(7, dtype=np.float32)[[1, 6]]}),
      (task("segmentation", num_classes=2), seg_logits, {"seg": seg}),
  ]


@pytest.mark.parametrize("case", range(6))
def test_gradients_are_finite_under_jit(case):
  t, logits, batch = extreme_cases()[case]
  grad_fn = jax.jit(jax.value_and_grad(lambda z, b: t.loss(z, b)[0]))
  value, grad = grad_fn(jnp.asarray(logits), batch)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_registry_and_config_errors():
  assert tasks.names() == ["multiclass", "multilabel", "segmentation"]
  with pytest.raises(ConfigError, match=r"config\.task\.name='multilable' is not one of: "
                                        r"multiclass, multilabel, segmentation"):
    tasks.get("multilable")
  with pytest.raises(ConfigError, match=r"config\.task\.loss='focal' is not one of: asl, bce"):
    task("multilabel", loss="focal")
  with pytest.raises(ConfigError, match=r"config\.task\.label_smoothing=1\.0"):
    task("multiclass", label_smoothing=1.0)
  with pytest.raises(ConfigError, match=r"config\.task\.num_classes=0 must be an integer >= 2"):
    task("segmentation")
  logits, seg = seg_example()
  with pytest.raises(ValueError, match=r"expected batch\['seg'\]\.shape"):
    loss_of(task("segmentation", num_classes=4), logits, {"seg": seg})
  cfg = tasks.default_config("multilabel")
  assert cfg.name == "multilabel" and cfg.loss == "bce" and cfg.asl_gamma_neg == 4.0
  assert tasks.build(cfg).batch_keys == ("labels", "label_mask")
  assert task("segmentation", num_classes=3).batch_keys == ("seg",)
