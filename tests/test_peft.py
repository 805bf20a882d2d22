"""Tests for cxrjax.peft: partition/combine, BitFit and functional LoRA on a micro/8 ViT.

The encoder (width 64, depth 2, 2 heads, MLP 256) is built with nnx.eval_shape and filled
from numpy: its values do not matter here, and compiling random initialisers shape by
shape on CPU would take longer than the tests.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from cxrjax import config_blocks, models, peft
from cxrjax.config_lib import ConfigError

TARGETS = ("attn/q", "attn/proj", "mlp/fc1")


@pytest.fixture(scope="module")
def encoder():
  config = ml_collections.ConfigDict({"data": {"image_size": 32}})
  model_cfg = config_blocks.model_block(config, "micro/8", config_blocks.VIT, img_size=32,
                                        dtype="float32")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(model_cfg,
                                                                  rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0.0, 0.02, x.shape).astype(x.dtype),
                        nnx.to_pure_dict(state))
  return graphdef, params


def leaves_by_path(tree) -> dict:
  return {peft.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_path_str():
  tree = {"blocks": {0: {"attn": {"q": {"kernel": 1}}}}}
  (path, _), = jax.tree_util.tree_leaves_with_path(tree)
  assert peft.path_str(path) == "blocks/0/attn/q/kernel"
  assert peft.path_str(("blocks", 1, "norm1", "scale")) == "blocks/1/norm1/scale"


def test_bitfit_predicate():
  assert peft.bitfit_predicate("blocks/0/attn/q/bias")
  assert peft.bitfit_predicate("bias")
  assert not peft.bitfit_predicate("blocks/0/norm1/scale")
  assert not peft.bitfit_predicate("bias_head/kernel")


def test_partition_combine_round_trip(encoder):
  _, params = encoder
  biases, rest = peft.partition(params, peft.bitfit_predicate)
  everything, by_path = leaves_by_path(params), leaves_by_path(biases)
  assert by_path and all(path.endswith("/bias") for path in by_path)
  assert "blocks/1/mlp/fc2/bias" in by_path and "patch_embed/bias" in by_path
  rest_paths = set(leaves_by_path(rest))
  assert not rest_paths & set(by_path)  # every leaf exactly once
  assert rest_paths | set(by_path) == set(everything)
  assert "cls_token" in rest and "blocks" in rest  # branches keep their nesting
  merged = peft.combine(biases, rest)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert all(leaves_by_path(merged)[p] is x for p, x in everything.items())
  # Nothing selected: the selected tree is empty, not a tree of empty branches.
  assert peft.partition(params, lambda path: False) == ({}, params)
  with pytest.raises(ValueError, match=r"both trees hold 'blocks/0/attn/q/bias'"):
    peft.combine(params, {"blocks": {0: {"attn": {"q": {"bias": 0}}}}})


def test_lora_init_shapes(encoder):
  _, params = encoder
  lora = peft.lora_init(params, targets=TARGETS, rank=4, rng=jax.random.key(0))
  assert sorted(lora) == sorted(f"blocks/{i}/{name}/kernel" for i in (0, 1)
                                for name in ("attn/q", "attn/proj", "mlp/fc1"))
  # q [embed, heads, kv]: in = embed; proj [heads, kv, embed]: in = heads * kv; fc1 [in, out].
  expected = {"attn/q": (64, 64), "attn/proj": (64, 64), "mlp/fc1": (64, 256)}
  for path, adapter in lora.items():
    fan_in, fan_out = expected[path.split("/", 2)[2].rsplit("/", 1)[0]]
    assert adapter["a"].shape == (fan_in, 4) and adapter["b"].shape == (4, fan_out)
    assert adapter["a"].dtype == jnp.float32
    assert not np.any(adapter["b"])
    assert 0 < np.abs(adapter["a"]).max() <= 1 / np.sqrt(fan_in)  # kaiming-uniform(sqrt 5)
  # The default targets are LoRA's q and v; init also traces (finetune uses eval_shape).
  shapes = jax.eval_shape(lambda key: peft.lora_init(params, rng=key), jax.random.key(0))
  assert sorted(shapes) == ["blocks/0/attn/q/kernel", "blocks/0/attn/v/kernel",
                            "blocks/1/attn/q/kernel", "blocks/1/attn/v/kernel"]
  assert shapes["blocks/0/attn/v/kernel"]["a"].shape == (64, 8)


def test_lora_fresh_init_is_identity_and_scaling(encoder):
  _, params = encoder
  lora = peft.lora_init(params, targets=TARGETS, rank=4, rng=jax.random.key(0))
  applied = peft.lora_apply(params, lora, alpha=16.0, rank=4)
  base = leaves_by_path(params)
  for path, value in leaves_by_path(applied).items():
    np.testing.assert_array_equal(value, base[path])  # B = 0: exactly the base model
  # A nonzero B: W + (alpha / rank) A @ B, reshaped to W's layout.
  rng = np.random.default_rng(1)
  lora = {path: dict(adapter, b=rng.normal(size=adapter["b"].shape).astype(np.float32))
          for path, adapter in lora.items()}
  for alpha, rank in ((16.0, 4), (2.0, 4)):
    applied = leaves_by_path(peft.lora_apply(params, lora, alpha=alpha, rank=rank))
    for path, adapter in lora.items():
      delta = (alpha / rank) * (np.asarray(adapter["a"]) @ adapter["b"])
      np.testing.assert_allclose(applied[path] - base[path],
                                 delta.reshape(base[path].shape), rtol=1e-4, atol=1e-6)
  q = "blocks/0/attn/q/kernel"  # in = embed: row e of A feeds kernel[e, :, :]
  np.testing.assert_allclose(
      applied[q][5] - base[q][5],
      (0.5 * np.asarray(lora[q]["a"][5]) @ lora[q]["b"]).reshape(2, 32), rtol=1e-4, atol=1e-6)
  merged = peft.lora_merge(params, lora, alpha=2.0, rank=4)
  np.testing.assert_array_equal(leaves_by_path(merged)[q], applied[q])


def test_lora_gradients_leave_the_base_untouched(encoder):
  graphdef, params = encoder
  lora = peft.lora_init(params, targets=("attn/q", "attn/v"), rank=4, rng=jax.random.key(0))
  trainable, frozen = peft.partition({"encoder": params, "lora": lora},
                                     lambda path: path.startswith("lora/"))
  assert list(trainable) == ["lora"] and list(frozen) == ["encoder"]
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)

  @jax.jit
  def grads_of(trainable):
    def loss(trainable):
      full = peft.combine(trainable, frozen)
      weights = peft.lora_apply(full["encoder"], full["lora"], alpha=8.0, rank=4)
      return jnp.sum(jnp.sin(nnx.merge(graphdef, weights)(images)["cls"]))
    return jax.grad(loss)(trainable)

  grads = grads_of(trainable)
  assert list(grads) == ["lora"]
  for adapter in grads["lora"].values():
    assert np.abs(np.asarray(adapter["b"])).sum() > 0
    assert not np.any(np.asarray(adapter["a"]))  # B = 0 at init: no gradient reaches A yet
  opt = optax.sgd(0.1)
  updates, _ = opt.update(grads, opt.init(trainable))
  stepped = peft.combine(optax.apply_updates(trainable, updates), frozen)
  for path, value in leaves_by_path(stepped["encoder"]).items():
    assert value is leaves_by_path(params)[path]
  assert np.any(np.asarray(stepped["lora"]["blocks/0/attn/q/kernel"]["b"]))


def test_lora_errors(encoder):
  _, params = encoder
  key = jax.random.key(0)
  with pytest.raises(ConfigError, match=r"'attn/qkv' matches no kernel; kernel paths "
                                        r"include: .*blocks/0/attn/q/kernel"):
    peft.lora_init(params, targets=("attn/q", "attn/qkv"), rng=key)
  with pytest.raises(ConfigError, match="not a valid regex"):
    peft.lora_init(params, targets=("attn/(",), rng=key)
  with pytest.raises(ConfigError, match="rank=0"):
    peft.lora_init(params, rank=0, rng=key)
  with pytest.raises(ConfigError, match=r"'patch_embed/kernel' .*unknown layout"):
    peft.lora_init({"patch_embed": {"kernel": np.zeros((3, 3, 4, 8))}},
                   targets=("patch_embed",), rng=key)
  with pytest.raises(ConfigError, match=r"'attn/q/kernel' .*unknown layout"):
    peft.lora_init({"attn": {"q": {"kernel": np.zeros((4, 8))}}}, targets=("q",), rng=key)
  lora = peft.lora_init(params, rank=4, rng=key)
  with pytest.raises(ValueError, match="rank 4 .* rank=8"):
    peft.lora_apply(params, lora, alpha=1.0, rank=8)
  with pytest.raises(ValueError, match="match no parameter"):
    peft.lora_apply({"blocks": {}}, lora, alpha=1.0, rank=4)


def test_lora_adapters_save_with_orbax(encoder, tmp_path):
  _, params = encoder
  lora = peft.lora_init(params, rank=2, rng=jax.random.key(0))
  lora = jax.tree.map(lambda x: x + 1, lora)  # distinct values in every leaf
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "lora", {"lora": lora})
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"lora": lora})
  restored = checkpointer.restore(tmp_path / "lora", abstract)["lora"]
  assert sorted(restored) == sorted(lora)
  for path, adapter in lora.items():
    for name in ("a", "b"):
      np.testing.assert_array_equal(restored[path][name], adapter[name])
