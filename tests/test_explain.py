"""Tests for cxrjax.explain: token Grad-CAM, GLoRI attention maps and map upsampling.

A micro/8 ViT (width 64, depth 2) on 32 px images (4x4 patch grid) with a linear or GLoRI
head. Modules are built with nnx.eval_shape and filled from numpy (initial values do not
matter here; compiling random initialisers per shape on CPU would dominate the run time),
and every Grad-CAM runs jitted, with class indices as traced arrays.
"""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cxrjax import config_blocks, explain, models
from cxrjax.models import heads
from tests.tiny import filled

BATCH, CLASSES = 2, 3
IMAGES = np.random.default_rng(0).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)


def head_of(**cfg) -> nnx.Module:
  return filled(lambda: heads.build(ml_collections.ConfigDict(cfg), num_classes=CLASSES,
                                    width=64, depth=2, rngs=nnx.Rngs(1)), seed=1, std=0.1)


def features_fn_for(head_blocks: tuple[int, ...]):
  """features_fn as the fine-tuning wrapper provides it: the head's feature dict and the
  raw output of the perturbed block."""

  def features_fn(model, images, perturb):
    out = model(images, perturb=perturb)
    raw = dict(zip(model.return_blocks, out["blocks"]))
    features = dict(pooled=out["cls"], cls_token=out["cls_token"], patch=out["patch"],
                    blocks=tuple(model.norm(raw[i]) for i in head_blocks),
                    num_prefix_tokens=model.num_prefix_tokens,
                    grid=model.grid_size(images.shape[1:3]), image_hw=images.shape[1:3])
    return features, raw[next(iter(perturb))]

  return features_fn


@pytest.fixture(scope="module")
def encoder():
  config = ml_collections.ConfigDict({"data": {"image_size": 32}})
  model_cfg = config_blocks.model_block(config, "micro/8", config_blocks.VIT, img_size=32,
                                        dtype="float32", return_blocks=(0, 1))
  return filled(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)), std=0.1)


@pytest.fixture(scope="module")
def linear_results(encoder):
  """Token gradients, tokens and Grad-CAM maps for blocks -1 and 0 of a linear head."""
  head = head_of(name="linear", features="cls+mean")
  features_fn = features_fn_for(())

  @nnx.jit
  def run(model, head, images, classes):
    out = {}
    for block in (-1, 0):
      grads, tokens = explain.token_gradients(model, head, images, classes, block=block,
                                              features_fn=features_fn)
      cam = explain.grad_cam(model, head, images, classes, block=block,
                             features_fn=features_fn)
      out[block] = (grads, tokens, cam)
    return out

  classes = jnp.array([0, 2])
  return head, features_fn, classes, run(encoder, head, IMAGES, classes)


def test_grad_cam_maps(linear_results):
  *_, results = linear_results
  for block, (_, _, cam) in results.items():
    cam = np.asarray(cam)
    assert cam.shape == (BATCH, 4, 4), block
    assert np.isfinite(cam).all() and (cam >= 0).all() and cam.max() > 0


def test_grad_cam_is_relu_of_gradient_weighted_patch_tokens(linear_results):
  *_, results = linear_results
  for grads, tokens, cam in results.values():
    grads, tokens = np.asarray(grads), np.asarray(tokens)
    assert grads.shape == tokens.shape == (BATCH, 1 + 16, 64)
    weights = grads[:, 1:].mean(axis=1)  # the class token is left out
    expected = np.maximum(np.einsum("bnd,bd->bn", tokens[:, 1:], weights), 0)
    np.testing.assert_allclose(np.asarray(cam).reshape(BATCH, 16), expected, rtol=1e-4,
                               atol=1e-6)


