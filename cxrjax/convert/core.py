"""Conversion core: checkpoint tensors <-> cxrjax ViT parameters and config.

Import: file -> flat tensors (torch_io) -> canonical names (mappings.Layout rules) ->
structural normalisation (packed GLU split, MIM norm, pos-embed coverage) -> inferred
`config.model` block -> Flax arrays, checked against the parameter shapes of the model
that block builds -> an Orbax workdir `OUT/checkpoints/0/{state,config,meta}` that
`checkpoint.load_encoder` reads (so it serves as `init_from` or as the EVA-X teacher).

Export: workdir -> canonical -> timm names (mappings.EXPORT_VIT / EXPORT_EVA) -> a
safetensors file whose metadata holds the timm class and kwargs that load it strictly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from typing import Any, Iterable, Mapping

import numpy as np

from cxrjax.convert import mappings
from cxrjax.convert.torch_io import ConvertError, load, read_safetensors, write_safetensors

TIMM_LAYERSCALE_INIT = 1e-5  # DINOv2's init; only marks LayerScale as present
META_MODEL = "cxrjax.model"  # safetensors metadata keys written by the export
META_TIMM_CLASS = "cxrjax.timm_class"
META_TIMM_KWARGS = "cxrjax.timm_kwargs"


# ----------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------


def table(rows: Iterable[Iterable[Any]], headers: Iterable[str], limit: int = 40) -> str:
  rows = [tuple(map(str, r)) for r in rows]
  headers = tuple(headers)
  shown = rows[:limit]
  widths = [max([len(h)] + [len(r[i]) for r in shown]) for i, h in enumerate(headers)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in shown]
  if len(rows) > limit:
    lines.append(f"... and {len(rows) - limit} more")
  return "\n".join(lines)


def _shape(a: Any) -> str:
  return "x".join(map(str, np.shape(a))) or "scalar"


@dataclasses.dataclass
class Report:
  file: str
  source: str
  layout: str = ""
  format: str = ""
  wrappers: list[str] = dataclasses.field(default_factory=list)
  prefix: str = ""
  stored_dtypes: list[str] = dataclasses.field(default_factory=list)
  mapped: int = 0
  dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # key, shape
  unexpected: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    wrap = ".".join(self.wrappers) or "-"
    counts = f"  {self.mapped} tensors imported, {len(self.dropped)} dropped"
    if self.unexpected:
      counts += f", {len(self.unexpected)} unexpected ignored (--allow_unexpected)"
    if self.missing:
      counts += f", {len(self.missing)} missing initialised (--allow_missing)"
    lines = [f"{self.file}: {self.format}, layout {self.layout} ({self.source}), wrapper "
             f"{wrap}, prefix {self.prefix or '-'}, stored as {', '.join(self.stored_dtypes)}",
             counts]
    if self.dropped:
      lines.append("  dropped: " + ", ".join(k for k, _ in self.dropped[:12])
                   + (" ..." if len(self.dropped) > 12 else ""))
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Source layout -> canonical names.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Compiled:
  layout: mappings.Layout
  rules: list[tuple[re.Pattern, str | tuple[str, ...]]]
  dropped: list[re.Pattern]
  unsupported: list[tuple[re.Pattern, str]]
  signature: re.Pattern


def _compile(layout: mappings.Layout) -> _Compiled:
  return _Compiled(
      layout=layout,
      rules=[(mappings.compile_pattern(p), t) for p, t in layout.rules],
      dropped=[mappings.compile_pattern(p) for p in layout.dropped],
      unsupported=[(mappings.compile_pattern(p), why) for p, why in layout.unsupported],
      signature=mappings.compile_pattern(layout.signature))


def _strip_layout_prefix(keys: Iterable[str], layout: mappings.Layout) -> dict[str, str]:
  """Source key -> key with the layout's model prefix (HF `vit.`/`dinov2.`) removed."""
  keys = list(keys)
  for prefix in layout.prefixes:
    if any(k.startswith(prefix) for k in keys):
      return {k: k[len(prefix):] if k.startswith(prefix) else k for k in keys}
  return {k: k for k in keys}


def _classify(key: str, c: _Compiled):
  for pattern, why in c.unsupported:
    if pattern.match(key):
      return "unsupported", why
  for pattern in c.dropped:
    if pattern.match(key):
      return "dropped", None
  for pattern, target in c.rules:
    m = pattern.match(key)
    if m:
      groups = m.groupdict()
      if isinstance(target, tuple):
        return "mapped", tuple(mappings.render(t, groups) for t in target)
      return "mapped", mappings.render(target, groups)
  return "unexpected", None


def _score(tensors: Mapping[str, np.ndarray], c: _Compiled) -> int:
  names = _strip_layout_prefix(tensors, c.layout)
  if not any(c.signature.match(k) for k in names.values()):
    return -1
  return sum(_classify(k, c)[0] != "unexpected" for k in names.values())


