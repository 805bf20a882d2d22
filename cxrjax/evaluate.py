r"""Evaluation binary: clinical metrics with bootstrap CIs, localisation, plots, predictions.

  python -m cxrjax.evaluate --config=configs/eval/default.py \
      --config.checkpoint=workdirs/ft_phantom --workdir=workdirs/eval_phantom

Reads a fine-tuning run (`workdir[:step]`; without a step, the step that run selected on
its validation split, from selection.json), predicts one split (default 'test', the only
binary that reads it) batched and sharded, and writes into --workdir:

  results.json      metrics per class and mean with 95% bootstrap CIs (schema: README)
  predictions.csv   one row per image: id, probability per class (and labels when known)
  metrics.jsonl, tensorboard/   the mean metrics as scalars at the checkpoint's step
  plots/*.png       ROC/PR curves, calibration, Grad-CAM / GLoRI overlays, segmentation

Thresholds for F1/sensitivity/specificity are chosen on `config.threshold_split`
(validation; Youden by default), never on the evaluated split. Localisation compares
Grad-CAM (any head) or GLoRI attention maps with ground-truth boxes where the split has
them (phantom findings, NIH BBox_List_2017), optionally next to a random-init model.
The data block of the run is used unless config.data.* overrides it (e.g. a folder or CSV
of DICOM/PNG/JPEG images for prediction only: config.data.source='folder').
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cxrjax import checkpoint as ckpt_lib
from cxrjax import config_lib, explain, finetune, inference, metric_writers, metrics
from cxrjax import parallel, peft, plots, tasks
from cxrjax.config_lib import ConfigError
from cxrjax.data import pipeline
from cxrjax.main import run_binary
from cxrjax.models import classifier

# config.data keys that, when non-empty, replace the fine-tuning run's.
DATA_OVERRIDES = ("source", "data_dir", "tfds_name", "manifest", "pp_eval")
LABEL_KEYS = ("labels", "label_mask", "seg", "boxes")


def eval_config_base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.checkpoint = ""           # fine-tuning workdir[:step]
  config.split = "test"
  config.threshold_split = "val"   # '' : fixed thresholds (config.threshold_method float)
  config.threshold_method = "youden"  # 'youden' | 'f1' | a number in (0, 1)
  config.weights = "auto"          # 'auto' (what the run selected with), 'params', 'ema'
  config.dtype = "bfloat16"        # compute dtype for inference
  config.tta_flip = False          # average with the left-right flipped image
  config.seed = 0
  config.data = dict(source="", data_dir="", tfds_name="", manifest="", pp_eval="",
                     batch_size=64, num_examples=0, max_batches=0, num_workers=0,
                     max_decode_failure_fraction=0.01)
  config.bootstrap = dict(n_resamples=1000, level=0.95, seed=0,
                          group_key="")  # batch field with patient ids ('' : per image)
  config.localization = dict(method="auto",   # 'gradcam' | 'attention' (GLoRI) | 'auto' | ''
                             block=-1, num_examples=64, map_threshold=0.5, batch_size=16,
                             thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
                             compare_random_init=True)
  config.plots = dict(enabled=True, num_overlays=16)
  config.mesh = dict(data=-1, fsdp=1, tensor=1, num_devices=0)
  return config


def check_config(config):
  """Evaluation configs have their own keys (`checkpoint` is a run, not a block), so they
  are checked here rather than by the training binaries' registered rules."""
  method = config.threshold_method
  if method not in ("youden", "f1"):
    try:
      value = float(method)
    except ValueError:
      value = -1.0
    if not 0.0 < value < 1.0:
      raise ConfigError(f"config.threshold_method={method!r} must be 'youden', 'f1' or a "
                        "number in (0, 1)")
  config_lib.require_choice(config, "weights", ("auto", "params", "ema"))
  config_lib.require_choice(config, "dtype", ("bfloat16", "float32"))
  config_lib.require_choice(config, "localization.method", ("auto", "gradcam", "attention", ""))
  if not config.checkpoint:
    raise ConfigError("config.checkpoint is empty: give a fine-tuning workdir[:step]")


# ----------------------------------------------------------------------------
# The fine-tuned model.
# ----------------------------------------------------------------------------


