"""Tests for cxrjax.models: the configurable ViT, its layers and the registry.

Forward passes use tiny models (width 64, depth 2, 2 heads, 32-64 px); parameter counts of
full-size models use nnx.eval_shape, so nothing is allocated.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cxrjax import models
from cxrjax.models import layers

ALLOWED_AXES = {"embed", "mlp", "heads", "kv", "patch", None}

# EVA-02 / EVA-X blocks (hustvl/EVA-X eva_x.py); B adds sub_ln (timm scale_mlp=True).
EVA = dict(mlp="swiglu", rope=True, qkv_bias="qv", pool="mean", fc_norm=True)


def model_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
      name="vit", variant="B/16", img_size=224, in_chans=3, mlp="gelu", mlp_ratio=None,
      sub_ln=False, rope=False, qkv_bias=True, class_token=True, num_registers=0,
      pos_embed="learned", layerscale_init=0.0, pool="cls", fc_norm=False,
      drop_path_rate=0.0, dtype="float32", mask_token=False, return_blocks=(),
      norm_eps=1e-6)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# Tiny-model settings; tests reuse these (same parameter shapes) because on CPU most of
# their time is compiling initialisers and ops once per distinct shape.
STANDARD = dict(return_blocks=(-1, 0))
EVA_ALL = dict(EVA, sub_ln=True, num_registers=2, mask_token=True, return_blocks=(-1,))


def tiny(**kwargs) -> models.VisionTransformer:
  kwargs = dict(width=64, depth=2, num_heads=2, patch_size=8, img_size=32) | kwargs
  return models.VisionTransformer(**kwargs, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def standard():
  return tiny(**STANDARD)


@pytest.fixture(scope="module")
def eva():
  return tiny(**EVA_ALL)


def images(batch=2, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


@functools.partial(nnx.jit, static_argnames="train")
def forward(model, x, mask=None, train=False, rngs=None):
  """The model's call, compiled whole: far cheaper on CPU than op-by-op first calls."""
  return model(x, mask=mask, train=train, rngs=rngs)


# One compiled function instead of op-by-op dispatch (each op compiles once on first use).
apply_rope = jax.jit(layers.apply_rope, static_argnums=3)


def num_params(model_cfg) -> int:
  abstract = nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ----------------------------------------------------------------------------
# Forward pass: shapes and dtypes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, prefix", [
    (STANDARD, 1),
    (EVA_ALL, 3),
    (dict(class_token=False, pool="mean", pos_embed="sincos", layerscale_init=1e-5), 0),
], ids=["standard", "eva02-registers", "no-cls-sincos-layerscale"])
def test_forward_shapes(kwargs, prefix, request):
  model = {1: "standard", 3: "eva"}.get(prefix)
  model = request.getfixturevalue(model) if model else tiny(**kwargs)
  assert model.num_prefix_tokens == prefix
  out = forward(model, images())
  assert out["cls"].shape == (2, 64)
  assert out["patch"].shape == (2, 16, 64)
  assert len(out["blocks"]) == len(kwargs.get("return_blocks", ()))
  for block in out["blocks"]:
    assert block.shape == (2, prefix + 16, 64)
  assert ("cls_token" in out) == kwargs.get("class_token", True)
  if "num_registers" in kwargs:
    assert out["registers"].shape == (2, 2, 64)
  else:
    assert "registers" not in out
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(leaf))


def run_blocks(model, x):
  outputs = []
  for block in model.blocks:
    x = block(x)
    outputs.append(x)
  return outputs


def test_return_blocks_are_raw_block_outputs_in_order(standard):
  out = forward(standard, images())
  raw = run_blocks(standard, standard.embed(images())[0])
  assert standard.return_blocks == (1, 0)
  np.testing.assert_allclose(out["blocks"][0], raw[1], atol=1e-5)
  np.testing.assert_allclose(out["blocks"][1], raw[0], atol=1e-5)


