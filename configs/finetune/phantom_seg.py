r"""Phantom lung/heart segmentation with the multi-scale ViT decoder (Dice + CE).

  python -m cxrjax.finetune --config=configs/finetune/phantom_seg.py \
      --config.init_from=workdirs/quickstart --workdir=workdirs/ft_phantom_seg

Arguments as configs/finetune/phantom.py (without head/probe). Layer decay 0.85 follows
EVA-X's segmentation choice; the rest is ours.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="phantom", image_size=64, task="segmentation", epochs=0)
  config.total_epochs, config.total_steps = 0.0, 600
  config.data.update(source_size=72, batch_size=16, num_examples=4_000, num_eval_examples=200,
                     pp_train="random_resized_crop({image_size}, scale=(0.7, 1.0))"
                              "|to_channels(3)|normalize('evax')")
  config.task.num_classes = 3
  config.model.update(variant="nano/8", dtype="float32")
  config.head.update(name="segmentation", dim=64)
  config.optim.update(lr=1e-3, layer_decay=0.85 if args.mode == "full" else 1.0)
  config.schedule.warmup_steps = 30
  config.eval.update(every_steps=100, batch_size=20)
  return config_blocks.finetune_runlocal(config, args)
