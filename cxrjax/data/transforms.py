"""Preprocessing ops, registered by name and composed from a big_vision-style string.

A pipeline string such as
    'random_resized_crop(64, scale=(0.5, 1.0))|to_channels(3)|normalize("evax")|block_mask(0.4)'
is parsed into a list of ops; each op maps an example dict (NumPy arrays) to a new one.
Random ops receive the `np.random.Generator` that Grain derives from the pipeline seed and
the element index, so augmentation is deterministic and resumable.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
from typing import Any, Callable

import numpy as np
from PIL import Image

from cxrjax.config_lib import ConfigError

# Normalisation statistics (on [0, 1] intensities). EVA-X normalises CXRs with a single
# grey-level mean/std computed on its pretraining set.
NORMALIZATION = {
    "evax": ((0.4919,) * 3, (0.2851,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0,) * 3, (1.0,) * 3),
}


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  fn: Callable[..., dict]
  random: bool  # True: called as fn(example, rng)


_OPS: dict[str, tuple[Callable[..., Callable], bool]] = {}


def register(name: str, *, random: bool = False):
  """Registers an op factory: factory(*args, **kwargs) -> fn(example[, rng])."""
  def wrap(factory):
    _OPS[name] = (factory, random)
    return factory
  return wrap


def names() -> list[str]:
  return sorted(_OPS)


def parse(spec: str) -> list[Op]:
  """Parses 'op1(args)|op2|...' into ops; unknown names and bad args fail with the op named."""
  ops = []
  for part in (p.strip() for p in spec.split("|")):
    if not part:
      continue
    try:
      call = ast.parse(part if "(" in part else part + "()", mode="eval").body
    except SyntaxError as e:
      raise ConfigError(f"cannot parse preprocessing op {part!r} in {spec!r}: {e.msg}")
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
      raise ConfigError(f"preprocessing op {part!r} must look like name(arg, key=value)")
    name = call.func.id
    if name not in _OPS:
      raise ConfigError(f"unknown preprocessing op {name!r} in {spec!r}; "
                        f"registered ops: {', '.join(names())}")
    try:
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError:
      raise ConfigError(f"preprocessing op {part!r}: arguments must be literals")
    factory, random = _OPS[name]
    try:
      ops.append(Op(name, factory(*args, **kwargs), random))
    except TypeError as e:
      raise ConfigError(f"preprocessing op {part!r}: {e}")
  return ops


class Preprocess:
  """A picklable callable applying parsed ops; use with grain's `random_map`."""

  def __init__(self, spec: str):
    self.spec = spec
    self.ops = parse(spec)

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    for op in self.ops:
      example = op.fn(example, rng) if op.random else op.fn(example)
    return example

  def __getstate__(self):
    # Ops registered by other modules (e.g. multiview.py) must be registered again in a
    # spawned Grain worker before the spec is parsed there.
    modules = sorted({_OPS[op.name][0].__module__ for op in self.ops} - {__name__})
    return {"spec": self.spec, "modules": modules}

  def __setstate__(self, state):
    for module in state.get("modules", ()):
      importlib.import_module(module)
    self.__init__(state["spec"])

  def __repr__(self):
    return f"Preprocess({self.spec!r})"


# ----------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------


def _resize_array(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
  h, w = size
  if array.shape[:2] == (h, w):
    return array
  if array.dtype == np.uint8:
    squeeze = array.ndim == 3 and array.shape[2] == 1
    img = Image.fromarray(array[..., 0] if squeeze else array)
    out = np.asarray(img.resize((w, h), resample))
    return out[..., None] if squeeze else out
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(c, np.float32)).resize(
      (w, h), resample)) for c in np.moveaxis(np.atleast_3d(array), -1, 0)]
  out = np.stack(channels, -1)
  return out if array.ndim == 3 else out[..., 0]


