"""Two JAX processes on localhost (jax.distributed on CPU, Gloo collectives).

Both runs below see 2 CPU devices in all: two processes with 1 device each, or one process
with 2. Same config, same global batch of 8, so the two must train the same model.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from cxrjax import parallel
from cxrjax.config_lib import ConfigError
from test_checkpoint import logged_losses, read_state
from tiny import REPO

FLAGS = [
    f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}",
    "--config.model.variant=micro/8", "--config.objective.teacher_model.variant=micro/8",
    "--config.data.image_size=32", "--config.data.source_size=40",
    "--config.data.batch_size=8", "--config.data.num_examples=256",
    "--config.log.every_steps=1", "--config.log.memory_analysis=false",
    "--config.objective.min_mask_block=4", "--config.model.dtype=float32",
]
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")


def _env(devices_per_process: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAX_COMPILATION_CACHE_DIR"):
    env.pop(key, None)
  env.update(extra)
  return env


def _finish(proc, what, timeout=500) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"{what} timed out:\n{out[-4000:]}")
  assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-4000:]}"
  return out


def _popen(cmd, env):
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
  steps = ["--config.total_steps=4", "--config.checkpoint.save_every_steps=4"]
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  binary = [sys.executable, "-m", "cxrjax.main", *FLAGS, *steps]
  port = portpicker.pick_unused_port()
  # Started together: the two runs share the machine's cores.
  procs = {
      "2 processes": _popen([LAUNCHER, "2", *binary, f"--workdir={two}"],
                            _env(1, JAX_COORDINATOR_PORT=str(port))),
      "1 process": _popen([*binary, f"--workdir={one}"], _env(2)),
  }
  out = {name: _finish(proc, name) for name, proc in procs.items()}

  # One checkpoint, written collectively: each process its own data-iterator state.
  assert os.listdir(os.path.join(two, "checkpoints")) == ["4"]
  data = sorted(os.listdir(os.path.join(two, "checkpoints", "4", "data")))
  assert [d for d in data if d.endswith(".json")] == ["process_0-of-2.json",
                                                       "process_1-of-2.json"]
  with open(os.path.join(two, "checkpoints", "4", "meta", "metadata")) as f:
    meta = json.load(f)
  assert (meta["processes"], meta["devices"], meta["mesh"]) == (2, 2, {
      "data": 2, "fsdp": 1, "tensor": 1})

  # Only process 0 logs: one metrics row and one progress line per step.
  with open(os.path.join(two, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f if '"loss"' in l] == [1, 2, 3, 4]
  assert out["2 processes"].count("step 4/4  loss") == 1  # (and the quickstart kNN line)
  assert out["2 processes"].count("step 4/4  knn/auroc") == 1
  assert "[p1]" not in "".join(l for l in out["2 processes"].splitlines(True)
                               if " INFO " in l)

  # Same model. Each process holds every other example of the global batch, so the batch
  # rows are permuted relative to the 1-process run: sums in another order, hence allclose.
  a, b = read_state(two, 4), read_state(one, 4)
  assert a.keys() == b.keys()
  for key in ("step", "rng", "skipped_steps"):
    np.testing.assert_array_equal(a[key], b[key])
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(list(logged_losses(two).values()),
                             list(logged_losses(one).values()), rtol=1e-5)


def _last_logged_step(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return max((json.loads(l)["step"] for l in f if l.endswith("}\n")), default=0)
  except FileNotFoundError:
    return 0


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step_then_resume(tmp_path):
  """JAX's preemption service spreads one host's SIGTERM; all save one step and exit 0."""
  workdir, total = str(tmp_path), 40
  cache = str(tmp_path / "jax_cache")  # the resumed run compiles nothing
  binary = [sys.executable, "-m", "cxrjax.main", *FLAGS, f"--config.total_steps={total}",
            "--config.checkpoint.save_every_steps=100", f"--workdir={workdir}"]

  def start_both():
    port = portpicker.pick_unused_port()
    return [_popen(binary, _env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                JAX_COMPILATION_CACHE_DIR=cache)) for i in range(2)]

  procs = start_both()
  deadline = time.monotonic() + 500
  while _last_logged_step(workdir) < 6:
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      pytest.fail("the 2-process run ended or stalled before step 6:\n"
                  + procs[0].communicate()[0][-4000:])
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  outs = [_finish(p, f"process {i}") for i, p in enumerate(procs)]
  stopped = int(outs[0].split("Stopped by SIGTERM after step ")[1].split()[0])
  assert 6 <= stopped < total
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
  assert _last_logged_step(workdir) == stopped

  procs = start_both()
  outs = [_finish(p, f"resumed process {i}") for i, p in enumerate(procs)]
  assert f"Resuming from {workdir}/checkpoints/{stopped} " in outs[0]
  assert sorted(logged_losses(workdir)) == list(range(1, total + 1))
  assert int(read_state(workdir, total)["step"]) == total


@pytest.mark.parametrize("env, message", [
    (dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1234"),
     r"JAX_COORDINATOR_ADDRESS='127.0.0.1:1234' is set but \['JAX_NUM_PROCESSES', "
     r"'JAX_PROCESS_ID'\] are not"),
    (dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1234", JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID="2"), r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"),
])
def test_bad_distributed_environment_fails_before_connecting(monkeypatch, env, message):
  for key in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  with pytest.raises(ConfigError, match=message):
    parallel.maybe_initialize_distributed()


def test_one_process_needs_no_distributed_runtime(monkeypatch):
  for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "CXRJAX_DISTRIBUTED"):
    monkeypatch.delenv(key, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  parallel.sync_processes("nothing to wait for")  # a no-op with one process