class Run:
  """A fine-tuning run's config, chosen step and weights, rebuilt as a Classifier."""

  def __init__(self, spec: str, weights: str, dtype: str, extra_blocks=()):
    directory, step = ckpt_lib.parse_workdir_spec(spec)
    workdir = os.path.dirname(directory)
    selection = finetune.read_selection(workdir)
    explicit_step = spec.rpartition(":")[2].isdigit()
    copy = 0
    if selection and selection.get("best"):
      if not explicit_step:
        step = selection["best"]["step"]
      copy = next((h["copy"] for h in selection["history"] if h["step"] == step),
                  selection["best"]["copy"])
    elif not explicit_step:
      logging.warning("%s has no selection.json; evaluating its latest step %d", workdir, step)
    self.config, _ = ckpt_lib.read_config(f"{workdir}:{step}")
    if "task" not in self.config:
      raise ConfigError(f"config.checkpoint={spec!r} is not a fine-tuning run (its config has "
                        f"no task block; pretraining runs are evaluated with kNN evaluators)")
    self.step, self.copy, self.workdir, self.selection = step, copy, workdir, selection
    if weights == "auto":
      weights = (selection or {}).get("weights", "params")
    arrays = ckpt_lib.load_state_arrays(directory, step, (weights,), optional=("frozen",))
    params = finetune.full_params(arrays[weights], arrays.get("frozen"), self.config)
    if self.config.probe_lrs:  # keep the head copy selected on validation
      params["head"] = jax.tree.map(lambda x: x[copy:copy + 1], params["head"])
    self.weights_name = weights
    self.class_names = tuple(self.config.class_names)
    self.model_cfg = dict(self.config.model, dtype=dtype)
    self.head_cfg = ml_collections.ConfigDict(dict(self.config.head, num_copies=1))
    self.extra_blocks = tuple(extra_blocks)
    self.graphdef, abstract = nnx.split(nnx.eval_shape(lambda: self.build(nnx.Rngs(0))),
                                        nnx.Param)
    self.params = finetune_params_placed(params, abstract)
    logging.info("Evaluating %s step %d (%s weights%s)", workdir, step, weights,
                 f", head copy {copy} lr {self.config.probe_lrs[copy]:g}"
                 if self.config.probe_lrs else "")

  def build(self, rngs) -> classifier.Classifier:
    return classifier.Classifier(self.model_cfg, self.head_cfg, len(self.class_names),
                                 rngs=rngs, extra_blocks=self.extra_blocks)

  def random_init_params(self, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(self.build(nnx.Rngs(seed)), nnx.Param))


def finetune_params_placed(params: dict, abstract) -> dict:
  peft.check_same_paths(params, nnx.to_pure_dict(abstract), "the checkpoint's params")
  return jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def data_config(run_config, config) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(run_config.data.to_dict())
  for key in DATA_OVERRIDES:
    if config.data[key]:
      data[key] = config.data[key]
  data.train_fraction = 1.0
  data.num_workers = config.data.num_workers
  data.max_decode_failure_fraction = config.data.max_decode_failure_fraction
  if config.data.num_examples:
    data.num_eval_examples = config.data.num_examples
  return data


def predict_split(run: Run, config, data_cfg, split: str, mesh) -> dict[str, np.ndarray]:
  task = run.config.task.name
  pp = data_cfg.pp_eval.format(image_size=run.config.data.image_size)
  ds = pipeline.make_dataset(data_cfg, split=split, pp=pp, seed=config.seed,
                             global_batch=config.data.batch_size, repeat=False)
  task_lib = tasks.get(task)(run.config.task)

  @jax.jit
  def predict(params, batch):
    model = nnx.merge(run.graphdef, params)
    images = batch["image"]
    logits = model(images)["logits"].astype(jnp.float32)
    if config.tta_flip:
      flipped = model(images[:, :, ::-1])["logits"].astype(jnp.float32)
      logits = (logits + (flipped[:, :, ::-1] if task == "segmentation" else flipped)) / 2
    if task == "segmentation":
      return {"pred": jnp.argmax(logits, -1).astype(jnp.int32)}
    return {"probs": task_lib.predict(logits)}

  batch_size = pipeline.per_process_batch_size(config.data.batch_size)
  iterator = pipeline.make_iterator(ds, data_cfg)
  preds = inference.predict_split(
      lambda b: predict(run.params, b), iterator, mesh,
      batch_size=batch_size, device_keys=("image",), keep_keys=LABEL_KEYS,
      max_batches=config.data.max_batches)
  stats = pipeline.data_stats(iterator)
  if stats.get("data/examples_skipped"):
    logging.warning("Skipped %d unreadable example(s) of %d in split %r",
                    stats["data/examples_skipped"], stats["data/examples_read"], split)
  return preds, ds, stats


