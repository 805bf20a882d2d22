"""Task heads on ViT features: linear probes, CheXFound's GLoRI and a segmentation decoder.

Heads never call the encoder. The fine-tuning wrapper runs it once and hands every head the
same feature dict, so a head can be swapped (or several trained on one forward pass)
without touching the encoder:

  pooled             [B, D]        the encoder's pooled output (its own pooling and norm)
  cls_token          [B, D]        normed class token; absent when the model has none
  patch              [B, N, D]     normed patch tokens of the last block
  blocks             tuple of [B, P + N, D] outputs of the blocks named by
                                   `required_blocks(head_cfg, depth)`, in that (increasing)
                                   order, each through the encoder's final norm
  num_prefix_tokens  int P         cls + registers; tokens are [cls?, registers..., patches...]
  grid               (h, w)        patch grid, N = h * w, patches row-major
  image_hw           (H, W)        input image size
All arrays are float32.

Registry: `build(config.head, num_classes=, width=, depth=, rngs=)` builds the head named by
`config.head.name`; `required_blocks(config.head, depth)` says which blocks it reads. Every
head is called as head(features, *, train=False, rngs=None) -> dict with at least 'logits';
dropout needs rngs=nnx.Rngs(dropout=key) when train=True (no RNG state lives in a head, so a
train step stays a pure function of (params, batch, key), as for the encoder). Every key of
a head has a default. One config.head block may carry the keys of every head (each reads
its own), but a key that no head reads is a ConfigError, so typos do not pass silently.

linear: one or `num_copies` linear classifiers on a chosen feature vector ('features').
  'last4' is DINOv2's linear-eval input (dinov2/eval/linear.py `create_linear_input` with
  n=4, avgpool=True): the class tokens of the last 4 blocks and the mean patch token of the
  last block, concatenated; models without a class token use each block's mean patch
  token, registers are skipped. Encoders shallower than 4 blocks use all of their blocks.
  Kernels start from N(0, 0.01), biases at 0: DINOv2's (and CheXFound's) LinearClassifier
  init. MAE's probe uses trunc-normal(2e-5) because it puts a BatchNorm without affine in
  front of the classifier; without that norm, 0.01 gives logits of a sensible scale on
  normed features. `num_copies` classifiers share one [copies, in, classes] kernel so the
  many learning rates of a DINOv2-style sweep train in one pass (the optimiser scales each
  copy's update); logits are then [copies, B, classes].

glori: CheXFound's "global and local representations integration" head (an ML-Decoder:
  one query per class cross-attending to patch tokens). From RPIDIAL/CheXFound
  chexfound/eval/classification/glori.py (`GLoRI`, `TransformerDecoderLayerOptimal`,
  `create_mldecoder_input`), classification/utils.py (`setup_glori`), linear_glori.py and
  README.md:
  - input: the normed patch tokens of the last `num_blocks` (default 4) blocks concatenated
    on channels, [B, N, num_blocks * D] -> Linear to `dim` -> ReLU (no LayerNorm);
  - one query per class [classes, dim]; one decoder layer: LayerNorm(query) -> multi-head
    cross-attention over the patch tokens (q/k/v/out projections, softmax over N, dropout
    0.1) -> residual + LayerNorm -> ReLU FFN dim -> 2048 -> dim -> residual + LayerNorm
    (post-norm, PyTorch LayerNorm eps 1e-5);
  - cat_cls (`use_cls`): the *raw* concatenated class tokens of the same blocks
    [B, num_blocks * D] are prepended to every class's decoder output; no projection;
  - per-class output: logit_k = <w_k, z_k> + b_k, w [classes, dim (+ num_blocks * D)]
    xavier-normal (as `duplicate_pooling`: std sqrt(2 / (classes + fan_in))), b = 0;
  - dim 768 and 8 heads (README; `--decoder-dim` default), 1 decoder layer, dropout 0.1,
    the README's GLoRI recipe passes --cat-cls; attention maps are the per-head softmax
    weights, averaged over heads in their notebook (notebooks/chexfound_example.ipynb).
  What differs here: CheXFound's queries are a frozen random nn.Embedding (ML-Decoder's
  choice); here they are trained (N(0, 1) init, as nn.Embedding), since only nnx.Param can
  live in the trainable model. ML-Decoder's `tgt + dropout(tgt)` before the first norm,
  which only injects noise into the queries in training (LayerNorm removes the factor 2 at
  eval), is left out. Without a class token, `use_cls` uses each block's mean patch token.
  Linear and attention projections start from trunc-normal(0.02) with zero biases (the
  ViT convention of this code base) instead of PyTorch's defaults. `mlp_dim` (default 2048)
  is exposed for small models. Returns 'attention' [B, classes, h, w]: the softmax weights
  averaged over heads.

segmentation: a simple feature pyramid (ViTDet, Li et al. 2022) feeding a UperNet-lite
  fusion. Four pyramid levels at 4x, 2x, 1x and 1/2x the patch grid, each from one block
  (`blocks`, 4 indices, BEiT/MAE-UperNet style, default 4 evenly spaced ones ending with the
  last, e.g. depth 12 -> (2, 5, 8, 11), depth 2 -> (0, 0, 1, 1)), or all four from one block
  (ViTDet, `blocks` of length 1). Each level: patch tokens [B, h, w, D] -> Dense to `dim` ->
  2x2 stride-2 transposed convolutions (LayerNorm + GELU between two of them) for 4x and 2x,
  identity for 1x, 2x2 max pooling for 1/2x, as ViTDet and BEiT's UperNet neck. Transposed
  convs with kernel = stride learn the upsampling and tile the output exactly (no overlap,
  no checkerboard); fixed resizes would add nothing learnable at the scales that carry the
  detail. The levels are then resized bilinearly to the 4x grid, concatenated, fused by a
  3x3 conv + LayerNorm + GELU, dropped out, classified by a 1x1 conv and resized bilinearly
  to image_hw: logits [B, H, W, classes]. LayerNorm rather than BatchNorm keeps every
  variable an nnx.Param (no batch statistics).

Logical axes (cxrjax.parallel.RULES): encoder-width inputs 'embed', hidden widths 'mlp',
attention 'heads'/'kv' (GLoRI's decoder width is its 'embed'), classes 'classes'
(replicated); axes no rule should shard (concatenated inputs, conv windows, copies) are None.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from cxrjax.config_lib import ConfigError
from cxrjax.models.layers import dense_init, layer_norm, zeros_init

Features = Mapping[str, Any]

# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------

_HEADS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator registering a head under `name`.

  A head class provides DEFAULTS (every config key with its default), classmethods
  validate(options, depth) and required_blocks(options, depth), and is constructed as
  cls(**options, num_classes=, width=, depth=, rngs=).
  """

  def decorator(cls: type) -> type:
    if name in _HEADS and _HEADS[name] is not cls:
      raise ValueError(f"head name {name!r} is already registered")
    _HEADS[name] = cls
    return cls

  return decorator


