r"""CXR-LT 2024, 40 findings (long-tailed multilabel): GLoRI head on a frozen backbone.

  python -m cxrjax.finetune --config=configs/finetune/cxr_lt24.py:init_from=workdirs/chexfound_512 \
      --config.data.data_dir=/data/tfds --workdir=workdirs/ft_cxr_lt

CheXFound (RPIDIAL/CheXFound) trains GLoRI on frozen ViT-L features at 512 px for the 40
CXR-LT 2024 findings. Asymmetric loss (Ridnik et al. 2021, gamma- 4, clip 0.05) for the
long tail, lr 1e-4, 10 epochs and batch 256 are our choices; the validation split is the
challenge's labelled development set.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="cxr_lt_2024", image_size=512, task="multilabel", epochs=10, mode="frozen")
  config.data.update(batch_size=256, num_examples=258_000, val_split="validation",
                     pp_train="random_resized_crop({image_size}, scale=(0.8, 1.0))"
                              "|random_affine(degrees=10)|to_channels(3)|normalize('evax')")
  config.task.update(loss="asl", asl_gamma_neg=4.0, asl_gamma_pos=0.0, asl_clip=0.05)
  config.head.update(name="glori", dim=768, num_heads=8, num_blocks=4, use_cls=True)
  config.optim.update(lr=1e-4, weight_decay=0.05)
  config.schedule.update(warmup_epochs=1.0)
  config.eval.update(every_steps=1000, batch_size=256)
  return config_blocks.finetune_runlocal(config, args)