def test_pooling_conventions(standard):
  # pool='cls': the cls token after the final norm.
  assert standard.fc_norm is None
  out = forward(standard, images())
  np.testing.assert_array_equal(out["cls"], out["cls_token"])
  # pool='mean' + fc_norm (EVA): no final norm; LayerNorm after mean pooling, and 'patch'
  # is fc_norm per token.
  model = tiny(pool="mean", fc_norm=True)
  assert model.norm is None
  out = forward(model, images())
  x = run_blocks(model, model.embed(images())[0])[-1]
  np.testing.assert_allclose(out["cls"], model.fc_norm(x[:, 1:].mean(axis=1)), atol=1e-5)
  np.testing.assert_allclose(out["patch"], model.fc_norm(x[:, 1:]), atol=1e-5)


# ----------------------------------------------------------------------------
# Parameter counts (nothing allocated).
# ----------------------------------------------------------------------------

# Exact counts (no classifier head). The published EVA-02/EVA-X sizes 6M / 22M / 86M are
# rounded to whole millions, so the tolerance is that rounding: +-0.5M. (Ti is 7.9% below
# "6M": timm lists eva02_tiny_patch14_224 as 5.5M.)
EVA_X_COUNTS = [
    ("Ti/16", False, 5_525_184, 6e6),
    ("S/16", False, 21_667_200, 22e6),
    ("B/16", True, 85_850_880, 86e6),
]


@pytest.mark.parametrize("variant, sub_ln, exact, published", EVA_X_COUNTS,
                         ids=[f"EVA-X-{v}={n:,}" for v, _, n, _ in EVA_X_COUNTS])
def test_eva_x_param_counts(variant, sub_ln, exact, published):
  count = num_params(model_config(variant=variant, sub_ln=sub_ln, **EVA))
  assert abs(count - published) <= 0.5e6
  assert count == exact


def test_vit_b16_param_count_matches_timm():
  # timm vit_base_patch16_224: 86,567,656 with the 1000-class head, 85,798,656 without.
  assert num_params(model_config()) == 85_798_656


# ----------------------------------------------------------------------------
# Position encodings.
# ----------------------------------------------------------------------------


def test_rope_depends_only_on_relative_position():
  grid, head_dim = (5, 6), 16
  sin, cos = layers.rope_sin_cos(grid, grid, head_dim)
  q, k = jax.random.normal(jax.random.key(0), (2, head_dim))

  def rotated(v):
    tokens = jnp.broadcast_to(v, (1, grid[0] * grid[1], 1, head_dim))
    return np.asarray(apply_rope(tokens, sin, cos, 0)[0, :, 0]).reshape(*grid, head_dim)

  rq, rk = rotated(q), rotated(k)
  row = rq[2] @ rk[2].T  # scores along a 1-D slice: one row
  col = rq[:, 3] @ rk[:, 3].T  # and one column
  for scores in (row, col):
    n = scores.shape[0]
    for offset in range(-n + 1, n):
      diagonal = np.diagonal(scores, offset)
      np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-5, atol=1e-5)
  # The two axes use different channels: moving along rows is not moving along columns.
  assert not np.allclose(rq[1, 0], rq[0, 1])


