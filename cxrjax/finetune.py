r"""Fine-tuning binary: linear probes, full fine-tuning, GLoRI, segmentation, LoRA/BitFit.

  python -m cxrjax.finetune --config=configs/finetune/phantom.py \
      --config.init_from=workdirs/quickstart --workdir=workdirs/ft_phantom

Reads top to bottom like cxrjax.main: config, mesh, data (train + validation), backbone
(any pretraining run's encoder, or imported weights, position embedding resampled to the
fine-tuning resolution), split into trainable and frozen params by `config.mode`, update
step, resume, loop with periodic validation. Model selection reads only the validation
split: the best step by `config.eval.select_metric` is kept (checkpoint keep-best) and named
in `workdir/selection.json`, which `cxrjax.evaluate` reads. The test split is never read
here. Restarting with the same --workdir resumes; SIGTERM saves and exits 0.

Modes (config.mode): 'full' (every parameter; layer-wise lr decay with
config.optim.layer_decay), 'frozen' (backbone frozen bit-for-bit: linear probe / GLoRI on
frozen features; config.probe_lrs trains one head copy per learning rate in one pass),
'lora' (low-rank adapters on config.lora.targets, cxrjax/peft.py), 'bitfit' (biases + head).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cxrjax import checkpoint as ckpt_lib
from cxrjax import config_lib, inference, metric_writers, optim, optim_extras, parallel, peft
from cxrjax import tasks
from cxrjax import validation  # noqa: F401  pylint: disable=unused-import  (registers checks)
from cxrjax.config_lib import ConfigError
from cxrjax.data import mixing, phantom, pipeline
from cxrjax.main import (NonFiniteLossError, interval_means, log_memory, peek_batch,
                         place_weights, resume, run_binary)
from cxrjax.metrics import classification as cls_metrics
from cxrjax.metrics import segmentation as seg_metrics
from cxrjax.models import classifier

MODES = ("full", "frozen", "lora", "bitfit")
SELECTION_FILE = "selection.json"
# The validation metric each task selects on with select_metric='auto'.
AUTO_SELECT = {"multilabel": "auroc", "multiclass": "accuracy", "segmentation": "dice"}
EVAL_KEEP_KEYS = ("labels", "label_mask", "seg", "boxes")


# ----------------------------------------------------------------------------
# Config rules.
# ----------------------------------------------------------------------------


@config_lib.check
def _finetune_rules(config):
  if "task" not in config:
    return
  config_lib.require_choice(config, "mode", MODES)
  config_lib.require_choice(config, "task.name", tasks.names())
  if not 0.0 < config.data.train_fraction <= 1.0:
    raise ConfigError(f"config.data.train_fraction={config.data.train_fraction} must be in "
                      "(0, 1]")
  if config.optim.layer_decay <= 0 or config.optim.layer_decay > 1:
    raise ConfigError(f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1]")
  select = config.eval.select_metric
  allowed = ("auto", "auroc", "auprc", "accuracy", "dice", "loss")
  if select not in allowed:
    raise ConfigError(f"config.eval.select_metric={select!r} is not one of: {', '.join(allowed)}")
  if config.probe_lrs:
    if config.mode != "frozen" or config.head.name != "linear":
      raise ConfigError(f"config.probe_lrs={tuple(config.probe_lrs)} trains several linear "
                        f"heads on frozen features: it needs config.mode='frozen' and "
                        f"config.head.name='linear' (got mode={config.mode!r}, "
                        f"head.name={config.head.name!r})")
    if config.optim.grad_clip_norm > 0:
      raise ConfigError(f"config.optim.grad_clip_norm={config.optim.grad_clip_norm} would "
                        "couple the head copies of config.probe_lrs; set it to 0")
    if min(config.probe_lrs) <= 0:
      raise ConfigError(f"config.probe_lrs={tuple(config.probe_lrs)} must all be positive")
  if is_refit(config) and len(config.probe_lrs) > 1:
    raise ConfigError(f"config.data.train_split={config.data.train_split!r} includes the "
                      f"validation split, so nothing can be selected on it: give the one "
                      f"chosen learning rate, e.g. config.probe_lrs=({config.probe_lrs[0]},)")
  if config.mode == "lora" and (config.lora.rank < 1 or not config.lora.targets):
    raise ConfigError(f"config.lora.rank={config.lora.rank} must be >= 1 and "
                      f"config.lora.targets={tuple(config.lora.targets)} non-empty")


def is_refit(config) -> bool:
  """Whether the run trains on its validation split (refit after selection)."""
  return config.data.val_split in config.data.train_split.split("+")


def class_names(config: ml_collections.ConfigDict, source) -> tuple[str, ...]:
  """Output classes: config.data.label_names, else the source's, else the phantom's."""
  if config.task.name == "segmentation":
    if config.data.source == "phantom":
      return phantom.SEG_CLASSES
    if config.task.num_classes < 2:
      raise ConfigError(f"config.task.num_classes={config.task.num_classes}: segmentation of "
                        f"{config.data.source!r} needs the number of mask classes (>= 2)")
    return tuple(f"class_{i}" for i in range(config.task.num_classes))
  names = tuple(config.data.label_names) or tuple(getattr(source, "label_names", None) or ())
  if not names and config.data.source == "phantom":
    names = phantom.FINDINGS
  if not names:
    raise ConfigError(f"cannot tell the classes of config.data.source={config.data.source!r}; "
                      "set config.data.label_names")
  return names


def selected_metric(config) -> str:
  name = config.eval.select_metric
  return AUTO_SELECT[config.task.name] if name == "auto" else name


# ----------------------------------------------------------------------------
# Trainable / frozen split.
# ----------------------------------------------------------------------------


def trainable_predicate(mode: str):
  """path -> whether the parameter trains (the head always does)."""
  def is_trainable(path: str) -> bool:
    if not path.startswith("encoder/"):
      return True
    if mode == "full":
      return True
    if mode == "bitfit":
      return peft.bitfit_predicate(path)
    return False  # frozen, lora: the backbone stays bit-identical
  return is_trainable


def full_params(params: dict, frozen: dict | None, config) -> dict:
  """Every model parameter from the trainable and frozen parts (LoRA deltas applied)."""
  params = dict(params)
  lora = params.pop("lora", None)
  merged = peft.combine(params, frozen) if frozen else params
  if lora is not None:
    merged = dict(merged, encoder=peft.lora_apply(merged["encoder"], lora,
                                                  alpha=config.lora.alpha,
                                                  rank=config.lora.rank))
  return merged


def scale_head_copies(factors: np.ndarray) -> optax.GradientTransformation:
  """Per-copy learning rates: head leaves have a leading copies axis (config.probe_lrs)."""
  def update(updates, state, params=None):
    del params
    def scale(path, u):
      if optim_extras.path_names(path)[0] != "head":
        return u
      return u * jnp.asarray(factors, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  parts = [optim.make_optimizer(config, schedule)]
  if config.optim.layer_decay != 1.0:  # BEiT/EVA layer-wise decay: lr * decay^(L+1-layer)
    parts.append(optim_extras.scale_by_lr_multipliers(config.optim.layer_decay, 1.0))
  if config.probe_lrs:
    parts.append(scale_head_copies(np.asarray(config.probe_lrs) / config.optim.lr))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------
# Validation score.
# ----------------------------------------------------------------------------


def validation_scores(task_name: str, metric: str, preds: dict[str, np.ndarray],
                      names: tuple[str, ...]) -> np.ndarray:
  """The selection metric per head copy ([copies]); higher is better."""
  if task_name == "segmentation":
    report = seg_metrics.dice_jaccard(preds["pred"], preds["seg"], names)
    key = "dice_dataset" if metric == "dice" else None
    if key is None:
      raise ConfigError(f"config.eval.select_metric={metric!r} is not defined for "
                        "segmentation; use 'dice'")
    return np.array([report["mean"][key]], np.float64)
  probs = preds["probs"]  # [N, copies, K]
  labels = preds["labels"]
  mask = preds.get("label_mask", np.ones_like(labels))
  scores = []
  for c in range(probs.shape[1]):
    p = probs[:, c]
    if metric in ("auroc", "auprc"):
      fn = cls_metrics.auroc if metric == "auroc" else cls_metrics.average_precision
      values = [fn(p[mask[:, k] > 0, k], labels[mask[:, k] > 0, k]) for k in range(p.shape[1])]
      values = [v for v in values if v is not None]
      scores.append(np.mean(values) if values else np.nan)
    elif metric == "accuracy":
      if task_name == "multiclass":
        keep = labels.sum(-1) > 0
        scores.append(np.mean(p[keep].argmax(-1) == labels[keep].argmax(-1)))
      else:
        scores.append(np.sum(((p > 0.5) == (labels > 0.5)) * mask) / max(mask.sum(), 1))
    else:
      raise ConfigError(f"config.eval.select_metric={metric!r} is not computed on validation "
                        "predictions; use auroc, auprc, accuracy or dice")
  return np.asarray(scores, np.float64)


class Selection:
  """workdir/selection.json: the validation history and the best (step, head copy)."""

  def __init__(self, workdir: str, metric: str, lrs: tuple[float, ...], weights: str):
    self.path = os.path.join(workdir, SELECTION_FILE)
    self.data = {"metric": f"val/{metric}", "mode": "max", "split": None, "weights": weights,
                 "probe_lrs": list(lrs), "best": None, "history": []}
    if os.path.exists(self.path):  # a resumed run continues its history
      with open(self.path, encoding="utf-8") as f:
        self.data = json.load(f)

  def add(self, step: int, scores: np.ndarray, split: str) -> tuple[float, int]:
    finite = np.where(np.isfinite(scores), scores, -np.inf)
    copy = int(np.argmax(finite))
    value = float(scores[copy])
    self.data["split"] = split
    self.data["history"] = [h for h in self.data["history"] if h["step"] < step]
    self.data["history"].append({"step": step, "value": value, "copy": copy,
                                 "per_copy": [float(s) for s in scores]})
    # Ties go to the later step, as the checkpoint manager's keep-best rule breaks them.
    best = max(self.data["history"], key=lambda h: (np.nan_to_num(h["value"], nan=-np.inf),
                                                     h["step"]))
    lrs = self.data["probe_lrs"]
    self.data["best"] = dict(step=best["step"], value=best["value"], copy=best["copy"],
                             lr=lrs[best["copy"]] if lrs else None)
    return value, copy

  def add_refit(self, step: int, train_split: str) -> None:
    """A refit run: its last step is the result (no validation score exists)."""
    lrs = self.data["probe_lrs"]
    self.data.update(split=None, refit_on=train_split, history=[],
                     best=dict(step=step, value=None, copy=0, lr=lrs[0] if lrs else None))

  def write(self) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.data, f, indent=2)
    os.replace(tmp, self.path)


def read_selection(workdir: str) -> dict | None:
  path = os.path.join(workdir, SELECTION_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def resolve_config(config: ml_collections.ConfigDict
                   ) -> tuple[ml_collections.ConfigDict, dict | None]:
  """The config this run records (backbone architecture from init_from) + encoder weights."""
  model_cfg, encoder = classifier.backbone_from(config.init_from, config)
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  config.model = ml_collections.ConfigDict(model_cfg)
  if config.probe_lrs:
    config.head.num_copies = len(config.probe_lrs)
  return config, encoder


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) fine-tuning in `workdir`; returns the last logged metrics."""
  config_lib.validate(config)
  config, encoder_weights = resolve_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_writer = jax.process_index() == 0

  # ---------------------------------------------------------------- Mesh.
  mesh = parallel.make_mesh(config.mesh)
  logging.info("%s", parallel.device_summary(mesh))
  writer = metric_writers.create(workdir, active=is_writer)
  steps_per_epoch = config.data.num_examples * config.data.train_fraction / config.data.batch_size
  total_steps = optim.steps_from(config, "total", steps_per_epoch)

  # ---------------------------------------------------------------- Task + data.
  task = tasks.get(config.task.name)(config.task)
  batch_keys = ("image", *task.batch_keys)
  pp_train = config.data.pp_train.format(image_size=config.data.image_size)
  train_ds = pipeline.make_dataset(config.data, split=config.data.train_split, pp=pp_train,
                                   seed=config.seed,
                                   global_batch=config.data.batch_size, repeat=True)
  train_iter = pipeline.make_iterator(train_ds, config.data)
  names = class_names(config, train_ds.source)
  config.class_names = tuple(names)  # the output classes, recorded for cxrjax.evaluate
  if is_writer:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  pp_eval = config.data.pp_eval.format(image_size=config.data.image_size)
  val_ds = pipeline.make_dataset(config.data, split=config.data.val_split, pp=pp_eval,
                                 seed=config.seed, global_batch=config.eval.batch_size,
                                 repeat=False)
  logging.info("Task %s over %d classes (%s); train %s (fraction %g), validation split %r",
               config.task.name, len(names), ", ".join(names), config.data.source,
               config.data.train_fraction, config.data.val_split)

  # ---------------------------------------------------------------- Model, abstract init.
  def build(rngs):
    return classifier.Classifier(config.model, config.head, len(names), rngs=rngs)

  graphdef, abstract_all = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param)
  is_trainable = trainable_predicate(config.mode)
  schedule = optim.make_schedule(config, total_steps, steps_per_epoch)
  tx = make_optimizer(config, schedule)
  use_ema = config.optim.ema_decay > 0

  def init(rng):
    all_params = nnx.to_pure_dict(nnx.state(build(nnx.Rngs(rng)), nnx.Param))
    params, frozen = peft.partition(all_params, is_trainable)
    if config.mode == "lora":
      params["lora"] = peft.lora_init(all_params["encoder"], targets=config.lora.targets,
                                      rank=config.lora.rank, rng=jax.random.fold_in(rng, 2))
    state = {"params": params, "opt_state": tx.init(params), "frozen": frozen,
             "step": jnp.zeros((), jnp.int32), "rng": jax.random.fold_in(rng, 1),
             "skipped_steps": jnp.zeros((), jnp.int32)}
    if use_ema:
      state["ema"] = params
    return state

  # ---------------------------------------------------------------- Shardings.
  repl = parallel.replicated(mesh)
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  all_sh = nnx.to_pure_dict(parallel.param_shardings(abstract_all, mesh))
  params_sh, frozen_sh = peft.partition(all_sh, is_trainable)
  if config.mode == "lora":  # adapters are small: replicated
    params_sh["lora"] = jax.tree.map(lambda _: repl, abstract_state["params"]["lora"])
  state_sh = {
      "params": params_sh, "frozen": frozen_sh,
      "opt_state": optax.tree_utils.tree_map_params(
          tx, lambda _, sh: sh, abstract_state["opt_state"], params_sh,
          transform_non_params=lambda _: repl),
      "step": repl, "rng": repl, "skipped_steps": repl}
  if use_ema:
    state_sh["ema"] = params_sh
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)

  with jax.set_mesh(mesh):
    # ---------------------------------------------------------------- Sharded init + backbone.
    state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
    if encoder_weights is not None:
      state = _load_backbone(state, encoder_weights, is_trainable, use_ema)
      logging.info("Backbone from %s", config.init_from)
    else:
      logging.warning("config.init_from='random': the backbone starts from random weights")
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    logging.info("Parameters: %s trainable, %s frozen (mode %r)", f"{count(state['params']):,}",
                 f"{count(state['frozen']):,}", config.mode)

    # ---------------------------------------------------------------- Update step.
    skip_nonfinite = config.nan_policy == "skip"
    copies = max(len(config.probe_lrs), 1)
    mix = config.mixup.mixup_alpha > 0 or config.mixup.cutmix_alpha > 0

    def forward(params, frozen, images, *, train, rng=None):
      model = nnx.merge(graphdef, full_params(params, frozen, config))
      return model(images, train=train, encoder_train=train and config.mode != "frozen",
                   rngs=nnx.Rngs(dropout=rng) if rng is not None else None)

    def task_loss(logits, batch):
      if copies == 1:
        return task.loss(logits, batch)
      losses, aux = jax.vmap(lambda l: task.loss(l, batch))(logits)
      return losses.sum(), jax.tree.map(jnp.mean, aux)  # copies learn independently

    def train_step(state, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])
      if mix:
        batch = mixing.mix_batch(batch, jax.random.fold_in(rng, 1), **config.mixup)

      def loss_fn(params):
        out = forward(params, state["frozen"], batch["image"], train=True, rng=rng)
        return task_loss(out["logits"], batch)

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      new = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
      if use_ema:
        decay = config.optim.ema_decay
        new["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
      if skip_nonfinite:
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new,
                           dict(state, step=state["step"] + 1))
        new["skipped_steps"] = state["skipped_steps"] + (~finite).astype(jnp.int32)
      metrics = {**aux, "loss": loss / copies, "grad_norm": grad_norm,
                 "lr": schedule(state["step"]), "finite": finite}
      return new, metrics

    abstract_batch = {k: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape[1:], v.dtype,
                                              sharding=parallel.batch_sharding(mesh, v.ndim))
                      for k, v in peek_batch(train_ds, batch_keys).items()}
    compiled_step = jax.jit(train_step, in_shardings=(state_sh, None),
                            out_shardings=(state_sh, repl), donate_argnums=(0,)
                            ).lower(abstract_state, abstract_batch).compile()
    if config.log.memory_analysis:
      log_memory(compiled_step)

    # ---------------------------------------------------------------- Validation.
    metric = selected_metric(config)
    eval_weights = "ema" if use_ema else "params"

    @jax.jit
    def predict(state, batch):
      out = forward(state[eval_weights], state["frozen"], batch["image"], train=False)
      if config.task.name == "segmentation":
        return {"pred": jnp.argmax(out["logits"], -1).astype(jnp.int32)}
      probs = task.predict(out["logits"])
      return {"probs": probs[:, None] if copies == 1 else jnp.moveaxis(probs, 0, 1)}

    eval_batch = pipeline.per_process_batch_size(config.eval.batch_size)

    def validate(state) -> np.ndarray:
      preds = inference.predict_split(
          lambda b: predict(state, b), pipeline.make_iterator(val_ds, config.data), mesh,
          batch_size=eval_batch, device_keys=("image",), keep_keys=EVAL_KEEP_KEYS,
          max_batches=config.eval.max_batches)
      return validation_scores(config.task.name, metric, preds, names)

    # ---------------------------------------------------------------- Resume.
    ck_cfg = ml_collections.ConfigDict(config.checkpoint.to_dict())
    ck_cfg.keep_best_metric, ck_cfg.keep_best_mode = f"val/{metric}", "max"
    parallel.sync_processes("compiled")
    checkpointer = ckpt_lib.Checkpointer(workdir, ck_cfg)
    meta = ckpt_lib.run_metadata(config, mesh)
    selection = Selection(workdir, metric, tuple(config.probe_lrs), eval_weights)
    first_step = 0
    restored = resume(checkpointer, abstract_state, train_iter, meta)
    if restored is not None:
      state, first_step = restored.state, int(jax.device_get(restored.state["step"]))
    if first_step >= total_steps:
      logging.info("Already trained for %d of %d steps; nothing to do.", first_step, total_steps)
      checkpointer.close()
      writer.close()
      return {}

    # ---------------------------------------------------------------- Loop.
    progress = metric_writers.Progress(total_steps, config.data.batch_size, first_step)
    preemption = ckpt_lib.PreemptionWatcher()
    logged: dict[str, float] = {}
    pending: list[dict] = []
    refit = is_refit(config)
    every_eval = 0 if refit else config.eval.every_steps
    try:
      for step in range(first_step + 1, total_steps + 1):
        batch = next(train_iter)
        state, metrics = compiled_step(state, parallel.shard_batch(
            {k: batch[k] for k in batch_keys}, mesh))
        pending.append(metrics)
        stop = preemption.should_stop(step)
        evaluate = step == total_steps or (every_eval > 0 and step % every_eval == 0)

        if step % config.log.every_steps == 0 or evaluate or stop:
          host = jax.device_get(pending)
          pending = []
          if not skip_nonfinite and not all(bool(m["finite"]) for m in host):
            raise NonFiniteLossError(f"non-finite loss or gradient before step {step}: "
                                     f"{host[-1]} (config.nan_policy='skip' drops such steps)")
          logged = interval_means(host)
          logged.update(progress.update(step))
          logged.update(pipeline.data_stats(train_iter))
          logged["epoch"] = step / steps_per_epoch
          if evaluate and refit:  # trained on validation: nothing to select, last step
            selection.add_refit(step, config.data.train_split)
            if is_writer:
              selection.write()
          elif evaluate:
            scores = validate(state)
            value, copy = selection.add(step, scores, config.data.val_split)
            logged[f"val/{metric}"] = value
            for c, lr in enumerate(config.probe_lrs):
              logged[f"val/{metric}/lr={lr:g}"] = float(scores[c])
            if is_writer:
              selection.write()
          writer.write_scalars(step, logged)
          writer.flush()
          if is_writer:
            val = (f"  val/{metric} {logged[f'val/{metric}']:.4f}"
                   if f"val/{metric}" in logged and evaluate else "")
            print(f"step {step}/{total_steps}  loss {logged['loss']:.4f}{val}  "
                  f"{logged['perf/images_per_sec']:.1f} img/s  "
                  f"ETA {metric_writers.format_eta(logged['perf/eta_minutes'])}", flush=True)

        if evaluate or stop:  # every validated step is a candidate for the best checkpoint
          checkpointer.save(step, state, train_iter, config, meta, metrics=logged, force=stop)
        if stop:
          break
    finally:
      preemption.close()
      checkpointer.close()
      writer.close()

    if is_writer:
      best = selection.data["best"] or {}
      chosen = (f"Refit on {config.data.train_split}: evaluate the last step"
                if refit else f"Best val/{metric} {best.get('value', float('nan')):.4f} at "
                              f"step {best.get('step')}")
      print(f"{'Stopped' if stop and step < total_steps else 'Done'} at step {step}. {chosen}"
            + (f" (lr {best['lr']:g})" if best.get("lr") else "")
            + f"; checkpoints in {checkpointer.directory}", flush=True)
    return logged


def _load_backbone(state: dict, encoder: dict, is_trainable, use_ema: bool) -> dict:
  """Places the pretrained encoder into the trainable/frozen parts of a fresh state."""
  params = {k: v for k, v in state["params"].items() if k != "lora"}
  current = peft.combine(params, state["frozen"])["encoder"]
  peft.check_same_paths(encoder, current, "config.init_from: the encoder weights")
  placed = place_weights(encoder, current, "init_from")
  trainable, frozen = peft.partition({"encoder": placed}, is_trainable)
  new = dict(state)
  new["params"] = dict(state["params"], **trainable)
  new["frozen"] = dict(state["frozen"], **frozen)
  if use_ema:
    new["ema"] = jax.tree.map(jnp.copy, new["params"])
  return new


def main(argv: list[str] | None = None) -> int:
  """Exit status as cxrjax.main's (main.run_binary)."""
  return run_binary("cxrjax.finetune", train, argv)


if __name__ == "__main__":
  sys.exit(main())
