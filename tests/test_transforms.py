"""Preprocessing ops: parsing, geometry bookkeeping and MIM masks."""

import numpy as np
import pytest

from cxrjax.config_lib import ConfigError
from cxrjax.data import transforms


def example(size=64):
  rng = np.random.default_rng(0)
  boxes = np.full((4, 5), -1, np.float32)
  boxes[0] = (2, 16, 16, 32, 40)
  return {"image": rng.integers(0, 255, (size, size), dtype=np.uint8),
          "seg": (rng.uniform(size=(size, size)) > 0.5).astype(np.uint8), "boxes": boxes}


def test_parse_errors_name_the_op():
  with pytest.raises(ConfigError, match="unknown preprocessing op 'rezise'.*resize"):
    transforms.parse("rezise(64)")
  with pytest.raises(ConfigError, match="arguments must be literals"):
    transforms.parse("resize(size)")
  with pytest.raises(ConfigError, match=r"resize\(1, 2, 3\)"):
    transforms.parse("resize(1, 2, 3)")


def test_pipeline_shapes_and_normalisation():
  pp = transforms.Preprocess("resize(32)|to_channels(3)|normalize('evax')")
  out = pp(example(), np.random.default_rng(0))
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
  raw = example()["image"].astype(np.float32) / 255
  assert abs(out["image"].mean() - (raw.mean() - 0.4919) / 0.2851) < 0.05
  assert out["seg"].shape == (32, 32)
  np.testing.assert_allclose(out["boxes"][0], (2, 8, 8, 16, 20))
  assert (out["boxes"][1:] == -1).all()


def test_random_ops_are_deterministic_for_a_generator():
  pp = transforms.Preprocess("random_resized_crop(32)|flip_lr(0.5)|block_mask(0.4, patch_size=4)")
  a = pp(example(), np.random.default_rng(7))
  b = pp(example(), np.random.default_rng(7))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_flip_moves_boxes_with_the_image():
  out = transforms.Preprocess("flip_lr(1.0)")(example(), np.random.default_rng(0))
  np.testing.assert_allclose(out["boxes"][0], (2, 64 - 32, 16, 64 - 16, 40))
  np.testing.assert_array_equal(out["image"], example()["image"][:, ::-1])


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.4), ((8, 8), 0.4), ((4, 4), 0.5)])
def test_block_mask_has_exact_count_and_blocks(grid, ratio):
  rng = np.random.default_rng(0)
  num = int(round(ratio * grid[0] * grid[1]))
  for _ in range(20):
    mask = transforms.block_mask(rng, grid, num, min_block=max(1, grid[0] * grid[1] // 12))
    assert mask.dtype == bool and mask.sum() == num
  if grid == (14, 14):  # block-wise: most masked patches have a masked 4-neighbour
    m = mask.reshape(grid)
    neighbours = np.zeros_like(m)
    neighbours[1:] |= m[:-1]; neighbours[:-1] |= m[1:]
    neighbours[:, 1:] |= m[:, :-1]; neighbours[:, :-1] |= m[:, 1:]
    assert (m & neighbours).sum() / m.sum() > 0.8
