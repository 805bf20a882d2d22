"""Checkpoints: exact resume after kill -9 / SIGTERM, corrupted steps, other meshes, NaN policy.

The kill/SIGTERM tests run the real binary in subprocesses (1 CPU device each) and share a
persistent compilation cache, so only the first one compiles.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from cxrjax import checkpoint as ckpt_lib
from cxrjax import main, objectives, parallel, peft
from cxrjax.config_lib import ConfigError
from tiny import REPO, tiny_pretrain_config

# The same tiny run as tests/tiny.py, as command-line flags of the binary.
TINY_FLAGS = [
    f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}",
    "--config.model.variant=micro/8", "--config.objective.teacher_model.variant=micro/8",
    "--config.data.image_size=32", "--config.data.source_size=40",
    "--config.data.batch_size=8", "--config.data.num_examples=256",
    "--config.log.every_steps=1", "--config.log.memory_analysis=false",
    "--config.objective.min_mask_block=4", "--config.mesh.num_devices=1",
]
TOTAL, EVERY = 48, 8


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module's runs, in-process and subprocesses.

  Most tests here train the same tiny config again (resume, NaN), so they compile once.
  """
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  for name, value in zip(names, (path, 0.0, 0)):
    jax.config.update(name, value)
  cc.reset_cache()  # the cache decides once whether it is on; make it look again
  yield path
  for name, value in before.items():
    jax.config.update(name, value)
  cc.reset_cache()


def read_state(workdir, step) -> dict[str, np.ndarray]:
  """{path: host array} of a saved train state (restored as numpy, any saved mesh)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path).item_metadata.tree
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
  args = ocp.args.PyTreeRestore(
      item=target, restore_args=jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target))
  restored = ocp.PyTreeCheckpointer().restore(path, args=args)
  return {peft.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(restored)}


def assert_bit_identical(a: dict, b: dict):
  assert a.keys() == b.keys()
  different = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
  assert not different, f"{len(different)} of {len(a)} arrays differ, e.g. {different[:3]}"


def logged_losses(workdir) -> dict[int, float]:
  """step -> loss; a resumed run logs some steps twice, the later row wins."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"loss"' in line]
  return {r["step"]: r["loss"] for r in rows}


# ----------------------------------------------------------------------------
# The binary in subprocesses: kill -9 and SIGTERM mid-run, then resume.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary_env(compilation_cache):
  env = dict(os.environ)
  env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def start_binary(workdir, env):
  cmd = [sys.executable, "-m", "cxrjax.main", *TINY_FLAGS,
         f"--config.total_steps={TOTAL}", f"--config.checkpoint.save_every_steps={EVERY}",
         f"--workdir={workdir}"]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run_binary(workdir, env) -> str:
  proc = start_binary(workdir, env)
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-3000:]
  return out


