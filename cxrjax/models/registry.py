"""Model registry: `config.model.name` -> builder(model_cfg, *, rngs) -> nnx.Module."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from cxrjax.config_lib import ConfigError

Builder = Callable[..., nnx.Module]

_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
  """Decorator registering `builder(model_cfg, *, rngs)` under `name`."""

  def decorator(builder: Builder) -> Builder:
    if name in _BUILDERS and _BUILDERS[name] is not builder:
      raise ValueError(f"model name {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder

  return decorator


def names() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def build(model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model named by `model_cfg['name']` from the `config.model` block."""
  name = model_cfg["name"]
  if name not in _BUILDERS:
    raise ConfigError(f"model.name={name!r} is not a registered model; valid choices: "
                      f"{', '.join(map(repr, names()))}")
  return _BUILDERS[name](model_cfg, rngs=rngs)
