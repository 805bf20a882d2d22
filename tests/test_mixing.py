"""Mixup / CutMix on device: timm 'batch' semantics, exact lambdas, jit, determinism."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from cxrjax.data import mixing

B, H, W, C, K = 4, 12, 10, 2, 3


def constant_batch():
  """Example i is the constant image i + 1, so every pixel tells whose it is."""
  image = np.broadcast_to(np.arange(1, B + 1, dtype=np.float32)[:, None, None, None],
                          (B, H, W, C)).copy()
  labels = np.eye(K, dtype=np.float32)[[0, 1, 2, 0]]
  mask = np.ones((B, K), np.float32)
  mask[1, 2] = 0.0  # partner of example 2 (B - 1 - 2 = 1)
  return {"image": image, "labels": labels, "label_mask": mask, "id": np.arange(B)}


def jitted(**kw):
  return jax.jit(functools.partial(mixing.mix_batch, **kw))


CUTMIX = jitted(mixup_alpha=0.0, cutmix_alpha=1.0)
MIXUP = jitted(mixup_alpha=0.4, cutmix_alpha=0.0)
BOTH = jitted(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.6)


def test_no_alphas_is_a_no_op():
  batch = constant_batch()
  assert mixing.mix_batch(batch, jax.random.key(0), mixup_alpha=0.0, cutmix_alpha=0.0) is batch
  assert mixing.mix_batch(batch, jax.random.key(0), mixup_alpha=1.0, cutmix_alpha=1.0,
                          prob=0.0) is batch


def test_cutmix_pastes_the_partner_box_and_mixes_labels_by_its_area():
  batch = constant_batch()
  partner = batch["image"][::-1]
  seen_partial = False
  for seed in range(8):
    out = jax.tree.map(np.asarray, CUTMIX(batch, jax.random.key(seed)))
    from_partner = out["image"] != batch["image"]
    # Every pixel is exactly the example's own or its partner's; the same box for all.
    np.testing.assert_array_equal(out["image"], np.where(from_partner, partner, batch["image"]))
    box = from_partner[0, :, :, 0]
    assert all(np.array_equal(from_partner[i, :, :, c], box) for i in range(B) for c in range(C))
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    if box.any():  # a rectangle
      assert box.sum() == len(rows) * len(cols) and np.all(box[np.ix_(rows, cols)])
    lam = 1.0 - box.sum() / (H * W)
    seen_partial |= 0.0 < lam < 1.0
    expected = lam * batch["labels"] + (1 - lam) * batch["labels"][::-1]
    np.testing.assert_allclose(out["labels"], expected, rtol=1e-6, atol=1e-7)
    if lam < 1.0:
      np.testing.assert_array_equal(out["label_mask"],
                                    batch["label_mask"] * batch["label_mask"][::-1])
    np.testing.assert_array_equal(out["id"], batch["id"])  # other fields untouched
  assert seen_partial


def test_mixup_blends_images_and_labels_with_one_lambda():
  batch = constant_batch()
  out = jax.tree.map(np.asarray, MIXUP(batch, jax.random.key(3)))
  # Example 0 (value 1) is mixed with example 3 (value 4): lam = (4 - v) / 3.
  lam = (4.0 - out["image"][0, 0, 0, 0]) / 3.0
  assert 0.0 < lam < 1.0
  for key in ("image", "labels"):
    np.testing.assert_allclose(out[key], lam * batch[key] + (1 - lam) * batch[key][::-1],
                               rtol=1e-5)
  assert out["label_mask"][2, 2] == 0.0 and out["label_mask"][1, 2] == 0.0
  assert out["label_mask"].sum() == B * K - 2


def test_deterministic_for_the_rng():
  batch = constant_batch()
  a = BOTH(batch, jax.random.key(11))
  b = BOTH(batch, jax.random.key(11))
  for key in ("image", "labels", "label_mask"):
    np.testing.assert_array_equal(a[key], b[key])
  outputs = {np.asarray(BOTH(batch, jax.random.key(s))["image"]).tobytes() for s in range(6)}
  assert len(outputs) > 1


def test_prob_and_switch_prob_choose_per_batch_between_nothing_cutmix_and_mixup():
  batch = constant_batch()
  own, partner = batch["image"], batch["image"][::-1]
  kinds = []
  for seed in range(24):
    out = np.asarray(BOTH(batch, jax.random.key(seed))["image"])
    if np.array_equal(out, own):
      kinds.append("none")
    elif np.all((out == own) | (out == partner)):
      kinds.append("cutmix")                      # pasted, never blended
    else:
      assert np.all(out[0] == out[0, 0, 0, 0])     # blended everywhere alike
      kinds.append("mixup")
  assert {"none", "cutmix", "mixup"} <= set(kinds), kinds


def test_bad_arguments():
  batch = constant_batch()
  with pytest.raises(ValueError, match="mixup_alpha=-1"):
    mixing.mix_batch(batch, jax.random.key(0), mixup_alpha=-1, cutmix_alpha=0.0)
  with pytest.raises(ValueError, match="switch_prob=1.5"):
    mixing.mix_batch(batch, jax.random.key(0), mixup_alpha=1.0, cutmix_alpha=1.0,
                     switch_prob=1.5)
  with pytest.raises(ValueError, match="floating"):
    mixing.mix_batch({**batch, "image": batch["image"].astype(np.uint8)}, jax.random.key(0),
                     mixup_alpha=1.0, cutmix_alpha=0.0)