def last_logged_step(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  steps = [json.loads(l)["step"] for l in lines if l.endswith("}")]
  return max(steps, default=0)


def interrupt_after_save(proc, workdir, sig, min_step=EVERY + 4) -> None:
  """Sends `sig` once checkpoint EVERY is complete and training is past `min_step`."""
  deadline = time.monotonic() + 400
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"the run ended before it could be interrupted:\n{proc.stdout.read()[-3000:]}")
    if (os.path.isdir(os.path.join(workdir, "checkpoints", str(EVERY)))
        and last_logged_step(workdir) >= min_step):
      proc.send_signal(sig)
      return
    time.sleep(0.01)
  proc.kill()
  pytest.fail("timed out waiting for the run to pass its first checkpoint")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, binary_env):
  """TOTAL steps without interruption: the reference for the resumed runs."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  run_binary(workdir, binary_env)
  return workdir


@pytest.mark.slow
def test_kill9_after_a_save_then_resume_is_bit_identical(tmp_path, binary_env, straight):
  workdir = str(tmp_path)
  proc = start_binary(workdir, binary_env)
  interrupt_after_save(proc, workdir, signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  done = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert done and done[-1] < TOTAL, done   # killed mid-run, after at least one save

  out = run_binary(workdir, binary_env)
  assert f"Resuming from {workdir}/checkpoints/{done[-1]} " in out, out[-3000:]
  assert_bit_identical(read_state(workdir, TOTAL), read_state(straight, TOTAL))
  assert logged_losses(workdir) == logged_losses(straight)  # same data order, same RNG


@pytest.mark.slow
def test_sigterm_mid_run_saves_exits_cleanly_and_resume_is_bit_identical(
    tmp_path, binary_env, straight):
  workdir = str(tmp_path)
  proc = start_binary(workdir, binary_env)
  interrupt_after_save(proc, workdir, signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  stopped = int(out.split("Stopped by SIGTERM after step ")[1].split()[0])
  assert EVERY + 4 <= stopped < TOTAL
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
  assert last_logged_step(workdir) == stopped  # nothing ran after the final save

  out = run_binary(workdir, binary_env)
  assert f"Resuming from {workdir}/checkpoints/{stopped} " in out, out[-3000:]
  assert_bit_identical(read_state(workdir, TOTAL), read_state(straight, TOTAL))
  assert logged_losses(workdir) == logged_losses(straight)


def test_preemption_watcher_sigint_then_second_signal_aborts():
  """Ctrl-C asks for a final save; a second Ctrl-C aborts at once."""
  previous = signal.getsignal(signal.SIGINT)
  watcher = ckpt_lib.PreemptionWatcher()
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.should_stop(2) and watcher.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGINT) is previous


# ----------------------------------------------------------------------------
# A corrupted or half-written latest step: the previous one is used.
# ----------------------------------------------------------------------------


def _truncate(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if os.path.basename(root) == "d":  # the array data files
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
  """Silent corruption: the files still decode, only the checksums notice."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names if os.path.basename(root) == "d"]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write('{"tree_metadata": {')


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A run with checkpoints 2 and 4, and its step-4 state read before any damage."""
  workdir = str(tmp_path_factory.mktemp("four"))
  main.train(tiny_pretrain_config("--config.checkpoint.save_every_steps=2"), workdir)
  return workdir, read_state(workdir, 2), read_state(workdir, 4)


def _host_abstract(checkpointer, step):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                      checkpointer.state_metadata(step))


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _garble_metadata])
def test_damaged_latest_step_restores_the_previous_one(tmp_path, four_steps, damage, caplog):
  source, step2, _ = four_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  damage(os.path.join(workdir, "checkpoints", "4"))
  # And a save that was killed before Orbax renamed its directory.
  os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1700000000", "state"))

  with caplog.at_level(logging.INFO):
    checkpointer = ckpt_lib.Checkpointer(workdir, tiny_pretrain_config().checkpoint)
    restored = checkpointer.restore_latest(_host_abstract(checkpointer, 2), None)
    checkpointer.close()
  assert restored.step == 2
  got = {peft.path_str(p): np.asarray(x)
         for p, x in jax.tree_util.tree_leaves_with_path(restored.state)}
  assert_bit_identical(got, step2)
  text = caplog.text
  assert "Ignoring half-written checkpoint" in text and "6.orbax-checkpoint-tmp" in text
  assert f"Checkpoint {workdir}/checkpoints/4 is unreadable" in text
  assert "Resuming from step 2 instead of unreadable step(s) [4]" in text
  # Set aside for inspection, out of the way of the resumed run's own step 4.
  assert os.path.isdir(os.path.join(workdir, ckpt_lib.UNREADABLE_DIR, "4"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_resume_past_a_truncated_step_reproduces_it(tmp_path, four_steps, caplog):
  source, _, step4 = four_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  _truncate(os.path.join(workdir, "checkpoints", "4"))
  with caplog.at_level(logging.INFO):
    main.train(tiny_pretrain_config("--config.checkpoint.save_every_steps=2"), workdir)
  assert "Resuming from step 2 instead of unreadable step(s) [4]" in caplog.text
  assert [r for r in logged_losses(workdir)] == [1, 2, 3, 4]
  assert_bit_identical(read_state(workdir, 4), step4)


def test_state_that_does_not_fit_the_config_is_an_error_not_a_fallback(tmp_path, four_steps):
  source, _, _ = four_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, tiny_pretrain_config().checkpoint)
  abstract = _host_abstract(checkpointer, 4)
  abstract["params"]["head"]["bias"] = jax.ShapeDtypeStruct((7,), np.float32)
  with pytest.raises(ConfigError, match=r"params/head/bias: saved \(\d+,\) float32, "
                                        r"config builds \(7,\) float32"):
    checkpointer.restore_latest(abstract, None)
  checkpointer.close()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


# ----------------------------------------------------------------------------
# Retention: newest N, every k-th, best by a metric, never the newest needed to resume.
# ----------------------------------------------------------------------------


def test_keep_latest_every_k_and_best_by_metric(tmp_path):
  cfg = tiny_pretrain_config("--config.checkpoint.max_to_keep=2",
                             "--config.checkpoint.keep_every_steps=4",
                             "--config.checkpoint.keep_best_metric=loss",
                             "--config.checkpoint.keep_best_mode=min").checkpoint
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  state = {"w": jax.numpy.zeros((4,))}
  config = tiny_pretrain_config()
  losses = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.95, 7: 0.99}  # best: step 2
  for step, loss in losses.items():
    checkpointer.save(step, state, None, config, {}, metrics={"loss": loss})
  checkpointer.close()
  # 6, 7 newest; 4 every 4th; 2 best loss. The newest (worst loss) survives for resume.
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [2, 4, 6, 7]


def test_keep_best_metric_must_be_logged(tmp_path):
  config = tiny_pretrain_config("--config.checkpoint.save_every_steps=2",
                                "--config.checkpoint.keep_best_metric=accuracy")
  with pytest.raises(ConfigError, match="keep_best_metric='accuracy' is not a logged metric; "
                                        "logged: .*loss"):
    main.train(config, str(tmp_path))


# ----------------------------------------------------------------------------
# Restore onto another mesh shape.
# ----------------------------------------------------------------------------


def _abstract_on(mesh, config, saved):
  """The saved state's shapes with this mesh's shardings: params by the logical rules."""
  objective = objectives.get(config.objective.name)(config)
  abstract_params = nnx.state(nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0))),
                              nnx.Param)
  params_sh = nnx.to_pure_dict(parallel.param_shardings(abstract_params, mesh))
  flat_sh = {peft.path_str(p): s
             for p, s in jax.tree_util.tree_leaves_with_path(params_sh)}

  def target(path, s):
    key = peft.path_str(path)
    sharding = (flat_sh[key[len("params/"):]] if key.startswith("params/")
                else parallel.replicated(mesh))
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
  return jax.tree_util.tree_map_with_path(target, saved)


def test_saved_on_2x4_mesh_restores_on_one_device_and_on_4x1(tmp_path, four_steps):
  _, _, step4 = four_steps
  config = tiny_pretrain_config()
  # Step 4 of the tiny run, sharded on a (data=2, fsdp=4) mesh of 8 devices and saved there.
  mesh24 = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1, num_devices=8))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), config.checkpoint)
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        ckpt_lib.Checkpointer(four_steps[0], config.checkpoint)
                        .state_metadata(4))
  abstract24 = _abstract_on(mesh24, config, shapes)
  state24 = jax.tree_util.tree_map_with_path(
      lambda p, a: jax.device_put(
          step4[peft.path_str(p)], a.sharding),
      abstract24)
  kernel = state24["params"]["encoder"]["blocks"]["0"]["mlp"]["w1"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec) and len(kernel.addressable_shards) == 8
  checkpointer.save(4, state24, None, config, ckpt_lib.run_metadata(config, mesh24))
  checkpointer.wait()
  assert checkpointer.read_meta(4)["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}

  for mesh_cfg in (dict(data=1, fsdp=1, tensor=1, num_devices=1),
                   dict(data=4, fsdp=1, tensor=1, num_devices=4)):
    mesh = parallel.make_mesh(mesh_cfg)
    restored = checkpointer.restore(4, _abstract_on(mesh, config, shapes), None).state
    leaves = jax.tree_util.tree_leaves_with_path(restored)
    assert all(x.sharding.mesh.devices.shape == mesh.devices.shape for _, x in leaves)
    got = {peft.path_str(p): np.asarray(x)
           for p, x in leaves}
    assert_bit_identical(got, step4)
  checkpointer.close()


def test_binary_resumes_onto_another_mesh(tmp_path, four_steps, caplog):
  """four_steps ran on all 8 devices as (data=8); resume on (data=2, fsdp=4) and go on."""
  workdir = str(tmp_path / "run")
  shutil.copytree(four_steps[0], workdir)
  with caplog.at_level(logging.INFO):
    main.train(tiny_pretrain_config("--config.mesh.data=2", "--config.mesh.fsdp=4",
                                    "--config.checkpoint.save_every_steps=2",
                                    "--config.total_steps=5"), workdir)
  assert "saved on mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in caplog.text
  assert "now mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in caplog.text
  assert sorted(logged_losses(workdir)) == [1, 2, 3, 4, 5]
  assert int(read_state(workdir, 5)["step"]) == 5


# ----------------------------------------------------------------------------
# Non-finite losses: 'skip' drops the update and counts it; 'stop' names everything.
# ----------------------------------------------------------------------------


@pytest.fixture
def nan_at_step_3(monkeypatch):
  """Makes the 3rd batch's images NaN, so loss and gradients of step 3 are NaN."""
  real = parallel.shard_batch
  calls = []

  def poisoned(batch, mesh):
    calls.append(1)
    if len(calls) == 3:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return real(batch, mesh)
  monkeypatch.setattr(parallel, "shard_batch", poisoned)