def select_layout(tensors: Mapping[str, np.ndarray], source: str, path: str) -> _Compiled:
  if source not in mappings.SOURCES:
    raise ConvertError(f"--from={source!r} is not a known source; valid choices: "
                       f"{', '.join(mappings.SOURCES)}")
  compiled = [_compile(layout) for layout in mappings.SOURCES[source]]
  scores = [_score(tensors, c) for c in compiled]
  best = int(np.argmax(scores))
  if scores[best] < 0:
    expected = " or ".join(repr(c.layout.signature) for c in compiled)
    rows = [(k, _shape(v)) for k, v in sorted(tensors.items())]
    raise ConvertError(
        f"{path} is not a {source} ViT checkpoint: no key {expected} (the patch "
        f"embedding of the {' / '.join(c.layout.description for c in compiled)} layout). "
        f"Its {len(rows)} tensors:\n" + table(rows, ("key", "shape"), limit=25))
  return compiled[best]


def to_canonical(tensors: Mapping[str, np.ndarray], c: _Compiled, report: Report,
                 allow_unexpected: bool) -> dict[str, np.ndarray]:
  canon: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  unsupported = []
  names = _strip_layout_prefix(tensors, c.layout)
  for key in sorted(tensors):
    value = tensors[key]
    kind, target = _classify(names[key], c)
    if kind == "unsupported":
      unsupported.append((key, _shape(value), target))
    elif kind == "dropped":
      report.dropped.append((key, _shape(value)))
    elif kind == "unexpected":
      report.unexpected.append((key, _shape(value)))
    else:
      targets = target if isinstance(target, tuple) else (target,)
      if value.ndim == 0 or value.shape[0] % len(targets):
        raise ConvertError(f"{report.file}: {key} has shape {value.shape}; expected dim 0 "
                           f"to split into {len(targets)} equal parts "
                           f"({', '.join(targets)})")
      for t, part in zip(targets, np.split(value, len(targets), axis=0)):
        if t in canon:
          raise ConvertError(f"{report.file}: keys {origin[t]!r} and {key!r} both map to "
                             f"{t!r}; the file mixes two layouts")
        canon[t], origin[t] = np.asarray(part, np.float32), key
  if unsupported:
    raise ConvertError(
        f"{report.file} uses features cxrjax's ViT does not implement; converting would "
        "change the model's function:\n"
        + table(unsupported, ("key", "shape", "why")))
  if report.unexpected and not allow_unexpected:
    raise ConvertError(
        f"{report.file}: {len(report.unexpected)} key(s) do not belong to a "
        f"{c.layout.description} ViT (wrong architecture or wrong --from?); pass "
        "--allow_unexpected to import the rest anyway:\n"
        + table(report.unexpected, ("unexpected key", "shape")))
  report.mapped = len(canon)
  return canon


# ----------------------------------------------------------------------------
# Structural normalisation (every layout).
# ----------------------------------------------------------------------------

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def block_indices(canon: Mapping[str, Any]) -> list[int]:
  return sorted({int(m.group(1)) for k in canon for m in [_BLOCK.match(k)] if m})


