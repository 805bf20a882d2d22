"""CLI: `python -m cxrjax.convert --from=SOURCE --in=FILE --out=DIR` or
`python -m cxrjax.convert --to=timm --in=WORKDIR[:step] --out=FILE.safetensors`.

Errors (wrong architecture, not a checkpoint, a pickle carrying code, bad flags) print
one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from cxrjax.convert import mappings


def _bool(text: str) -> bool:
  value = text.strip().lower()
  if value in ("true", "1", "yes"):
    return True
  if value in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m cxrjax.convert",
      description="Import EVA-X / timm / DINOv2 / MAE weights into a cxrjax workdir, or "
                  "export a cxrjax encoder to timm-layout safetensors.")
  direction = p.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from", dest="source", choices=sorted(mappings.SOURCES),
                         help="layout family of --in (import)")
  direction.add_argument("--to", dest="target", choices=["timm"],
                         help="export --in (a cxrjax WORKDIR[:step]) to this layout")
  p.add_argument("--in", dest="in_path", required=True,
                 help="checkpoint file (.pt/.pth/.safetensors), or WORKDIR[:step] with --to")
  p.add_argument("--out", required=True, help="output workdir, or FILE.safetensors with --to")
  p.add_argument("--variant", help="cxrjax variant to check against, e.g. S/16")
  p.add_argument("--img_size", type=int, help="target resolution (resamples the pos-embed)")
  p.add_argument("--patch_size", type=int, help="target patch size (PI-resizes the kernel)")
  p.add_argument("--rope", type=_bool, help="2-D RoPE on/off (not visible in weights; "
                 "default: on for evax and timm EVA-02 models)")
  p.add_argument("--norm_eps", type=float, help="LayerNorm epsilon (default per layout)")
  p.add_argument("--dtype", choices=["bfloat16", "float32"],
                 help="compute dtype written to config.model.dtype (default: bfloat16, "
                 "or the dtype recorded by a cxrjax export)")
  p.add_argument("--select", help="dotted key of the state dict inside a .pt file, when "
                 "the automatic unwrapping picks the wrong one (e.g. model)")
  p.add_argument("--allow_missing", action="store_true",
                 help="leave parameters absent from the file at random init")
  p.add_argument("--allow_unexpected", action="store_true",
                 help="ignore tensors that do not belong to the architecture")
  p.add_argument("--overwrite", action="store_true", help="replace OUT/checkpoints")
  args = p.parse_args(argv)
  if args.target:
    ignored = [f for f in ("variant", "img_size", "patch_size", "rope", "norm_eps", "dtype",
                           "select")
               if getattr(args, f) is not None]
    if ignored:
      p.error("--to=timm exports the workdir as it is; drop "
              + ", ".join("--" + f for f in ignored))
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  # Imported after argument parsing so that --help and flag errors are instant.
  from cxrjax.config_lib import ConfigError  # pylint: disable=import-outside-toplevel
  from cxrjax.convert import core  # pylint: disable=import-outside-toplevel
  from cxrjax.convert.torch_io import ConvertError  # pylint: disable=import-outside-toplevel
  try:
    if args.target:
      meta = core.export_timm(args.in_path, args.out)
      print(f"wrote {args.out}: timm {meta[core.META_TIMM_CLASS]}("
            f"{meta[core.META_TIMM_KWARGS]})")
      for note in json.loads(meta["cxrjax.notes"]):
        print(f"  note: {note}")
      return 0
    imported = core.convert(
        args.source, args.in_path, args.out, overwrite=args.overwrite, variant=args.variant,
        img_size=args.img_size, patch_size=args.patch_size, rope=args.rope,
        norm_eps=args.norm_eps, dtype=args.dtype, select=args.select,
        allow_missing=args.allow_missing, allow_unexpected=args.allow_unexpected)
  except (ConvertError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(imported.report.summary())
  model = imported.model
  print(f"wrote {args.out} (step 0): variant {model['variant']}, img_size "
        f"{model['img_size']}, mlp {model['mlp']}, rope {model['rope']}, qkv_bias "
        f"{model['qkv_bias']}, registers {model['num_registers']}, pool {model['pool']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
