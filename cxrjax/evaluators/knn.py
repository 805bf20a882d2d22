"""kNN and linear-probe shortcuts on frozen features (no head training in the loop).

`knn`: DINO's weighted k-NN classifier (Caron et al. 2021, k=20, T=0.07): cosine
similarity to every train feature, the k nearest vote with weight exp(sim / T); the class
score is the weighted mean of the neighbours' labels. It works for multilabel targets
(per-class scores) and one-hot multiclass ones; metrics: mean AUROC over classes with both
label values (cxrjax.metrics) and, for one-hot labels, accuracy.

`linear_probe`: L2-regularised logistic regression per class (scikit-learn, lbfgs) on
standardised train features; the same metrics on the eval split. A shortcut for tracking
pretraining, not the full multi-lr probe of cxrjax.finetune.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxrjax import inference
from cxrjax.config_lib import ConfigError
from cxrjax.data import pipeline
from cxrjax.evaluators import register
from cxrjax.metrics import classification as cls_metrics

DEFAULTS = dict(every_steps=1000, train_split="train", eval_split="val", num_train=2000,
                num_eval=500, batch_size=64, pp="resize({image_size})|to_channels(3)"
                "|normalize('evax')", k=20, temperature=0.07, l2=1.0)


def settings(eval_cfg: ml_collections.ConfigDict) -> dict:
  unknown = sorted(set(eval_cfg) - set(DEFAULTS) - {"type"})
  if unknown:
    raise ConfigError(f"config.evals: unknown key(s) {unknown}; valid: "
                      f"{', '.join(sorted(DEFAULTS))}")
  return {**DEFAULTS, **{k: v for k, v in eval_cfg.items() if k != "type"}}


class FeatureEvaluator:
  """Extracts (features, labels) of a train and an eval subset with the current params."""

  def __init__(self, encode_fn, eval_cfg, data_cfg, mesh):
    self.cfg = settings(eval_cfg)
    self.encode_fn, self.mesh = encode_fn, mesh
    data = ml_collections.ConfigDict(data_cfg.to_dict())
    data.num_examples = self.cfg["num_train"]      # phantom: size of the split read
    data.num_eval_examples = self.cfg["num_eval"]
    if "train_fraction" in data:
      data.train_fraction = 1.0
    pp = self.cfg["pp"].format(image_size=data_cfg.image_size)
    self.data = data
    self.datasets = {
        part: pipeline.make_dataset(data, split=self.cfg[f"{part}_split"], pp=pp, seed=0,
                                    global_batch=self.cfg["batch_size"], repeat=False)
        for part in ("train", "eval")}
    self.every_steps = int(self.cfg["every_steps"])

  def features(self, params, part: str) -> tuple[np.ndarray, np.ndarray]:
    limit = self.cfg["num_train" if part == "train" else "num_eval"]
    batch = pipeline.per_process_batch_size(self.cfg["batch_size"])
    out = inference.predict_split(
        lambda b: {"features": self.encode_fn(params, b["image"])},
        pipeline.make_iterator(self.datasets[part], self.data), self.mesh, batch_size=batch,
        device_keys=("image",), keep_keys=("labels",),
        max_batches=-(-limit // self.cfg["batch_size"]))
    if "labels" not in out:
      raise ConfigError(f"config.evals: the {self.cfg[f'{part}_split']!r} split of "
                        f"{self.data.source!r} has no labels")
    return out["features"][:limit], out["labels"][:limit]


def _scores_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  aurocs = [cls_metrics.auroc(scores[:, k], labels[:, k] > 0.5) for k in range(labels.shape[1])]
  aurocs = [a for a in aurocs if a is not None]
  out = {"auroc": float(np.mean(aurocs)) if aurocs else float("nan")}
  if np.all(labels.sum(1) == 1):  # one-hot: single-label accuracy
    out["accuracy"] = float(np.mean(scores.argmax(1) == labels.argmax(1)))
  return out


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_scores(train_feats, train_labels, eval_feats, k: int, temperature: float):
  train = train_feats / jnp.linalg.norm(train_feats, axis=1, keepdims=True).clip(1e-12)
  query = eval_feats / jnp.linalg.norm(eval_feats, axis=1, keepdims=True).clip(1e-12)
  sims, idx = jax.lax.top_k(query @ train.T, k)
  weights = jnp.exp(sims / temperature)
  votes = (weights[..., None] * train_labels[idx]).sum(1)
  return votes / weights.sum(1, keepdims=True)


@register("knn")
class KnnEvaluator(FeatureEvaluator):

  def run(self, params) -> Iterator[tuple[str, float]]:
    train_x, train_y = self.features(params, "train")
    eval_x, eval_y = self.features(params, "eval")
    k = min(int(self.cfg["k"]), len(train_x))
    scores = np.asarray(_knn_scores(jnp.asarray(train_x), jnp.asarray(train_y),
                                    jnp.asarray(eval_x), k, float(self.cfg["temperature"])))
    yield from _scores_metrics(scores, eval_y).items()


@register("linear_probe")
class LinearProbeEvaluator(FeatureEvaluator):

  def run(self, params) -> Iterator[tuple[str, float]]:
    from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
    from sklearn.preprocessing import StandardScaler  # pylint: disable=import-outside-toplevel
    train_x, train_y = self.features(params, "train")
    eval_x, eval_y = self.features(params, "eval")
    scaler = StandardScaler().fit(train_x)
    train_x, eval_x = scaler.transform(train_x), scaler.transform(eval_x)
    scores = np.zeros(eval_y.shape, np.float64)
    for c in range(train_y.shape[1]):
      y = train_y[:, c] > 0.5
      if y.all() or not y.any():
        scores[:, c] = float(y.mean())
        logging.info("linear_probe: class %d has one label value in the train subset", c)
        continue
      clf = LogisticRegression(C=1.0 / float(self.cfg["l2"]), max_iter=500)
      scores[:, c] = clf.fit(train_x, y).predict_proba(eval_x)[:, 1]
    yield from _scores_metrics(scores, eval_y).items()
