r"""CheXFound: DINOv2 ViT-L/16 with 4 registers on CXRs, and its high-resolution stages.

  python -m cxrjax.main --config=configs/chexfound_l.py --workdir=workdirs/chexfound_224
  python -m cxrjax.main --config=configs/chexfound_l.py:res=448,init_from=workdirs/chexfound_224 \
      --workdir=workdirs/chexfound_448

RPIDIAL/CheXFound chexfound/configs/train/vitl16_ibot333.yaml (+ dinov2's
ssl_default_config.yaml for everything it leaves unset): ViT-L/16, SwiGLU (hidden 2736, as
dinov2's swiglufused), 4 registers, LayerScale 1e-5, drop path 0.4; DINO and separate iBOT
heads with 131072 prototypes (DINO bottleneck 384), iBOT loss weight 3, Sinkhorn-Knopp
centering, teacher momentum 0.994 -> 1, teacher temperature 0.04 -> 0.07 over 30 epochs,
KoLeo 0.1; 2 global crops + 8 local crops of 96 px; AdamW (0.9, 0.999), base lr 2e-4 scaled
by sqrt(batch / 1024), min lr 1e-6, wd 0.04 -> 0.2 (cosine), gradient clip 3, patch-embed lr
x0.2, no layer-wise decay (1.0), prototypes frozen for the first epoch; 100 epochs of 2500
iterations (OFFICIAL_EPOCH_LENGTH) with 10 warm-up epochs, 38 images x 8 GPUs per step.

res=336|448|512 are the highres configs (global crops at res, local crops 128/128/144,
12/14/10 images per GPU): with init_from=<224 workdir[:step]> they start from that run's
student and teacher, pos-embed resampled (see cxrjax/objectives/dinov2.py). Differences
from dinov2/CheXFound: drop path grows linearly over depth (dinov2: uniform 0.4); tokens and
pos-embed get no weight decay. `runlocal` shrinks everything to a CPU run.
"""

import math

from cxrjax import config_blocks
from cxrjax.config_lib import ConfigError, parse_arg
from cxrjax.objectives.dinov2 import dinov2_objective
from cxrjax.optim_extras import dinov2_optim_block

EPOCH = 2500                                            # train.OFFICIAL_EPOCH_LENGTH
LOCAL_SIZE = {224: 96, 336: 128, 448: 128, 512: 144}     # crops.local_crops_size
PER_GPU_BATCH = {224: 38, 336: 12, 448: 14, 512: 10}     # train.batch_size_per_gpu
GPUS = 8                                                # scripts/run_train_*.sh


def get_config(arg=None):
  args = parse_arg(arg, res=224, init_from="", runlocal=False)
  if args.res not in LOCAL_SIZE:
    raise ConfigError(f"config argument res={args.res} is not one of: "
                      f"{', '.join(map(str, LOCAL_SIZE))}")
  config = config_blocks.pretrain_base()
  config.data.image_size = args.res
  config.data.source_size = args.res
  config.data.pp_train = ""   # multi_crop makes every crop from the decoded radiograph
  config.data.batch_size = PER_GPU_BATCH[args.res] * GPUS
  config.model = config_blocks.model_block(
      config, "L/16", config_blocks.VIT, mlp="swiglu", mlp_ratio=2736 / 1024,
      num_registers=4, layerscale_init=1e-5, drop_path_rate=0.4, drop_path_uniform=True,
      mask_token=True)
  config.objective = dinov2_objective(
      config, local_crop_size=LOCAL_SIZE[args.res], centering="sinkhorn_knopp",
      momentum=0.994, teacher_temp_warmup_epochs=0.0, teacher_temp_warmup_steps=30 * EPOCH,
      dino=dict(prototypes=131072, bottleneck_dim=384),
      ibot=dict(prototypes=131072, separate_head=True, loss_weight=3.0),
      init_from=args.init_from)

  config.total_steps = 100 * EPOCH
  config.schedule.warmup_steps = 10 * EPOCH
  lr = 2e-4 * math.sqrt(config.data.batch_size / 1024)  # scaling_rule: sqrt_wrt_1024
  config.optim.update(dinov2_optim_block(
      lr=lr, weight_decay=0.04, weight_decay_end=0.2, layer_decay=1.0,
      patch_embed_lr_mult=0.2, freeze_prototypes_steps=EPOCH, grad_clip_norm=3.0))
  config.schedule.min_lr_ratio = 1e-6 / lr
  # The weight-decay cosine spans the whole run; a reference follows --config.total_steps.
  config.optim.weight_decay_steps = config.get_ref("total_steps")
  config.checkpoint.save_every_steps = 5000

  if args.runlocal:  # minutes on a laptop CPU
    config.model.update(variant="nano/8", dtype="float32", drop_path_rate=0.1)
    config.data.update(image_size=32, source_size=64, batch_size=16, num_examples=4096,
                       num_threads=2)
    config.objective.update(dict(
        local_crop_size=16, num_local_crops=2, teacher_temp_warmup_steps=30,
        dino=dict(prototypes=256, hidden_dim=128, bottleneck_dim=64),
        ibot=dict(prototypes=256, hidden_dim=128, bottleneck_dim=64)))
    config.total_steps = 100
    config.schedule.warmup_steps = 10
    config.optim.update(lr=1e-3, freeze_prototypes_steps=10)
    config.schedule.min_lr_ratio = 0.01
    config.checkpoint.save_every_steps = 50
    config.log.every_steps = 10
  return config