def _size2(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _crop_resize(example: dict, box: tuple[int, int, int, int], size) -> dict:
  """Crops image (and seg/boxes when present) to box=(y0, x0, h, w), then resizes."""
  y0, x0, h, w = box
  out_h, out_w = _size2(size)
  example = dict(example)
  example["image"] = _resize_array(example["image"][y0:y0 + h, x0:x0 + w], (out_h, out_w),
                                   Image.BICUBIC)
  if "seg" in example:
    example["seg"] = _resize_array(example["seg"][y0:y0 + h, x0:x0 + w], (out_h, out_w),
                                   Image.NEAREST)
  if "boxes" in example:
    boxes = np.array(example["boxes"], np.float32)
    valid = boxes[:, 0] >= 0
    sx, sy = out_w / w, out_h / h
    boxes[valid, 1:] = (boxes[valid, 1:] - [x0, y0, x0, y0]) * [sx, sy, sx, sy]
    boxes[valid, 1::2] = boxes[valid, 1::2].clip(0, out_w)
    boxes[valid, 2::2] = boxes[valid, 2::2].clip(0, out_h)
    # A box cropped away entirely no longer localises anything; its label is kept.
    gone = valid & ((boxes[:, 3] <= boxes[:, 1]) | (boxes[:, 4] <= boxes[:, 2]))
    boxes[gone] = -1
    example["boxes"] = boxes
  return example


def resize_example(example: dict, size) -> dict:
  """Resizes image, seg and boxes of an example to `size` (int: square) without cropping."""
  h, w = example["image"].shape[:2]
  return _crop_resize(example, (0, 0, h, w), size)


@register("resize")
def _resize(size):
  def fn(example):
    h, w = example["image"].shape[:2]
    return _crop_resize(example, (0, 0, h, w), size)
  return fn


def sample_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio=(3 / 4, 4 / 3)
                    ) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (y0, x0, h, w); 10 tries, then a centre crop."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@register("random_resized_crop", random=True)