def _split_packed_glu(canon: dict[str, np.ndarray], report: Report) -> None:
  """A SwiGLU `fc1` packed as [gate; value] has twice fc2's input rows: split it."""
  for i in block_indices(canon):
    p = f"blocks.{i}.mlp."
    fc1, fc2 = canon.get(p + "fc1.weight"), canon.get(p + "fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
      for wb in ("weight", "bias"):
        if p + "fc1." + wb in canon:
          gate, value = np.split(canon.pop(p + "fc1." + wb), 2, axis=0)
          canon[p + "w1." + wb], canon[p + "w2." + wb] = gate, value
    if p + "w1.weight" in canon:
      for wb in ("weight", "bias"):
        if p + "fc2." + wb in canon:
          canon[p + "w3." + wb] = canon.pop(p + "fc2." + wb)


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def _normalize_pos_embed(canon: dict[str, np.ndarray], report: Report,
                         grid_hint: int | None = None) -> int | None:
  """Brings a learned pos-embed to cxrjax coverage [cls?, patches]; returns the grid side.

  Sources differ in what the table covers: [cls, patches] (ViT, DINOv2, EVA), patches
  only (timm no_embed_class, e.g. timm's DINOv2-with-registers), or [cls, registers,
  patches] (timm reg_tokens without no_embed_class). A missing cls row becomes zeros and
  register rows fold into the register tokens: both are exact. Which of these a table is
  follows from which split leaves a square grid; `grid_hint` (from cxrjax metadata)
  settles the rare tables where two do.
  """
  pos = canon.get("pos_embed")
  if pos is None:
    return None
  if pos.ndim == 2:
    pos = pos[None]
  n_cls = int("cls_token" in canon)
  n_reg = canon["reg_tokens"].shape[1] if "reg_tokens" in canon else 0
  rows = pos.shape[1]
  fits = [c for c in dict.fromkeys((n_cls, 0, n_cls + n_reg)) if _is_square(rows - c)]
  if grid_hint and rows - grid_hint * grid_hint in fits:
    fits = [rows - grid_hint * grid_hint]
  if not fits:
    raise ConvertError(
        f"{report.file}: pos_embed has {rows} rows; with {n_cls} cls token(s) and "
        f"{n_reg} register(s) no split leaves a square patch grid (cxrjax supports square "
        "pos-embed grids)")
  covered = fits[0]
  if len(fits) > 1:
    report.notes.append(
        f"pos_embed of {rows} rows read as {covered} prefix rows + a "
        f"{math.isqrt(rows - covered)}^2 grid; {fits[1]} prefix rows would also fit")
  patches = pos[:, covered:]
  cls_row = pos[:, :n_cls] if covered else np.zeros((1, n_cls, pos.shape[2]), np.float32)
  if covered == n_cls + n_reg and n_reg and covered != n_cls:
    canon["reg_tokens"] = canon["reg_tokens"] + pos[:, n_cls:covered]
    report.notes.append("pos_embed rows of the registers folded into the register tokens")
  if covered == 0 and n_cls:
    report.notes.append("pos_embed had no cls row (no_embed_class): a zero row was added")
  canon["pos_embed"] = np.concatenate([cls_row, patches], axis=1)
  return math.isqrt(rows - covered)


# ----------------------------------------------------------------------------
# Inferring the config.model block.
# ----------------------------------------------------------------------------


def ratio_for(hidden: int, width: int) -> float:
  """An mlp_ratio with int(width * ratio) == hidden, preferring the recipes' values."""
  for r in (4.0, 4 * 2 / 3, hidden / width):
    if int(width * r) == hidden:
      return r
  return (hidden + 0.5) / width  # int() truncates: half a unit up always lands on hidden


def _variant(width: int, depth: int, patch: int, requested: str | None, report: Report,
             hint: str | None) -> str:
  from cxrjax.config_lib import ConfigError  # pylint: disable=import-outside-toplevel
  from cxrjax.models import vit  # pylint: disable=import-outside-toplevel
  if requested:
    try:
      v, p = vit.parse_variant(requested)
    except ConfigError as e:
      raise ConvertError(f"--variant: {e}")
    if (v.width, v.depth) != (width, depth):
      raise ConvertError(
          f"--variant={requested} is width {v.width}, depth {v.depth}, but {report.file} "
          f"holds a width-{width}, depth-{depth} ViT (wrong architecture?)")
    if p != patch:
      raise ConvertError(f"--variant={requested} has patch {p}, but the file's patch "
                         f"embedding is {patch}x{patch}; use --patch_size={p} to resample it")
    return requested
  if hint:
    try:
      v, p = vit.parse_variant(hint)
      if (v.width, v.depth, p) == (width, depth, patch):
        return hint
    except ConfigError:  # a stale hint: infer from the weights instead
      pass
  names = [n for n, v in vit.VARIANTS.items() if (v.width, v.depth) == (width, depth)]
  if len(names) != 1:
    known = table(((n, v.width, v.depth, v.num_heads) for n, v in vit.VARIANTS.items()),
                  ("variant", "width", "depth", "heads"))
    raise ConvertError(
        f"{report.file}: no single cxrjax variant has width {width} and depth {depth} "
        f"(found {names or 'none'}); cxrjax builds named variants "
        f"(cxrjax/models/vit.py VARIANTS):\n{known}")
  return f"{names[0]}/{patch}"


def infer_model(canon: dict[str, np.ndarray], layout: mappings.Layout, report: Report, *,
                hint: Mapping[str, Any] | None = None, variant: str | None = None,
                img_size: int | None = None, rope: bool | None = None,
                norm_eps: float | None = None, dtype: str | None = None
                ) -> tuple[dict, int | None]:
  """Returns (config.model block, source grid side or None) for the canonical tensors."""
  hint = dict(hint or {})
  if "patch_embed.weight" not in canon:
    raise ConvertError(f"{report.file}: no patch embedding weight after mapping")
  width, in_chans, ph, pw = canon["patch_embed.weight"].shape
  if ph != pw:
    raise ConvertError(f"{report.file}: patch embedding is {ph}x{pw}; cxrjax supports "
                       "square patches")
  blocks = block_indices(canon)
  if not blocks or blocks != list(range(len(blocks))):
    raise ConvertError(f"{report.file}: transformer blocks {blocks} are not numbered "
                       "0..depth-1")
  depth = len(blocks)
  grid_hint = None
  if hint.get("img_size") and hint.get("variant"):
    grid_hint = int(hint["img_size"]) // int(str(hint["variant"]).split("/")[-1])
  grid = _normalize_pos_embed(canon, report, grid_hint)

  b0 = "blocks.0."
  mlp = "swiglu" if b0 + "mlp.w1.weight" in canon else "gelu"
  up = canon.get(b0 + ("mlp.w1.weight" if mlp == "swiglu" else "mlp.fc1.weight"))
  if up is None:
    raise ConvertError(f"{report.file}: block 0 has no MLP input weight (fc1/w1/w12)")
  if b0 + "attn.k.bias" in canon:
    qkv_bias: bool | str = True
  elif b0 + "attn.q.bias" in canon:
    qkv_bias = "qv"
  else:
    qkv_bias = False
  class_token = "cls_token" in canon
  num_registers = int(canon["reg_tokens"].shape[1]) if "reg_tokens" in canon else 0
  has_norm, has_fc_norm = "norm.weight" in canon, "fc_norm.weight" in canon
  if has_norm and has_fc_norm:
    raise ConvertError(f"{report.file} has both `norm` and `fc_norm`; cxrjax's ViT has one "
                       "final norm (per token, or after mean pooling with fc_norm=True)")
  if has_fc_norm:
    pool = "mean"
  elif hint.get("pool") in ("cls", "mean") and (class_token or hint["pool"] == "mean"):
    pool = hint["pool"]
  else:
    pool = "cls" if class_token else "mean"

  if rope is None:
    if "rope" in hint:
      rope = bool(hint["rope"])
    elif layout.rope == "always":
      rope = True
    elif layout.rope == "eva02" and mlp == "swiglu" and qkv_bias == "qv":
      rope = True
      report.notes.append("rope=True assumed: SwiGLU with q/v-only biases is the EVA-02 "
                          "family; pass --rope=false if this model has no RoPE")
    else:
      rope = False
  if norm_eps is None:
    norm_eps = float(hint.get("norm_eps", layout.norm_eps))

  patch = ph
  if grid is not None:
    src_img = grid * patch
  else:
    src_img = img_size or int(hint.get("img_size", 224))
    if src_img % patch:
      raise ConvertError(f"{report.file}: the model has no pos-embed; pass --img_size as "
                         f"a multiple of the patch size {patch}")
  model = dict(
      name="vit",
      variant=_variant(width, depth, patch, variant, report, hint.get("variant")),
      img_size=int(src_img), in_chans=int(in_chans), mlp=mlp,
      mlp_ratio=ratio_for(int(up.shape[0]), int(width)),
      sub_ln=b0 + "mlp.norm.weight" in canon, rope=rope, qkv_bias=qkv_bias,
      class_token=class_token, num_registers=num_registers,
      pos_embed="learned" if "pos_embed" in canon else "none",
      layerscale_init=(float(hint.get("layerscale_init") or TIMM_LAYERSCALE_INIT)
                       if b0 + "ls1.gamma" in canon else 0.0),
      pool=pool, fc_norm=has_fc_norm,
      drop_path_rate=float(hint.get("drop_path_rate", 0.0)),
      dtype=dtype or hint.get("dtype", "bfloat16"),
      mask_token=False, return_blocks=list(hint.get("return_blocks", [])),
      norm_eps=norm_eps)
  return model, grid


# ----------------------------------------------------------------------------
# Canonical <-> Flax arrays.
# ----------------------------------------------------------------------------

_CXRJAX = [(mappings.compile_pattern(c), f, kind) for c, f, kind in mappings.CXRJAX]
_CXRJAX_INV = [(mappings.compile_pattern(f), c, kind) for c, f, kind in mappings.CXRJAX]


def _forward(kind: str, w: np.ndarray, heads: int) -> np.ndarray:
  if kind == "conv":  # [D, C, ph, pw] -> [(ph pw C), D]: the (p q c) patch flattening
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
  if kind == "linear":
    return w.T
  if kind == "qkv_in":  # [H*hd, D] -> [D, H, hd]
    return w.T.reshape(w.shape[1], heads, -1)
  if kind == "head_bias":
    return w.reshape(heads, -1)
  if kind == "attn_out":  # [D, H*hd] -> [H, hd, D]
    return w.T.reshape(heads, -1, w.shape[0])
  return w


def _inverse(kind: str, a: np.ndarray, patch: int, in_chans: int) -> np.ndarray:
  if kind == "conv":
    return a.reshape(patch, patch, in_chans, a.shape[-1]).transpose(3, 2, 0, 1)
  if kind == "linear":
    return a.T
  if kind == "qkv_in":
    return a.reshape(a.shape[0], -1).T
  if kind == "head_bias":
    return a.reshape(-1)
  if kind == "attn_out":
    return a.reshape(-1, a.shape[-1]).T
  return a


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """'blocks.0.attn.q.kernel' -> nested dict; digit segments become ints (nnx.List)."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def abstract_params(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Flat {path: ShapeDtypeStruct} of the encoder a config.model block builds."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from cxrjax import models  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(dict(model_cfg))
  abstract = nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0)))
  return flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def canonical_to_params(canon: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any],
                        report: Report, allow_missing: bool) -> dict:
  """Builds the pure-dict encoder params, checking every shape against the model."""
  from cxrjax.models import vit  # pylint: disable=import-outside-toplevel
  heads = vit.parse_variant(model_cfg["variant"])[0].num_heads
  expected = abstract_params(model_cfg)
  flat, unplaced, mismatched = {}, [], []
  for key in sorted(canon):
    for pattern, target, kind in _CXRJAX:
      m = pattern.match(key)
      if m:
        path = mappings.render(target, m.groupdict())
        break
    else:
      unplaced.append((key, _shape(canon[key])))
      continue
    value = _forward(kind, canon[key], heads)
    if path not in expected:
      unplaced.append((key, _shape(canon[key])))
    elif tuple(value.shape) != tuple(expected[path].shape):
      mismatched.append((key, path, _shape(value), _shape(expected[path])))
    else:
      flat[path] = np.ascontiguousarray(value, np.float32)
  if mismatched:
    raise ConvertError(
        f"{report.file}: tensor shapes do not fit the inferred model "
        f"{model_cfg['variant']} (wrong architecture or --variant?):\n"
        + table(mismatched, ("source (canonical)", "cxrjax param", "file shape",
                             "model shape")))
  if unplaced:
    raise ConvertError(
        f"{report.file}: tensors with no place in the inferred model "
        f"{model_cfg['variant']} ({len(unplaced)}):\n" + table(unplaced, ("key", "shape")))
  missing = sorted(set(expected) - set(flat))
  report.missing = [(k, _shape(expected[k])) for k in missing]
  if missing and not allow_missing:
    raise ConvertError(
        f"{report.file}: {len(missing)} parameter(s) of the inferred model "
        f"{model_cfg['variant']} are not in the file (wrong architecture or wrong --from?); "
        "pass --allow_missing to initialise them as the model does:\n"
        + table(report.missing, ("missing cxrjax param", "shape")))
  flat.update(_random_init(model_cfg, missing, expected))
  return unflatten(flat)


def _random_init(model_cfg: Mapping[str, Any], paths: Iterable[str],
                 shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Initial values for the params a file lacks, following the model's scheme
  (cxrjax/models/layers.py): LayerNorm scale 1, biases 0, LayerScale at its init value,
  everything else N(0, 0.02) truncated at 2 sigma, output projections scaled by
  1/sqrt(2 * layer). Drawn with numpy (seed 0): building the Flax model just for its
  initialisers costs seconds of XLA compilation."""
  from cxrjax.models.layers import INIT_STD  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  out = {}
  for path in paths:
    shape, leaf = tuple(shapes[path].shape), path.rsplit(".", 1)[-1]
    if leaf == "scale":
      out[path] = np.ones(shape, np.float32)
    elif leaf == "bias":
      out[path] = np.zeros(shape, np.float32)
    elif leaf == "gamma":
      out[path] = np.full(shape, model_cfg["layerscale_init"], np.float32)
    else:
      std = INIT_STD
      m = re.match(r"blocks\.(\d+)\.(attn\.proj|mlp\.fc2|mlp\.w3)\.kernel", path)
      if m:
        std /= math.sqrt(2.0 * (int(m.group(1)) + 1))
      out[path] = (np.clip(rng.standard_normal(shape), -2, 2) * std).astype(np.float32)
  return out


def params_to_canonical(params: Mapping, model_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
  from cxrjax.models import vit  # pylint: disable=import-outside-toplevel
  _, patch = vit.parse_variant(model_cfg["variant"])
  canon = {}
  for path, value in flatten(params).items():
    for pattern, target, kind in _CXRJAX_INV:
      m = pattern.match(path)
      if m:
        canon[mappings.render(target, m.groupdict())] = _inverse(
            kind, np.asarray(value, np.float32), patch, int(model_cfg["in_chans"]))
        break
    else:
      raise ConvertError(f"cxrjax parameter {path} has no timm counterpart")
  return canon


# ----------------------------------------------------------------------------
# Resampling to another resolution or patch size.
# ----------------------------------------------------------------------------


def resample_pos_embed(canon: dict[str, np.ndarray], src_grid: int, dst_grid: int) -> None:
  """Bicubic resize of the patch rows, as the model itself does at run time
  (cxrjax.models.layers.resample_pos_embed), so a converted model at the new size
  computes what the original computes when fed that size."""
  from cxrjax.models import layers  # pylint: disable=import-outside-toplevel
  pos = canon["pos_embed"]
  n_prefix = pos.shape[1] - src_grid * src_grid
  patches = np.asarray(layers.resample_pos_embed(
      pos[:, n_prefix:], (src_grid, src_grid), (dst_grid, dst_grid)))
  canon["pos_embed"] = np.concatenate([pos[:, :n_prefix], patches], axis=1)


def resample_patch_kernel(w: np.ndarray, new: int) -> np.ndarray:
  """FlexiViT PI-resize of a conv patch kernel [D, C, p, p] to [D, C, new, new].

  With B the bilinear resize of a p x p patch to new x new (a linear map), the new
  kernel solves <B x, w'> = <x, w> in the least-squares sense: w' = pinv(B^T) w. Growing
  the patch this is exact for images upsampled the same way; shrinking it is the best
  linear approximation.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  d, c, p, _ = w.shape
  if p == new:
    return w
  basis = jnp.eye(p * p, dtype=jnp.float32).reshape(p * p, p, p)
  resized = jax.image.resize(basis, (p * p, new, new), method="linear", antialias=True)
  b = np.asarray(resized, np.float64).reshape(p * p, new * new).T  # [new^2, p^2]
  pinv = np.linalg.pinv(b.T)  # [new^2, p^2]
  flat = w.reshape(d * c, p * p).astype(np.float64)
  return (flat @ pinv.T).reshape(d, c, new, new).astype(np.float32)


# ----------------------------------------------------------------------------
# Import: file -> config + params -> workdir.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Imported:
  model: dict
  params: dict
  report: Report


def import_checkpoint(path: str, source: str, *, variant: str | None = None,
                      img_size: int | None = None, patch_size: int | None = None,
                      rope: bool | None = None, norm_eps: float | None = None,
                      dtype: str | None = None, select: str | None = None,
                      allow_missing: bool = False, allow_unexpected: bool = False
                      ) -> Imported:
  """Reads a checkpoint of `source` ('evax', 'timm', 'dinov2', 'mae') into cxrjax form."""
  loaded = load(path, select=select)
  report = Report(file=path, source=source, format=loaded.format, wrappers=loaded.wrappers,
                  prefix=loaded.prefix, stored_dtypes=loaded.source_dtypes)
  report.dropped += [(k, "outside " + loaded.prefix) for k in loaded.dropped]
  compiled = select_layout(loaded.tensors, source, path)
  report.layout = compiled.layout.name
  canon = to_canonical(loaded.tensors, compiled, report, allow_unexpected)

  if (compiled.layout.mim_norm_to_fc_norm and "norm.weight" in canon
      and "fc_norm.weight" not in canon
      and any(k in loaded.tensors for k in ("mask_token", "lm_head.weight"))):
    for wb in ("weight", "bias"):
      if f"norm.{wb}" in canon:
        canon[f"fc_norm.{wb}"] = canon.pop(f"norm.{wb}")
    report.notes.append("MIM checkpoint: final `norm` imported as `fc_norm` (mean pooling), "
                        "as EVA-X fine-tuning and timm do; per-token features are unchanged")
  _split_packed_glu(canon, report)

  hint = json.loads(loaded.metadata[META_MODEL]) if META_MODEL in loaded.metadata else None
  if hint:
    report.notes.append("architecture flags not stored in weights (rope, norm_eps, pool) "
                        f"taken from the file's {META_MODEL} metadata")
  model, grid = infer_model(canon, compiled.layout, report, hint=hint, variant=variant,
                            img_size=img_size, rope=rope,
                            norm_eps=norm_eps, dtype=dtype)

  if patch_size and patch_size != int(model["variant"].split("/")[1]):
    old = int(model["variant"].split("/")[1])
    canon["patch_embed.weight"] = resample_patch_kernel(canon["patch_embed.weight"],
                                                        patch_size)
    model["variant"] = f"{model['variant'].split('/')[0]}/{patch_size}"
    report.notes.append(f"patch embedding resampled {old} -> {patch_size} (PI-resize)")
    if grid is not None:
      model["img_size"] = grid * patch_size  # same grid: the pos-embed is unchanged
    elif model["img_size"] % patch_size:
      raise ConvertError(f"img_size {model['img_size']} is not a multiple of "
                         f"--patch_size={patch_size}; pass --img_size")
  patch = int(model["variant"].split("/")[1])
  if img_size and grid is not None and img_size != model["img_size"]:
    if img_size % patch:
      raise ConvertError(f"--img_size={img_size} is not a multiple of the patch size "
                         f"{patch}")
    resample_pos_embed(canon, grid, img_size // patch)
    report.notes.append(f"pos-embed resampled from {grid}x{grid} to "
                        f"{img_size // patch}x{img_size // patch} patches (bicubic)")
    if model["rope"]:
      report.notes.append(
          "RoPE coordinates now span the new grid; to keep the pretraining RoPE scale "
          "convert at the source size and feed larger images (the model rescales both "
          "the pos-embed and RoPE onto its img_size grid)")
    model["img_size"] = img_size
  params = canonical_to_params(canon, model, report, allow_missing)
  return Imported(model=model, params=params, report=report)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_workdir(out: str, model: Mapping[str, Any], params: Mapping, *,
                  extra_config: Mapping[str, Any] | None = None,
                  meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Saves `{"params": {"encoder": params}}` as step 0 of an Orbax workdir."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from cxrjax import checkpoint  # pylint: disable=import-outside-toplevel
  directory = checkpoint.checkpoint_dir(out)
  if os.path.isdir(directory) and os.listdir(directory):
    if not overwrite:
      raise ConvertError(f"--out={out} already holds checkpoints ({directory}); choose a "
                         "new directory or pass --overwrite")
    shutil.rmtree(directory)
  config = {"model": dict(model), **(extra_config or {})}
  info = {"cxrjax": _version(), "jax": jax.__version__, "orbax": ocp.__version__,
          **(meta or {})}
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": {"encoder": params}}),
        config=ocp.args.JsonSave(_jsonable(config)),
        meta=ocp.args.JsonSave(_jsonable(info))))
    manager.wait_until_finished()
  return directory


def _version() -> str:
  import cxrjax  # pylint: disable=import-outside-toplevel
  return cxrjax.__version__


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist")
                               else str(o)))


def convert(source: str, in_path: str, out: str, *, overwrite: bool = False,
            **kwargs) -> Imported:
  """`python -m cxrjax.convert --from=SOURCE --in=FILE --out=DIR` as a function."""
  imported = import_checkpoint(in_path, source, **kwargs)
  report = imported.report
  write_workdir(
      out, imported.model, imported.params, overwrite=overwrite,
      extra_config={"convert": {"source": source, "file": os.path.abspath(in_path),
                                "layout": report.layout}},
      meta={"source_file": os.path.abspath(in_path), "sha256": _sha256(in_path),
            "report": report.as_dict()})
  logging.info("Wrote %s", out)
  return imported


# ----------------------------------------------------------------------------
# Export: workdir -> timm safetensors.
# ----------------------------------------------------------------------------


def _apply_export(canon: dict[str, np.ndarray], rules) -> dict[str, np.ndarray]:
  out, used = {}, set()
  depth = len(block_indices(canon))
  for dst, src in rules:
    for i in range(depth) if "{i}" in dst else [None]:
      for wb in ("weight", "bias") if "{wb}" in dst else [None]:
        groups = {"i": str(i) if i is not None else None, "wb": wb}
        names = [mappings.render(s, groups) for s in (src if isinstance(src, tuple)
                                                      else (src,))]
        if not all(n in canon for n in names):
          continue
        out[mappings.render(dst, groups)] = np.concatenate([canon[n] for n in names], 0)
        used.update(names)
  left = sorted(set(canon) - used)
  if left:
    raise ConvertError(f"export: canonical tensors with no timm name: {left}")
  return out


def timm_layout(model: Mapping[str, Any]) -> tuple[str, dict, Any]:
  """(timm class name, kwargs, export rules) for a cxrjax config.model block."""
  from cxrjax.models import vit  # pylint: disable=import-outside-toplevel
  v, patch = vit.parse_variant(model["variant"])
  width = v.width
  hidden = int(width * (model["mlp_ratio"] if model["mlp_ratio"] is not None
                        else vit.default_mlp_ratio(model["mlp"], v.mlp_ratio)))
  swiglu = model["mlp"] == "swiglu"
  eva = bool(model["rope"]) or model["qkv_bias"] == "qv"
  if eva and model["qkv_bias"] is True:
    raise ConvertError("cannot export to timm: RoPE with a key bias has no timm Eva "
                       "equivalent (Eva has q/v biases only)")
  common = dict(img_size=int(model["img_size"]), patch_size=patch,
                in_chans=int(model["in_chans"]), num_classes=0, embed_dim=width,
                depth=v.depth, num_heads=v.num_heads, class_token=bool(model["class_token"]),
                global_pool="token" if model["pool"] == "cls" else "avg",
                init_values=TIMM_LAYERSCALE_INIT if model["layerscale_init"] else None)
  glu_rules = mappings.EXPORT_GLU_SPLIT if model["sub_ln"] else mappings.EXPORT_GLU_PACKED
  if eva:
    grid = int(model["img_size"]) // patch
    kwargs = dict(common, qkv_bias=model["qkv_bias"] == "qv", qkv_fused=False,
                  mlp_ratio=ratio_for(hidden, width), swiglu_mlp=swiglu,
                  scale_mlp=bool(model["sub_ln"]), use_rot_pos_emb=bool(model["rope"]),
                  ref_feat_shape=[grid, grid], num_reg_tokens=int(model["num_registers"]),
                  use_abs_pos_emb=model["pos_embed"] != "none",
                  use_fc_norm=bool(model["fc_norm"]))
    return "Eva", kwargs, mappings.EXPORT_EVA + glu_rules
  packed = swiglu and not model["sub_ln"]
  kwargs = dict(common, qkv_bias=bool(model["qkv_bias"]),
                mlp_ratio=ratio_for(2 * hidden if packed else hidden, width),
                reg_tokens=int(model["num_registers"]), no_embed_class=False,
                pos_embed="none" if model["pos_embed"] == "none" else "learn",
                fc_norm=bool(model["fc_norm"]), scale_mlp_norm=bool(model["sub_ln"]),
                act_layer="silu" if swiglu else "gelu",
                mlp_layer=("SwiGLUPacked" if packed else "SwiGLU") if swiglu else "Mlp")
  return "VisionTransformer", kwargs, mappings.EXPORT_VIT + (glu_rules if swiglu else ())


def export_timm(spec: str, out_file: str) -> dict:
  """Writes the encoder of workdir `spec` (path[:step]) as a timm-layout safetensors file.

  Returns the metadata written. Load it in PyTorch with `build_timm_model(out_file)`, or
  create the timm class named in the metadata with its kwargs and load_state_dict.
  """
  from cxrjax import checkpoint  # pylint: disable=import-outside-toplevel
  from cxrjax.config_lib import ConfigError  # pylint: disable=import-outside-toplevel
  from cxrjax.models import layers, vit  # pylint: disable=import-outside-toplevel
  if not out_file.endswith(".safetensors"):
    raise ConvertError(f"--out={out_file} must end in .safetensors")
  try:
    model_cfg, params = checkpoint.load_encoder(spec)
  except (ConfigError, FileNotFoundError) as e:
    raise ConvertError(f"--in={spec}: {e}")
  model = model_cfg.to_dict()
  canon = params_to_canonical(params, model)
  notes = []
  if canon.pop("mask_token", None) is not None:
    notes.append("mask_token not exported (timm ViT/Eva have none)")
  v, patch = vit.parse_variant(model["variant"])
  grid = int(model["img_size"]) // patch
  n_cls, n_reg = int(model["class_token"]), int(model["num_registers"])
  if model["pos_embed"] == "sincos":
    table_ = layers.sincos_pos_embed((grid, grid), (grid, grid), v.width)[None]
    canon["pos_embed"] = np.concatenate([np.zeros((1, n_cls, v.width), np.float32), table_],
                                        axis=1)
    notes.append("fixed sin-cos pos-embed exported as a learned table")
  if "pos_embed" in canon and n_reg:
    # timm's table covers [cls, registers, patches]; cxrjax registers have no position.
    pos = canon["pos_embed"]
    canon["pos_embed"] = np.concatenate(
        [pos[:, :n_cls], np.zeros((1, n_reg, v.width), np.float32), pos[:, n_cls:]], axis=1)
  cls_name, kwargs, rules = timm_layout(model)
  tensors = _apply_export(canon, rules)
  metadata = {"format": "pt", META_TIMM_CLASS: cls_name,
              META_TIMM_KWARGS: json.dumps(kwargs), META_MODEL: json.dumps(_jsonable(model)),
              "cxrjax.source": spec, "cxrjax.notes": json.dumps(notes)}
  if float(model["norm_eps"]) != 1e-6:
    metadata["cxrjax.norm_eps"] = repr(float(model["norm_eps"]))
  os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
  write_safetensors(out_file, tensors, metadata)
  return metadata


def build_timm_model(path: str):
  """Creates the timm model an exported file describes and loads it strictly (eval mode).

  Needs torch and timm. The file's metadata names the class (VisionTransformer or Eva)
  and its kwargs.
  """
  import functools  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import timm.layers  # pylint: disable=import-outside-toplevel
  from timm.models import eva, vision_transformer  # pylint: disable=import-outside-toplevel
  tensors, metadata, _ = read_safetensors(path)
  if META_TIMM_CLASS not in metadata:
    raise ConvertError(f"{path} was not written by cxrjax's --to=timm export (no "
                       f"{META_TIMM_CLASS} metadata)")
  kwargs = json.loads(metadata[META_TIMM_KWARGS])
  eps = float(metadata.get("cxrjax.norm_eps", 1e-6))
  if metadata[META_TIMM_CLASS] == "Eva":
    kwargs["ref_feat_shape"] = tuple(kwargs["ref_feat_shape"])
    if eps != 1e-6:
      kwargs["norm_layer"] = functools.partial(timm.layers.LayerNorm, eps=eps)
    model = eva.Eva(**kwargs)
  else:
    kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    if eps != 1e-6:
      kwargs["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=eps)
    model = vision_transformer.VisionTransformer(**kwargs)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                        strict=True)
  return model.eval()
