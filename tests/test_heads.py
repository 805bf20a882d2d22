"""Tests for cxrjax.models.heads: linear probes, GLoRI and the segmentation decoder.

Heads read the feature dict of cxrjax/models/classifier.py, built here from a micro/8 ViT
(width 64, depth 2, 2 heads) on 32 px images: a 4x4 grid, one class token. The encoder is
built with nnx.eval_shape and filled from numpy, because on CPU compiling its random
initialisers shape by shape takes longer than every test here (its values do not matter);
the heads are built for real through heads.build (jitted: one compile instead of one per
parameter shape) from 'rbg' keys, whose random bits compile in a fraction of the time of
the default threefry ones (likewise for dropout masks); where a test only needs some head
of the right shapes, it is filled like the encoder.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cxrjax import config_blocks, models, parallel
from cxrjax.config_lib import ConfigError
from cxrjax.models import heads
from tests.tiny import filled

WIDTH, DEPTH, CLASSES, BATCH = 64, 2, 3, 2


def encoder_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({"data": {"image_size": 32}})
  return config_blocks.model_block(config, "micro/8", config_blocks.VIT, img_size=32,
                                   dtype="float32", **overrides)


def rbg_rngs(seed: int, stream: str = "params") -> nnx.Rngs:
  return nnx.Rngs(**{stream: jax.random.key(seed, impl="rbg")})


def head_config(**kwargs) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kwargs)


def make_head(seed: int = 1, **cfg) -> nnx.Module:
  return heads.build(head_config(**cfg), num_classes=CLASSES, width=WIDTH, depth=DEPTH,
                     rngs=rbg_rngs(seed))


def build_head(**cfg) -> nnx.Module:
  return nnx.jit(lambda: make_head(**cfg))()


@pytest.fixture(scope="module")
def all_features():
  """Features as the fine-tuning wrapper builds them, with every block (0, 1) in 'blocks'."""
  model = filled(lambda: models.build(encoder_config(return_blocks=(0, 1)),
                                      rngs=nnx.Rngs(0)))
  images = np.random.default_rng(0).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)

  def features(m, x):
    out = m(x)
    return dict(pooled=out["cls"], cls_token=out["cls_token"], patch=out["patch"],
                blocks=tuple(m.norm(b) for b in out["blocks"]))

  return dict(nnx.jit(features)(model, images), num_prefix_tokens=1, grid=(4, 4),
              image_hw=(32, 32))


def features_for(head_cfg: dict, features: dict, *, class_token: bool = True) -> dict:
  """The dict a head gets: only its required blocks. class_token=False drops the class
  token, so the one prefix token acts as a register (a model with registers, no cls)."""
  needed = heads.required_blocks(head_config(**head_cfg), DEPTH)
  feats = dict(features, blocks=tuple(features["blocks"][i] for i in needed))
  if not class_token:
    del feats["cls_token"]
  return feats


def run_head(head, features, *, train=False, rngs=None):
  """(output, grads of sum(sin(logits)) w.r.t. the head's params), jitted; the features are
  closed over so grid / num_prefix_tokens stay Python ints."""

  def loss(h, r):
    out = h(features, train=train, rngs=r)
    return jnp.sum(jnp.sin(out["logits"])), out

  step = nnx.jit(lambda h, r: nnx.value_and_grad(loss, has_aux=True)(h, r))
  (_, out), grads = step(head, rngs)
  return out, grads


def assert_finite_nonzero(grads):
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]  # numpy: no per-shape compiles
  assert leaves and all(np.isfinite(g).all() for g in leaves)
  assert sum(np.abs(g).sum() for g in leaves) > 0


def param_shapes(head) -> dict:
  return jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(nnx.state(head, nnx.Param)))


# ----------------------------------------------------------------------------
# Registry and config handling.
# ----------------------------------------------------------------------------


def test_registry_names_and_config_errors():
  assert {"linear", "glori", "segmentation"} <= set(heads.names())
  with pytest.raises(ConfigError, match=r"config.head.name='mlp'.*'glori'"):
    heads.required_blocks(head_config(name="mlp"), DEPTH)
  with pytest.raises(ConfigError, match=r"config.head.featurs='pooled' is not a key"):
    heads.required_blocks(head_config(name="linear", featurs="pooled"), DEPTH)
  with pytest.raises(ConfigError, match=r"config.head.features='cls' .*last4"):
    heads.required_blocks(head_config(name="linear", features="cls"), DEPTH)
  with pytest.raises(ConfigError, match=r"config.head.num_copies=0"):
    heads.required_blocks(head_config(name="linear", num_copies=0), DEPTH)
  with pytest.raises(ConfigError, match=r"num_classes=0"):
    heads.build(head_config(name="linear"), num_classes=0, width=WIDTH, depth=DEPTH,
                rngs=nnx.Rngs(0))
  # One config.head block carries the keys of every head; each reads its own.
  shared = dict(features="pooled", dropout=0.0, num_copies=1, dim=256, num_heads=8,
                num_blocks=4, use_cls=True, blocks=())
  assert heads.required_blocks(head_config(name="linear", **shared), 12) == ()
  assert heads.required_blocks(head_config(name="glori", **shared), 12) == (8, 9, 10, 11)
  assert heads.required_blocks(head_config(name="segmentation", **shared), 12) == (2, 5, 8, 11)


def test_required_blocks():
  def required(depth, **cfg):
    return heads.required_blocks(head_config(**cfg), depth)

  assert required(12, name="linear", features="pooled") == ()
  assert required(12, name="linear", features="last4") == (8, 9, 10, 11)
  assert required(2, name="linear", features="last4") == (0, 1)  # shallower than 4 blocks
  assert required(2, name="glori", num_blocks=2, dim=32, num_heads=2) == (0, 1)
  assert required(2, name="segmentation") == (0, 1)
  assert required(12, name="segmentation", blocks=(-1,)) == (11,)
  assert required(12, name="segmentation", blocks=(3, 5, 7, 11)) == (3, 5, 7, 11)


# ----------------------------------------------------------------------------
# Linear.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("features,in_dim", [
    ("pooled", WIDTH), ("cls_token", WIDTH), ("mean_patch", WIDTH), ("cls+mean", 2 * WIDTH),
    ("last4", 3 * WIDTH)])
def test_linear_head(all_features, features, in_dim):
  cfg = dict(name="linear", features=features)
  head = build_head(**cfg)
  assert param_shapes(head) == {"kernel": (1, in_dim, CLASSES), "bias": (1, CLASSES)}
  out, grads = run_head(head, features_for(cfg, all_features))
  assert out["logits"].shape == (BATCH, CLASSES)
  assert np.isfinite(np.asarray(out["logits"])).all()
  assert_finite_nonzero(grads)


def test_linear_inputs_layout(all_features):
  feats = features_for(dict(name="linear", features="last4"), all_features)
  b0, b1 = feats["blocks"]
  read = {name: heads.LINEAR_INPUTS[name].read for name in heads.LINEAR_INPUTS}
  # DINOv2 linear eval: class tokens of the last blocks, then the last block's mean patch.
  np.testing.assert_allclose(
      read["last4"](feats),
      jnp.concatenate([b0[:, 0], b1[:, 0], b1[:, 1:].mean(1)], -1), rtol=1e-6)
  np.testing.assert_allclose(
      read["cls+mean"](feats),
      jnp.concatenate([feats["cls_token"], feats["patch"].mean(1)], -1), rtol=1e-6)
  # Without a class token the prefix token is a register: skipped, mean patch tokens used.
  no_cls = features_for(dict(name="linear", features="last4"), all_features,
                        class_token=False)
  np.testing.assert_allclose(
      read["last4"](no_cls),
      jnp.concatenate([b0[:, 1:].mean(1), b1[:, 1:].mean(1), b1[:, 1:].mean(1)], -1),
      rtol=1e-6)
  with pytest.raises(ConfigError, match="class token"):
    read["cls_token"](no_cls)


def test_linear_copies_and_dropout(all_features):
  cfg = dict(name="linear", features="pooled", num_copies=3, dropout=0.5)
  head = build_head(**cfg)
  feats = features_for(cfg, all_features)
  assert head.kernel.shape == (3, WIDTH, CLASSES)
  logits = head(feats)["logits"]
  assert logits.shape == (3, BATCH, CLASSES)
  assert not np.allclose(logits[0], logits[1])  # independent copies
  # Copy k is an ordinary linear classifier with kernel[k], bias[k].
  np.testing.assert_allclose(logits[2], feats["pooled"] @ head.kernel[2] + head.bias[2],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="needs rngs"):
    head(feats, train=True)
  trained = head(feats, train=True, rngs=rbg_rngs(0, "dropout"))["logits"]
  assert trained.shape == logits.shape and not np.allclose(trained, logits)


# ----------------------------------------------------------------------------
# GLoRI.
# ----------------------------------------------------------------------------

GLORI = dict(name="glori", dim=32, num_heads=2, num_blocks=2, mlp_dim=48, dropout=0.1)


# (The class-token path with use_cls=True runs in test_param_shardings_on_a_mesh.)
@pytest.mark.parametrize("use_cls,class_token,train", [(True, False, True),
                                                       (False, True, False)])
def test_glori_head(all_features, use_cls, class_token, train):
  cfg = dict(GLORI, use_cls=use_cls)
  head = build_head(**cfg) if train else filled(lambda: make_head(**cfg))
  shapes = param_shapes(head)
  assert shapes["queries"] == (CLASSES, 32)
  assert shapes["embed_tokens"]["kernel"] == (2 * WIDTH, 32)  # 2 blocks' patch tokens
  assert shapes["q"]["kernel"] == (32, 2, 16) and shapes["out"]["kernel"] == (2, 16, 32)
  # CheXFound's cat_cls: the raw class tokens of the 2 blocks join each class's vector.
  assert shapes["class_kernel"] == (CLASSES, 32 + (2 * WIDTH if use_cls else 0))
  feats = features_for(cfg, all_features, class_token=class_token)
  out, grads = run_head(head, feats, train=train, rngs=rbg_rngs(0, "dropout"))
  assert out["logits"].shape == (BATCH, CLASSES)
  assert out["attention"].shape == (BATCH, CLASSES, 4, 4)
  np.testing.assert_allclose(out["attention"].sum((2, 3)), 1.0, rtol=1e-5)
  assert_finite_nonzero(grads)
  assert np.abs(np.asarray(grads["queries"][...])).sum() > 0
  with pytest.raises(ValueError, match="needs rngs"):  # traced only: nothing compiles
    nnx.eval_shape(lambda h: h(feats, train=True), head)


def test_glori_config_errors():
  for bad, message in [
      (dict(num_heads=5), r"config.head.num_heads=5 is invalid; expected a divisor of "
                          r"config.head.dim=32"),
      (dict(num_blocks=3), r"config.head.num_blocks=3 is invalid; expected at most the "
                           r"encoder depth 2"),
      (dict(use_cls="yes"), r"config.head.use_cls='yes'"),
      (dict(dropout=1.0), r"config.head.dropout=1.0"),
  ]:
    with pytest.raises(ConfigError, match=message):
      heads.required_blocks(head_config(**dict(GLORI, **bad)), DEPTH)


# ----------------------------------------------------------------------------
# Segmentation.
# ----------------------------------------------------------------------------

SEGMENTATION = dict(name="segmentation", dim=16, dropout=0.1)


def test_segmentation_head(all_features):
  head = build_head(**SEGMENTATION)
  shapes = param_shapes(head)
  assert shapes["proj"][0]["kernel"] == (WIDTH, 16)
  assert len(shapes["resample"][0]["convs"]) == 2 and len(shapes["resample"][1]["convs"]) == 1
  assert shapes["fuse"]["kernel"] == (3, 3, 4 * 16, 16)
  assert shapes["classifier"]["kernel"] == (1, 1, 16, CLASSES)
  out, grads = run_head(head, features_for(SEGMENTATION, all_features), train=True,
                        rngs=rbg_rngs(0, "dropout"))
  assert out["logits"].shape == (BATCH, 32, 32, CLASSES)
  assert np.isfinite(np.asarray(out["logits"])).all()
  assert_finite_nonzero(grads)


def test_segmentation_blocks():
  assert heads.default_pyramid_blocks(12) == (2, 5, 8, 11)
  assert heads.default_pyramid_blocks(24) == (5, 11, 17, 23)
  assert heads.default_pyramid_blocks(2) == (0, 0, 1, 1)
  assert heads.default_pyramid_blocks(1) == (0, 0, 0, 0)
  assert heads.pyramid_blocks((-1,), 12) == (11, 11, 11, 11)  # ViTDet: one block
  for bad in [(0, 1), (0, 1, 2, 12), ("a",)]:
    with pytest.raises(ConfigError, match=r"config.head.blocks="):
      heads.required_blocks(head_config(**dict(SEGMENTATION, blocks=bad)), 12)


# ----------------------------------------------------------------------------
# Sharding.
# ----------------------------------------------------------------------------


def test_param_shardings_on_a_mesh(all_features):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  specs = {}
  for cfg in (dict(name="linear", features="last4", num_copies=2),
              dict(GLORI, num_heads=4), SEGMENTATION):
    abstract = nnx.eval_shape(lambda cfg=cfg: make_head(**cfg))
    shardings = parallel.param_shardings(nnx.state(abstract, nnx.Param), mesh)
    specs[cfg["name"]] = jax.tree.map(lambda s: tuple(s.spec),
                                      nnx.to_pure_dict(shardings))
  assert specs["linear"]["kernel"] == (None, "fsdp", None)
  assert specs["glori"]["q"]["kernel"] == ("fsdp", "tensor", None)
  assert specs["glori"]["fc1"]["kernel"] == ("fsdp", "tensor")
  assert specs["segmentation"]["proj"][0]["kernel"] == ("fsdp", "tensor")
  # A head placed on those shardings runs.
  head = filled(lambda: make_head(**GLORI))
  state = nnx.state(head, nnx.Param)
  nnx.update(head, jax.device_put(state, parallel.param_shardings(state, mesh)))
  feats = features_for(GLORI, all_features)
  out = nnx.jit(lambda h: h(feats))(head)
  assert out["logits"].shape == (BATCH, CLASSES)
  assert np.isfinite(np.asarray(out["logits"])).all()
