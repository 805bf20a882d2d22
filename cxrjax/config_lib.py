"""Config files, command-line overrides and validation.

Every binary takes `--config=configs/x.py[:arg]` plus `--config.a.b=value` overrides and
`--workdir=DIR`. We parse these ourselves rather than through absl's config_flags so that a
typo or a wrong type ends in one line naming the key and the valid choices, before any
compute, instead of a traceback from inside flag parsing.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Callable, Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config problem a user can fix; binaries print it as one line and exit 2."""


# ----------------------------------------------------------------------------
# Loading config files.
# ----------------------------------------------------------------------------


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `variant=B,runlocal=True` into a ConfigDict, typed like `defaults`.

  Keys not in `defaults` are refused, so `evax_b.py:varient=S` fails loudly.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"unknown config argument {key!r} in {arg!r}; valid arguments: "
          f"{', '.join(sorted(defaults))}")
    if not sep:  # A bare name is a flag: `runlocal` means runlocal=True.
      value = "True"
    out[key] = _parse_value(value.strip(), defaults[key], f"config argument {key}")
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist (from --config={spec})")
  module_spec = importlib.util.spec_from_file_location(
      f"cxrjax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path!r} has a syntax error at line {e.lineno}: {e.msg}")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
  return config


# ----------------------------------------------------------------------------
# Overrides.
# ----------------------------------------------------------------------------


def _parse_value(text: str, current: Any, where: str) -> Any:
  """Parses `text` into the type of the field's current value."""
  expected = type(current)
  try:
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text) if text[:1] in "([" else tuple(
          _literal(t) for t in text.split(",") if t)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return expected(value)
    if current is None:
      return _literal(text)
  except (ValueError, SyntaxError):
    pass
  else:
    raise ConfigError(f"{where}: cannot override a field of type {expected.__name__}")
  raise ConfigError(
      f"{where}={text!r} is not a valid {expected.__name__} "
      f"(current value {current!r})")


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _unknown_key(prefix: str, key: str, valid: Iterable[str]) -> ConfigError:
  valid = sorted(valid)
  near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
  hint = f"; did you mean {' or '.join(near)}?" if near else ""
  where = f"{prefix}.{key}" if prefix else key
  return ConfigError(
      f"unknown config key {where!r}{hint} Valid keys in "
      f"{prefix or 'config'}: {', '.join(valid)}")


def set_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets `config.<dotted>` from a command-line string, keeping the field's type."""
  *parents, leaf = dotted.split(".")
  node, prefix = config, "config"
  for name in parents:
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise _unknown_key(prefix, name, node.keys() if isinstance(
          node, ml_collections.ConfigDict) else ())
    node, prefix = node[name], f"{prefix}.{name}"
  if not isinstance(node, ml_collections.ConfigDict):
    raise ConfigError(f"{prefix} is a value, not a block; cannot set {dotted!r}")
  if leaf not in node:
    raise _unknown_key(prefix, leaf, node.keys())
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"{prefix}.{leaf} is a block with keys "
                      f"{', '.join(sorted(current.keys()))}; set one of them")
  with node.unlocked():
    node[leaf] = _parse_value(text, current, f"{prefix}.{leaf}")


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

HELP = """usage: python -m {prog} --config=configs/NAME.py[:ARG] [--config.KEY=VALUE ...] --workdir=DIR

  --config=FILE[:ARG]   a config file; ARG is passed to its get_config (e.g. variant=S,runlocal)
  --config.a.b=VALUE    override any field; the value is parsed to the field's type
  --workdir=DIR         where checkpoints, logs and metrics go (resumes if it holds a checkpoint)
"""


def parse_command_line(argv: Sequence[str], prog: str,
                       flags: Sequence[str] = ("workdir",)
                       ) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """Returns (config with overrides applied, other flag values)."""
  spec, overrides, values = None, [], {}
  for raw in argv:
    if raw in ("-h", "--help", "-help"):
      raise SystemExit(HELP.format(prog=prog))
    if not raw.startswith("--") or "=" not in raw:
      raise ConfigError(f"cannot parse argument {raw!r}; expected --name=value\n"
                        + HELP.format(prog=prog))
    name, _, value = raw[2:].partition("=")
    if name == "config":
      spec = value
    elif name.startswith("config."):
      overrides.append((name[len("config."):], value))
    elif name in flags:
      values[name] = value
    else:
      raise _unknown_key("", name, ["config", "config.<key>", *flags])
  if spec is None:
    raise ConfigError("--config=configs/NAME.py is required\n" + HELP.format(prog=prog))
  config = load_config(spec)
  for dotted, text in overrides:
    set_override(config, dotted, text)
  config.lock()
  return config, values


# ----------------------------------------------------------------------------
# Validation: registered checks, each naming the fields it compares.
# ----------------------------------------------------------------------------

_CHECKS: list[Callable[[ml_collections.ConfigDict], None]] = []


def check(fn):
  """Registers a validation rule; rules raise ConfigError."""
  _CHECKS.append(fn)
  return fn


def require_choice(config, dotted: str, choices: Iterable[str]) -> None:
  value = get(config, dotted)
  choices = sorted(choices)
  if value not in choices:
    raise ConfigError(f"config.{dotted}={value!r} is not one of: {', '.join(choices)}")


def get(config, dotted: str):
  node = config
  for name in dotted.split("."):
    if name not in node:
      raise ConfigError(f"config.{dotted} is missing (no key {name!r})")
    node = node[name]
  return node


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Runs every registered rule; the first failure is raised as a ConfigError."""
  for rule in _CHECKS:
    rule(config)
  return config