def _random_resized_crop(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """Inception-style crop (torchvision semantics: 10 tries, then a centre crop)."""
  def fn(example, rng):
    height, width = example["image"].shape[:2]
    return _crop_resize(example, sample_crop_box(rng, height, width, scale, ratio), size)
  return fn


@register("flip_lr", random=True)
def _flip_lr(p=0.5):
  """Horizontal flip. Off by default in configs: CXR laterality (dextrocardia, side of a
  finding) is meaningful for many labels."""
  def fn(example, rng):
    if rng.uniform() >= p:
      return example
    example = dict(example)
    width = example["image"].shape[1]
    example["image"] = example["image"][:, ::-1]
    if "seg" in example:
      example["seg"] = example["seg"][:, ::-1]
    if "boxes" in example:
      boxes = np.array(example["boxes"], np.float32)
      valid = boxes[:, 0] >= 0
      boxes[valid, 1], boxes[valid, 3] = width - boxes[valid, 3], width - boxes[valid, 1]
      example["boxes"] = boxes
    return example
  return fn


@register("center_crop")
def _center_crop(size):
  """Crops the central size x size window (no resize); for evaluation after `resize`."""
  out_h, out_w = _size2(size)

  def fn(example):
    h, w = example["image"].shape[:2]
    if h < out_h or w < out_w:
      raise ValueError(f"center_crop({size}): image is only {h}x{w}")
    y0, x0 = (h - out_h) // 2, (w - out_w) // 2
    return _crop_resize(example, (y0, x0, out_h, out_w), (out_h, out_w))
  return fn


def _affine_matrix(center, degrees=0.0, scale=1.0, shear=(0.0, 0.0), translate=(0.0, 0.0)
                   ) -> np.ndarray:
  """3x3 forward map of pixel coordinates: rotate/scale/shear about `center`, then shift."""
  cx, cy = center
  t = math.radians(degrees)
  sx, sy = math.radians(shear[0]), math.radians(shear[1])
  rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
  shr = np.array([[1, math.tan(sx), 0], [math.tan(sy), 1, 0], [0, 0, 1]])
  scl = np.diag([scale, scale, 1.0])
  to_c = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
  back = np.array([[1, 0, cx + translate[0]], [0, 1, cy + translate[1]], [0, 0, 1]])
  return back @ rot @ shr @ scl @ to_c


def _warp(array: np.ndarray, matrix: np.ndarray, resample, fill=0) -> np.ndarray:
  inverse = np.linalg.inv(matrix)[:2].reshape(-1)  # PIL maps output -> input pixels
  h, w = array.shape[:2]

  def one(channel):
    img = Image.fromarray(np.ascontiguousarray(channel))
    return np.asarray(img.transform((w, h), Image.AFFINE, tuple(inverse), resample,
                                    fillcolor=fill))
  if array.ndim == 2:
    return one(array)
  return np.stack([one(array[..., c]) for c in range(array.shape[-1])], -1)


def _affine(example: dict, matrix: np.ndarray) -> dict:
  """Warps image (bilinear), seg (nearest, background fill) and boxes (corner hull)."""
  example = dict(example)
  image = example["image"]
  h, w = image.shape[:2]
  example["image"] = _warp(image, matrix, Image.BILINEAR)
  if "seg" in example:
    example["seg"] = _warp(example["seg"], matrix, Image.NEAREST)
  if "boxes" in example:
    boxes = np.array(example["boxes"], np.float32)
    valid = boxes[:, 0] >= 0
    if valid.any():
      b = boxes[valid]
      corners = np.stack([b[:, [1, 2]], b[:, [3, 2]], b[:, [1, 4]], b[:, [3, 4]]], 1)
      moved = corners @ matrix[:2, :2].T + matrix[:2, 2]
      lo, hi = moved.min(1), moved.max(1)
      new = np.concatenate([b[:, :1], lo, hi], 1)
      new[:, 1::2] = new[:, 1::2].clip(0, w)
      new[:, 2::2] = new[:, 2::2].clip(0, h)
      gone = (new[:, 3] <= new[:, 1]) | (new[:, 4] <= new[:, 2])
      new[gone] = -1
      boxes[valid] = new
    example["boxes"] = boxes
  return example


@register("random_affine", random=True)
def _random_affine(degrees=10.0, translate=0.05, scale=(0.9, 1.1), shear=0.0, p=1.0):
  """Small rotation/shift/zoom/shear, as CXR fine-tuning recipes use (no flips)."""
  def fn(example, rng):
    if rng.uniform() >= p:
      return example
    h, w = example["image"].shape[:2]
    matrix = _affine_matrix(
        (w / 2, h / 2), degrees=rng.uniform(-degrees, degrees),
        scale=rng.uniform(*scale) if isinstance(scale, (tuple, list)) else scale,
        shear=(rng.uniform(-shear, shear), rng.uniform(-shear, shear)),
        translate=(rng.uniform(-translate, translate) * w,
                   rng.uniform(-translate, translate) * h))
    return _affine(example, matrix)
  return fn


# ----------------------------------------------------------------------------
# Intensity.
# ----------------------------------------------------------------------------


# Keys holding images that channel/normalisation ops apply to ([..., H, W] or
# [..., H, W, C]); the crop keys come from the multi-view ops in multiview.py.
IMAGE_KEYS = ("image", "global_crops", "local_crops")


def _image_keys(example: dict) -> list[str]:
  return [k for k in IMAGE_KEYS if k in example]


@register("to_channels")
def _to_channels(channels=3):
  """Grey [H,W] or [H,W,1] -> [H,W,channels] (replicated), so RGB-pretrained models fit.

  `to_channels(1)` keeps CXRs single-channel for a native 1-channel patch embedding.
  Stacked crops ([N,H,W]) get a channel axis the same way.
  """
  def convert(image, crops):
    if image.ndim == (3 if crops else 2):
      image = image[..., None]
    if image.shape[-1] != channels:
      if image.shape[-1] != 1:
        raise ValueError(f"to_channels({channels}): image has {image.shape[-1]} channels")
      image = np.repeat(image, channels, axis=-1)
    return image

  def fn(example):
    example = dict(example)
    for key in _image_keys(example):
      example[key] = convert(example[key], key != "image")
    return example
  return fn


@register("normalize")
def _normalize(stats="evax", mean=None, std=None):
  """uint8/uint16 or [0,1] float -> (x - mean) / std in float32."""
  if stats not in NORMALIZATION:
    raise ValueError(f"normalize: stats={stats!r} not in {sorted(NORMALIZATION)}")
  mean = np.asarray(mean if mean is not None else NORMALIZATION[stats][0], np.float32)
  std = np.asarray(std if std is not None else NORMALIZATION[stats][1], np.float32)

  # uint8 input: one 256-entry table per channel replaces three full-image float passes
  # (same float32 arithmetic, so the same values).
  levels = np.arange(256, dtype=np.float32) / 255.0
  luts = (levels[:, None] - mean[None, :]) / std[None, :]  # [256, len(mean)]

  def convert(image, crops):
    if image.dtype == np.uint8:
      channels = image.shape[-1] if image.ndim == (4 if crops else 3) else 1
      if channels == 1 or channels == len(mean):
        if channels == 1 or np.all(luts == luts[:, :1]):
          return luts[:, 0][image]
        return np.stack([luts[:, c][image[..., c]] for c in range(channels)], -1)
      image = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
      image = image.astype(np.float32) / 65535.0
    image = image.astype(np.float32)
    channels = image.shape[-1] if image.ndim == (4 if crops else 3) else 1
    m, s = (mean[:channels], std[:channels]) if channels <= len(mean) else (mean[0], std[0])
    return (image - m) / s

  def fn(example):
    example = dict(example)
    for key in _image_keys(example):
      example[key] = convert(example[key], key != "image")
    return example
  return fn


def _apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return lut[image]
  if image.dtype == np.uint16:
    image = (image >> 8).astype(np.uint8)
    return lut[image]
  raise ValueError(f"intensity ops expect uint8 images (before normalize); got {image.dtype}")


def _intensity_lut(brightness: float, contrast: float, gamma: float) -> np.ndarray:
  """One 256-entry table for x -> ((x ** gamma) * contrast about 0.5) + brightness."""
  x = np.arange(256, dtype=np.float32) / 255.0
  y = x ** gamma
  y = (y - 0.5) * contrast + 0.5 + brightness
  return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


@register("random_intensity", random=True)
def _random_intensity(brightness=0.1, contrast=0.1, gamma=(0.8, 1.25), p=1.0):
  """Exposure variation: additive brightness, multiplicative contrast, gamma (uint8 LUT)."""
  def fn(example, rng):
    if rng.uniform() >= p:
      return example
    lut = _intensity_lut(rng.uniform(-brightness, brightness),
                         rng.uniform(1 - contrast, 1 + contrast),
                         math.exp(rng.uniform(math.log(gamma[0]), math.log(gamma[1]))))
    return {**example, "image": _apply_lut(example["image"], lut)}
  return fn


def _ra_geometric(kind, level, rng, example):
  h, w = example["image"].shape[:2]
  sign = 1 if rng.uniform() < 0.5 else -1
  kw = {"rotate": dict(degrees=sign * 30 * level),
        "shear_x": dict(shear=(sign * 17 * level, 0)),
        "shear_y": dict(shear=(0, sign * 17 * level)),
        "translate_x": dict(translate=(sign * 0.3 * level * w, 0)),
        "translate_y": dict(translate=(0, sign * 0.3 * level * h))}[kind]
  return _affine(example, _affine_matrix((w / 2, h / 2), **kw))


def _ra_pixel(kind, level, rng, image):
  from PIL import ImageEnhance, ImageFilter, ImageOps  # pylint: disable=import-outside-toplevel
  sign = 1 if rng.uniform() < 0.5 else -1
  if kind == "gamma":
    return _apply_lut(image, _intensity_lut(0.0, 1.0, math.exp(sign * 0.7 * level)))
  if kind == "brightness":
    return _apply_lut(image, _intensity_lut(sign * 0.4 * level, 1.0, 1.0))
  if kind == "contrast":
    return _apply_lut(image, _intensity_lut(0.0, 1.0 + sign * 0.8 * level, 1.0))
  img = Image.fromarray(image)
  if kind == "autocontrast":
    img = ImageOps.autocontrast(img)
  elif kind == "equalize":
    img = ImageOps.equalize(img)
  elif kind == "sharpness":
    img = ImageEnhance.Sharpness(img).enhance(1.0 + sign * 0.9 * level)
  elif kind == "blur":
    img = img.filter(ImageFilter.GaussianBlur(radius=0.1 + 2.0 * level))
  return np.asarray(img)


RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "shear_x", "shear_y",
                   "translate_x", "translate_y", "brightness", "contrast", "gamma",
                   "sharpness", "blur")
