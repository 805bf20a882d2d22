r"""Quickstart: a tiny EVA-X pretrained on phantom chest radiographs, on a laptop CPU.

  python -m cxrjax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

A 4-block, 128-wide EVA-02-style student learns to predict, at 40% block-masked 8x8-pixel
patches of 64x64 phantom CXRs, the features of a frozen teacher. No teacher checkpoint
exists on a fresh machine, so the teacher here is an explicitly random ViT (logged as such):
the run shows the whole machinery (data, masks, sharded step, logs, checkpoints), not a
useful encoder. A kNN evaluator reports phantom-finding AUROC of the encoder's features
at steps 150 and 300. Takes about 3-5 minutes on 2 CPU cores.
"""

from cxrjax import config_blocks


def get_config(arg=None):
  del arg
  config = config_blocks.pretrain_base()
  config.total_steps = 300
  config.data.update(image_size=64, source_size=72, batch_size=32, num_examples=20_000,
                     num_threads=2)
  config.data.pp_train = ("random_resized_crop({image_size}, scale=(0.5, 1.0))"
                          "|to_channels(3)|normalize('evax')")
  config.model = config_blocks.model_block(config, "nano/8", config_blocks.EVA02,
                                           mask_token=True, dtype="float32")
  config.objective = config_blocks.evax_objective(
      teacher="random",
      teacher_model=config_blocks.model_block(config, "nano/8", config_blocks.VIT,
                                              dtype="float32"))
  config.optim.lr = 1e-3
  config.schedule.warmup_steps = 20
  config.checkpoint.save_every_steps = 100
  config.log.every_steps = 25
  # A kNN check of the encoder on phantom findings at steps 150 and 300 (cxrjax/evaluators).
  config.evals.knn = dict(type="knn", every_steps=150, num_train=512, num_eval=256,
                          batch_size=64)
  return config
