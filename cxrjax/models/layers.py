"""Transformer building blocks shared by the cxrjax vision models.

Every parameter is created through `nnx.with_partitioning` with *logical* axis names
('embed', 'mlp', 'heads', 'kv', 'patch', None); `cxrjax.parallel.RULES` maps them to mesh
axes. Activations run in `dtype` (bf16 for training), parameters are stored in
`param_dtype` (fp32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

# ViT/BEiT/EVA initialise every dense kernel from N(0, 0.02) truncated at 2 sigma.
INIT_STD = 0.02


def dense_init(names: tuple[str | None, ...], stddev: float = INIT_STD):
  return nnx.with_partitioning(nnx.initializers.truncated_normal(stddev), names)


def zeros_init(names: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), names)


def layer_norm(dim: int, axis: str, *, eps: float, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over a feature axis named `axis` (statistics are computed in fp32)."""
  return nnx.LayerNorm(
      dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (axis,)),
      bias_init=zeros_init((axis,)), rngs=rngs)


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample, rescaling the kept ones."""
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  kept = jax.random.bernoulli(key, keep, shape)
  return jnp.where(kept, x / keep, 0).astype(x.dtype)


class LayerScale(nnx.Module):
  """Per-channel residual branch scale (CaiT / DINOv2), initialised to a small constant."""

  def __init__(self, dim: int, init_value: float, *, param_dtype: Dtype, rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.constant(init_value), ("embed",))
    self.gamma = nnx.Param(init(rngs.params(), (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


# ----------------------------------------------------------------------------
# Position encodings.
# ----------------------------------------------------------------------------


def grid_positions(grid: int, ref_grid: int) -> np.ndarray:
  """Patch coordinates of a `grid`-long axis rescaled onto the reference (pretraining) grid.

  EVA-02 (`VisionRotaryEmbeddingFast`: t = arange(ft) / ft * pt) uses this so a model run at
  another resolution sees the same coordinate range it was trained on. At grid == ref_grid
  the positions are exactly 0, 1, ..., grid - 1.
  """
  return np.arange(grid, dtype=np.float64) * (ref_grid / grid)


def rope_sin_cos(grid_hw: tuple[int, int], ref_hw: tuple[int, int], head_dim: int,
                 theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """EVA-02 2-D axial RoPE tables, each [gh * gw, head_dim] float32.

  Matches EVA-02/EVA-X `VisionRotaryEmbeddingFast(dim=head_dim // 2)` and timm's
  `RotaryEmbeddingCat(in_pixels=False, ref_feat_shape=...)`: head_dim // 4 frequencies
  theta^(-i / (head_dim // 4)); the first half of the head dims rotates with the row
  coordinate, the second half with the column coordinate; within each half, channel pairs
  (2i, 2i+1) share a frequency (interleaved layout, see `rotate_half`). Patches are
  row-major, as produced by the patch embedding.
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
  n_bands = head_dim // 4
  bands = theta ** (-np.arange(n_bands, dtype=np.float64) / n_bands)
  rows = np.outer(grid_positions(grid_hw[0], ref_hw[0]), bands)  # [gh, n_bands]
  cols = np.outer(grid_positions(grid_hw[1], ref_hw[1]), bands)  # [gw, n_bands]
  angles = np.concatenate([
      np.broadcast_to(rows[:, None, :], (grid_hw[0], grid_hw[1], n_bands)),
      np.broadcast_to(cols[None, :, :], (grid_hw[0], grid_hw[1], n_bands)),
  ], axis=-1).reshape(grid_hw[0] * grid_hw[1], 2 * n_bands)
  angles = np.repeat(angles, 2, axis=-1)
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation of interleaved pairs."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array, num_prefix_tokens: int
               ) -> jax.Array:
  """Rotates the patch tokens of x [B, T, H, D]; the first `num_prefix_tokens` (cls,
  registers) have no grid position and pass through unchanged, as in EVA-02.

  The rotation runs in fp32 and is cast back to x's dtype.
  """
  prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
  p = patches.astype(jnp.float32)
  sin, cos = sin[:, None, :], cos[:, None, :]  # broadcast over heads
  rotated = (p * cos + rotate_half(p) * sin).astype(x.dtype)
  return jnp.concatenate([prefix, rotated], axis=1)


def sincos_pos_embed(grid_hw: tuple[int, int], ref_hw: tuple[int, int], dim: int
                     ) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [gh * gw, dim] (MAE's get_2d_sincos_pos_embed).

  As in MAE, the first half of the channels encodes the column (w) coordinate, the second
  half the row (h) coordinate, each as [sin, cos] of dim // 4 frequencies. Coordinates are
  rescaled onto the reference grid (see `grid_positions`), so at `ref_hw` this is exactly
  MAE's table and at other sizes a smooth stand-in for interpolating it.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

  def encode(pos):
    angles = np.outer(pos, omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

  rows = encode(grid_positions(grid_hw[0], ref_hw[0]))  # [gh, dim/2]
  cols = encode(grid_positions(grid_hw[1], ref_hw[1]))  # [gw, dim/2]
  table = np.concatenate([
      np.broadcast_to(cols[None, :, :], (grid_hw[0], grid_hw[1], dim // 2)),
      np.broadcast_to(rows[:, None, :], (grid_hw[0], grid_hw[1], dim // 2)),
  ], axis=-1)
  return table.reshape(grid_hw[0] * grid_hw[1], dim).astype(np.float32)


def resample_pos_embed(pos_embed: jax.Array, src_hw: tuple[int, int],
                       dst_hw: tuple[int, int]) -> jax.Array:
  """Bicubically resizes a learned patch pos-embed [..., src_h * src_w, D] to dst_hw.

  Identity (no op) when the grids match. Note jax.image.resize's cubic kernel uses
  a = -0.5 (Keys) where PyTorch's bicubic uses a = -0.75, so values differ slightly from
  timm's resample_abs_pos_embed; antialiasing applies when shrinking, as in timm.
  """
  if tuple(src_hw) == tuple(dst_hw):
    return pos_embed
  lead, dim = pos_embed.shape[:-2], pos_embed.shape[-1]
  grid = pos_embed.astype(jnp.float32).reshape(*lead, *src_hw, dim)
  grid = jax.image.resize(grid, (*lead, *dst_hw, dim), method="bicubic")
  return grid.reshape(*lead, dst_hw[0] * dst_hw[1], dim).astype(pos_embed.dtype)


# ----------------------------------------------------------------------------
# Attention and MLPs.
# ----------------------------------------------------------------------------


class Attention(nnx.Module):
  """Multi-head self-attention with separate q/k/v projections.

  Kernels: q/k/v [embed, heads, kv], proj [heads, kv, embed]. `qkv_bias`: True gives q, k
  and v biases (timm ViT); 'qv' gives q and v biases only (BEiT / EVA-02 / EVA-X: a key
  bias adds the same q.b_k to every logit of a query row, so softmax ignores it); False
  gives none. Optional 2-D RoPE is applied to the patch tokens of q and k.
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool | str,
               num_prefix_tokens: int, out_std: float, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.num_prefix_tokens = num_prefix_tokens

    def in_proj(bias: bool) -> nnx.LinearGeneral:
      return nnx.LinearGeneral(
          dim, (num_heads, self.head_dim), use_bias=bias, dtype=dtype,
          param_dtype=param_dtype, kernel_init=dense_init(("embed", "heads", "kv")),
          bias_init=zeros_init(("heads", "kv")), rngs=rngs)

    self.q = in_proj(bool(qkv_bias))
    self.k = in_proj(qkv_bias is True)
    self.v = in_proj(bool(qkv_bias))
    self.proj = nnx.LinearGeneral(
        (num_heads, self.head_dim), dim, axis=(-2, -1), dtype=dtype,
        param_dtype=param_dtype, kernel_init=dense_init(("heads", "kv", "embed"), out_std),
        bias_init=zeros_init(("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None
               ) -> jax.Array:
    q, k, v = self.q(x), self.k(x), self.v(x)  # [B, T, H, D]
    if rope is not None:
      q = apply_rope(q, *rope, self.num_prefix_tokens)
      k = apply_rope(k, *rope, self.num_prefix_tokens)
    # No `implementation=`, so the same code runs on CPU; JAX chooses the kernel.
    out = jax.nn.dot_product_attention(q, k, v)
    return self.proj(out)


class Mlp(nnx.Module):
  """fc1 -> exact GELU (as PyTorch nn.GELU) -> [inner_norm] -> fc2."""

  def __init__(self, dim: int, hidden: int, *, sub_ln: bool, eps: float, out_std: float,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=dense_init(("embed", "mlp")),
                          bias_init=zeros_init(("mlp",)), rngs=rngs)
    self.inner_norm = (layer_norm(hidden, "mlp", eps=eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs) if sub_ln else None)
    self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=dense_init(("mlp", "embed"), out_std),
                          bias_init=zeros_init(("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.fc1(x), approximate=False)
    if self.inner_norm is not None:
      h = self.inner_norm(h)
    return self.fc2(h)


class SwiGLU(nnx.Module):
  """EVA-02 SwiGLU: w3([inner_norm](silu(w1 x) * w2 x)).

  Names follow EVA-02/EVA-X (`w1` gate, `w2` up, `ffn_ln` -> `inner_norm`, `w3` out);
  xformers' fused `w12` of EVA-X Ti/S splits as w1 = first half, w2 = second half.
  """

  def __init__(self, dim: int, hidden: int, *, sub_ln: bool, eps: float, out_std: float,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    def up() -> nnx.Linear:
      return nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=dense_init(("embed", "mlp")),
                        bias_init=zeros_init(("mlp",)), rngs=rngs)

    self.w1 = up()
    self.w2 = up()
    self.inner_norm = (layer_norm(hidden, "mlp", eps=eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs) if sub_ln else None)
    self.w3 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=dense_init(("mlp", "embed"), out_std),
                         bias_init=zeros_init(("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.w1(x)) * self.w2(x)
    if self.inner_norm is not None:
      h = self.inner_norm(h)
    return self.w3(h)
