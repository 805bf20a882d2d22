"""Weight import/export: EVA-X, timm (ViT / Eva), DINOv2 (CheXFound), MAE <-> cxrjax.

Usage
-----
Import a published checkpoint into a cxrjax workdir (an Orbax checkpoint at step 0 with
its `config.model` block), usable as `config.init_from=DIR` or as the EVA-X teacher
`config.objective.teacher=DIR`:

    pip install 'cxrjax[torch]'   # only needed for .pt/.pth files; safetensors needs nothing
    python -m cxrjax.convert --from=evax --in=eva_x_small_patch16_merged520k_mim.pt \
        --out=ckpt/evax_s
    python -m cxrjax.convert --from=dinov2 --in=teacher_checkpoint.pth --out=ckpt/chexfound
    python -m cxrjax.convert --from=mae --in=mae_pretrain_vit_base.pth --out=ckpt/mae_b
    python -m cxrjax.convert --from=timm --in=model.safetensors --out=ckpt/vit --img_size=448

The architecture (width, depth, patch, SwiGLU/GELU, sub-LN, q/k/v biases, registers,
LayerScale, pooling) is read off the tensors; `--variant=S/16` checks it, `--img_size`
resamples the pos-embed, `--patch_size` the patch kernel (FlexiViT PI-resize), `--rope`
and `--norm_eps` set what weights cannot show. Wrappers (`teacher`, `model_ema`, `model`,
`module`, `state_dict`) and `module.`/`backbone.` prefixes are unwrapped; half precision
becomes float32. Dropped keys (mask tokens, MIM/DINO heads, MAE decoder, classifier) are
listed; missing or unexpected keys are an error with a table, unless `--allow_missing` /
`--allow_unexpected`. `.pt` files are read with `torch.load(weights_only=True)` only.

Export an encoder (any cxrjax workdir, `DIR[:step]`) to timm layout:

    python -m cxrjax.convert --to=timm --in=workdir:20000 --out=encoder.safetensors

and in PyTorch: `cxrjax.convert.build_timm_model('encoder.safetensors')` (timm
VisionTransformer, or Eva for RoPE / q,v-bias models, loaded strictly; the file's
metadata holds the class and kwargs).

Python: `convert(source, in_path, out_dir, **flags)`, `import_checkpoint(...)` (no files
written), `export_timm(spec, out_file)`. Numerical parity with the reference PyTorch
models is tested in tests/test_convert.py.
"""

from cxrjax.convert.core import (Imported, Report, build_timm_model, convert, export_timm,
                                 import_checkpoint, resample_patch_kernel, write_workdir)
from cxrjax.convert.mappings import SOURCES
from cxrjax.convert.torch_io import ConvertError, load, read_safetensors, write_safetensors

__all__ = [
    "ConvertError", "Imported", "Report", "SOURCES", "build_timm_model", "convert",
    "export_timm", "import_checkpoint", "load", "read_safetensors", "resample_patch_kernel",
    "write_safetensors", "write_workdir",
]
