r"""RSNA Pneumonia (lung opacity, binary) classification.

  python -m cxrjax.finetune --config=configs/finetune/rsna.py:init_from=workdirs/evax_s \
      --config.data.data_dir=/data/tfds --workdir=workdirs/ft_rsna

EVA-X reports RSNA classification; its repository has no RSNA script, so the settings are
its CXR14 ones (224 px, layer decay 0.55, wd 0.05, drop path 0.2, fixed lr after warmup)
with 10 epochs (ours). Splits: patientId hashed 80/10/10 (cxrjax/data/builders/rsna_pneumonia.py).
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="rsna_pneumonia", image_size=224, task="multilabel", epochs=10)
  config.data.update(batch_size=256, num_examples=21_300, val_split="validation")
  config.model.drop_path_rate = 0.2
  config.optim.update(lr=1e-3 * 256 / 256, layer_decay=0.55, weight_decay=0.05)
  config.schedule.update(name="warmup_constant", warmup_epochs=1.0)
  config.eval.update(every_steps=100, batch_size=128)
  return config_blocks.finetune_runlocal(config, args)
