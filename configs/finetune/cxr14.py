r"""NIH ChestX-ray14, 14 findings (multilabel), EVA-X fine-tuning recipe.

  python -m cxrjax.finetune --config=configs/finetune/cxr14.py:init_from=workdirs/evax_s \
      --config.data.data_dir=/data/tfds --workdir=workdirs/ft_cxr14_s

Published settings (hustvl/EVA-X classification/train_files/eva_x/cxr14/vit_s.sh): 224 px,
30 epochs, 5 warmup epochs then a fixed lr (`--fixed_lr`), blr 1e-3 with MAE's scaling
lr = blr * global_batch / 256 and a global batch of 4 x 256, layer decay 0.55, weight decay
0.05, drop path 0.2, RandAugment m6 (mstd 0.5), mean pooling, no mixup/cutmix. EVA-X picks
its checkpoint on the official *test* list; we select on our patient-disjoint validation
split of train_val_list.txt and leave the test split to cxrjax.evaluate.
Arguments: init_from, mode, fraction (1%-label runs: fraction=0.01), seed, runlocal.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="nih_cxr14", image_size=224, task="multilabel", epochs=30)
  config.data.update(batch_size=1024, num_examples=78_000, val_split="validation",
                     pp_train="random_resized_crop({image_size}, scale=(0.5, 1.0))|flip_lr"
                              "|randaugment(2, 6, magnitude_std=0.5)|to_channels(3)"
                              "|normalize('evax')")
  config.model.drop_path_rate = 0.2
  config.optim.update(lr=1e-3 * 1024 / 256, layer_decay=0.55, weight_decay=0.05)
  config.schedule.update(name="warmup_constant", warmup_epochs=5.0)
  config.eval.update(every_steps=500, batch_size=256)
  return config_blocks.finetune_runlocal(config, args)
