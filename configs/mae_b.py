r"""MAE ViT-B/16 on CXRs (CXRBase-style masked-autoencoder pretraining).

  python -m cxrjax.main --config=configs/mae_b.py --workdir=workdirs/mae_b

facebookresearch/mae PRETRAIN.md / models_mae.py: 75% random masking, encoder on visible
patches only, decoder 512 wide x 8 blocks x 16 heads, norm_pix_loss, fixed sin-cos position
embeddings, AdamW (0.9, 0.95), blr 1.5e-4 (lr = blr * batch / 256), wd 0.05, batch 4096,
800 epochs with 40 warm-up, crops of scale (0.2, 1). Horizontal flips are left out (CXR
laterality). Arguments: variant=B|L, runlocal.
"""

from cxrjax import config_blocks
from cxrjax.config_lib import ConfigError, parse_arg
from cxrjax.objectives.mae import mae_objective


def get_config(arg=None):
  args = parse_arg(arg, variant="B", runlocal=False)
  if args.variant not in ("B", "L"):
    raise ConfigError(f"config argument variant={args.variant!r} is not one of: B, L")
  config = config_blocks.pretrain_base()
  config.model = config_blocks.model_block(config, f"{args.variant}/16", config_blocks.VIT,
                                           pos_embed="sincos")
  config.objective = mae_objective()
  config.data.pp_train = ("random_resized_crop({image_size}, scale=(0.2, 1.0))|to_channels(3)"
                          "|normalize('evax')")
  config.data.batch_size = 4096
  config.total_epochs = 800.0
  config.schedule.warmup_epochs = 40.0
  config.schedule.min_lr_ratio = 0.0
  config.optim.update(lr=1.5e-4 * 4096 / 256, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                      grad_clip_norm=0.0)

  if args.runlocal:  # minutes on a laptop CPU
    config_blocks.pretrain_runlocal(config)
    config.objective.update(decoder_width=64, decoder_depth=2, decoder_heads=2)
  return config