def test_token_gradient_matches_finite_differences(encoder, linear_results):
  head, features_fn, classes, results = linear_results
  grads = np.asarray(results[-1][0])

  @nnx.jit
  def chosen_logits(model, head, perturbation):
    features, _ = features_fn(model, IMAGES, {1: perturbation})
    return head(features)["logits"][jnp.arange(BATCH), classes]

  # The largest patch-token gradient of image 1 (image 0's logit must not move with it).
  flat = np.argmax(np.abs(grads[1, 1:]))
  token, channel = 1 + flat // 64, flat % 64
  eps = 1e-2
  step = np.zeros(grads.shape, np.float32)
  step[1, token, channel] = eps
  up, down = chosen_logits(encoder, head, step), chosen_logits(encoder, head, -step)
  finite_difference = (up - down) / (2 * eps)
  np.testing.assert_allclose(finite_difference[1], grads[1, token, channel], rtol=5e-3)
  assert abs(float(finite_difference[0])) < 1e-4 * abs(float(grads[1, token, channel])) + 1e-6


def test_class_logits_take_copy_zero():
  logits = jnp.arange(2 * BATCH * CLASSES, dtype=jnp.float32).reshape(2, BATCH, CLASSES)
  np.testing.assert_array_equal(explain.class_logits(logits), logits[0])
  np.testing.assert_array_equal(explain.class_logits(logits[1]), logits[1])


def test_glori_attention_and_grad_cam(encoder):
  cfg = dict(name="glori", dim=32, num_heads=2, num_blocks=2, mlp_dim=32)
  head = head_of(**cfg)
  features_fn = features_fn_for(heads.required_blocks(ml_collections.ConfigDict(cfg), 2))

  @nnx.jit
  def run(model, head, images):
    features, _ = features_fn(model, images, {1: jnp.zeros((BATCH, 17, 64))})
    maps = explain.glori_attention_maps(head(features))
    cam = explain.grad_cam(model, head, images, 1, block=-1, features_fn=features_fn)
    return maps, cam

  maps, cam = run(encoder, head, IMAGES)
  assert maps.shape == (BATCH, CLASSES, 4, 4)
  np.testing.assert_allclose(np.asarray(maps).sum((2, 3)), 1.0, rtol=1e-5)
  assert cam.shape == (BATCH, 4, 4) and np.isfinite(np.asarray(cam)).all()
  with pytest.raises(ValueError, match="no 'attention'"):
    explain.glori_attention_maps({"logits": jnp.zeros((BATCH, CLASSES))})
  with pytest.raises(ValueError, match="out of range"):
    explain.token_gradients(encoder, head, IMAGES, 0, block=2, features_fn=features_fn)


def test_upsample_nearest_keeps_patch_aligned_boxes_exact():
  grid = np.zeros((1, 4, 6), np.float32)
  grid[0, 1:3, 2:5] = 1.0  # rows 1-2, cols 2-4 of a 4x6 grid, patch 8
  pixels = np.asarray(explain.upsample_maps(jnp.asarray(grid), (32, 48), method="nearest"))
  box = np.zeros((1, 32, 48), np.float32)
  box[0, 8:24, 16:40] = 1.0
  np.testing.assert_array_equal(pixels, box)


def test_upsample_bilinear_centres_cells():
  # A ramp over rows: cell i holds i. Cell i's pixels [8i, 8i + 8) average back to i (the
  # cell centre sits at pixel 8i + 3.5); align_corners-style resizing would not.
  ramp = jnp.broadcast_to(jnp.arange(4.0)[:, None], (4, 4))[None]
  pixels = np.asarray(explain.upsample_maps(ramp, (32, 32)))
  cell_means = pixels[0].reshape(4, 8, 4, 8).mean(axis=(1, 3))
  np.testing.assert_allclose(cell_means[1:3], ramp[0, 1:3], atol=1e-6)  # interior cells
  np.testing.assert_allclose(pixels[0, 12:14, 0], [1.0 + 0.5 / 8, 1.0 + 1.5 / 8], atol=1e-6)
  assert pixels[0, 0, 0] == 0.0 and pixels[0, -1, 0] == 3.0  # edges hold, no overshoot
  constant = np.asarray(explain.upsample_maps(jnp.full((2, 4, 4), 0.25), (32, 32)))
  np.testing.assert_allclose(constant, 0.25, atol=1e-7)
  with pytest.raises(ValueError, match="method='bicubic'"):
    explain.upsample_maps(ramp, (32, 32), method="bicubic")