_RA_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@register("randaugment", random=True)
def _randaugment(num_ops=2, magnitude=9, ops=RANDAUGMENT_OPS, magnitude_std=0.0):
  """RandAugment (Cubuk et al. 2020) with grey-level ops only: no colour, solarize or
  posterize, which have no radiographic meaning. Magnitude 0..10 as in timm."""
  unknown = [o for o in ops if o not in RANDAUGMENT_OPS]
  if unknown:
    raise ValueError(f"randaugment: unknown ops {unknown}; choose from {RANDAUGMENT_OPS}")
  ops = tuple(ops)

  def fn(example, rng):
    image = example["image"]
    grey = image.ndim == 2 or image.shape[-1] == 1
    if image.dtype != np.uint8 or not grey:
      raise ValueError("randaugment expects grey uint8 images: put it before to_channels "
                       "and normalize")
    for _ in range(num_ops):
      kind = ops[int(rng.integers(len(ops)))]
      level = float(np.clip(rng.normal(magnitude, magnitude_std) if magnitude_std
                            else magnitude, 0, 10)) / 10.0
      if kind == "identity":
        continue
      if kind in _RA_GEOMETRIC:
        example = _ra_geometric(kind, level, rng, example)
      else:
        img = example["image"]
        out = _ra_pixel(kind, level, rng, img[..., 0] if img.ndim == 3 else img)
        example = {**example, "image": out[..., None] if img.ndim == 3 else out}
    return example
  return fn


