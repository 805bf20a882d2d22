"""Preprocessing ops for the multi-view and masked objectives (DINOv2, MoCo v3 / CLIP, MAE).

Registered into `cxrjax.data.transforms` by import (the objectives import this module):

  multi_crop(global_size, local_size, num_local, ...)  -> global_crops [2, G, G, C],
                                                          local_crops [L, l, l, C]
  two_views(size, ...)                                 -> view1, view2 [S, S, C]
  ibot_mask(patch_size, ratio=(0.1, 0.5), prob=0.5)    -> ibot_mask [2, N] bool
  random_mask(ratio=0.75, patch_size=16)               -> mae_mask [N] bool
  tokenize_report(max_len=128)                         -> report [max_len] int32

The view ops start from the decoded grey radiograph (uint8 [H, W], as every source yields)
and make their own crops, so a config using them keeps `data.pp_train` free of crops and
normalisation. Augmentations follow DINOv2 / MoCo v3 (BYOL recipe): random resized crop
(bicubic), optional horizontal flip, brightness/contrast jitter with probability 0.8,
Gaussian blur (sigma 0.1-2), solarisation. Saturation, hue and random greyscale are left
out: they do nothing to a grey image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cxrjax.data import transforms



def _grey_uint8(image: np.ndarray) -> np.ndarray:
  """Any decoded image -> grey uint8 [H, W] (multi-channel CXRs are replicated grey)."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] in (1, 3):
    image = image[..., 0]
  if image.ndim != 2:
    raise ValueError(f"expected a grey image [H, W] or [H, W, 1|3], got {image.shape}")
  if image.dtype == np.uint8:
    return image
  if image.dtype == np.uint16:
    return (image >> 8).astype(np.uint8)
  if np.issubdtype(image.dtype, np.floating):
    if image.min() < -1e-3 or image.max() > 1 + 1e-3:
      raise ValueError("a float image for the view ops must hold [0, 1] intensities; put "
                       "them before normalize() (the view ops normalise themselves)")
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  raise ValueError(f"unsupported image dtype {image.dtype}")


