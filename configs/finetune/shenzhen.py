r"""Shenzhen tuberculosis (binary) classification, 662 images.

  python -m cxrjax.finetune --config=configs/finetune/shenzhen.py:init_from=workdirs/evax_s \
      --config.data.data_dir=/data/tfds --workdir=workdirs/ft_shenzhen

No published script; CXR14-style EVA-X settings (layer decay 0.55, wd 0.05, drop path 0.2)
with 50 epochs and batch 64 for the small set (ours). Splits: patient hash 80/10/10.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="shenzhen_tb", image_size=224, task="multilabel", epochs=50)
  config.data.update(batch_size=64, num_examples=530, val_split="validation")
  config.model.drop_path_rate = 0.2
  config.optim.update(lr=5e-4, layer_decay=0.55, weight_decay=0.05)
  config.schedule.update(warmup_epochs=5.0)
  config.eval.update(every_steps=20, batch_size=64)
  return config_blocks.finetune_runlocal(config, args)
