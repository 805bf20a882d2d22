"""Orbax checkpoints: train state + Grain iterator + config + metadata, per step; preemption.

Layout: `workdir/checkpoints/<step>/{state,data,config,meta}`.

- `state`: the train state, a plain pytree of arrays (pure dicts from `nnx.split`: params,
  optimizer state, EMA/teacher, step, RNG), so any cxrjax checkpoint can be read without the
  objective's code, onto any mesh shape (each process reads only its own shards).
- `data`: the Grain iterator position, one small JSON file per process.
- `config`: the run's config (JSON); `meta`: versions, mesh, git revision, the logged metrics
  and a checksum of every state array.

Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a
save killed midway never looks like a checkpoint; such leftovers are logged and removed. A
complete step whose files were later truncated or corrupted fails to restore or fails its
checksums; resuming then logs that, moves the step aside to `workdir/unreadable_checkpoints/`
and uses the previous step. A state that does not fit the config (another model) is an error,
never a reason to fall back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import signal
import subprocess
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cxrjax import config_lib, peft
from cxrjax.config_lib import ConfigError

ITEMS = ("state", "data", "config", "meta")
UNREADABLE_DIR = "unreadable_checkpoints"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be resumed from (named in the message)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


@config_lib.check
def _checkpoint_rules(config):
  if "checkpoint" not in config:
    return
  ck = config.checkpoint
  if ck.max_to_keep < 1:
    raise ConfigError(f"config.checkpoint.max_to_keep={ck.max_to_keep} must be >= 1 (the "
                      "newest checkpoints are always kept so a run can resume)")
  for key in ("save_every_steps", "keep_every_steps"):
    if ck[key] < 0:
      raise ConfigError(f"config.checkpoint.{key}={ck[key]} must be >= 0 (0: off)")
  if ck.get("keep_best_metric"):
    config_lib.require_choice(config, "checkpoint.keep_best_mode", ("min", "max"))
    if ck.keep_best_n < 1:
      raise ConfigError(f"config.checkpoint.keep_best_n={ck.keep_best_n} must be >= 1 when "
                        f"keep_best_metric={ck.keep_best_metric!r} is set")


def preservation_policy(ck: ml_collections.ConfigDict):
  """Which steps survive: newest N, plus every k-th, plus the best N by a logged metric.

  The policies are OR-ed, so the best-by-metric rule can never delete the newest step that
  resume needs (orbax's own `best_fn` option would).
  """
  pp = ocp.checkpoint_managers
  policies = [pp.LatestN(n=ck.max_to_keep)]
  if ck.keep_every_steps > 0:
    policies.append(pp.EveryNSteps(interval_steps=ck.keep_every_steps))
  name = ck.get("keep_best_metric", "")
  if name:
    minimize = ck.keep_best_mode == "min"
    worst = math.inf if minimize else -math.inf

    def metric(metrics):  # a missing or non-finite value ranks last
      value = (metrics or {}).get(name)
      return float(value) if value is not None and math.isfinite(value) else worst

    # BestN sorts ascending (descending with reverse) and keeps the last n.
    policies.append(pp.BestN(get_metric_fn=metric, reverse=minimize, n=ck.keep_best_n,
                             keep_checkpoints_without_metrics=False))
  return pp.AnyPreservationPolicy(policies)


# ----------------------------------------------------------------------------
# Checksums: restored bytes must be the saved bytes.
# ----------------------------------------------------------------------------


def _leaf_checksum(x):
  """Position-weighted sum of the array's elements as unsigned integers, mod 2**32.

  Integer addition is exact and order-free, so the value does not depend on the sharding or
  the mesh; odd weights make every element count, and a moved element changes the sum.
  """
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize >= 4:  # 8-byte values become two words (a trailing axis)
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    small = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)
  for d in range(words.ndim):
    index = index * jnp.uint32(words.shape[d]) + jax.lax.broadcasted_iota(
        jnp.uint32, words.shape, d)
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} of a (sharded, possibly multi-process) state."""
  sums = _checksums_jit(state)
  # Replicated scalars: every process holds the value, so read the local copy.
  return {peft.path_str(p): int(np.asarray(s.addressable_data(0)))
          for p, s in jax.tree_util.tree_leaves_with_path(sums)}


# ----------------------------------------------------------------------------
# The manager.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
  state: Any
  step: int
  meta: dict


class Checkpointer:
  """Periodic async saving and fault-tolerant resume for a binary's workdir."""

  def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict):
    self.cfg = ckpt_cfg
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    self._report_half_written()
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=ckpt_cfg.async_save,
        preservation_policy=preservation_policy(ckpt_cfg),
        create=True,
        cleanup_tmp_directories=True)  # after _report_half_written has named them
    handlers = dict(state=ocp.StandardCheckpointHandler(),
                    data=grain.checkpoint.CheckpointHandler(),
                    config=ocp.JsonCheckpointHandler(),
                    meta=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

  # ------------------------------------------------------------------ saving.

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int, total_steps: int) -> bool:
    every = self.cfg.save_every_steps
    return step == total_steps or (every > 0 and step % every == 0)

  def save(self, step: int, state: Any, data_iterator, config: ml_collections.ConfigDict,
           meta: dict, metrics: dict | None = None, force: bool = False) -> bool:
    """Starts saving `step` (async: returns once the arrays are copied off the devices).

    Every process must call this (the arrays are written collectively, each process its
    own shards; process 0 writes the JSON items).
    """
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    meta = dict(meta, step=int(step), saved_unix_time=time.time(),
                metrics={k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
                checksums=state_checksums(state))
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
                 meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items),
                              metrics=metrics or None, force=force)
    if saved:
      logging.info("Saving checkpoint %s/%d%s", self.directory, step,
                   " (async)" if self.cfg.async_save else "")
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves; call before the process exits."""
    self.manager.wait_until_finished()
    self.manager.close()

  # ------------------------------------------------------------------ restoring.

  def state_metadata(self, step: int) -> Any:
    """The saved state as a pytree of jax.ShapeDtypeStruct (no shardings)."""
    tree = self.manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)  # the nested dicts/lists inside Orbax's wrapper
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state: Any, data_iterator) -> Restored:
    """Restores `step` onto the shardings in `abstract_state` (any mesh shape).

    Raises ConfigError if the saved state does not fit `abstract_state` (another model or
    optimizer), CheckpointError if its bytes are not the saved ones, and whatever Orbax
    raises for unreadable files.
    """
    self._check_fits(step, abstract_state)
    meta = self.read_meta(step)
    saved_processes = meta.get("processes", 1)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None and os.path.isdir(os.path.join(self.directory, str(step),
                                                                "data")):
      if saved_processes != jax.process_count():
        raise ConfigError(
            f"{self.directory}/{step} was written by {saved_processes} process(es), this run "
            f"has {jax.process_count()}: the data iterator position is saved per process. "
            f"Resume with {saved_processes} processes (any number of devices each)")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
    if "checksums" in meta:
      got = state_checksums(state)
      bad = sorted(k for k, v in meta["checksums"].items() if got.get(k) != v)
      if bad:
        raise CheckpointError(f"restored bytes differ from the saved ones in {len(bad)} "
                              f"array(s), e.g. state/{bad[0]}")
    return Restored(state, step, meta)

  def restore_latest(self, abstract_state: Any, data_iterator) -> Restored | None:
    """Restores the newest readable step, skipping (and setting aside) unreadable ones.

    Returns None when the directory holds no checkpoint.
    """
    unreadable = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, abstract_state, data_iterator)
        error = None
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read failure: fall back)
        restored, error = None, e
      if not _all_processes_ok(error is None):
        error = error or CheckpointError("unreadable on another process")
        logging.warning("Checkpoint %s/%d is unreadable (%s: %s); ignoring it and trying "
                        "the previous step", self.directory, step, type(error).__name__,
                        _first_line(error))
        unreadable.append(step)
        continue
      if unreadable:
        moved = self._set_aside(unreadable)
        logging.warning("Resuming from step %d instead of unreadable step(s) %s (moved to "
                        "%s)", step, unreadable, moved)
      return restored
    if unreadable:
      raise CheckpointError(
          f"{self.directory}: no readable checkpoint; steps {unreadable} all failed to "
          "restore (see the warnings above). Move the directory away to start afresh")
    return None

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    saved = {peft.path_str(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in
             jax.tree_util.tree_leaves_with_path(self.state_metadata(step))}
    want = {peft.path_str(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in
            jax.tree_util.tree_leaves_with_path(abstract_state)}
    if saved == want:
      return
    diffs = ([f"{k}: saved {saved[k][0]} {saved[k][1]}, config builds {want[k][0]} {want[k][1]}"
              for k in sorted(saved.keys() & want.keys()) if saved[k] != want[k]]
             + [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - want.keys())]
             + [f"{k}: not in the checkpoint" for k in sorted(want.keys() - saved.keys())])
    raise ConfigError(
        f"{self.directory}/{step} holds a train state that does not fit this config "
        f"({len(diffs)} difference(s): {'; '.join(diffs[:3])}). Run with the config it was "
        f"saved with ({self.directory}/{step}/config/metadata) or use a fresh --workdir")

  def _set_aside(self, steps: list[int]) -> str:
    """Moves unreadable steps out of the manager's directory (kept for inspection)."""
    target = os.path.join(self.workdir, UNREADABLE_DIR)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dst = os.path.join(target, str(step))
        if os.path.exists(dst):
          dst = f"{dst}.{int(time.time())}"
        os.rename(os.path.join(self.directory, str(step)), dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("cxrjax_checkpoint_set_aside")
    self.manager.reload()
    return target

  def _report_half_written(self) -> None:
    """Logs saves that were interrupted (Orbax ignores them; cleanup removes them)."""
    directory = epath.Path(self.directory)
    if jax.process_index() != 0 or not directory.exists():
      return
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
      if _TMP_MARKER in path.name:
        logging.warning("Ignoring half-written checkpoint %s (its save was interrupted); "
                        "resuming from the latest complete step instead", path)


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ""


def run_metadata(config: ml_collections.ConfigDict, mesh) -> dict:
  """What a later reader needs to interpret a checkpoint: versions, mesh, code revision."""
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import cxrjax  # pylint: disable=import-outside-toplevel
  try:
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    revision = None
  return {
      "cxrjax": cxrjax.__version__, "git_revision": revision,
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
      "orbax": ocp.__version__, "python": platform.python_version(),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "devices": jax.device_count(), "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "objective": config.objective.name if "objective" in config else None,
      "task": config.task.name if "task" in config else None, "model": config.model.to_dict(),
  }


# ----------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT -> save after the current step, then exit cleanly.
# ----------------------------------------------------------------------------


class PreemptionWatcher:
  """Tells the loop when to write a final checkpoint and stop.

  One process: a signal handler sets a flag that the loop reads after each step.
  Several processes: a signal reaches one host or all at different times, yet all must save
  the same step together. JAX's preemption service (started by jax.distributed.initialize)
  catches SIGTERM on any host, and `reached_preemption_sync_point(step)` turns true on every
  process at the same step. SIGINT (Ctrl-C on one host) is re-sent to this process as SIGTERM
  to join that protocol. A second signal aborts without saving.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}
    self._sync = False
    if jax.process_count() > 1:
      from jax._src import distributed  # pylint: disable=import-outside-toplevel
      self._sync = distributed.global_state.preemption_sync_manager is not None
      if not self._sync:
        logging.warning("JAX's preemption service is off (jax_enable_preemption_service); "
                        "a signal to one host will not stop the others at the same step")
    signals = [signal.SIGINT] if self._sync else [signal.SIGINT, signal.SIGTERM]
    try:
      for signum in signals:
        if signal.getsignal(signum) == signal.SIG_IGN:
          continue  # started to ignore it (nohup, a launcher's background process)
        self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker thread)
      logging.warning("Not in the main thread: SIGTERM/SIGINT will not save a checkpoint")

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      self.close()
      raise KeyboardInterrupt(f"second {name}: exiting without a final checkpoint")
    self.signal_name = name
    logging.warning("%s received: saving a checkpoint after the current step, then exiting "
                    "(send it again to exit at once without saving)", name)
    if self._sync and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # hand it to JAX's preemption notifier

  def should_stop(self, step: int) -> bool:
    """Call after every step on every process."""
    if self._sync:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.signal_name is not None

  def close(self) -> None:
    """Restores the previous handlers."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


# ----------------------------------------------------------------------------
# Reading another run's encoder (teachers, fine-tuning).
# ----------------------------------------------------------------------------


def parse_workdir_spec(spec: str) -> tuple[str, int | None]:
  """'path/to/workdir[:step]' -> (checkpoints dir, step or None for the latest)."""
  path, _, step = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise ConfigError(f"{spec!r}: no checkpoints directory at {directory}")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  if not steps:
    raise ConfigError(f"{spec!r}: {directory} holds no complete checkpoint")
  if step:
    if int(step) not in steps:
      raise ConfigError(f"{spec!r}: step {step} not found; available steps: {steps}")
    return directory, int(step)
  return directory, steps[-1]


def read_config(spec: str) -> tuple[ml_collections.ConfigDict, int]:
  directory, step = parse_workdir_spec(spec)
  with open(os.path.join(directory, str(step), "config", "metadata"), encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f)), step