@dataclasses.dataclass(frozen=True)
class ViewAugment:
  """One augmented view of a grey radiograph; returns float32 [size, size] in [0, 1]."""
  size: int
  scale: tuple[float, float]
  flip: float = 0.0
  jitter: float = 0.8          # probability of brightness/contrast jitter
  brightness: float = 0.4
  contrast: float = 0.4
  blur: float = 0.0            # probability of a Gaussian blur, sigma ~ U(0.1, 2.0)
  solarize: float = 0.0        # probability of solarisation at 128

  def __call__(self, grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = grey.shape
    y0, x0, h, w = transforms.sample_crop_box(rng, height, width, self.scale)
    img = Image.fromarray(grey).resize((self.size, self.size), Image.BICUBIC,
                                       box=(x0, y0, x0 + w, y0 + h))
    if rng.uniform() < self.flip:
      img = ImageOps.mirror(img)
    if rng.uniform() < self.jitter:
      # torchvision ColorJitter applies its adjustments in a random order.
      for which in rng.permutation(2):
        amount = self.brightness if which == 0 else self.contrast
        if amount > 0:
          factor = rng.uniform(max(0.0, 1 - amount), 1 + amount)
          enhancer = ImageEnhance.Brightness if which == 0 else ImageEnhance.Contrast
          img = enhancer(img).enhance(factor)
    if rng.uniform() < self.blur:
      img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.uniform() < self.solarize:
      img = ImageOps.solarize(img, threshold=128)
    return np.asarray(img, np.float32) / 255.0


def _normalizer(stats: str, channels: int):
  if stats not in transforms.NORMALIZATION:
    raise ValueError(f"stats={stats!r} is not one of {sorted(transforms.NORMALIZATION)}")
  mean, std = (np.asarray(v, np.float32) for v in transforms.NORMALIZATION[stats])
  if channels <= len(mean):
    mean, std = mean[:channels], std[:channels]
  else:
    mean, std = np.full(channels, mean[0], np.float32), np.full(channels, std[0], np.float32)

  def fn(view01: np.ndarray) -> np.ndarray:
    return ((view01[..., None] - mean) / std).astype(np.float32)
  return fn


def _probabilities(value, count: int, name: str) -> tuple[float, ...]:
  values = (value,) * count if isinstance(value, (int, float)) else tuple(value)
  if len(values) != count or not all(0.0 <= v <= 1.0 for v in values):
    raise ValueError(f"{name}={value!r} must be a probability or {count} probabilities")
  return values


@transforms.register("multi_crop", random=True)
def _multi_crop(global_size, local_size=96, num_local=8, global_scale=(0.32, 1.0),
                local_scale=(0.05, 0.32), flip=0.0, jitter=0.8, brightness=0.4, contrast=0.4,
                blur=(1.0, 0.1, 0.5), solarize=0.2, stats="evax", channels=3):
  """DINOv2 multi-crop (dinov2/data/augmentations.py DataAugmentationDINO).

  Two global crops (blur p=1.0 / 0.1, solarisation only on the second, p=0.2) and
  `num_local` local crops (blur p=0.5). `blur` = (global 1, global 2, local) probabilities.
  """
  if num_local < 0:
    raise ValueError(f"num_local={num_local} must be >= 0")
  blur_g1, blur_g2, blur_l = _probabilities(blur, 3, "blur")
  common = dict(flip=flip, jitter=jitter, brightness=brightness, contrast=contrast)
  global1 = ViewAugment(global_size, tuple(global_scale), blur=blur_g1, **common)
  global2 = ViewAugment(global_size, tuple(global_scale), blur=blur_g2,
                        solarize=solarize, **common)
  local = ViewAugment(local_size, tuple(local_scale), blur=blur_l, **common)
  finish = _normalizer(stats, channels)

  def fn(example, rng):
    grey = _grey_uint8(example["image"])
    globals_ = np.stack([finish(global1(grey, rng)), finish(global2(grey, rng))])
    locals_ = (np.stack([finish(local(grey, rng)) for _ in range(num_local)]) if num_local
               else np.zeros((0, local_size, local_size, channels), np.float32))
    return {**example, "global_crops": globals_, "local_crops": locals_}
  return fn


@transforms.register("two_views", random=True)
def _two_views(size, scale=(0.08, 1.0), flip=0.0, jitter=0.8, brightness=0.4, contrast=0.4,
               blur=(1.0, 0.1), solarize=(0.0, 0.2), stats="evax", channels=3):
  """MoCo v3's two asymmetric views (BYOL recipe; moco-v3 main_moco.py augmentation1/2)."""
  blur1, blur2 = _probabilities(blur, 2, "blur")
  sol1, sol2 = _probabilities(solarize, 2, "solarize")
  common = dict(flip=flip, jitter=jitter, brightness=brightness, contrast=contrast)
  first = ViewAugment(size, tuple(scale), blur=blur1, solarize=sol1, **common)
  second = ViewAugment(size, tuple(scale), blur=blur2, solarize=sol2, **common)
  finish = _normalizer(stats, channels)

  def fn(example, rng):
    grey = _grey_uint8(example["image"])
    return {**example, "view1": finish(first(grey, rng)), "view2": finish(second(grey, rng))}
  return fn


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


@transforms.register("ibot_mask", random=True)
def _ibot_mask(patch_size, ratio=(0.1, 0.5), prob=0.5, min_block=4, key="global_crops"):
  """iBOT masks for each global crop: `ibot_mask` [num_global, N] bool.

  Each crop is masked with probability `prob`, a fraction ~ U(ratio) of its patches in
  BEiT-style blocks of >= `min_block` patches, at most half the grid per block (dinov2
  MaskingGenerator(min_num_patches=4, max_num_patches=0.5 * N), ssl_default_config
  mask_sample_probability 0.5, mask_ratio_min_max (0.1, 0.5)). dinov2 draws these per batch
  (exactly half the crops masked, ratios stratified over linspace(0.1, 0.5)); drawing per
  crop has the same distribution per crop and keeps the pipeline per-example.
  """
  lo, hi = ratio
  if not 0.0 <= lo <= hi < 1.0 or not 0.0 <= prob <= 1.0:
    raise ValueError(f"ibot_mask: ratio={ratio} must satisfy 0 <= lo <= hi < 1 and "
                     f"prob={prob} must be in [0, 1]")

  def fn(example, rng):
    crops = example[key]
    grid = (crops.shape[1] // patch_size, crops.shape[2] // patch_size)
    n = grid[0] * grid[1]
    masks = np.zeros((crops.shape[0], n), bool)
    for i in range(crops.shape[0]):
      if rng.uniform() < prob:
        count = int(n * rng.uniform(lo, hi))
        if count > 0:
          masks[i] = transforms.block_mask(rng, grid, count, min_block=min_block,
                                           max_block=max(min_block, n // 2))
    return {**example, "ibot_mask": masks}
  return fn


def mae_num_visible(num_patches: int, ratio: float) -> int:
  """MAE random_masking: len_keep = int(L * (1 - mask_ratio))."""
  return int(num_patches * (1 - ratio))


@transforms.register("random_mask", random=True)
def _random_mask(ratio=0.75, patch_size=16):
  """MAE's uniform random mask: `mae_mask` [N] bool, exactly N - int(N * (1 - ratio)) True.

  A fixed count per image keeps the encoder's visible-token sequence a static shape.
  """
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"random_mask: ratio={ratio} must be in (0, 1)")

  def fn(example, rng):
    h, w = example["image"].shape[:2]
    n = (h // patch_size) * (w // patch_size)
    mask = np.ones(n, bool)
    mask[rng.permutation(n)[:mae_num_visible(n, ratio)]] = False
    return {**example, "mae_mask": mask}
  return fn


# ----------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------


class ByteTokenizer:
  """UTF-8 byte tokenizer for radiology reports: id 0 pads, byte b is id b + 1.

  No vocabulary file to ship or version: every text encodes, and the 257-entry embedding
  is tiny. Reports are lower-cased by default (casing carries no finding).
  """
  PAD = 0
  vocab_size = 257

  def __init__(self, max_len: int = 128, lowercase: bool = True):
    if max_len <= 0:
      raise ValueError(f"max_len={max_len} must be positive")
    self.max_len, self.lowercase = max_len, lowercase

  def encode(self, text) -> np.ndarray:
    if isinstance(text, np.ndarray) and text.dtype.kind in "iu":
      ids = text.astype(np.int64).reshape(-1)
      if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
        raise ValueError(f"report token ids must be in [0, {self.vocab_size}), got "
                         f"[{ids.min()}, {ids.max()}]")
    else:
      if isinstance(text, (bytes, np.bytes_)):
        text = bytes(text).decode("utf-8", errors="replace")
      text = " ".join(str(text).split())
      if self.lowercase:
        text = text.lower()
      ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + 1
    out = np.zeros(self.max_len, np.int32)
    ids = ids[:self.max_len]
    out[:len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if i > 0]
    return bytes(i - 1 for i in ids).decode("utf-8", errors="replace")


@transforms.register("tokenize_report")
def _tokenize_report(max_len=128, lowercase=True):
  """`report` (text, bytes or token ids) -> int32 [max_len] ids (0 = padding)."""
  tokenizer = ByteTokenizer(max_len, lowercase)

  def fn(example):
    if "report" not in example:
      raise KeyError(f"tokenize_report: the example has no 'report' (has {sorted(example)})")
    return {**example, "report": tokenizer.encode(example["report"])}
  return fn
