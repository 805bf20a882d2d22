r"""Label-efficiency sweeps: fine-tune + evaluate over label fractions and seeds, then plot.

  python -m cxrjax.sweep --config=configs/finetune/covidx.py:init_from=workdirs/evax_s \
      --fractions=0.01,0.1,1 --seeds=0,1,2 --eval_config=configs/eval/default.py \
      --workdir=workdirs/sweep_covidx [--config.<key>=<value> ...] [--dry_run=true]

Each (fraction, seed) fine-tunes in WORKDIR/f<fraction>_s<seed>/finetune on the seeded,
stratified subset (config.data.train_fraction / fraction_seed; nested across fractions)
and evaluates its validation-selected checkpoint in .../eval. Runs already finished are
skipped (each binary resumes or returns at once), so an interrupted sweep is rerun as is.
WORKDIR/label_efficiency.json lists every run's mean metric with its bootstrap CI and
WORKDIR/label_efficiency.png plots them. --dry_run=true prints the commands instead (to
submit each run as its own job, e.g. with launch/slurm_gpu.sh).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from cxrjax import config_lib, evaluate, finetune, plots
from cxrjax.config_lib import ConfigError
from cxrjax.main import setup_logging

FLAGS = ("workdir", "fractions", "seeds", "eval_config", "dry_run", "metric")
# The summary metric per task (results.json "mean" entry).
DEFAULT_METRIC = {"multilabel": "auroc", "multiclass": "accuracy", "segmentation": "dice_dataset"}


def _numbers(text: str, name: str, kind=float) -> list:
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"--{name}={text!r} must be a comma-separated list of {kind.__name__}s")
  if not values:
    raise ConfigError(f"--{name} is empty")
  return values


def run_dir(workdir: str, fraction: float, seed: int) -> str:
  return os.path.join(workdir, f"f{fraction:g}_s{seed}")


def mean_metric(results: dict, name: str) -> dict:
  section = results.get("classification") or results.get("segmentation") or {}
  value = section.get("mean", {}).get(name)
  if isinstance(value, dict):
    return {"value": value.get("value"), "ci_low": value.get("ci_low"),
            "ci_high": value.get("ci_high")}
  return {"value": value, "ci_low": None, "ci_high": None}


def sweep(argv: list[str]) -> list[dict]:
  config, flags = config_lib.parse_command_line(argv, "cxrjax.sweep", flags=FLAGS)
  for required in ("workdir", "fractions"):
    if required not in flags:
      raise ConfigError(f"--{required}=... is required")
  workdir = flags["workdir"]
  fractions = _numbers(flags["fractions"], "fractions")
  seeds = _numbers(flags.get("seeds", "0"), "seeds", int)
  eval_spec = flags.get("eval_config", "configs/eval/default.py")
  metric = flags.get("metric") or DEFAULT_METRIC[config.task.name]
  ft_overrides = [a for a in argv if not any(a.startswith(f"--{f}=") for f in FLAGS)]
  points = []
  for fraction in fractions:
    for seed in seeds:
      out = run_dir(workdir, fraction, seed)
      ft_argv = [*ft_overrides, f"--config.data.train_fraction={fraction}",
                 f"--config.data.fraction_seed={seed}", f"--config.seed={seed}",
                 f"--workdir={out}/finetune"]
      ev_argv = [f"--config={eval_spec}", f"--config.checkpoint={out}/finetune",
                 f"--workdir={out}/eval"]
      if flags.get("dry_run", "false").lower() in ("1", "true", "yes"):
        print("python -m cxrjax.finetune " + " ".join(ft_argv))
        print("python -m cxrjax.evaluate " + " ".join(ev_argv))
        continue
      ft_config, ft_flags = config_lib.parse_command_line(ft_argv, "cxrjax.finetune")
      finetune.train(ft_config, ft_flags["workdir"])
      ev_config, ev_flags = config_lib.parse_command_line(ev_argv, "cxrjax.evaluate")
      results = evaluate.evaluate(ev_config, ev_flags["workdir"])
      points.append({"fraction": fraction, "seed": seed, "label": f"seed {seed}",
                     "metric": metric, **mean_metric(results, metric)})
  if points:
    with open(os.path.join(workdir, "label_efficiency.json"), "w", encoding="utf-8") as f:
      json.dump(points, f, indent=2)
    plottable = [p for p in points if p["value"] is not None]
    if plottable:
      plots.label_efficiency_curve(plottable, os.path.join(workdir, "label_efficiency.png"),
                                   metric_name=f"mean {metric}")
    for p in points:
      logging.info("fraction %g seed %d: %s %s", p["fraction"], p["seed"], metric, p["value"])
  return points


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  setup_logging()
  try:
    sweep(argv)
  except ConfigError as e:
    print(f"cxrjax.sweep: config error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
