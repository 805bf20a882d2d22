"""Key-mapping tables: checkpoint layouts <-> cxrjax's canonical names, as data.

A conversion runs in two steps:

1. *Source layout -> canonical names.* Each `Layout` lists rules `(source pattern,
   canonical target)`. Patterns use placeholders: `{i}` a block index, `{c}` an
   optional DINOv2 block-chunk index (`blocks.1.7.` in FSDP checkpoints trained with
   `block_chunks`, where 7 is already the global index), and `{wb}` weight|bias. A rule
   with several targets splits the source tensor along dim 0 into equal parts (fused qkv,
   packed SwiGLU `w12` with the gate first); `{*}` matches anything. Canonical names are
   the cxrjax module paths, with tensors still in PyTorch orientation (`[out, in]`
   weights, conv `[D, C, ph, pw]`, LayerNorm `weight`).
2. *Canonical -> cxrjax arrays.* `CXRJAX` maps each canonical name to the Flax parameter
   path and a layout change (transpose, head split); its inverse serves the export.

Structure that is not a rename lives in `core.py` and applies to every layout: a packed
GLU `mlp.fc1` (rows = 2 x fc2 columns) splits into w1/w2, `fc2` beside w1 becomes w3, the
learned pos-embed is brought to cxrjax's coverage (cls + patches; registers get none).

Keys matched by `dropped` are not imported and listed in the report (MIM heads, decoders,
classifier heads, mask tokens, fixed RoPE tables). Keys matched by `unsupported` name a
feature cxrjax's ViT lacks; converting them would change the function, so they are an
error with that reason. Every other unmatched key is "unexpected".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

# EVA-02/EVA-X, timm, DINOv2 and MAE all use LayerNorm eps 1e-6; HF ViTMAE's config
# default is 1e-12 (facebook/vit-mae-* keep it).
DEFAULT_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  description: str
  rules: tuple[tuple[str, str | tuple[str, ...]], ...]
  dropped: tuple[str, ...] = ()
  unsupported: tuple[tuple[str, str], ...] = ()
  # A key that must exist for the file to be of this layout (the patch embedding).
  signature: str = "patch_embed.proj.weight"
  # Prefixes stripped when present (HF task models wrap the backbone as `vit.`/`dinov2.`).
  prefixes: tuple[str, ...] = ()
  norm_eps: float = DEFAULT_EPS
  # EVA-02/EVA-X MIM checkpoints end in `norm` + lm_head; their fine-tuning (and timm's
  # checkpoint_filter_fn) moves `norm` to `fc_norm` under mean pooling. cxrjax's EVA-02
  # model is that fine-tuning model, so per-token features stay norm(x) either way.
  mim_norm_to_fc_norm: bool = False
  # RoPE leaves no weights behind: the default when --rope is not given.
  # 'always' | 'never' | 'eva02': on for SwiGLU with q/v-only biases (the EVA-02 family).
  rope: str = "never"


_PLACEHOLDERS = {"{i}": r"(?P<i>\d+)", "{c}": r"(?:\d+\.)?", "{wb}": r"(?P<wb>weight|bias)",
                 "{*}": r".+"}


def compile_pattern(pattern: str) -> re.Pattern:
  out = re.escape(pattern)
  for name, regex in _PLACEHOLDERS.items():
    out = out.replace(re.escape(name), regex)
  return re.compile(out + r"\Z")


def render(template: str, groups: dict[str, str]) -> str:
  return template.format(**{k: v for k, v in groups.items() if v is not None})


def _block(*pairs: tuple[str, str | tuple[str, ...]], prefix: str, target: str = "blocks.{i}."
           ) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
  """Per-block rules under a source prefix (`blocks.{i}.`, `encoder.layer.{i}.`...)."""
  def expand(t):
    return tuple(target + x for x in t) if isinstance(t, tuple) else target + t
  return tuple((prefix + src, expand(dst)) for src, dst in pairs)


QKV = ("attn.q.{wb}", "attn.k.{wb}", "attn.v.{wb}")
GLU = ("mlp.w1.{wb}", "mlp.w2.{wb}")

# Block parts named the same in timm ViT, EVA-02 and DINOv2 (all descend from timm).
_TIMM_BLOCK = (
    ("norm1.{wb}", "norm1.{wb}"),
    ("norm2.{wb}", "norm2.{wb}"),
    ("attn.proj.{wb}", "attn.proj.{wb}"),
    ("mlp.fc1.{wb}", "mlp.fc1.{wb}"),  # GELU, or packed SwiGLU (split by shape in core)
    ("mlp.fc2.{wb}", "mlp.fc2.{wb}"),
)

# ---------------------------------------------------------------------------------------
# EVA-X released checkpoints (hustvl/EVA-X classification/models/models_eva.py, EVA-02
# names): Ti/S fused qkv + q_bias/v_bias + xformers SwiGLU `w12`/`w3`; B separate
# q/k/v_proj + q_bias/v_bias + w1/w2/ffn_ln/w3; `*_mim.pt` end in norm + lm_head,
# `*_ft.pth` in fc_norm + head.
# ---------------------------------------------------------------------------------------
EVAX = Layout(
    name="evax",
    description="EVA-X / EVA-02 original (models_eva.py)",
    rules=(
        ("patch_embed.proj.{wb}", "patch_embed.{wb}"),
        ("cls_token", "cls_token"),
        ("pos_embed", "pos_embed"),
        *_block(*_TIMM_BLOCK,
                ("attn.qkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight")),
                ("attn.q_proj.weight", "attn.q.weight"),
                ("attn.k_proj.weight", "attn.k.weight"),
                ("attn.v_proj.weight", "attn.v.weight"),
                ("attn.q_bias", "attn.q.bias"),
                ("attn.v_bias", "attn.v.bias"),
                ("mlp.w12.{wb}", GLU),
                ("mlp.w1.{wb}", "mlp.w1.{wb}"),
                ("mlp.w2.{wb}", "mlp.w2.{wb}"),
                ("mlp.w3.{wb}", "mlp.w3.{wb}"),
                ("mlp.ffn_ln.{wb}", "mlp.norm.{wb}"),
                ("gamma_1", "ls1.gamma"),
                ("gamma_2", "ls2.gamma"),
                prefix="blocks.{i}."),
        ("norm.{wb}", "norm.{wb}"),
        ("fc_norm.{wb}", "fc_norm.{wb}"),
    ),
    dropped=("mask_token", "lm_head.{wb}", "head.{wb}", "rope.freqs_cos", "rope.freqs_sin",
             "blocks.{i}.attn.rope.freqs_cos", "blocks.{i}.attn.rope.freqs_sin"),
    unsupported=(
        ("blocks.{i}.attn.inner_attn_ln.{wb}",
         "sub-LN inside attention (EVA-CLIP `inner_attn_ln`) is not implemented in cxrjax"),
        ("rel_pos_bias.relative_position_bias_table",
         "relative position bias (BEiT) is not implemented in cxrjax"),
        ("blocks.{i}.attn.relative_position_bias_table",
         "relative position bias (BEiT) is not implemented in cxrjax"),
    ),
    mim_norm_to_fc_norm=True,
    rope="always",
)

# ---------------------------------------------------------------------------------------
# timm: VisionTransformer (fused qkv with bias, ls1/ls2.gamma, reg_token, SwiGLUPacked
# fc1 or SwiGLU fc1_g/fc1_x, mlp.norm) and Eva (qkv + q_bias/v_bias or q/k/v_proj,
# gamma_1/gamma_2, GluMlp fc1 or SwiGLU fc1_g/fc1_x + mlp.norm).
# ---------------------------------------------------------------------------------------
TIMM = Layout(
    name="timm",
    description="timm VisionTransformer / Eva",
    rules=(
        ("patch_embed.proj.{wb}", "patch_embed.{wb}"),
        ("cls_token", "cls_token"),
        ("reg_token", "reg_tokens"),
        ("pos_embed", "pos_embed"),
        *_block(*_TIMM_BLOCK,
                ("attn.qkv.{wb}", QKV),
                ("attn.q_bias", "attn.q.bias"),
                ("attn.v_bias", "attn.v.bias"),
                ("attn.q_proj.{wb}", "attn.q.{wb}"),
                ("attn.k_proj.{wb}", "attn.k.{wb}"),
                ("attn.v_proj.{wb}", "attn.v.{wb}"),
                ("mlp.fc1_g.{wb}", "mlp.w1.{wb}"),
                ("mlp.fc1_x.{wb}", "mlp.w2.{wb}"),
                ("mlp.norm.{wb}", "mlp.norm.{wb}"),
                ("ls1.gamma", "ls1.gamma"),
                ("ls2.gamma", "ls2.gamma"),
                ("gamma_1", "ls1.gamma"),
                ("gamma_2", "ls2.gamma"),
                prefix="blocks.{i}."),
        ("norm.{wb}", "norm.{wb}"),
        ("fc_norm.{wb}", "fc_norm.{wb}"),
    ),
    dropped=("head.{wb}",),
    unsupported=(
        ("blocks.{i}.attn.norm.{wb}", "sub-LN inside attention (timm scale_attn_inner / "
         "scale_attn_norm) is not implemented in cxrjax"),
        ("blocks.{i}.attn.q_norm.{wb}", "QK-norm is not implemented in cxrjax"),
        ("blocks.{i}.attn.k_norm.{wb}", "QK-norm is not implemented in cxrjax"),
        ("norm_pre.{wb}", "a pre-transformer norm (CLIP pre_norm) is not implemented in "
         "cxrjax"),
        ("patch_embed.norm.{wb}", "a patch-embedding norm is not implemented in cxrjax"),
        ("attn_pool.latent", "attention pooling (global_pool='map') is not implemented in "
         "cxrjax"),
    ),
    rope="eva02",
)

# ---------------------------------------------------------------------------------------
# DINOv2 original (facebookresearch/dinov2; CheXFound ships a `teacher` dict of
# `backbone.` keys in this layout): fused qkv with bias, ls1/ls2.gamma, register_tokens,
# SwiGLUFFNFused w12/w3 or GELU fc1/fc2.
# ---------------------------------------------------------------------------------------
DINOV2 = Layout(
    name="dinov2",
    description="DINOv2 original (facebookresearch/dinov2, CheXFound)",
    rules=(
        ("patch_embed.proj.{wb}", "patch_embed.{wb}"),
        ("cls_token", "cls_token"),
        ("register_tokens", "reg_tokens"),
        ("pos_embed", "pos_embed"),
        *_block(*_TIMM_BLOCK,
                ("attn.qkv.{wb}", QKV),
                ("mlp.w12.{wb}", GLU),
                ("mlp.w3.{wb}", "mlp.w3.{wb}"),
                ("ls1.gamma", "ls1.gamma"),
                ("ls2.gamma", "ls2.gamma"),
                prefix="blocks.{c}{i}."),
        ("norm.{wb}", "norm.{wb}"),
    ),
    dropped=("mask_token", "head.{wb}"),
)

# HF transformers Dinov2Model / Dinov2WithRegistersModel: hub files use the v4 names
# (attention.attention.query, attention.output.dense, mlp.weights_in/weights_out);
# transformers 5 saves q/k/v/o_proj and gate/up/down_proj. Both are accepted.
_HF_ATTN = (
    ("attention.attention.query.{wb}", "attn.q.{wb}"),
    ("attention.attention.key.{wb}", "attn.k.{wb}"),
    ("attention.attention.value.{wb}", "attn.v.{wb}"),
    ("attention.output.dense.{wb}", "attn.proj.{wb}"),
    ("attention.q_proj.{wb}", "attn.q.{wb}"),
    ("attention.k_proj.{wb}", "attn.k.{wb}"),
    ("attention.v_proj.{wb}", "attn.v.{wb}"),
    ("attention.o_proj.{wb}", "attn.proj.{wb}"),
)
_HF_EMBED = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.{wb}", "patch_embed.{wb}"),
)

DINOV2_HF = Layout(
    name="dinov2-hf",
    description="HF transformers Dinov2Model / Dinov2WithRegistersModel",
    rules=(
        *_HF_EMBED,
        ("embeddings.register_tokens", "reg_tokens"),
        *_block(*_HF_ATTN,
                ("norm1.{wb}", "norm1.{wb}"),
                ("norm2.{wb}", "norm2.{wb}"),
                ("layer_scale1.lambda1", "ls1.gamma"),
                ("layer_scale2.lambda1", "ls2.gamma"),
                ("mlp.fc1.{wb}", "mlp.fc1.{wb}"),
                ("mlp.fc2.{wb}", "mlp.fc2.{wb}"),
                ("mlp.weights_in.{wb}", GLU),
                ("mlp.weights_out.{wb}", "mlp.w3.{wb}"),
                ("mlp.gate_proj.{wb}", "mlp.w1.{wb}"),
                ("mlp.up_proj.{wb}", "mlp.w2.{wb}"),
                ("mlp.down_proj.{wb}", "mlp.w3.{wb}"),
                prefix="encoder.layer.{i}."),
        ("layernorm.{wb}", "norm.{wb}"),
    ),
    dropped=("embeddings.mask_token", "classifier.{wb}"),
    signature="embeddings.patch_embeddings.projection.weight",
    prefixes=("dinov2.",),
)

# ---------------------------------------------------------------------------------------
# MAE original (facebookresearch/mae models_mae.py / models_vit.py): timm ViT blocks, the
# fixed sin-cos pos_embed stored as a tensor (imported as a learned table: identical at
# the pretraining size), decoder_* and mask_token dropped; fine-tuned models end in
# fc_norm (global_pool) or norm.
# ---------------------------------------------------------------------------------------
MAE = Layout(
    name="mae",
    description="MAE original (facebookresearch/mae)",
    rules=(
        ("patch_embed.proj.{wb}", "patch_embed.{wb}"),
        ("cls_token", "cls_token"),
        ("pos_embed", "pos_embed"),
        *_block(*_TIMM_BLOCK, ("attn.qkv.{wb}", QKV), prefix="blocks.{i}."),
        ("norm.{wb}", "norm.{wb}"),
        ("fc_norm.{wb}", "fc_norm.{wb}"),
    ),
    dropped=("mask_token", "decoder_embed.{wb}", "decoder_pos_embed", "decoder_norm.{wb}",
             "decoder_pred.{wb}", "decoder_blocks.{*}", "head.{wb}"),
)

# HF transformers ViTMAEModel / ViTMAEForPreTraining (v4 hub names and transformers 5).
MAE_HF = Layout(
    name="mae-hf",
    description="HF transformers ViTMAEModel / ViTMAEForPreTraining",
    rules=(
        *_HF_EMBED,
        *_block(*_HF_ATTN,
                ("layernorm_before.{wb}", "norm1.{wb}"),
                ("layernorm_after.{wb}", "norm2.{wb}"),
                ("intermediate.dense.{wb}", "mlp.fc1.{wb}"),
                ("output.dense.{wb}", "mlp.fc2.{wb}"),
                ("mlp.fc1.{wb}", "mlp.fc1.{wb}"),
                ("mlp.fc2.{wb}", "mlp.fc2.{wb}"),
                prefix="encoder.layer.{i}."),
        *_block(*_HF_ATTN,
                ("layernorm_before.{wb}", "norm1.{wb}"),
                ("layernorm_after.{wb}", "norm2.{wb}"),
                ("mlp.fc1.{wb}", "mlp.fc1.{wb}"),
                ("mlp.fc2.{wb}", "mlp.fc2.{wb}"),
                prefix="layers.{i}."),
        ("layernorm.{wb}", "norm.{wb}"),
    ),
    dropped=("decoder.{*}", "embeddings.mask_token"),
    signature="embeddings.patch_embeddings.projection.weight",
    prefixes=("vit.",),
    norm_eps=1e-12,
)

SOURCES: dict[str, tuple[Layout, ...]] = {
    "evax": (EVAX,),
    "timm": (TIMM,),
    "dinov2": (DINOV2, DINOV2_HF),
    "mae": (MAE, MAE_HF),
}

# Checkpoint wrappers, tried in this order (EMA/teacher weights first, as timm does), and
# key prefixes of training wrappers: DDP `module.`, DINOv2/CheXFound `backbone.`.
WRAPPERS = ("teacher", "model_ema", "model", "module", "state_dict")
WRAPPER_PREFIXES = ("module.", "teacher.backbone.", "backbone.")

# ---------------------------------------------------------------------------------------
# Canonical name -> cxrjax parameter path + layout change. Kinds (core.py implements each
# and its inverse): conv (patch kernel), linear ([out,in] -> [in,out]), qkv_in (q/k/v
# kernel -> [embed, heads, head_dim]), head_bias ([D] -> [heads, head_dim]), attn_out
# (proj kernel -> [heads, head_dim, embed]), norm (LayerNorm weight -> scale), copy.
# ---------------------------------------------------------------------------------------
CXRJAX: tuple[tuple[str, str, str], ...] = (
    ("patch_embed.weight", "patch_embed.kernel", "conv"),
    ("patch_embed.bias", "patch_embed.bias", "copy"),
    ("cls_token", "cls_token", "copy"),
    ("reg_tokens", "reg_tokens", "copy"),
    ("pos_embed", "pos_embed", "copy"),
    ("mask_token", "mask_token", "copy"),
    ("blocks.{i}.norm1.weight", "blocks.{i}.norm1.scale", "norm"),
    ("blocks.{i}.norm1.bias", "blocks.{i}.norm1.bias", "copy"),
    ("blocks.{i}.norm2.weight", "blocks.{i}.norm2.scale", "norm"),
    ("blocks.{i}.norm2.bias", "blocks.{i}.norm2.bias", "copy"),
    ("blocks.{i}.attn.q.weight", "blocks.{i}.attn.q.kernel", "qkv_in"),
    ("blocks.{i}.attn.k.weight", "blocks.{i}.attn.k.kernel", "qkv_in"),
    ("blocks.{i}.attn.v.weight", "blocks.{i}.attn.v.kernel", "qkv_in"),
    ("blocks.{i}.attn.q.bias", "blocks.{i}.attn.q.bias", "head_bias"),
    ("blocks.{i}.attn.k.bias", "blocks.{i}.attn.k.bias", "head_bias"),
    ("blocks.{i}.attn.v.bias", "blocks.{i}.attn.v.bias", "head_bias"),
    ("blocks.{i}.attn.proj.weight", "blocks.{i}.attn.proj.kernel", "attn_out"),
    ("blocks.{i}.attn.proj.bias", "blocks.{i}.attn.proj.bias", "copy"),
    ("blocks.{i}.ls1.gamma", "blocks.{i}.ls1.gamma", "copy"),
    ("blocks.{i}.ls2.gamma", "blocks.{i}.ls2.gamma", "copy"),
    ("blocks.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.kernel", "linear"),
    ("blocks.{i}.mlp.fc1.bias", "blocks.{i}.mlp.fc1.bias", "copy"),
    ("blocks.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.kernel", "linear"),
    ("blocks.{i}.mlp.fc2.bias", "blocks.{i}.mlp.fc2.bias", "copy"),
    ("blocks.{i}.mlp.w1.weight", "blocks.{i}.mlp.w1.kernel", "linear"),
    ("blocks.{i}.mlp.w1.bias", "blocks.{i}.mlp.w1.bias", "copy"),
    ("blocks.{i}.mlp.w2.weight", "blocks.{i}.mlp.w2.kernel", "linear"),
    ("blocks.{i}.mlp.w2.bias", "blocks.{i}.mlp.w2.bias", "copy"),
    ("blocks.{i}.mlp.w3.weight", "blocks.{i}.mlp.w3.kernel", "linear"),
    ("blocks.{i}.mlp.w3.bias", "blocks.{i}.mlp.w3.bias", "copy"),
    ("blocks.{i}.mlp.norm.weight", "blocks.{i}.mlp.inner_norm.scale", "norm"),
    ("blocks.{i}.mlp.norm.bias", "blocks.{i}.mlp.inner_norm.bias", "copy"),
    ("norm.weight", "norm.scale", "norm"),
    ("norm.bias", "norm.bias", "copy"),
    ("fc_norm.weight", "fc_norm.scale", "norm"),
    ("fc_norm.bias", "fc_norm.bias", "copy"),
)

# ---------------------------------------------------------------------------------------
# Export: canonical -> timm. Several canonical sources concatenate along dim 0 (fused
# qkv; packed SwiGLU, gate first). `VIT` targets timm VisionTransformer, `EVA` timm Eva
# with unfused q/k/v_proj (EVA-X B's layout; the function is the same as fused).
# ---------------------------------------------------------------------------------------
_EXPORT_COMMON = (
    ("patch_embed.{wb}", "patch_embed.proj.{wb}"),
    ("cls_token", "cls_token"),
    ("reg_tokens", "reg_token"),
    ("pos_embed", "pos_embed"),
    ("blocks.{i}.norm1.{wb}", "blocks.{i}.norm1.{wb}"),
    ("blocks.{i}.norm2.{wb}", "blocks.{i}.norm2.{wb}"),
    ("blocks.{i}.attn.proj.{wb}", "blocks.{i}.attn.proj.{wb}"),
    ("blocks.{i}.mlp.fc1.{wb}", "blocks.{i}.mlp.fc1.{wb}"),
    ("blocks.{i}.mlp.fc2.{wb}", "blocks.{i}.mlp.fc2.{wb}"),
    ("blocks.{i}.mlp.w3.{wb}", "blocks.{i}.mlp.fc2.{wb}"),
    ("blocks.{i}.mlp.norm.{wb}", "blocks.{i}.mlp.norm.{wb}"),
    ("norm.{wb}", "norm.{wb}"),
    ("fc_norm.{wb}", "fc_norm.{wb}"),
)
# SwiGLU without sub-LN is packed (timm SwiGLUPacked / GluMlp), with it separate
# (timm SwiGLU: fc1_g, fc1_x, norm): the modules timm builds for those options.
EXPORT_GLU_PACKED = (("blocks.{i}.mlp.fc1.{wb}", ("blocks.{i}.mlp.w1.{wb}",
                                                   "blocks.{i}.mlp.w2.{wb}")),)
EXPORT_GLU_SPLIT = (("blocks.{i}.mlp.fc1_g.{wb}", "blocks.{i}.mlp.w1.{wb}"),
                     ("blocks.{i}.mlp.fc1_x.{wb}", "blocks.{i}.mlp.w2.{wb}"))

# (timm name, canonical name or tuple to concatenate); rules apply only to tensors present.
EXPORT_VIT: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    *((dst, src) for src, dst in _EXPORT_COMMON),
    ("blocks.{i}.attn.qkv.{wb}", ("blocks.{i}.attn.q.{wb}", "blocks.{i}.attn.k.{wb}",
                                  "blocks.{i}.attn.v.{wb}")),
    ("blocks.{i}.ls1.gamma", "blocks.{i}.ls1.gamma"),
    ("blocks.{i}.ls2.gamma", "blocks.{i}.ls2.gamma"),
)
EXPORT_EVA: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    *((dst, src) for src, dst in _EXPORT_COMMON),
    ("blocks.{i}.attn.q_proj.{wb}", "blocks.{i}.attn.q.{wb}"),
    ("blocks.{i}.attn.k_proj.{wb}", "blocks.{i}.attn.k.{wb}"),
    ("blocks.{i}.attn.v_proj.{wb}", "blocks.{i}.attn.v.{wb}"),
    ("blocks.{i}.gamma_1", "blocks.{i}.ls1.gamma"),
    ("blocks.{i}.gamma_2", "blocks.{i}.ls2.gamma"),
)


def layout_names() -> Sequence[str]:
  return tuple(layout.name for layouts in SOURCES.values() for layout in layouts)
