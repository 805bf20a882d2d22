r"""COVIDx CXR-3 (3 classes) / CXR-4 (2 classes), multiclass, EVA-X recipe at 480 px.

  python -m cxrjax.finetune --config=configs/finetune/covidx.py:version=v4,init_from=W \
      --config.data.data_dir=/data/tfds --workdir=workdirs/ft_covidx4

Published settings (hustvl/EVA-X classification/train_files/eva_x/covidx4/vit_s.sh): input
480 px (position embedding resampled from 224 at load), 10 epochs, 1 warmup epoch, fixed lr,
blr 1e-3 with global batch 4 x 128 (lr = blr * 512 / 256), layer decay 0.55, weight decay
0.05, drop path 0.2, and label fractions 1 / 0.1 / 0.01 (`--data_pct`). EVA-X evaluates on
val.txt as its "test"; we select on the validation split and test once with cxrjax.evaluate.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="covidx", image_size=480, task="multiclass", epochs=10, version="v4")
  config.data.update(batch_size=512, num_examples=67_000, val_split="validation")
  config.data.tfds_name = f"covidx/{args.version}_512"
  config.model.drop_path_rate = 0.2
  config.optim.update(lr=1e-3 * 512 / 256, layer_decay=0.55, weight_decay=0.05)
  config.schedule.update(name="warmup_constant", warmup_epochs=1.0)
  config.eval.update(every_steps=200, batch_size=128)
  return config_blocks.finetune_runlocal(config, args)
