"""Pretraining objectives, found by name (`config.objective.name`).

An objective is a class constructed from the whole config that provides:
  validate(config)                  extra config checks (classmethod; raise ConfigError)
  preprocess() -> str               ops appended to config.data.pp_train (e.g. masks)
  batch_keys: tuple[str, ...]       the batch fields its loss reads
  build_model(rngs) -> nnx.Module   the trainable model; its `encoder` is what fine-tuning reads
  build_frozen(rngs) -> nnx.Module | None     a frozen model (teacher), or None
  frozen_weights() -> dict | None   host weights for the frozen model (None: use its init)
  loss(model, frozen, batch, *, train, rngs) -> (scalar loss, dict of scalar metrics)
optionally:
  params_weights() -> dict | None   host weights for the trainable params (continuation runs,
                                    e.g. DINOv2 at a higher resolution); placed after init
  update_frozen(frozen, params, aux, step) -> frozen
                                    called in the jitted step after the optimizer update, with
                                    pure dicts (frozen: every variable of build_frozen's module;
                                    params: the updated trainable params) and the loss's aux dict,
                                    whose "state/..." entries carry arrays for it (not logged).
The trainable model may hold only nnx.Param variables; anything else belongs in `frozen`.
"""

from __future__ import annotations

from cxrjax.config_lib import ConfigError

_OBJECTIVES: dict[str, type] = {}


def register(name: str):
  def wrap(cls):
    _OBJECTIVES[name] = cls
    cls.name = name
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_OBJECTIVES)


def get(name: str) -> type:
  if name not in _OBJECTIVES:
    raise ConfigError(f"config.objective.name={name!r} is not one of: {', '.join(names())}")
  return _OBJECTIVES[name]


# Registration by import.
from cxrjax.objectives import evax_mim, contrastive, dinov2, mae  # noqa: E402,F401  pylint: disable=wrong-import-position
