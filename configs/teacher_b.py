r"""Contrastive ViT-B/16 teacher for EVA-X (its "tokenizer" stage), trained on CXRs.

  python -m cxrjax.main --config=configs/teacher_b.py --workdir=workdirs/teacher_b
  python -m cxrjax.main --config=configs/evax_b.py --workdir=workdirs/evax_b \
      --config.objective.teacher=workdirs/teacher_b

EVA-X regresses the features of MGCA, an image-report contrastive ViT-B/16. With a dataset
that yields reports (MIMIC-CXR) this trains the CLIP form (image encoder + byte-level text
encoder, symmetric InfoNCE); without reports (the phantom default, CheXpert, CXR14) it
trains MoCo v3 (two views, momentum encoder). `mode=` forces one.

Arguments (after a colon): variant=S|B, mode=auto|image_image|image_text, runlocal (a
minutes-long CPU run). Optimiser and schedule: MoCo v3 ViT-B (facebookresearch/moco-v3
CONFIG.md: AdamW, lr 1.5e-4 * batch / 256, wd 0.1, 300 epochs, 40 warm-up, batch 4096,
T = 0.2, momentum 0.99 cosine -> 1), with MoCo v3's fixed 2-D sin-cos position embedding.
"""

from cxrjax import config_blocks
from cxrjax.config_lib import ConfigError, parse_arg
from cxrjax.objectives.contrastive import MODES, contrastive_objective


def get_config(arg=None):
  args = parse_arg(arg, variant="B", mode="auto", runlocal=False)
  if args.variant not in ("S", "B"):
    raise ConfigError(f"config argument variant={args.variant!r} is not one of: S, B")
  if args.mode not in MODES:
    raise ConfigError(f"config argument mode={args.mode!r} is not one of: {', '.join(MODES)}")
  config = config_blocks.pretrain_base()
  config.model = config_blocks.model_block(config, f"{args.variant}/16", config_blocks.VIT,
                                           pos_embed="sincos")
  # The objective makes its views (two_views, or crop + tokenize_report) from the decoded
  # radiograph, so the generic crop/normalise ops stay out of pp_train.
  config.data.pp_train = ""
  config.objective = contrastive_objective(config, mode=args.mode)
  config.data.batch_size = 4096
  config.total_epochs = 300.0
  config.schedule.warmup_epochs = 40.0
  config.schedule.min_lr_ratio = 0.0
  config.optim.update(lr=1.5e-4 * 4096 / 256, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                      grad_clip_norm=0.0)

  if args.runlocal:  # minutes on a laptop CPU
    config_blocks.pretrain_runlocal(config)
    config.objective.update(proj_dim=64, mlp_dim=256, text_width=64, text_depth=2,
                            text_heads=2, max_report_len=128)
  return config
