"""Mixup and CutMix on device, inside the jitted train step (timm `Mixup`, mode 'batch').

mixup (Zhang et al. 2018) blends whole images, CutMix (Yun et al. 2019) pastes a box of the
partner image; the targets are blended with the same weight lambda. As in timm
(timm/data/mixup.py, `Mixup._mix_batch` with correct_lam=True):
  * one lambda and one choice of mixup or CutMix per batch; with probability `prob` the
    batch is mixed at all, and when both alphas are > 0, CutMix is chosen with
    probability `switch_prob`; lambda ~ Beta(alpha, alpha) of the chosen method;
  * example i is mixed with example B - 1 - i (the batch flipped);
  * the CutMix box is centred uniformly in the image, of side floor(size sqrt(1 - lambda))
    and clipped to the image; lambda is then corrected to 1 - box area / image area, the
    share of pixels that really are the example's own.
Targets: labels <- lambda labels + (1 - lambda) labels[flipped]. timm smooths targets
before mixing; our tasks smooth after, which is the same because smoothing is linear.
label_mask: an entry of a mixed example counts only where both examples' masks are 1
(mask * mask[flipped]): its target is half unknown otherwise. When lambda is exactly 1
(nothing of the partner is used) the mask is the example's own, when exactly 0 the
partner's.
Only `image`, `labels` and `label_mask` are mixed; other fields (seg, boxes, ids) are
returned unchanged and no longer describe mixed images, so do not mix batches of tasks
that read them. Under data parallelism the flip pairs examples across devices; XLA moves
the partner images (one collective permutation per step).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def _check_probability(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
    raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
  return float(value)


def _check_alpha(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
    raise ValueError(f"{name}={value!r} must be a number >= 0 (0 turns it off)")
  return float(value)


def _symmetric_beta(rng: jax.Array, alphas: tuple[float, ...]) -> jax.Array:
  """One Beta(a, a) draw per alpha, from a single log-gamma call.

  Beta(a, a) = X / (X + Y) = sigmoid(log X - log Y) with X, Y ~ Gamma(a): in log space,
  so small alphas (X and Y underflow to 0) do not give 0 / 0, and with one gamma sampler
  (a rejection loop) in the graph instead of one per draw, which keeps compiling fast.
  """
  log_gamma = jax.random.loggamma(rng, jnp.asarray(alphas + alphas, jnp.float32))
  return jax.nn.sigmoid(log_gamma[:len(alphas)] - log_gamma[len(alphas):])


def _cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int
                ) -> tuple[jax.Array, jax.Array]:
  """timm `rand_bbox` + lambda correction: (inside [H, W] bool, corrected lambda)."""
  key_y, key_x = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  center_y = jax.random.randint(key_y, (), 0, height)
  center_x = jax.random.randint(key_x, (), 0, width)
  top = jnp.clip(center_y - cut_h // 2, 0, height)
  bottom = jnp.clip(center_y + cut_h // 2, 0, height)
  left = jnp.clip(center_x - cut_w // 2, 0, width)
  right = jnp.clip(center_x + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  area = ((bottom - top) * (right - left)).astype(jnp.float32)
  return inside, 1.0 - area / (height * width)


def mix_batch(batch: dict, rng: jax.Array, *, mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float = 0.5, prob: float = 1.0) -> dict:
  """The batch with `image` [B, H, W, C] (floating), `labels` and `label_mask` mixed.

  Deterministic for `rng`; the alphas and probabilities are Python numbers (static under
  jit). Both alphas 0 (or prob 0) returns `batch` unchanged. See the module doc.
  """
  mixup_alpha = _check_alpha(mixup_alpha, "mixup_alpha")
  cutmix_alpha = _check_alpha(cutmix_alpha, "cutmix_alpha")
  switch_prob = _check_probability(switch_prob, "switch_prob")
  prob = _check_probability(prob, "prob")
  if (mixup_alpha == 0 and cutmix_alpha == 0) or prob == 0:
    return batch
  image = batch["image"]
  if image.ndim != 4 or not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"batch['image'] must be a floating [B, H, W, C] array, got "
                     f"{image.dtype} {image.shape}; mix after normalisation")
  height, width = image.shape[1:3]
  key_apply, key_switch, key_lambda, key_box = jax.random.split(rng, 4)

  apply = jax.random.uniform(key_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # An alpha of 0 draws with a placeholder alpha 1; that draw is never used.
  lam_mixup, lam_cutmix = _symmetric_beta(key_lambda, (mixup_alpha or 1.0, cutmix_alpha or 1.0))
  inside, lam_box = _cutmix_box(key_box, lam_cutmix, height, width)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mixup), 1.0).astype(jnp.float32)

  partner = image[::-1]
  blended = (lam * image.astype(jnp.float32)
             + (1.0 - lam) * partner.astype(jnp.float32)).astype(image.dtype)
  pasted = jnp.where(inside[None, :, :, None], partner, image)
  mixed = dict(batch)
  mixed["image"] = jnp.where(apply, jnp.where(use_cutmix, pasted, blended), image)
  if "labels" in batch:
    labels = batch["labels"].astype(jnp.float32)
    mixed["labels"] = lam * labels + (1.0 - lam) * labels[::-1]
  if "label_mask" in batch:
    mask = batch["label_mask"].astype(jnp.float32)
    both = mask * mask[::-1]
    mixed["label_mask"] = jnp.where(lam == 1.0, mask, jnp.where(lam == 0.0, mask[::-1], both))
  return mixed
