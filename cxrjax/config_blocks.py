"""Shared config blocks for the files in configs/ (big_vision's configs/common.py role).

Each recipe file builds its ConfigDict from these blocks and then sets what differs, so
every recipe has the same keys and `--config.x=y` overrides are checked against them.
"""

from __future__ import annotations

import ml_collections

# Architecture flags of the model families. `img_size` is filled in from data.image_size
# (a FieldReference, so `--config.data.image_size=448` moves both).
EVA02 = dict(mlp="swiglu", mlp_ratio=4 * 2 / 3, sub_ln=False, rope=True, qkv_bias="qv",
             class_token=True, num_registers=0, pos_embed="learned", layerscale_init=0.0,
             pool="mean", fc_norm=True)
VIT = dict(mlp="gelu", mlp_ratio=4.0, sub_ln=False, rope=False, qkv_bias=True,
           class_token=True, num_registers=0, pos_embed="learned", layerscale_init=0.0,
           pool="cls", fc_norm=False)


def model_block(config: ml_collections.ConfigDict, variant: str, family: dict, **overrides
                ) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict(dict(
      name="vit", variant=variant, in_chans=3, drop_path_rate=0.0, dtype="bfloat16",
      mask_token=False, return_blocks=(), norm_eps=1e-6, **family))
  model.img_size = config.data.get_ref("image_size")
  model.update(overrides)
  return model