# ----------------------------------------------------------------------------
# Localisation.
# ----------------------------------------------------------------------------


def saliency_fn(run: Run, method: str, block: int):
  """jitted (params, images [B,H,W,C], classes [B]) -> pixel maps [B, H, W] of each image's
  class: Grad-CAM on `block`'s tokens, or the GLoRI head's attention."""
  def maps(params, images, classes):
    model = nnx.merge(run.graphdef, params)
    if method == "attention":
      attention = explain.glori_attention_maps(model(images))  # [B, K, h, w]
      grid_maps = jnp.take_along_axis(attention, classes[:, None, None, None], axis=1)[:, 0]
    else:
      def features_fn(encoder, imgs, perturb):
        del encoder
        feats = model.features(imgs, perturb=perturb)
        return feats, feats["raw_blocks"][list(perturb)[0]]
      grid_maps = explain.grad_cam(model.encoder, model.head, images, classes, block=block,
                                   features_fn=features_fn)
    return explain.upsample_maps(grid_maps, images.shape[1:3], method="bilinear")
  return jax.jit(maps)


def localization(run: Run, config, ds, preds, method: str, params: dict) -> tuple[dict, dict]:
  """Maps of the first examples with boxes, for every (image, boxed class) pair."""
  boxes = preds["boxes"]
  has_box = (boxes[..., 0] >= 0).any(-1)
  chosen = np.flatnonzero(has_box)[:config.localization.num_examples]
  if not len(chosen):
    return {}, {}
  images = _example_images(ds, chosen)
  num_classes = len(run.class_names)
  saliency = np.zeros((len(chosen), num_classes) + images.shape[1:3], np.float32)
  maps_fn = saliency_fn(run, method, config.localization.block)
  chunk = config.localization.batch_size  # one compiled shape for every chunk and class
  for k in range(num_classes):
    rows = [j for j, i in enumerate(chosen) if (boxes[i][:, 0] == k).any()]
    for start in range(0, len(rows), chunk):
      part = rows[start:start + chunk]
      batch, real = inference.pad_batch({"image": images[part]}, chunk)
      maps = maps_fn(params, jnp.asarray(batch["image"]), jnp.full((chunk,), k, jnp.int32))
      saliency[part, k] = np.asarray(maps)[:real]
  report = metrics.localization_report(
      saliency, boxes[chosen], run.class_names,
      thresholds=tuple(config.localization.thresholds),
      map_threshold=config.localization.map_threshold)
  # The map of each image's first boxed class, for the overlay plot.
  first = [int(boxes[i][boxes[i][:, 0] >= 0][0, 0]) for i in chosen]
  sample = dict(images=images, maps=saliency[np.arange(len(chosen)), first],
                boxes=[boxes[i] for i in chosen],
                titles=[f"{run.class_names[k]}" for k in first])
  return report, sample