def test_rope_matches_eva02_reference():
  # numpy transcription of EVA-02/EVA-X rope.py VisionRotaryEmbeddingFast(dim=head_dim // 2,
  # pt_seq_len, ft_seq_len) with `rotate_half` over interleaved pairs.
  head_dim, pt, ft = 16, 4, 6
  dim = head_dim // 2
  freqs = 1.0 / (10000 ** (np.arange(0, dim, 2)[: dim // 2] / dim))
  t = np.arange(ft) / ft * pt
  f = np.repeat(np.einsum("i,f->if", t, freqs), 2, axis=-1)
  f = np.concatenate([np.broadcast_to(f[:, None], (ft, ft, dim)),
                      np.broadcast_to(f[None, :], (ft, ft, dim))], -1).reshape(-1, head_dim)
  x = np.random.default_rng(0).normal(size=(1, ft * ft, 1, head_dim))
  half = x.reshape(*x.shape[:-1], -1, 2)
  rot = np.stack([-half[..., 1], half[..., 0]], -1).reshape(x.shape)
  expected = x * np.cos(f)[:, None] + rot * np.sin(f)[:, None]

  sin, cos = layers.rope_sin_cos((ft, ft), (pt, pt), head_dim)
  np.testing.assert_allclose(apply_rope(x.astype(np.float32), sin, cos, 0), expected,
                             atol=1e-5)


def test_rope_leaves_prefix_tokens_alone():
  sin, cos = layers.rope_sin_cos((2, 2), (2, 2), 8)
  x = np.random.default_rng(0).normal(size=(1, 3 + 4, 2, 8)).astype(np.float32)
  y = np.asarray(apply_rope(x, sin, cos, 3))
  np.testing.assert_array_equal(y[:, :3], x[:, :3])
  np.testing.assert_allclose(y[:, 3], x[:, 3], atol=1e-6)  # grid position (0, 0): angle 0
  assert not np.allclose(y[:, 4:], x[:, 4:])


def test_pos_embed_interpolation(eva, standard):
  out = forward(eva, images(size=64))  # trained at 32 px: 4x4 grid -> 8x8
  assert out["patch"].shape == (2, 64, 64)
  assert jnp.all(jnp.isfinite(out["cls"]))
  # Same grid: the resampling is the identity (the array itself is returned).
  pos = eva.pos_embed[...][:, 1:]
  assert layers.resample_pos_embed(pos, (4, 4), (4, 4)) is pos
  # Bicubic resizing keeps a constant field constant.
  const = jnp.full((1, 16, 8), 0.3)
  np.testing.assert_allclose(layers.resample_pos_embed(const, (4, 4), (8, 6)), 0.3,
                             atol=1e-6)
  # At the training size the embedding adds exactly the stored table.
  model = standard
  x, grid = model.embed(images())
  patches = model.patch_embed(images().reshape(2, 4, 8, 4, 8, 3)
                              .transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 192))
  assert grid == (4, 4)
  np.testing.assert_allclose(x[:, 1:] - patches, jnp.broadcast_to(
      model.pos_embed[...][:, 1:], (2, 16, 64)), atol=1e-5)


# ----------------------------------------------------------------------------
# Masked image modelling, stochastic depth, precision.
# ----------------------------------------------------------------------------


def test_mask_token_replaces_exactly_the_masked_patches(eva, standard):
  model = eva
  mask = jax.random.bernoulli(jax.random.key(1), 0.4, (2, 16))
  plain, _ = model.embed(images())
  masked, _ = model.embed(images(), mask)
  prefix = model.num_prefix_tokens
  np.testing.assert_array_equal(masked[:, :prefix], plain[:, :prefix])
  changed = jnp.any(masked[:, prefix:] != plain[:, prefix:], axis=-1)
  np.testing.assert_array_equal(changed, mask)
  expected = model.mask_token[...][0, 0] + model.pos_embed[...][0, 1:]
  np.testing.assert_allclose(masked[:, prefix:][mask],
                             jnp.broadcast_to(expected, (2, 16, 64))[mask], atol=1e-6)
  with pytest.raises(ValueError, match="mask_token"):
    standard(images(), mask=mask)


def test_drop_path():
  model = tiny(drop_path_rate=0.5)
  x = images(batch=4)  # 4 samples x 2 branches: seeds 0 and 1 drop different ones
  eval_a, eval_b = forward(model, x)["cls"], forward(model, x)["cls"]
  np.testing.assert_array_equal(eval_a, eval_b)
  train_0 = forward(model, x, train=True, rngs=nnx.Rngs(dropout=0))["cls"]
  train_0_again = forward(model, x, train=True, rngs=nnx.Rngs(dropout=0))["cls"]
  train_1 = forward(model, x, train=True, rngs=nnx.Rngs(dropout=1))["cls"]
  np.testing.assert_array_equal(train_0, train_0_again)
  assert not jnp.allclose(train_0, train_1)
  with pytest.raises(ValueError, match="rngs"):
    model(x, train=True)
  # Without drop path, training needs no rngs (traced only: nothing to compute).
  nnx.eval_shape(lambda m: m(x, train=True), tiny())


def test_drop_path_schedule_linear_or_uniform():
  linear = nnx.eval_shape(lambda: tiny(drop_path_rate=0.4))
  uniform = nnx.eval_shape(lambda: tiny(drop_path_rate=0.4, drop_path_uniform=True))
  depth = len(linear.blocks)
  np.testing.assert_allclose([b.drop_path for b in linear.blocks],
                             np.linspace(0.0, 0.4, depth))
  assert [b.drop_path for b in uniform.blocks] == [0.4] * depth


def test_jitted_train_forward_is_a_pure_function_of_params_batch_key():
  graphdef, params = nnx.split(tiny(**EVA_ALL, drop_path_rate=0.2))

  @jax.jit
  def forward(params, batch, key):
    model = nnx.merge(graphdef, params)
    return model(batch, train=True, rngs=nnx.Rngs(dropout=key))["cls"]

  a = forward(params, images(), jax.random.key(0))
  np.testing.assert_array_equal(a, forward(params, images(), jax.random.key(0)))
  assert a.shape == (2, 64)


def test_bfloat16_compute(monkeypatch):
  seen = []
  attention = jax.nn.dot_product_attention

  def recording_attention(q, k, v, *args, **kwargs):
    seen.append((q.dtype, k.dtype, v.dtype))
    return attention(q, k, v, *args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording_attention)
  model = tiny(**EVA_ALL, dtype="bfloat16")
  for param in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert param.dtype == jnp.float32
  out = nnx.eval_shape(lambda m: m(images()), model)  # traces the call, computes nothing
  assert seen == [(jnp.bfloat16,) * 3] * 2
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.float32


# ----------------------------------------------------------------------------
# Sharding annotations, config validation, registry.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    STANDARD, dict(EVA_ALL, layerscale_init=1e-5),
], ids=["standard", "eva02-all-options"])
def test_every_param_has_logical_axis_names(kwargs):
  state = nnx.state(nnx.eval_shape(lambda: tiny(**kwargs)), nnx.Param)
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
  params = dict(nnx.to_flat_state(state))
  assert specs.keys() == params.keys()
  for path, param in params.items():
    names = param.get_metadata().get("out_sharding")
    assert names is not None, path
    assert len(names) == len(param.shape), path
    assert set(names) <= ALLOWED_AXES, path
    assert tuple(specs[path].get_value()) == tuple(names), path