def pretrain_base() -> ml_collections.ConfigDict:
  """All blocks of a pretraining config, with laptop-neutral defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Duration: exactly one of total_steps / total_epochs is > 0.
  config.total_steps = 0
  config.total_epochs = 0.0

  config.data = dict(
      source="phantom",          # registered source (cxrjax.data.pipeline)
      num_examples=100_000,      # phantom: size of the train split
      num_eval_examples=2_000,
      phantom_seed=0,
      source_size=256,           # resolution sources render/decode at, before augmentation
      image_size=224,            # network input resolution
      batch_size=256,            # global batch over all processes and devices
      pp_train=("random_resized_crop({image_size}, scale=(0.5, 1.0))|to_channels(3)"
                "|normalize('evax')"),
      num_workers=0,             # Grain worker processes (0: in the main process)
      num_threads=4,
      prefetch=4,
      # Where non-phantom sources read from (cxrjax/data/pipeline.py): the TFDS data_dir
      # (source=<dataset> or 'tfds'), the `prepare` output ('array_record'), the image
      # folder ('folder'), or the root of relative manifest paths ('manifest').
      data_dir="",
      tfds_name="",              # source='tfds': e.g. 'chexpert/competition_512'
      manifest="",               # source='manifest': CSV/JSONL; '{split}' is substituted
      label_names=(),            # manifest label columns (empty: inferred)
      label_policy="u_ignore",   # uncertain (-1) labels: u_ignore|u_ones|u_zeros|u_smooth_*
      missing_label="mask",      # blank labels: 'mask' or 'negative'
      max_boxes=16,              # boxes padded with -1 to this many per image
      sources=(),                # source='mixture': (dict(source=..., weight=...), ...)
      # Unreadable examples are skipped and counted; more than this fraction (checked
      # after failure_check_after examples, and at the end of a split) stops the run.
      max_decode_failure_fraction=0.01,
      failure_check_after=200,
  )
  config.model = model_block(config, "B/16", EVA02)

  config.objective = ml_collections.ConfigDict(dict(name="evax_mim"))

  config.optim = dict(name="adamw", lr=1.5e-3, b1=0.9, b2=0.98, eps=1e-6,
                      weight_decay=0.05, grad_clip_norm=3.0, ema_decay=0.0)
  config.schedule = dict(name="warmup_cosine", warmup_steps=0, warmup_epochs=0.0,
                         min_lr_ratio=0.01)
  # Mesh axis sizes; one may be -1 (fill). num_devices > 0 uses only the first N local
  # devices (single-process debugging and tests); 0 uses every device of every process.
  config.mesh = dict(data=-1, fsdp=1, tensor=1, num_devices=0)
  # Kept: the newest max_to_keep steps (resume needs the latest), every keep_every_steps-th
  # step, and the keep_best_n best by a logged metric ('' = off; e.g. 'loss' with 'min').
  config.checkpoint = dict(save_every_steps=1000, max_to_keep=3, keep_every_steps=0,
                           keep_best_metric="", keep_best_mode="min", keep_best_n=1,
                           async_save=True)
  config.log = dict(every_steps=50, memory_analysis=True)
  # What to do on a non-finite loss or gradient: 'stop' (raise, naming the step, the loss
  # terms and the last checkpoint) or 'skip' (drop that update and count it).
  config.nan_policy = "stop"
  config.evals = ml_collections.ConfigDict()
  return config


def evax_objective(teacher: str = "", mask_ratio: float = 0.4,
                   teacher_model: ml_collections.ConfigDict | None = None
                   ) -> ml_collections.ConfigDict:
  """EVA-X MIM block. `teacher_model` is only used when teacher='random'."""
  return ml_collections.ConfigDict(dict(
      name="evax_mim",
      teacher=teacher,           # cxrjax workdir[:step] | imported checkpoint dir | 'random'
      teacher_seed=1,
      teacher_model=teacher_model or ml_collections.ConfigDict(),
      mask_ratio=mask_ratio,     # EVA-02: ~40% of patches, block-wise
      min_mask_block=16,         # BEiT/EVA-02 minimum block size (patches)
  ))


def evax_pretrain(arg: str | None, default_variant: str) -> ml_collections.ConfigDict:
  """The EVA-X MIM recipe at any size (shared by configs/evax_{ti,s,b}.py).

  Architectures follow hustvl/EVA-X `eva_x.py`: patch 16, SwiGLU with mlp_ratio 4*2/3,
  2-D RoPE (reference grid 14x14), mean pooling with fc_norm; B adds sub-LN in the MLP
  (`scale_mlp=True`) and unfused q/k/v. hustvl/EVA-X publishes no pretraining script, so
  the optimiser settings are EVA-02's MIM choices (AdamW, beta2 0.98, wd 0.05, ~40%
  block-wise masks) and the duration is ours: state that when you report results.
  """
  from cxrjax.config_lib import parse_arg  # pylint: disable=import-outside-toplevel
  args = parse_arg(arg, variant=default_variant, runlocal=False, teacher="")
  sizes = {"Ti": "Ti/16", "S": "S/16", "B": "B/16"}
  if args.variant not in sizes:
    from cxrjax.config_lib import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(f"config argument variant={args.variant!r} is not one of: "
                      f"{', '.join(sizes)}")
  config = pretrain_base()
  config.model = model_block(config, sizes[args.variant], EVA02, mask_token=True,
                             sub_ln=args.variant == "B")
  # The published EVA-X tokenizer is an image-text contrastive ViT-B/16 (MGCA); this is
  # the architecture built when teacher='random' (smoke tests only).
  config.objective = evax_objective(teacher=args.teacher,
                                    teacher_model=model_block(config, "B/16", VIT))
  config.total_epochs = 300.0
  config.schedule.warmup_epochs = 10.0
  config.data.num_examples = 520_000   # EVA-X merged ~520k unlabelled CXRs (ckpt name)
  config.data.batch_size = 2048

  if args.runlocal:  # minutes on a laptop CPU: tiny images, few steps, small batches
    config.total_epochs = 0.0
    config.total_steps = 20
    config.schedule.warmup_epochs = 0.0
    config.schedule.warmup_steps = 5
    config.data.update(image_size=64, source_size=72, batch_size=8, num_examples=512)
    config.objective.teacher = args.teacher or "random"
    config.checkpoint.save_every_steps = 10
    config.log.every_steps = 5
  return config