def test_nan_policy_stop_names_step_terms_and_last_checkpoint(tmp_path, nan_at_step_3):
  workdir = str(tmp_path)
  config = tiny_pretrain_config("--config.log.every_steps=2",
                                "--config.checkpoint.save_every_steps=2")
  with pytest.raises(main.NonFiniteLossError) as err:
    main.train(config, workdir)
  message = str(err.value)
  # Found at the step-4 log line, but the step it names is the one that went wrong.
  assert "non-finite loss at step 3:" in message
  assert "loss=nan" in message and "mim_cosine=nan" in message and "grad_norm=nan" in message
  assert f"Last good checkpoint: {workdir}/checkpoints/2 " in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # no NaN weights


def test_nan_policy_skip_drops_the_update_counts_it_and_continues(tmp_path, nan_at_step_3):
  workdir = str(tmp_path)
  config = tiny_pretrain_config("--config.nan_policy=skip",
                                "--config.checkpoint.save_every_steps=1",
                                "--config.checkpoint.max_to_keep=4")
  main.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
  assert [rows[s]["skipped_steps"] for s in range(1, 5)] == [0, 0, 1, 1]
  assert np.isnan(rows[3]["loss"]) and all(np.isfinite(rows[s]["loss"]) for s in (1, 2, 4))
  s2, s3, s4 = (read_state(workdir, s) for s in (2, 3, 4))
  trained = ("params", "opt_state")
  assert_bit_identical({k: v for k, v in s3.items() if k.startswith(trained)},
                       {k: v for k, v in s2.items() if k.startswith(trained)})
  assert int(s3["step"]) == 3 and int(s3["skipped_steps"]) == 1
  assert not np.array_equal(s4["params/head/kernel"], s3["params/head/kernel"])
  assert all(np.isfinite(v).all() for v in s4.values() if v.dtype.kind == "f")
