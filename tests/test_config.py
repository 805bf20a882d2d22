"""Config loading, overrides and validation: every failure names the key and the choices."""

import os
import subprocess
import sys

import pytest

from cxrjax import config_lib, validation  # noqa: F401  (validation registers the checks)
from cxrjax.config_lib import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["evax_ti.py", "evax_s.py", "evax_b.py", "quickstart.py"]


def load(name, *overrides):
  argv = [f"--config={os.path.join(REPO, 'configs', name)}", *overrides]
  config, _ = config_lib.parse_command_line(argv, "test")
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_recipe_loads_and_validates(name):
  config = load(name, "--config.objective.teacher=random")
  config_lib.validate(config)
  assert config.data.source == "phantom"  # offline by default


def test_config_argument_string():
  config = load("evax_b.py:variant=Ti,runlocal")
  assert config.model.variant == "Ti/16"
  assert config.total_steps == 20 and config.objective.teacher == "random"
  with pytest.raises(ConfigError, match="variant='Q' is not one of: Ti, S, B"):
    load("evax_b.py:variant=Q")
  with pytest.raises(ConfigError, match="unknown config argument 'varient'.*variant"):
    load("evax_b.py:varient=S")


def test_overrides_keep_types_and_follow_references():
  config = load("evax_s.py", "--config.data.image_size=448", "--config.optim.lr=2e-4",
                "--config.model.return_blocks=(-2,-1)", "--config.data.num_workers=2")
  assert config.data.image_size == 448 and config.model.img_size == 448  # a FieldReference
  assert config.optim.lr == pytest.approx(2e-4)
  assert tuple(config.model.return_blocks) == (-2, -1)
  config = load("evax_s.py", "--config.model.rope=false")
  assert config.model.rope is False


def test_typo_names_key_and_nearest():
  with pytest.raises(ConfigError) as e:
    load("quickstart.py", "--config.data.batch_sise=8")
  msg = str(e.value)
  assert "config.data.batch_sise" in msg and "did you mean batch_size" in msg
  assert "image_size" in msg  # the valid keys are listed


def test_wrong_type_names_key():
  with pytest.raises(ConfigError, match=r"config.data.batch_size='eight' is not a valid int"):
    load("quickstart.py", "--config.data.batch_size=eight")
  with pytest.raises(ConfigError, match="config.model is a block"):
    load("quickstart.py", "--config.model=vit")


def test_impossible_values_name_both_fields():
  config = load("evax_b.py", "--config.data.image_size=200")
  with pytest.raises(ConfigError, match=r"config.data.image_size=200 .* patch size 16 of "
                                        r"config.model.variant='B/16'"):
    config_lib.validate(config)
  config = load("quickstart.py", "--config.data.batch_size=12")  # 8 test devices
  with pytest.raises(ConfigError, match=r"batch_size=12 is not divisible by the data-parallel"):
    config_lib.validate(config)
  config = load("quickstart.py", "--config.objective.name=byol")
  with pytest.raises(ConfigError, match="objective.name='byol' is not one of: .*evax_mim"):
    config_lib.validate(config)
  config = load("quickstart.py", "--config.model.name=resnet")
  with pytest.raises(ConfigError, match="model.name='resnet' is not one of: vit"):
    config_lib.validate(config)
  config = load("quickstart.py", "--config.total_epochs=3")
  with pytest.raises(ConfigError, match="exactly one of config.total_steps"):
    config_lib.validate(config)


def test_real_recipe_refuses_silent_random_teacher():
  config = load("evax_b.py")
  with pytest.raises(ConfigError, match="config.objective.teacher is empty"):
    config_lib.validate(config)


def test_command_line_error_is_one_line_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "cxrjax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}", "--config.data.batch_sise=8"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "batch_sise" in lines[0] and "batch_size" in lines[0], proc.stderr
  assert not os.listdir(tmp_path)  # failed before any work


FINETUNE_CONFIGS = sorted(os.listdir(os.path.join(REPO, "configs", "finetune")))


@pytest.mark.parametrize("name", FINETUNE_CONFIGS)
def test_every_finetune_recipe_loads_and_validates(name):
  from cxrjax import finetune  # noqa: F401  (registers the fine-tuning rules)
  config = load(f"finetune/{name}:init_from=random")
  config_lib.validate(config)
  local = load(f"finetune/{name}:runlocal=True")
  config_lib.validate(local)
  assert local.data.source == "phantom" and local.total_steps == 20


def test_eval_configs_load():
  from cxrjax import evaluate
  for name in sorted(os.listdir(os.path.join(REPO, "configs", "eval"))):
    config = load(f"eval/{name}:checkpoint=/some/run")
    evaluate.check_config(config)
    assert config.split == "test"


def test_evax_image_term_argument():
  config = load("evax_s.py:image_term=0.1,teacher=random")
  assert config.objective.name == "evax_mim_contrastive"
  assert config.objective.image_loss_weight == 0.1
  assert load("evax_s.py").objective.name == "evax_mim"
