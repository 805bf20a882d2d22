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
      name="vit", variant=variant, in_chans=3, drop_path_rate=0.0, drop_path_uniform=False,
      dtype="bfloat16",
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


def pretrain_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """runlocal=True of the ViT-B recipes (mae_b, teacher_b): 100 steps of a nano/8 model on
  64 px phantoms, minutes on a laptop CPU. Objective-specific shrinking stays in the recipe."""
  config.model.variant = "nano/8"
  config.model.dtype = "float32"
  config.total_epochs = 0.0
  config.total_steps = 100
  config.schedule.warmup_epochs = 0.0
  config.schedule.warmup_steps = 10
  config.data.update(image_size=64, source_size=72, batch_size=32, num_examples=4096,
                     num_threads=2)
  config.optim.lr = 1e-3
  config.checkpoint.save_every_steps = 50
  config.log.every_steps = 10
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
  Args: variant, runlocal, teacher (WORKDIR[:STEP][#teacher|#ema]: a contrastive or
  DINOv2 cxrjax run, or imported weights), image_term (weight of an image-level InfoNCE
  term added to the MIM loss; 0 = MIM only).
  """
  from cxrjax.config_lib import parse_arg  # pylint: disable=import-outside-toplevel
  args = parse_arg(arg, variant=default_variant, runlocal=False, teacher="", image_term=0.0)
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
  if args.image_term > 0:  # EVA-X's contrastive half as an image-level term (InfoNCE)
    from cxrjax.objectives import contrastive  # pylint: disable=import-outside-toplevel
    contrastive.evax_image_term(config.objective, weight=float(args.image_term))
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


def finetune_base() -> ml_collections.ConfigDict:
  """All blocks of a fine-tuning config (cxrjax.finetune), with phantom defaults.

  The backbone architecture comes from the `init_from` run; config.model only sets what
  fine-tuning changes (img_size, drop_path_rate, dtype) unless init_from='random'.
  """
  config = pretrain_base()
  del config["objective"]
  # workdir[:step] of a pretraining run or of imported weights (python -m cxrjax.convert),
  # or 'random' (config.model as written, random init: the no-pretraining baseline).
  config.init_from = ""
  config.model = model_block(config, "B/16", EVA02, drop_path_rate=0.1)
  config.data.update(
      num_examples=10_000, num_eval_examples=1_000, batch_size=64,
      pp_train=("random_resized_crop({image_size}, scale=(0.7, 1.0))|flip_lr"
                "|to_channels(3)|normalize('evax')"),
      pp_eval="resize({image_size})|to_channels(3)|normalize('evax')",
      label_names=(),
      # Label efficiency: a fixed, seeded, stratified subset of the train split.
      train_fraction=1.0,
      fraction_seed=0,
      val_split="val",           # model selection only ever reads this split
      # 'train+val' refits on both once the settings are chosen (then nothing is selected
      # on validation: the last step is the result; see cxrjax/finetune.py).
      train_split="train",
  )
  # What the head predicts and the loss (cxrjax/tasks.py).
  config.task = dict(name="multilabel", loss="bce", label_smoothing=0.0, asl_gamma_neg=4.0,
                     asl_gamma_pos=0.0, asl_clip=0.05, dice_weight=1.0, ce_weight=1.0,
                     ignore_index=-1, num_classes=0)
  # Head (cxrjax/models/heads.py). Keys of every head live here; each head reads its own.
  config.head = dict(name="linear", features="pooled", dropout=0.0, num_copies=1, dim=256,
                     num_heads=8, num_blocks=4, use_cls=True, blocks=())
  # 'full' (everything trains), 'frozen' (linear probe / frozen-backbone head), 'lora'
  # (low-rank adapters on config.lora.targets), 'bitfit' (biases + head).
  config.mode = "full"
  config.lora = dict(rank=8, alpha=16.0, targets=("attn/q", "attn/v"))
  # Several learning rates for a frozen-backbone head at once (one head copy per lr, chosen
  # on validation), e.g. CheXFound's grid 1e-5 ... 0.1. Empty: config.optim.lr only.
  config.probe_lrs = ()
  config.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                      grad_clip_norm=0.0, ema_decay=0.0, layer_decay=1.0)
  config.schedule = dict(name="warmup_cosine", warmup_steps=0, warmup_epochs=0.0,
                         min_lr_ratio=0.0)
  config.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, prob=1.0)
  # Validation during training; the best step by `select_metric` is kept and recorded in
  # workdir/selection.json, which the evaluation binary reads (never the test split).
  config.eval = dict(every_steps=100, batch_size=64, select_metric="auto", max_batches=0)
  config.checkpoint.update(save_every_steps=0, max_to_keep=2)
  config.log.every_steps = 20
  return config


def finetune_recipe(arg: str | None, *, source: str, image_size: int, task: str,
                    epochs: float, **arg_defaults
                    ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(config, parsed args) shared by configs/finetune/*.py.

  Args every recipe accepts: init_from (pretraining workdir | 'random'), mode, fraction
  (train label fraction), seed, runlocal (shrinks to a CPU smoke run on phantom data).
  """
  from cxrjax.config_lib import parse_arg  # pylint: disable=import-outside-toplevel
  defaults = dict(init_from="", mode="full", fraction=1.0, seed=0, runlocal=False)
  args = parse_arg(arg, **{**defaults, **arg_defaults})
  config = finetune_base()
  config.init_from = args.init_from
  config.mode = args.mode
  config.seed = args.seed
  config.data.train_fraction = float(args.fraction)
  config.data.fraction_seed = args.seed
  config.data.source = source
  config.data.image_size = image_size
  config.data.source_size = image_size
  config.task.name = task
  config.total_epochs = float(epochs)
  return config, args


def finetune_runlocal(config: ml_collections.ConfigDict, args) -> ml_collections.ConfigDict:
  """Called last by a recipe: with runlocal=True, a minute on a laptop CPU (phantom data,
  tiny images, few steps, a micro backbone unless init_from is given)."""
  if not args.runlocal:
    return config
  config.data.update(source="phantom", image_size=32, source_size=40, batch_size=8,
                     num_examples=256, num_eval_examples=32, label_names=(), val_split="val",
                     num_threads=2)
  config.eval.update(every_steps=10, batch_size=8)
  config.total_epochs, config.total_steps = 0.0, 20
  config.schedule.update(warmup_epochs=0.0, warmup_steps=2)
  config.log.every_steps = 5
  config.model.dtype = "float32"
  if not args.init_from:
    config.init_from = "random"
    config.model.variant = "micro/8"
    config.head.num_blocks = min(config.head.num_blocks, 2)  # micro has 2 blocks
  if config.task.name != "segmentation":
    config.task.num_classes = 0
  if config.head.name == "segmentation" or config.task.name == "segmentation":
    config.task.num_classes = 3   # phantom background / lung / heart
  return config
