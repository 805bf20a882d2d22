"""Explanation maps for ViT classifiers: Grad-CAM on tokens, GLoRI attention, upsampling.

Grad-CAM (Selvaraju et al. 2017) on a ViT block: the block's patch tokens [N, D] play the
role of a CNN's feature map (D channels at N positions). The gradient of the chosen class
logit with respect to those tokens is obtained without touching the model: the encoder
adds `perturb={block: zeros}` to the block's output, and the gradient with respect to the
zeros is the gradient with respect to the tokens. Channel weights are the gradient averaged
over the patch tokens, and cam = ReLU(sum_c w_c * tokens_c) at each patch, reshaped to the
patch grid. Prefix tokens (cls, registers) have no position and are left out. This is
classic Grad-CAM, not Chefer et al.'s attention relevance propagation.

Maps live on the patch grid; `upsample_maps` brings them to pixels with patch cell (i, j)
covering pixels [i*p, (i+1)*p) x [j*p, (j+1)*p) (see its docstring), so a map that equals a
patch-aligned box stays exactly that box.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

# features_fn(model, images, perturb) -> (features dict for the head, the raw output
# [B, P + N, D] of the perturbed block, i.e. the tensor the perturbation is added to).
FeaturesFn = Callable[[nnx.Module, jax.Array, Mapping[int, jax.Array]],
                      tuple[Mapping[str, Any], jax.Array]]


def class_logits(logits: jax.Array) -> jax.Array:
  """[B, K] logits of a head; multi-copy linear heads ([copies, B, K]) give copy 0."""
  return logits[0] if logits.ndim == 3 else logits


def token_gradients(model: nnx.Module, head: nnx.Module, images: jax.Array,
                    class_index: int | jax.Array, *, block: int = -1,
                    features_fn: FeaturesFn) -> tuple[jax.Array, jax.Array]:
  """(d logit[b, class_index[b]] / d tokens, tokens) of block `block`, both [B, P + N, D].

  `model` is the encoder (it must accept `perturb=` and have width, depth, num_prefix_tokens
  and grid_size), `head` a cxrjax.models.heads head called with train=False; class_index is
  an int or an int array [B] (traced values are fine, so this jits).
  """
  depth = model.depth
  if not -depth <= block < depth:
    raise ValueError(f"block={block} is out of range for a depth-{depth} encoder")
  block_index = block % depth
  batch = images.shape[0]
  grid_h, grid_w = model.grid_size(images.shape[1:3])
  zeros = jnp.zeros((batch, model.num_prefix_tokens + grid_h * grid_w, model.width),
                    jnp.float32)
  classes = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (batch,))

  def chosen_logit_sum(perturbation: jax.Array) -> tuple[jax.Array, jax.Array]:
    features, tokens = features_fn(model, images, {block_index: perturbation})
    logits = class_logits(head(features, train=False)["logits"])
    chosen = jnp.take_along_axis(logits, classes[:, None], axis=1)[:, 0]
    # Images do not interact in the encoder or the heads, so the gradient of the sum is
    # each image's gradient of its own logit.
    return chosen.sum(), tokens

  grads, tokens = jax.grad(chosen_logit_sum, has_aux=True)(zeros)
  return grads, tokens.astype(jnp.float32)


def grad_cam(model: nnx.Module, head: nnx.Module, images: jax.Array,
             class_index: int | jax.Array, *, block: int = -1,
             features_fn: FeaturesFn) -> jax.Array:
  """Grad-CAM maps [B, h, w] (>= 0) of class `class_index` on block `block`'s tokens."""
  grads, tokens = token_gradients(model, head, images, class_index, block=block,
                                  features_fn=features_fn)
  prefix = model.num_prefix_tokens
  channel_weights = grads[:, prefix:].mean(axis=1)  # [B, D]: pooled gradients
  cam = jax.nn.relu(jnp.einsum("bnd,bd->bn", tokens[:, prefix:], channel_weights))
  return cam.reshape(images.shape[0], *model.grid_size(images.shape[1:3]))


# jax.image.resize method names.
UPSAMPLE_METHODS = {"nearest": "nearest", "bilinear": "linear"}


def upsample_maps(maps: jax.Array, image_hw: tuple[int, int], method: str = "bilinear"
                  ) -> jax.Array:
  """Patch-grid maps [B, h, w] -> pixel maps [B, H, W] (float32).

  Alignment: in continuous pixel coordinates (pixel y spans [y, y + 1)), patch cell i spans
  [i * p, (i + 1) * p) and its value sits at its centre (i + 0.5) * p; output pixel y reads
  the grid at (y + 0.5) / p - 0.5. This is jax.image.resize's half-pixel convention
  (PyTorch align_corners=False); align_corners=True would shift a map by up to half a patch
  and stretch it. With method='nearest' and H = h * p every pixel takes its own cell's
  value, so a map equal to a patch-aligned box is exactly that box in pixels (IoU 1).
  'bilinear' interpolates between cell centres and holds the edge cells' values out to
  the image border.
  """
  if method not in UPSAMPLE_METHODS:
    raise ValueError(f"method={method!r} is not one of: {', '.join(UPSAMPLE_METHODS)}")
  if maps.ndim != 3:
    raise ValueError(f"expected maps [B, h, w], got shape {maps.shape}")
  height, width = (int(s) for s in image_hw)
  return jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], height, width),
                          method=UPSAMPLE_METHODS[method])


def glori_attention_maps(head_output: Mapping[str, jax.Array]) -> jax.Array:
  """The GLoRI head's per-class attention [B, K, h, w] (softmax weights over the patch
  tokens, averaged over heads; each map sums to 1)."""
  if "attention" not in head_output:
    raise ValueError("head output has no 'attention'; glori_attention_maps needs the output "
                     f"of a 'glori' head (got keys {sorted(head_output)})")
  return head_output["attention"]