# ----------------------------------------------------------------------------
# Masks for masked image modelling.
# ----------------------------------------------------------------------------


def block_mask(rng: np.random.Generator, grid: tuple[int, int], num_masked: int,
               min_block: int = 16, max_block: int | None = None,
               aspect=(0.3, 1 / 0.3)) -> np.ndarray:
  """BEiT/EVA-02 block-wise mask: rectangles of >= min_block patches until num_masked.

  Returns a bool [gh*gw] array with exactly `num_masked` True entries (the last block is
  topped up with random single patches, so the ratio is exact and batches stack).
  """
  gh, gw = grid
  mask = np.zeros(grid, bool)
  max_block = max_block or num_masked
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  min_block = min(min_block, num_masked)
  tries_left = 100
  while mask.sum() < num_masked and tries_left:
    tries_left -= 1
    remaining = num_masked - mask.sum()
    for _ in range(10):
      target = rng.uniform(min_block, max(min_block, min(remaining, max_block)) + 1e-9)
      ar = math.exp(rng.uniform(*log_aspect))
      h = int(round(math.sqrt(target * ar)))
      w = int(round(math.sqrt(target / ar)))
      if 0 < h < gh and 0 < w < gw:
        top, left = int(rng.integers(0, gh - h + 1)), int(rng.integers(0, gw - w + 1))
        new = h * w - mask[top:top + h, left:left + w].sum()
        if 0 < new <= remaining:
          mask[top:top + h, left:left + w] = True
          break
  flat = mask.reshape(-1)
  missing = num_masked - flat.sum()
  if missing > 0:  # tiny grids: fill up with random free patches
    flat[rng.choice(np.flatnonzero(~flat), missing, replace=False)] = True
  return flat


@register("block_mask", random=True)
def _block_mask(ratio=0.4, patch_size=16, min_block=16):
  """Adds `mim_mask` [N] bool for the image's patch grid (run after resizing)."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"block_mask: ratio={ratio} must be in (0, 1)")

  def fn(example, rng):
    h, w = example["image"].shape[:2]
    grid = (h // patch_size, w // patch_size)
    num = int(round(ratio * grid[0] * grid[1]))
    # BEiT's minimum block of 16 patches assumes a 14x14 grid; scale it for small grids.
    smallest = max(1, min(min_block, grid[0] * grid[1] // 12))
    return {**example, "mim_mask": block_mask(rng, grid, num, smallest)}
  return fn


@register("keep")
def _keep(*keys):
  def fn(example):
    missing = [k for k in keys if k not in example]
    if missing:
      raise KeyError(f"keep{keys}: example has no {missing} (has {sorted(example)})")
    return {k: example[k] for k in keys}
  return fn
