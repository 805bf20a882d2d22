"""Loss functions shared by the self-supervised objectives (pure jnp, float32 inside).

Each function follows one published implementation; the reference is named in its
docstring, and tests/test_objectives.py checks every one against an independent NumPy
version. Sharded inputs need nothing special: the functions reduce over the whole (global)
batch under jit, which is what the PyTorch code gets from its all-reduces and all-gathers.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12, axis: int = -1) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def cross_entropy_with_integer_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-row -log softmax(logits)[label]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------
# Contrastive.
# ----------------------------------------------------------------------------


def info_nce(q: jax.Array, k: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
  """InfoNCE of q[i] against all k, the positive being k[i]; mean over i.

  logits = logit_scale * <q/|q|, k/|k|> (logit_scale = 1 / temperature). MoCo v3
  `contrastive_loss` without its 2T factor (the caller applies it), and each half of CLIP's
  symmetric loss.
  """
  logits = logit_scale * (l2_normalize(q) @ l2_normalize(k).T)
  return cross_entropy_with_integer_labels(logits, jnp.arange(q.shape[0])).mean()


def clip_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
  """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropies."""
  return 0.5 * (info_nce(image, text, logit_scale) + info_nce(text, image, logit_scale))


# ----------------------------------------------------------------------------
# Masked image modelling.
# ----------------------------------------------------------------------------


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, p*p*C], rows of patches in (p, q, c) order.

  The same order as the ViT patch embedding (cxrjax.models.vit) and MAE's `patchify`
  (einsum 'nchpwq->nhwpqc').
  """
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)",
                          p=patch_size, q=patch_size)


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix: bool = True) -> jax.Array:
  """MAE reconstruction loss on the masked (removed) patches only.

  facebookresearch/mae models_mae.py `forward_loss`: with norm_pix_loss, each target patch is
  normalised by its own mean and *unbiased* variance (torch .var default), eps 1e-6; the
  squared error is averaged over a patch's pixels, then over masked patches.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  weight = mask.astype(jnp.float32)
  return jnp.sum(per_patch * weight) / jnp.maximum(weight.sum(), 1.0)


# ----------------------------------------------------------------------------
# DINO / iBOT (facebookresearch/dinov2 dinov2/loss/*.py).
# ----------------------------------------------------------------------------


def softmax_center(teacher_logits: jax.Array, center: jax.Array, temperature) -> jax.Array:
  """DINO centering + sharpening: softmax((t - center) / temperature)."""
  return jax.nn.softmax((teacher_logits.astype(jnp.float32) - center) / temperature, axis=-1)


def sinkhorn_knopp(teacher_logits: jax.Array, temperature, num_iterations: int = 3,
                   weights: jax.Array | None = None) -> jax.Array:
  """Sinkhorn-Knopp targets [M, K] from teacher logits [M, K] (dinov2 `sinkhorn_knopp_teacher`).

  Q = exp(t / temperature) over samples x prototypes is scaled so that every prototype gets
  the same total mass 1/K and every sample 1/B, then multiplied by B so each sample's row
  is a distribution. `weights` [M] in {0, 1} restricts the problem to the rows with weight 1
  (iBOT: the masked tokens of a fixed-size buffer); other rows come back as zeros, exactly
  as if the valid rows had been gathered first.
  """
  logits = teacher_logits.astype(jnp.float32) / temperature
  w = jnp.ones(logits.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
  # A global shift cancels in the first normalisation; it keeps exp() finite.
  shift = jnp.max(jnp.where(w[:, None] > 0, logits, -jnp.inf))
  q = jnp.exp(logits - jax.lax.stop_gradient(shift)) * w[:, None]
  num_samples = jnp.maximum(w.sum(), 1.0)
  num_prototypes = logits.shape[1]
  tiny = jnp.finfo(jnp.float32).tiny  # rows without weight (and underflow) stay 0, not NaN
  q = q / jnp.sum(q)
  for _ in range(num_iterations):
    q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), tiny) / num_prototypes  # 1/K each
    q = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), tiny) / num_samples     # 1/B each
  return q * num_samples


def dino_cross_entropy(student_logits: jax.Array, teacher_probs: jax.Array,
                       student_temp: float) -> jax.Array:
  """Per-row -sum_k t_k log softmax(s / student_temp)_k (dinov2 DINOLoss / iBOT `lossfunc`)."""
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  return -jnp.sum(teacher_probs * logp, axis=-1)


def dino_multicrop_loss(student_global: jax.Array, student_local: jax.Array | None,
                        teacher_global: jax.Array, student_temp: float) -> jax.Array:
  """DINO loss over all (student crop, teacher crop) pairs except same-view global pairs.

  student_global [G, B, K] logits, student_local [L, B, K] logits (or None), teacher_global
  [G, B, K] target distributions. dinov2 ssl_meta_arch `forward_backward`: every local crop is
  compared with every teacher global crop and every student global crop with the *other*
  teacher global crops; the sum of the per-pair batch means is divided by the number of
  pairs, G(G-1) + L*G.
  """
  num_global = student_global.shape[0]
  total, terms = 0.0, 0
  for i in range(num_global):
    for j in range(num_global):
      if i != j:
        total += dino_cross_entropy(student_global[i], teacher_global[j], student_temp).mean()
        terms += 1
  if student_local is not None:
    for i in range(student_local.shape[0]):
      for j in range(num_global):
        total += dino_cross_entropy(student_local[i], teacher_global[j], student_temp).mean()
        terms += 1
  return total / max(terms, 1)


def ibot_loss(student_logits: jax.Array, teacher_probs: jax.Array, mask: jax.Array,
              student_temp: float) -> jax.Array:
  """iBOT patch loss on masked tokens: student_logits/teacher_probs [M, T, K], mask [M, T].

  dinov2 iBOTPatchLoss.forward_masked: each masked token of image m is weighted by
  1 / (number of masked tokens of m); the weighted sum is divided by the number of images M
  (including images without any masked token, which add nothing).
  """
  ce = dino_cross_entropy(student_logits, teacher_probs, student_temp)      # [M, T]
  weight = mask.astype(jnp.float32)
  per_image = jnp.sum(ce * weight, axis=-1) / jnp.maximum(weight.sum(-1), 1.0)
  return jnp.sum(per_image) / mask.shape[0]


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Kozachenko-Leonenko entropy regulariser (dinov2 KoLeoLoss): -mean log d(x_i, NN(x_i)).

  Rows are L2-normalised; each row's nearest neighbour is the other row with the largest
  inner product; the distance is torch's PairwiseDistance(p=2, eps=1e-8) = ||x - y + eps||.
  The neighbour choice carries no gradient, the distance does.
  """
  x = l2_normalize(x, eps=eps)
  dots = x @ x.T
  dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
  nearest = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))
  dist = jnp.sqrt(jnp.sum((x - x[nearest] + eps) ** 2, axis=-1))
  return -jnp.mean(jnp.log(dist + eps))


# ----------------------------------------------------------------------------
# Diagnostics.
# ----------------------------------------------------------------------------


def entropy(probs: jax.Array, axis: int = -1) -> jax.Array:
  """Shannon entropy in nats (0 log 0 = 0)."""
  p = probs.astype(jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def prototype_usage(probs: jax.Array) -> jax.Array:
  """Perplexity of the batch-mean assignment over K prototypes, divided by K, in [1/K, 1].

  1 when the batch spreads evenly over all prototypes, 1/K when every sample uses the same
  one (DINO's collapse to a single dimension).
  """
  marginal = probs.reshape(-1, probs.shape[-1]).astype(jnp.float32).mean(axis=0)
  return jnp.exp(entropy(marginal)) / probs.shape[-1]


def cosine_schedule(step, start: float, end: float, total_steps: int) -> jax.Array:
  """start -> end over total_steps along a half cosine, then end (dinov2 CosineScheduler
  without warmup; MoCo v3 `adjust_moco_momentum`)."""
  t = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * t))
