r"""Phantom findings (6-way multilabel), any mode and head: the offline fine-tuning recipe.

  python -m cxrjax.finetune --config=configs/finetune/phantom.py:mode=frozen,head=glori \
      --config.init_from=workdirs/quickstart --workdir=workdirs/ft_phantom

Arguments: init_from, mode=full|frozen|lora|bitfit, head=linear|glori, fraction (train
label fraction), seed, probe (True: linear probe over the lr grid of config.probe_lrs),
runlocal. Hyper-parameters are ours (phantoms have no published recipe).
"""

from cxrjax import config_blocks


def get_config(arg=None):
  config, args = config_blocks.finetune_recipe(
      arg, source="phantom", image_size=64, task="multilabel", epochs=0, head="linear",
      probe=False)
  config.total_epochs, config.total_steps = 0.0, 600
  config.data.update(source_size=72, batch_size=32, num_examples=4_000, num_eval_examples=500)
  config.model.update(variant="nano/8", dtype="float32", drop_path_rate=0.1)
  config.head.name = args.head
  config.head.update(dim=64, num_heads=4)
  config.optim.update(lr=5e-4, layer_decay=0.75 if args.mode == "full" else 1.0)
  config.schedule.warmup_steps = 30
  config.eval.update(every_steps=100, batch_size=50)
  if args.probe:
    config.mode = "frozen"
    config.probe_lrs = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    config.optim.update(lr=1e-3, weight_decay=0.0, grad_clip_norm=0.0)
  return config_blocks.finetune_runlocal(config, args)
