"""Periodic evaluators of a pretraining run's encoder, found by name (big_vision style).

`config.evals.<name> = dict(type='knn' | 'linear_probe', every_steps=..., ...)`; cxrjax.main
builds each with `get(type)(encode_fn, eval_cfg, data_cfg, mesh)` and, every `every_steps`,
logs what `run(params)` yields as `<name>/<metric>`. An evaluator reads frozen features
only (no training of the encoder), so it measures the representation as pretraining goes.

  encode_fn(params, images) -> [B, D] float32 features (jitted by the caller)
"""

from __future__ import annotations

from cxrjax.config_lib import ConfigError

_EVALUATORS: dict[str, type] = {}


def register(name: str):
  def wrap(cls):
    _EVALUATORS[name] = cls
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_EVALUATORS)


def get(name: str) -> type:
  if name not in _EVALUATORS:
    raise ConfigError(f"evaluator type {name!r} is not one of: {', '.join(names())}")
  return _EVALUATORS[name]


from cxrjax.evaluators import knn  # noqa: E402,F401  pylint: disable=wrong-import-position
