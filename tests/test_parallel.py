"""Mesh construction, the logical-axis table, and sharded == unsharded training."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cxrjax import main, models, parallel
from cxrjax.config_lib import ConfigError
from tiny import tiny_pretrain_config


def test_mesh_shape_fill_and_errors():
  assert parallel.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  assert parallel.mesh_shape(dict(data=2, fsdp=-1, tensor=1), 8) == (2, 4, 1)
  with pytest.raises(ConfigError, match="needs 6 devices, but 8"):
    parallel.mesh_shape(dict(data=2, fsdp=3, tensor=1), 8)
  with pytest.raises(ConfigError, match="at most one may be -1"):
    parallel.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ConfigError, match="not divisible"):
    parallel.mesh_shape(dict(data=3, fsdp=-1, tensor=1), 8)


def test_logical_rules_map_and_fall_back_to_replication():
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, tensor=4))
  assert parallel.logical_to_mesh_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  # 3 heads (ViT-Ti) cannot split over tensor=4: replicated rather than failing.
  assert parallel.logical_to_mesh_spec(("embed", "heads", "kv"), (192, 3, 64), mesh) == P(
      "fsdp", None, None)
  with pytest.raises(KeyError, match="no rule"):
    parallel.logical_to_mesh_spec(("nonsense",), (4,), mesh)


def test_params_are_sharded_by_the_table():
  cfg = tiny_pretrain_config().model  # width 64, 2 heads, SwiGLU hidden 170
  mesh = parallel.make_mesh(dict(data=1, fsdp=4, tensor=2))
  abstract = nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0)))
  shardings = parallel.param_shardings(nnx.state(abstract, nnx.Param), mesh)
  specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(shardings))}
  fc1 = [s for k, s in specs.items() if "mlp" in k and "kernel" in k]
  assert fc1 and all("tensor" in tuple(s) for s in fc1), specs
  assert any(tuple(s)[:1] == ("fsdp",) for s in specs.values())
  heads = [s for k, s in specs.items() if "['attn']['q']['kernel']" in k]
  assert heads and all(tuple(s) == ("fsdp", "tensor", None) for s in heads), heads


def _step_losses(workdir, **mesh_cfg):
  full = dict(data=1, fsdp=1, tensor=1, num_devices=0) | mesh_cfg
  config = tiny_pretrain_config(*[f"--config.mesh.{k}={v}" for k, v in full.items()],
                                "--config.total_steps=3", "--config.model.dtype=float32")
  main.train(config, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(l)["loss"] for l in f if '"loss"' in l]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
  return _step_losses(tmp_path_factory.mktemp("one"), num_devices=1)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4), dict(data=8, fsdp=1),
                                  dict(data=2, fsdp=1, tensor=4)])
def test_sharded_training_matches_one_device(tmp_path, mesh, one_device_losses):
  """Same init, same batches: the losses of 3 steps on a mesh equal those on 1 device.

  float32 compute; tolerance rtol=2e-5 for reductions summed in a different order.
  """
  assert len(one_device_losses) == 3
  np.testing.assert_allclose(_step_losses(tmp_path, **mesh), one_device_losses, rtol=2e-5)
