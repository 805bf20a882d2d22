"""The pretraining binary end to end on phantom CXRs (tiny model, CPU)."""

import glob
import json
import os

import numpy as np

from cxrjax import main
from tiny import tiny_pretrain_config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if '"loss"' in l]


def test_pretraining_learns_and_writes_everything(tmp_path):
  workdir = str(tmp_path)
  config = tiny_pretrain_config("--config.total_steps=60", "--config.optim.lr=3e-3",
                                "--config.schedule.warmup_steps=5",
                                "--config.checkpoint.save_every_steps=30")
  main.train(config, workdir)
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, 61))
  losses = np.array([r["loss"] for r in rows])
  assert losses[-10:].mean() < losses[:10].mean() - 0.05, losses
  assert all(np.isfinite(losses))
  assert {"mim_cosine", "grad_norm", "lr", "perf/images_per_sec",
          "data/examples_read", "data/examples_skipped"} <= set(rows[-1])
  assert rows[-1]["data/examples_skipped"] == 0
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["30", "60"]
  assert set(os.listdir(os.path.join(workdir, "checkpoints", "60"))) >= {
      "state", "data", "config", "meta"}
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["variant"] == "micro/8"


def test_rerun_resumes_from_last_checkpoint(tmp_path):
  workdir = str(tmp_path)
  main.train(tiny_pretrain_config("--config.total_steps=4"), workdir)
  main.train(tiny_pretrain_config("--config.total_steps=6"), workdir)
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == [1, 2, 3, 4, 5, 6]  # the second run started at step 5