def names() -> tuple[str, ...]:
  return tuple(sorted(_HEADS))


def _head_class(head_cfg: Mapping[str, Any]) -> type:
  name = head_cfg.get("name")
  if name not in _HEADS:
    raise ConfigError(f"config.head.name={name!r} is not a registered head; valid choices: "
                      f"{', '.join(map(repr, names()))}")
  return _HEADS[name]


def _options(head_cfg: Mapping[str, Any], depth: int) -> tuple[type, dict[str, Any]]:
  """The head class and its validated options: head_cfg over the class's DEFAULTS.

  One config.head block may hold the keys of every head (config_blocks.finetune_base), so
  keys of other registered heads are ignored; a key no head knows is a ConfigError.
  """
  cls = _head_class(head_cfg)
  known = {key for head in _HEADS.values() for key in head.DEFAULTS} | {"name"}
  unknown = sorted(set(head_cfg.keys()) - known)
  if unknown:
    raise ConfigError(
        f"config.head.{unknown[0]}={head_cfg[unknown[0]]!r} is not a key of any head; "
        f"the {head_cfg['name']!r} head reads: {', '.join(sorted(cls.DEFAULTS))}")
  options = {key: head_cfg[key] if key in head_cfg else default
             for key, default in cls.DEFAULTS.items()}
  cls.validate(options, depth)
  return cls, options