@pytest.mark.parametrize("overrides, key", [
    (dict(img_size=100), "model.img_size"),
    (dict(mlp="relu"), "model.mlp"),
    (dict(pool="avg"), "model.pool"),
    (dict(pos_embed="rope"), "model.pos_embed"),
    (dict(pool="cls", class_token=False), "model.pool"),
    (dict(qkv_bias="kv"), "model.qkv_bias"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(variant="H/16"), "model.variant"),
    (dict(return_blocks=(12,)), "model.return_blocks"),
    (dict(name="resnet"), "model.name"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_config_names_the_key(overrides, key):
  with pytest.raises(ValueError, match=key) as error:
    models.build(model_config(**overrides), rngs=nnx.Rngs(0))
  message = str(error.value)
  value = next(iter(overrides.values())) if len(overrides) == 1 else "cls"
  assert repr(value) in message or str(value) in message
  if key in ("model.mlp", "model.pool", "model.pos_embed", "model.name"):
    assert "valid choices" in message


def test_missing_config_key():
  cfg = model_config()
  del cfg["norm_eps"]
  with pytest.raises(ValueError, match="model.norm_eps"):
    models.build(cfg, rngs=nnx.Rngs(0))


def test_registry_and_attributes(standard):
  # models.build itself is exercised by the parameter-count and invalid-config tests.
  assert "vit" in models.names()
  assert set(models.VARIANTS) == {"micro", "nano", "Ti", "S", "B", "L", "g"}
  assert (standard.width, standard.patch_size, standard.num_prefix_tokens) == (64, 8, 1)
  assert standard.grid_size((48, 64)) == (6, 8)
  with pytest.raises(ValueError, match="patch size 8"):
    standard.grid_size((30, 32))
