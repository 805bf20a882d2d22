"""Periodic evaluators: kNN / linear-probe shortcuts, and their use inside cxrjax.main."""

import json
import os

import numpy as np
import pytest

from cxrjax import main
from cxrjax.config_lib import ConfigError
from cxrjax.evaluators import knn
from tests.tiny import tiny_pretrain_config


def test_knn_scores_match_a_numpy_reference():
  rng = np.random.default_rng(0)
  train, query = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
  labels = (rng.random((50, 3)) < 0.4).astype(np.float32)
  got = np.asarray(knn._knn_scores(train, labels, query, 5, 0.07))  # pylint: disable=protected-access
  t = train / np.linalg.norm(train, axis=1, keepdims=True)
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  sims = q @ t.T
  for i in range(len(q)):
    top = np.argsort(-sims[i])[:5]
    w = np.exp(sims[i, top] / 0.07)
    np.testing.assert_allclose(got[i], (w[:, None] * labels[top]).sum(0) / w.sum(), rtol=1e-4)


def test_unknown_evaluator_key_is_refused():
  import ml_collections
  with pytest.raises(ConfigError, match="unknown key"):
    knn.settings(ml_collections.ConfigDict(dict(type="knn", neighbours=5)))


@pytest.mark.slow
def test_main_logs_knn_and_linear_probe(tmp_path, capsys):
  config = tiny_pretrain_config(
      "--config.mesh.num_devices=1", "--config.total_steps=4", evals=True)
  with config.unlocked():
    config.evals.knn.update(every_steps=2, num_train=64, num_eval=32, batch_size=16)
    config.evals.probe = dict(type="linear_probe", every_steps=4, num_train=64, num_eval=32,
                              batch_size=16)
  main.train(config, str(tmp_path))
  printed = capsys.readouterr().out
  assert "step 4/4  loss" in printed and "step 2/4  knn/auroc" in printed
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  knn_rows = [r for r in rows if "knn/auroc" in r]
  assert [r["step"] for r in knn_rows] == [2, 4]
  assert all(0.0 <= r["knn/auroc"] <= 1.0 for r in knn_rows)
  assert 0.0 <= [r for r in rows if "probe/auroc" in r][0]["probe/auroc"] <= 1.0
