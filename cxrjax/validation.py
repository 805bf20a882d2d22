"""Config rules checked before any compute (registered with config_lib.check).

Each rule names the fields it compares and the valid choices, so a wrong value ends in one
line like `config.data.image_size=200 is not divisible by the patch size 16 of
config.model.variant='B/16'`.
"""

from __future__ import annotations

from cxrjax import models, objectives, optim, parallel
from cxrjax.config_lib import ConfigError, check, require_choice
from cxrjax.data import pipeline


@check
def _registered_names(config):
  require_choice(config, "model.name", models.names())
  if "objective" in config:  # pretraining configs (fine-tuning ones have `task`)
    require_choice(config, "objective.name", objectives.names())
  require_choice(config, "data.source", pipeline.source_names())
  require_choice(config, "optim.name", optim.optimizer_names())
  require_choice(config, "schedule.name", optim.schedule_names())
  require_choice(config, "nan_policy", ("stop", "skip"))
  require_choice(config, "model.dtype", ("bfloat16", "float32"))


@check
def _patch_divides_image(config):
  variant = config.model.variant
  size, _, patch = variant.partition("/")
  if not patch.isdigit():
    raise ConfigError(f"config.model.variant={variant!r} must look like SIZE/PATCH, "
                      f"e.g. 'B/16'")
  if size not in models.VARIANTS:
    raise ConfigError(f"config.model.variant={variant!r}: size {size!r} is not one of: "
                      f"{', '.join(models.VARIANTS)}")
  image_size = config.data.image_size
  if image_size % int(patch):
    raise ConfigError(f"config.data.image_size={image_size} is not divisible by the patch size "
                      f"{patch} of config.model.variant={variant!r}")


@check
def _duration(config):
  if (config.total_steps > 0) == (config.total_epochs > 0):
    raise ConfigError(f"set exactly one of config.total_steps={config.total_steps} and "
                      f"config.total_epochs={config.total_epochs} to a positive value")
  for key in ("batch_size", "num_examples"):
    if config.data[key] <= 0:
      raise ConfigError(f"config.data.{key}={config.data[key]} must be positive")
  if config.optim.lr <= 0:
    raise ConfigError(f"config.optim.lr={config.optim.lr} must be positive")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ConfigError(f"config.optim.ema_decay={config.optim.ema_decay} must be in [0, 1)")


@check
def _batch_fits_mesh(config):
  num_devices = len(parallel.mesh_devices(config.mesh))
  shape = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh, num_devices)))
  data_parallel = shape["data"] * shape["fsdp"]
  batch = config.data.batch_size
  if batch % data_parallel:
    raise ConfigError(
        f"config.data.batch_size={batch} is not divisible by the data-parallel size "
        f"{data_parallel} (config.mesh: data={shape['data']} x fsdp={shape['fsdp']} "
        f"on {num_devices} devices)")


@check
def _objective_rules(config):
  if "objective" not in config:
    return
  objective = objectives.get(config.objective.name)
  if hasattr(objective, "validate"):
    objective.validate(config)
