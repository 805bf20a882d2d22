r"""SIIM-ACR pneumothorax segmentation (Dice + CE), multi-scale ViT decoder.

  python -m cxrjax.finetune --config=configs/finetune/siim.py:init_from=workdirs/evax_b \
      --config.data.data_dir=/data/tfds --workdir=workdirs/ft_siim

EVA-X segments with UperNet and layer decay 0.85 (its segmentation/ configs); our decoder is
the lighter simple-feature-pyramid head of cxrjax/models/heads.py, so numbers are not
directly comparable. Resolution 512, 50 epochs, lr 1e-4 and batch 32 are ours.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="siim_acr_pneumothorax", image_size=512, task="segmentation", epochs=50)
  config.data.update(batch_size=32, num_examples=10_700, val_split="validation",
                     pp_train="random_resized_crop({image_size}, scale=(0.8, 1.0))"
                              "|random_intensity|to_channels(3)|normalize('evax')")
  config.task.num_classes = 2
  config.head.update(name="segmentation", dim=256)
  config.optim.update(lr=1e-4, layer_decay=0.85, weight_decay=0.05)
  config.schedule.update(warmup_epochs=1.0)
  config.eval.update(every_steps=500, batch_size=32)
  return config_blocks.finetune_runlocal(config, args)