def build(head_cfg: Mapping[str, Any], *, num_classes: int, width: int, depth: int,
          rngs: nnx.Rngs) -> nnx.Module:
  """Builds the head named by `head_cfg['name']` for a `width`-wide, `depth`-deep encoder."""
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes={num_classes!r} is invalid; expected a positive int "
                      "(the number of labels of the task)")
  cls, options = _options(head_cfg, depth)
  return cls(**options, num_classes=num_classes, width=width, depth=depth, rngs=rngs)


def required_blocks(head_cfg: Mapping[str, Any], depth: int) -> tuple[int, ...]:
  """Block indices (sorted, in [0, depth)) whose outputs the head reads from
  features['blocks']; () when it reads none."""
  cls, options = _options(head_cfg, depth)
  return tuple(cls.required_blocks(options, depth))


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------


def _fail(key: str, value: Any, expected: str) -> ConfigError:
  return ConfigError(f"config.head.{key}={value!r} is invalid; expected {expected}")


def _check_dropout(options: Mapping[str, Any]) -> None:
  rate = options["dropout"]
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise _fail("dropout", rate, "a rate in [0, 1)")


def _check_positive_int(options: Mapping[str, Any], key: str) -> None:
  value = options[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise _fail(key, value, "a positive int")


def apply_dropout(x: jax.Array, rate: float, *, train: bool, rngs: nnx.Rngs | None,
                  where: str) -> jax.Array:
  """Inverted dropout, drawing its mask from rngs.dropout() (only when training)."""
  if not train or rate == 0:
    return x
  if rngs is None:
    raise ValueError(f"{where}: train=True with dropout={rate} needs "
                     "rngs=nnx.Rngs(dropout=key)")
  keep = 1.0 - rate
  kept = jax.random.bernoulli(rngs.dropout(), keep, x.shape)
  return jnp.where(kept, x / keep, 0).astype(x.dtype)


def last_blocks(depth: int, count: int) -> tuple[int, ...]:
  return tuple(range(depth - count, depth))


def _blocks(features: Features, count: int, where: str) -> tuple[jax.Array, ...]:
  blocks = tuple(features["blocks"])
  if len(blocks) != count:
    raise ValueError(f"{where} needs {count} block output(s) in features['blocks'] (those "
                     f"named by heads.required_blocks), got {len(blocks)}")
  return blocks


def _patches(tokens: jax.Array, features: Features) -> jax.Array:
  return tokens[:, features["num_prefix_tokens"]:]


def _summary_token(tokens: jax.Array, features: Features) -> jax.Array:
  """A block's class token, or its mean patch token when the model has no class token."""
  if "cls_token" in features:
    return tokens[:, 0]
  return _patches(tokens, features).mean(axis=1)


def _class_token(features: Features) -> jax.Array:
  if "cls_token" not in features:
    raise ConfigError("config.head.features reads the class token, but the encoder has none "
                      "(model.class_token=False); expected 'pooled' or 'mean_patch'")
  return features["cls_token"]


# ----------------------------------------------------------------------------
# Linear probes.
# ----------------------------------------------------------------------------

# DINOv2's linear eval tries n_last_blocks 1 and 4, each with and without avgpool; 'last4'
# is its n=4 + avgpool input (CheXFound's linear_glori.py defaults to n=4 without avgpool).
DINOV2_LINEAR_BLOCKS = 4


class LinearInput(NamedTuple):
  """How a linear head reads its input vector from the feature dict."""
  read: Callable[[Features], jax.Array]   # features -> [B, vectors * D]
  vectors: Callable[[int], int]           # depth -> number of D-wide vectors concatenated
  blocks: Callable[[int], tuple[int, ...]]  # depth -> block indices read


def _dinov2_blocks(depth: int) -> tuple[int, ...]:
  return last_blocks(depth, min(DINOV2_LINEAR_BLOCKS, depth))


def _read_dinov2_last_blocks(features: Features) -> jax.Array:
  blocks = tuple(features["blocks"])
  if not blocks:
    raise ValueError("features='last4' needs the last blocks in features['blocks'] (see "
                     "heads.required_blocks)")
  summaries = [_summary_token(tokens, features) for tokens in blocks]
  return jnp.concatenate(summaries + [_patches(blocks[-1], features).mean(axis=1)], axis=-1)


LINEAR_INPUTS: dict[str, LinearInput] = {
    "pooled": LinearInput(lambda f: f["pooled"], lambda depth: 1, lambda depth: ()),
    "cls_token": LinearInput(_class_token, lambda depth: 1, lambda depth: ()),
    "mean_patch": LinearInput(lambda f: f["patch"].mean(axis=1), lambda depth: 1,
                              lambda depth: ()),
    "cls+mean": LinearInput(
        lambda f: jnp.concatenate([_class_token(f), f["patch"].mean(axis=1)], axis=-1),
        lambda depth: 2, lambda depth: ()),
    "last4": LinearInput(_read_dinov2_last_blocks, lambda depth: len(_dinov2_blocks(depth)) + 1,
                         _dinov2_blocks),
}


@register("linear")
class LinearHead(nnx.Module):
  """`num_copies` independent linear classifiers on one feature vector (module docstring)."""

  DEFAULTS = dict(features="pooled", dropout=0.0, num_copies=1)

  def __init__(self, *, features: str, dropout: float, num_copies: int, num_classes: int,
               width: int, depth: int, rngs: nnx.Rngs):
    self.feature_name = features
    self.dropout_rate = dropout
    self.num_copies = num_copies
    in_dim = LINEAR_INPUTS[features].vectors(depth) * width
    kernel_init = nnx.with_partitioning(nnx.initializers.normal(0.01),
                                        (None, "embed", "classes"))
    self.kernel = nnx.Param(kernel_init(rngs.params(), (num_copies, in_dim, num_classes)))
    self.bias = nnx.Param(zeros_init((None, "classes"))(rngs.params(),
                                                        (num_copies, num_classes)))

  @classmethod
  def validate(cls, options: dict[str, Any], depth: int) -> None:
    if options["features"] not in LINEAR_INPUTS:
      raise _fail("features", options["features"], f"one of {', '.join(LINEAR_INPUTS)}")
    _check_dropout(options)
    _check_positive_int(options, "num_copies")

  @classmethod
  def required_blocks(cls, options: dict[str, Any], depth: int) -> tuple[int, ...]:
    return LINEAR_INPUTS[options["features"]].blocks(depth)

  def __call__(self, features: Features, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    x = LINEAR_INPUTS[self.feature_name].read(features).astype(jnp.float32)
    x = apply_dropout(x, self.dropout_rate, train=train, rngs=rngs, where="linear head")
    logits = jnp.einsum("bf,kfc->kbc", x, self.kernel[...]) + self.bias[...][:, None, :]
    return {"logits": logits[0] if self.num_copies == 1 else logits}


# ----------------------------------------------------------------------------
# GLoRI.
# ----------------------------------------------------------------------------

# PyTorch's LayerNorm default, which CheXFound's decoder layer uses.
GLORI_NORM_EPS = 1e-5


@register("glori")
class GLoRIHead(nnx.Module):
  """CheXFound's GLoRI: class queries cross-attending to multi-block patch tokens."""

  DEFAULTS = dict(dim=768, num_heads=8, num_blocks=4, use_cls=True, dropout=0.1, mlp_dim=2048)

  def __init__(self, *, dim: int, num_heads: int, num_blocks: int, use_cls: bool,
               dropout: float, mlp_dim: int, num_classes: int, width: int, depth: int,
               rngs: nnx.Rngs):
    del depth  # the blocks are chosen by required_blocks
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.num_blocks, self.use_cls, self.dropout_rate = num_blocks, use_cls, dropout

    def linear(n_in: int, n_out: int, names: tuple[str | None, str | None]) -> nnx.Linear:
      return nnx.Linear(n_in, n_out, kernel_init=dense_init(names),
                        bias_init=zeros_init((names[1],)), rngs=rngs)

    def norm() -> nnx.LayerNorm:
      return layer_norm(dim, "embed", eps=GLORI_NORM_EPS, dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=rngs)

    def attention_in() -> nnx.LinearGeneral:
      return nnx.LinearGeneral(dim, (num_heads, self.head_dim),
                               kernel_init=dense_init(("embed", "heads", "kv")),
                               bias_init=zeros_init(("heads", "kv")), rngs=rngs)

    self.embed_tokens = linear(num_blocks * width, dim, (None, "embed"))
    self.queries = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                   ("classes", "embed"))(
        rngs.params(), (num_classes, dim)))
    self.query_norm = norm()
    self.q, self.k, self.v = attention_in(), attention_in(), attention_in()
    self.out = nnx.LinearGeneral((num_heads, self.head_dim), dim, axis=(-2, -1),
                                 kernel_init=dense_init(("heads", "kv", "embed")),
                                 bias_init=zeros_init(("embed",)), rngs=rngs)
    self.attention_norm = norm()
    self.fc1 = linear(dim, mlp_dim, ("embed", "mlp"))
    self.fc2 = linear(mlp_dim, dim, ("mlp", "embed"))
    self.ffn_norm = norm()
    class_dim = dim + (num_blocks * width if use_cls else 0)
    # CheXFound: xavier_normal_ on duplicate_pooling [classes, class_dim, 1].
    class_std = math.sqrt(2.0 / (num_classes + class_dim))
    self.class_kernel = nnx.Param(nnx.with_partitioning(
        nnx.initializers.normal(class_std), ("classes", None))(
            rngs.params(), (num_classes, class_dim)))
    self.class_bias = nnx.Param(zeros_init(("classes",))(rngs.params(), (num_classes,)))

  @classmethod
  def validate(cls, options: dict[str, Any], depth: int) -> None:
    for key in ("dim", "num_heads", "num_blocks", "mlp_dim"):
      _check_positive_int(options, key)
    if options["dim"] % options["num_heads"]:
      raise _fail("num_heads", options["num_heads"],
                  f"a divisor of config.head.dim={options['dim']}")
    if options["num_blocks"] > depth:
      raise _fail("num_blocks", options["num_blocks"],
                  f"at most the encoder depth {depth}")
    if not isinstance(options["use_cls"], bool):
      raise _fail("use_cls", options["use_cls"], "True or False")
    _check_dropout(options)

  @classmethod
  def required_blocks(cls, options: dict[str, Any], depth: int) -> tuple[int, ...]:
    return last_blocks(depth, options["num_blocks"])

  def __call__(self, features: Features, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    def drop(x: jax.Array) -> jax.Array:
      return apply_dropout(x, self.dropout_rate, train=train, rngs=rngs, where="glori head")

    blocks = _blocks(features, self.num_blocks, "the glori head")
    tokens = jnp.concatenate([_patches(b, features) for b in blocks], axis=-1)
    memory = jax.nn.relu(self.embed_tokens(tokens.astype(jnp.float32)))  # [B, N, dim]

    query = self.query_norm(self.queries[...])  # [K, dim]; the same queries for every image
    q = self.q(query)                            # [K, heads, head_dim]
    k, v = self.k(memory), self.v(memory)        # [B, N, heads, head_dim]
    scores = jnp.einsum("khd,bnhd->bhkn", q, k) / math.sqrt(self.head_dim)
    weights = jax.nn.softmax(scores, axis=-1)    # over the patch tokens
    attended = jnp.einsum("bhkn,bnhd->bkhd", drop(weights), v)
    h = self.attention_norm(query[None] + drop(self.out(attended)))          # [B, K, dim]
    h = self.ffn_norm(h + drop(self.fc2(drop(jax.nn.relu(self.fc1(h))))))

    if self.use_cls:
      summary = jnp.concatenate([_summary_token(b, features) for b in blocks], axis=-1)
      summary = jnp.broadcast_to(summary[:, None, :].astype(h.dtype),
                                 (*h.shape[:2], summary.shape[-1]))
      h = jnp.concatenate([summary, h], axis=-1)  # CheXFound's order: [cls, decoder]
    logits = jnp.einsum("bkf,kf->bk", h, self.class_kernel[...]) + self.class_bias[...]
    grid_h, grid_w = features["grid"]
    batch, num_classes = weights.shape[0], weights.shape[2]
    attention = weights.mean(axis=1).reshape(batch, num_classes, grid_h, grid_w)
    return {"logits": logits, "attention": attention}


# ----------------------------------------------------------------------------
# Segmentation.
# ----------------------------------------------------------------------------

# Pyramid levels, as multiples of the patch grid (ViTDet / BEiT UperNet: strides 4..32 at
# patch 16), finest first; `blocks[i]` feeds level i.
PYRAMID_SCALES = (4, 2, 1, 0.5)
SEGMENTATION_NORM_EPS = 1e-6


class Upsample(nnx.Module):
  """`steps` 2x2 stride-2 transposed convs with LayerNorm + GELU between them (ViTDet's
  simple feature pyramid); steps=0 is the identity."""

  def __init__(self, dim: int, steps: int, *, rngs: nnx.Rngs):
    conv_init = nnx.with_partitioning(nnx.initializers.kaiming_normal(),
                                      (None, None, None, "mlp"))
    self.convs = nnx.List([
        nnx.ConvTranspose(dim, dim, (2, 2), strides=(2, 2), padding="VALID",
                          kernel_init=conv_init, bias_init=zeros_init(("mlp",)), rngs=rngs)
        for _ in range(steps)])
    self.norms = nnx.List([
        layer_norm(dim, "mlp", eps=SEGMENTATION_NORM_EPS, dtype=jnp.float32,
                   param_dtype=jnp.float32, rngs=rngs) for _ in range(steps - 1)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i < len(self.norms):
        x = jax.nn.gelu(self.norms[i](x), approximate=False)
    return x


class MaxPool(nnx.Module):
  """2x2 stride-2 max pooling (ViTDet's and BEiT's coarsest level); odd grids round up."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


RESAMPLERS: dict[float, Callable[[int, nnx.Rngs], nnx.Module]] = {
    4: lambda dim, rngs: Upsample(dim, 2, rngs=rngs),
    2: lambda dim, rngs: Upsample(dim, 1, rngs=rngs),
    1: lambda dim, rngs: Upsample(dim, 0, rngs=rngs),
    0.5: lambda dim, rngs: MaxPool(),
}


def default_pyramid_blocks(depth: int) -> tuple[int, ...]:
  """4 evenly spaced blocks ending with the last: ceil(depth * (i + 1) / 4) - 1.

  depth 12 -> (2, 5, 8, 11) (BEiT/MAE UperNet), 24 -> (5, 11, 17, 23); shallow encoders
  repeat blocks: depth 2 -> (0, 0, 1, 1).
  """
  levels = len(PYRAMID_SCALES)
  return tuple(math.ceil(depth * (i + 1) / levels) - 1 for i in range(levels))


def pyramid_blocks(blocks: Any, depth: int) -> tuple[int, ...]:
  """The block feeding each pyramid level, in [0, depth), from config.head.blocks."""
  blocks = tuple(blocks)
  if not blocks:
    return default_pyramid_blocks(depth)
  if len(blocks) == 1:  # ViTDet: every level from one block
    blocks = blocks * len(PYRAMID_SCALES)
  return tuple(i % depth for i in blocks)


@register("segmentation")
class SegmentationHead(nnx.Module):
  """Simple feature pyramid + UperNet-lite fusion; logits [B, H, W, classes]."""

  DEFAULTS = dict(blocks=(), dim=256, dropout=0.1)

  def __init__(self, *, blocks: tuple[int, ...], dim: int, dropout: float, num_classes: int,
               width: int, depth: int, rngs: nnx.Rngs):
    self.level_blocks = pyramid_blocks(blocks, depth)
    self.read_blocks = tuple(sorted(set(self.level_blocks)))
    self.dropout_rate = dropout
    self.proj = nnx.List([
        nnx.Linear(width, dim, kernel_init=dense_init(("embed", "mlp")),
                   bias_init=zeros_init(("mlp",)), rngs=rngs) for _ in PYRAMID_SCALES])
    self.resample = nnx.List([RESAMPLERS[scale](dim, rngs) for scale in PYRAMID_SCALES])
    self.fuse = nnx.Conv(len(PYRAMID_SCALES) * dim, dim, (3, 3), padding="SAME",
                         use_bias=False, rngs=rngs,
                         kernel_init=nnx.with_partitioning(nnx.initializers.kaiming_normal(),
                                                           (None, None, None, "mlp")))
    self.fuse_norm = layer_norm(dim, "mlp", eps=SEGMENTATION_NORM_EPS, dtype=jnp.float32,
                                param_dtype=jnp.float32, rngs=rngs)
    # mmseg's decode heads start their 1x1 classifier from N(0, 0.01).
    self.classifier = nnx.Conv(dim, num_classes, (1, 1), rngs=rngs,
                               kernel_init=nnx.with_partitioning(
                                   nnx.initializers.normal(0.01),
                                   (None, None, "mlp", "classes")),
                               bias_init=zeros_init(("classes",)))

  @classmethod
  def validate(cls, options: dict[str, Any], depth: int) -> None:
    blocks = options["blocks"]
    levels = len(PYRAMID_SCALES)
    expected = (f"() (default: {default_pyramid_blocks(depth)}), one block index, or "
                f"{levels} (one per pyramid level {PYRAMID_SCALES}), each an int in "
                f"[-{depth}, {depth})")
    if not isinstance(blocks, (tuple, list)) or len(blocks) not in (0, 1, levels):
      raise _fail("blocks", blocks, expected)
    if any(isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth
           for i in blocks):
      raise _fail("blocks", blocks, expected)
    _check_positive_int(options, "dim")
    _check_dropout(options)

  @classmethod
  def required_blocks(cls, options: dict[str, Any], depth: int) -> tuple[int, ...]:
    return tuple(sorted(set(pyramid_blocks(options["blocks"], depth))))

  def __call__(self, features: Features, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    blocks = _blocks(features, len(self.read_blocks), "the segmentation head")
    by_index = dict(zip(self.read_blocks, blocks))
    grid_h, grid_w = features["grid"]
    fine_hw = (4 * grid_h, 4 * grid_w)  # the finest (4x) level
    levels = []
    for block, proj, resample in zip(self.level_blocks, self.proj, self.resample):
      tokens = einops.rearrange(_patches(by_index[block], features), "b (h w) d -> b h w d",
                                h=grid_h, w=grid_w)
      level = resample(proj(tokens.astype(jnp.float32)))
      levels.append(jax.image.resize(level, (level.shape[0], *fine_hw, level.shape[-1]),
                                     method="bilinear"))
    x = jax.nn.gelu(self.fuse_norm(self.fuse(jnp.concatenate(levels, axis=-1))),
                    approximate=False)
    x = apply_dropout(x, self.dropout_rate, train=train, rngs=rngs,
                      where="segmentation head")
    logits = self.classifier(x)
    height, width = features["image_hw"]
    logits = jax.image.resize(logits, (logits.shape[0], height, width, logits.shape[-1]),
                              method="bilinear")
    return {"logits": logits}