def _example_images(ds, indices) -> np.ndarray:
  """Images of examples `indices` of an unshuffled, batched dataset, reading each batch
  (batch = index // batch_size) once however many of its examples are wanted."""
  batches = {b: ds[b] for b in sorted({int(i) // ds.batch_size for i in indices})}
  return np.stack([batches[int(i) // ds.batch_size]["image"][int(i) % ds.batch_size]
                   for i in indices])


# ----------------------------------------------------------------------------
# The binary.
# ----------------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  check_config(config)
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  mesh = parallel.make_mesh(config.mesh)
  method = config.localization.method
  run = Run(config.checkpoint, config.weights, config.dtype,
            extra_blocks=(config.localization.block,) if method else ())
  task = run.config.task.name
  if method == "auto":
    method = "attention" if run.config.head.name == "glori" else "gradcam"
  data_cfg = data_config(run.config, config)
  results: dict[str, Any] = {
      "checkpoint": {"workdir": run.workdir, "step": run.step, "weights": run.weights_name,
                     "selection": (run.selection or {}).get("best")},
      "split": config.split, "task": task, "class_names": list(run.class_names),
      "data": {"source": data_cfg.source}}
  plot_paths: list[str] = []
  plot_dir = os.path.join(workdir, "plots")

  with jax.set_mesh(mesh):
    preds, ds, stats = predict_split(run, config, data_cfg, config.split, mesh)
    results["data"].update({k.split("/")[-1]: v for k, v in stats.items()})
    results["num_examples"] = int(len(next(iter(preds.values()))))
    if task != "segmentation" and "labels" in preds:
      width = preds["labels"].shape[-1]
      if width == 0:  # unlabelled images (a folder): predictions only
        preds.pop("labels"), preds.pop("label_mask", None)
        logging.info("The %r split has no labels: writing predictions only", config.split)
      elif width != len(run.class_names):
        raise ConfigError(f"the {config.split!r} split of {data_cfg.source!r} has {width} "
                          f"labels per image; the model predicts {len(run.class_names)} "
                          f"({', '.join(run.class_names)})")
    has_labels = "labels" in preds or "seg" in preds

    # ---------------------------------------------------------------- Metrics.
    if task == "segmentation" and "seg" in preds:
      results["segmentation"] = metrics.dice_jaccard(preds["pred"], preds["seg"],
                                                     run.class_names)
    elif task != "segmentation" and "labels" in preds:
      groups = _groups(preds, config.bootstrap.group_key)
      common = dict(groups=groups, n_resamples=config.bootstrap.n_resamples,
                    seed=config.bootstrap.seed, level=config.bootstrap.level)
      if task == "multiclass":
        labelled = preds["labels"].sum(-1) > 0  # rows without a class are not scored
        if groups is not None:
          common["groups"] = groups[labelled]
        results["classification"] = metrics.multiclass_report(
            preds["probs"][labelled], preds["labels"][labelled], run.class_names, **common)
        results["classification"]["num_unlabelled"] = int((~labelled).sum())
      else:
        thresholds = _thresholds(run, config, data_cfg, mesh)
        results["classification"] = metrics.multilabel_report(
            preds["probs"], preds["labels"], preds.get("label_mask"), run.class_names,
            thresholds=thresholds, **common)
        results["classification"]["threshold_split"] = config.threshold_split or None
        results["classification"]["threshold_method"] = str(config.threshold_method)

    # ---------------------------------------------------------------- Localisation.
    if method and task != "segmentation" and "boxes" in preds:
      report, sample = localization(run, config, ds, preds, method, run.params)
      if report:
        results["localization"] = {"method": method, "model": report}
        if config.localization.compare_random_init:
          random_params = jax.tree.map(jnp.asarray, run.random_init_params(config.seed + 1))
          results["localization"]["random_init"], _ = localization(
              run, config, ds, preds, method, random_params)
        if config.plots.enabled:
          n = config.plots.num_overlays
          plot_paths.append(plots.overlay_grid(
              sample["images"][:n], sample["maps"][:n], os.path.join(plot_dir, f"{method}.png"),
              boxes=sample["boxes"][:n], titles=sample["titles"][:n]))

    # ---------------------------------------------------------------- Plots.
    if config.plots.enabled and has_labels:
      plot_paths += _plots(run, task, preds, ds, plot_dir, config.plots.num_overlays)

  results["plots"] = [os.path.relpath(p, workdir) for p in plot_paths]
  results["predictions_csv"] = _write_predictions(workdir, run, task, preds)
  results["config"] = json.loads(config.to_json_best_effort())
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    writer = metric_writers.create(workdir, active=True, log_lines=False)
    writer.write_scalars(run.step, _scalars(results))
    writer.close()
    print(_summary(results), flush=True)
  return results


def _groups(preds, key: str):
  if not key:
    return None
  if key not in preds:
    raise ConfigError(f"config.bootstrap.group_key={key!r} is not a field of the split's "
                      f"examples (has {sorted(preds)})")
  return preds[key]


def _thresholds(run: Run, config, data_cfg, mesh):
  method = config.threshold_method
  if not config.threshold_split:
    return np.full(len(run.class_names), float(method)) if method not in ("youden", "f1") \
        else None
  if config.threshold_split == config.split:
    raise ConfigError(f"config.threshold_split={config.threshold_split!r} is the evaluated "
                      "split; thresholds must come from another split (validation)")
  val, _, _ = predict_split(run, config, data_cfg, config.threshold_split, mesh)
  chosen = method if method in ("youden", "f1") else float(method)
  return metrics.choose_thresholds(val["probs"], val["labels"], val.get("label_mask"), chosen)


def _plots(run, task, preds, ds, plot_dir, num_overlays) -> list[str]:
  paths = []
  if task == "segmentation":
    n = min(num_overlays, len(preds["pred"]))
    images = _example_images(ds, range(n))
    paths.append(plots.segmentation_overlay(images[..., 0], preds["pred"][:n], preds["seg"][:n],
                                            run.class_names,
                                            os.path.join(plot_dir, "segmentation.png")))
    return paths
  probs, labels = preds["probs"], preds["labels"]
  if task == "multiclass":
    paths.append(plots.calibration_diagram(probs, labels.argmax(-1),
                                           os.path.join(plot_dir, "calibration.png"),
                                           title="top-label calibration"))
  else:
    mask = preds.get("label_mask")
    keep = np.ones(probs.shape, bool) if mask is None else mask > 0
    paths.append(plots.calibration_diagram(probs[keep], labels[keep],
                                           os.path.join(plot_dir, "calibration.png"),
                                           title="all classes pooled"))
  paths.append(plots.roc_pr_curves(probs, labels, preds.get("label_mask"), run.class_names,
                                   os.path.join(plot_dir, "roc_pr.png")))
  return paths


def _write_predictions(workdir: str, run: Run, task: str, preds) -> str | None:
  if task == "segmentation" or jax.process_index() != 0:
    return None
  path = os.path.join(workdir, "predictions.csv")
  names = run.class_names
  with open(path, "w", newline="", encoding="utf-8") as f:
    out = csv.writer(f)
    has_labels = "labels" in preds
    out.writerow(["id", *(f"prob_{n}" for n in names),
                  *((f"label_{n}" for n in names) if has_labels else ())])
    ids = preds.get("id", np.arange(len(preds["probs"])).astype(str))
    for i, row in enumerate(preds["probs"]):
      labels = ([f"{v:g}" if m > 0 else "" for v, m in
                 zip(preds["labels"][i], preds.get("label_mask", np.ones_like(preds["labels"]))[i])]
                if has_labels else [])
      out.writerow([ids[i], *(f"{p:.6f}" for p in row), *labels])
  return os.path.relpath(path, workdir)


def _means(results: dict) -> dict[str, Any]:
  """The summary entries: 'mean' (multilabel, segmentation) or 'overall' (multiclass)."""
  out = {}
  for section in ("classification", "segmentation"):
    report = results.get(section, {})
    out.update(report.get("mean", {}) or report.get("overall", {}))
  return out


def _scalars(results: dict) -> dict[str, float]:
  out = {}
  for name, value in _means(results).items():
    value = value.get("value") if isinstance(value, dict) else value
    if value is not None:
      out[f"{results['split']}/{name}"] = float(value)
  return out


def _summary(results: dict) -> str:
  lines = [f"{results['task']} on split {results['split']!r} "
           f"({results['num_examples']} examples), step {results['checkpoint']['step']}"]
  for name, value in _means(results).items():
    if isinstance(value, dict) and value.get("value") is not None:
      ci = (f" [{value['ci_low']:.4f}, {value['ci_high']:.4f}]"
            if value.get("ci_low") is not None else "")
      lines.append(f"  {name}: {value['value']:.4f}{ci}")
    elif isinstance(value, float):
      lines.append(f"  {name}: {value:.4f}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Exit status as cxrjax.main's (main.run_binary)."""
  return run_binary("cxrjax.evaluate", evaluate, argv)


if __name__ == "__main__":
  sys.exit(main())