# Which encoder of a run `WORKDIR[:STEP]#WHICH` names: the trained params (default), their
# EMA (optim.ema_decay > 0), or a DINOv2 run's EMA teacher (CheXFound releases the teacher).
ENCODER_LOCATIONS = {"params": ("params", "encoder"), "ema": ("ema", "encoder"),
                     "teacher": ("frozen", "teacher", "encoder")}


def split_encoder_spec(spec: str) -> tuple[str, str]:
  """'WORKDIR[:STEP][#WHICH]' -> ('WORKDIR[:STEP]', WHICH)."""
  base, _, which = spec.partition("#")
  which = which or "params"
  if which not in ENCODER_LOCATIONS:
    raise ConfigError(f"{spec!r}: '#{which}' is not one of: "
                      f"{', '.join('#' + w for w in ENCODER_LOCATIONS)}")
  return base, which


def load_encoder(spec: str) -> tuple[ml_collections.ConfigDict, dict]:
  """Returns (model config, encoder params as a pure dict of host arrays) of a run.

  spec: 'WORKDIR[:STEP][#params|#ema|#teacher]'. Only that encoder is read (partial
  restore), not the optimizer state.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from cxrjax import models  # pylint: disable=import-outside-toplevel
  spec, which = split_encoder_spec(spec)
  directory, step = parse_workdir_spec(spec)
  config, _ = read_config(spec)
  abstract = nnx.eval_shape(lambda: models.build(config.model, rngs=nnx.Rngs(0)))
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
  location = ENCODER_LOCATIONS[which]
  item = target
  for key in reversed(location):
    item = {key: item}
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), item)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
        os.path.join(directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                    partial_restore=True))
  except (ValueError, KeyError) as e:
    raise ConfigError(f"{spec!r} (step {step}): cannot read the {'/'.join(location)} "
                      f"encoder of model {config.model.variant}: {e}")
  for key in location:
    restored = restored[key]
  logging.info("Loaded encoder %s (%s, step %d) from %s", config.model.variant,
               "/".join(location), step, directory)
  return config.model, restored


def load_state_arrays(directory: str, step: int, keys: tuple[str, ...],
                      optional: tuple[str, ...] = ()) -> dict:
  """{key: pytree of host arrays} for the top-level state entries `keys` (and those of
  `optional` that exist) of one step: a partial restore, e.g. params/frozen/ema of a
  fine-tuning run without its optimizer state."""
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  missing = [k for k in keys if k not in tree]
  if missing:
    raise ConfigError(f"{path}: the state has no {missing} (has {sorted(tree)})")
  keys = tuple(keys) + tuple(k for k in optional if k in tree and tree[k])
  item = {k: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k]) for k in keys}
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), item)
  return _int_keys(checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True)))


def _int_keys(tree):
  """Orbax metadata names list positions '0', '1'...; nnx pure dicts use ints."""
  if not isinstance(tree, dict):
    return tree
  numeric = bool(tree) and all(isinstance(k, str) and k.isdigit() for k in tree)
  return {(int(k) if numeric else k): _int_keys(v) for k, v in tree.items()}
