r"""Pretraining binary.

  python -m cxrjax.main --config=configs/evax_b.py --workdir=workdirs/evax_b

Reads top to bottom: config, mesh, data, abstract init and shardings, sharded init, update
step (compiled ahead of time, memory printed), resume, loop with NaN check, periodic
checkpoints and logs. Restarting with the same --workdir resumes from the newest readable
checkpoint, on any mesh; SIGTERM/SIGINT save one at the current step and exit 0. Several
processes: see launch/ (process 0 logs; all write each checkpoint). docs/checkpointing.md
has the details.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cxrjax import checkpoint as ckpt_lib
from cxrjax import config_lib, evaluators, metric_writers, objectives, optim, parallel
from cxrjax.data import pipeline
from cxrjax import validation  # noqa: F401  pylint: disable=unused-import  (registers checks)


class NonFiniteLossError(RuntimeError):
  pass


def total_and_epoch_steps(config) -> tuple[int, float]:
  steps_per_epoch = config.data.num_examples / config.data.batch_size
  total = optim.steps_from(config, "total", steps_per_epoch)
  return total, steps_per_epoch


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) pretraining in `workdir`; returns the last logged metrics."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  is_writer = jax.process_index() == 0

  # ---------------------------------------------------------------- Mesh.
  mesh = parallel.make_mesh(config.mesh)
  logging.info("%s", parallel.device_summary(mesh))
  writer = metric_writers.create(workdir, active=is_writer)
  if is_writer:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  total_steps, steps_per_epoch = total_and_epoch_steps(config)

  # ---------------------------------------------------------------- Objective + data.
  objective = objectives.get(config.objective.name)(config)
  pp = config.data.pp_train.format(image_size=config.data.image_size)
  pp = "|".join(p for p in (pp, objective.preprocess()) if p)
  train_ds = pipeline.make_dataset(config.data, split="train", pp=pp, seed=config.seed,
                                   global_batch=config.data.batch_size, repeat=True)
  train_iter = pipeline.make_iterator(train_ds, config.data)
  logging.info("Train data: %s, preprocessing %r", config.data.source, pp)

  # ---------------------------------------------------------------- Abstract init.
  schedule = optim.make_schedule(config, total_steps, steps_per_epoch)
  tx = optim.make_optimizer(config, schedule)
  abstract_model = nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  abstract_frozen = nnx.eval_shape(lambda: objective.build_frozen(nnx.Rngs(0)))
  # The frozen part (teacher, EMA teacher, centers...) keeps every variable it has; the
  # objective may update it after each step (`update_frozen`), never through gradients.
  frozen_graphdef, abstract_frozen_state = (nnx.split(abstract_frozen)
                                            if abstract_frozen is not None else (None, None))
  use_ema = config.optim.ema_decay > 0

  def init(rng):
    params = nnx.to_pure_dict(nnx.state(objective.build_model(nnx.Rngs(rng)), nnx.Param))
    state = {"params": params, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": jax.random.fold_in(rng, 1),
             "skipped_steps": jnp.zeros((), jnp.int32)}
    if use_ema:
      state["ema"] = params
    if frozen_graphdef is not None:
      state["frozen"] = nnx.to_pure_dict(nnx.state(objective.build_frozen(nnx.Rngs(rng))))
    return state

  # ---------------------------------------------------------------- Shardings.
  repl = parallel.replicated(mesh)
  params_sh = nnx.to_pure_dict(parallel.param_shardings(abstract_params, mesh))
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sh = {
      "params": params_sh,
      "opt_state": optax.tree_utils.tree_map_params(
          tx, lambda _, sh: sh, abstract_state["opt_state"], params_sh,
          transform_non_params=lambda _: repl),
      "step": repl, "rng": repl, "skipped_steps": repl}
  if use_ema:
    state_sh["ema"] = params_sh
  if frozen_graphdef is not None:
    state_sh["frozen"] = nnx.to_pure_dict(
        parallel.param_shardings(abstract_frozen_state, mesh))
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)

  # Everything below runs with the mesh as context (shardings, shard_map).
  with jax.set_mesh(mesh):
    # ---------------------------------------------------------------- Sharded init.
    state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
    if objective.frozen_weights() is not None:
      state["frozen"] = place_weights(objective.frozen_weights(), state["frozen"], "teacher")
    # Continuation runs (e.g. DINOv2 high resolution) start from another run's weights.
    if (weights := getattr(objective, "params_weights", lambda: None)()) is not None:
      state["params"] = place_weights(weights, state["params"], "init_from")
      if use_ema:
        state["ema"] = jax.tree.map(jnp.copy, state["params"])
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info("Trainable parameters: %s (%.2fM)", f"{n_params:,}", n_params / 1e6)

    # ---------------------------------------------------------------- Update step.
    skip_nonfinite = config.nan_policy == "skip"

    def train_step(state, batch):
      rng = jax.random.fold_in(state["rng"], state["step"])
      frozen = (nnx.merge(frozen_graphdef, state["frozen"])
                if frozen_graphdef is not None else None)

      def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return objective.loss(model, frozen, batch, train=True, rngs=nnx.Rngs(dropout=rng))

      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      new = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
      if hasattr(objective, "update_frozen"):  # e.g. EMA teacher, DINO centers
        new["frozen"] = objective.update_frozen(state["frozen"], params, aux, state["step"])
      # "state/..." entries are arrays for update_frozen, not metrics to log.
      aux = {k: v for k, v in aux.items() if not k.startswith("state/")}
      if use_ema:
        decay = config.optim.ema_decay
        new["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
      if skip_nonfinite:  # keep the old weights and optimizer state, but advance the step
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new,
                           dict(state, step=state["step"] + 1))
        new["skipped_steps"] = state["skipped_steps"] + (~finite).astype(jnp.int32)
      metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                 "param_norm": optax.tree.norm(params), "finite": finite, **aux}
      return new, metrics

    batch_keys = objective.batch_keys
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape[:0] + (config.data.batch_size,)
                                              + v.shape[1:], v.dtype,
                                              sharding=parallel.batch_sharding(mesh, v.ndim))
                      for k, v in peek_batch(train_ds, batch_keys).items()}
    jitted_step = jax.jit(train_step, in_shardings=(state_sh, None),
                          out_shardings=(state_sh, repl), donate_argnums=(0,))
    compiled_step = jitted_step.lower(abstract_state, abstract_batch).compile()
    if config.log.memory_analysis:
      log_memory(compiled_step)
    # What each log line holds: the step's metrics plus those added in the loop.
    logged_names = set(compiled_step.out_info[1]) - {"finite"} | {
        "skipped_steps", "epoch", "perf/steps_per_sec", "perf/images_per_sec",
        "perf/eta_minutes", *pipeline.data_stats(train_iter)}
    # ---------------------------------------------------------------- Evaluators.
    # Periodic representation checks (kNN, linear-probe shortcut) on the encoder.
    encode = jax.jit(lambda params, images: nnx.merge(graphdef, params).encoder(images)["cls"])
    evals = {name: evaluators.get(cfg.type)(encode, cfg, config.data, mesh)
             for name, cfg in config.evals.items()}
    for name, ev in evals.items():
      logged_names |= {f"{name}/{m}" for m in ("auroc", "accuracy")}
    best_metric = config.checkpoint.keep_best_metric
    if best_metric and best_metric not in logged_names:
      raise config_lib.ConfigError(
          f"config.checkpoint.keep_best_metric={best_metric!r} is not a logged metric; "
          f"logged: {', '.join(sorted(logged_names))}")

    # ---------------------------------------------------------------- Resume.
    # The newest readable checkpoint in the workdir, onto this run's mesh (which may differ
    # from the one it was saved on); unreadable newer steps are logged and set aside.
    parallel.sync_processes("compiled")  # before the first cross-process collective
    checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint)
    meta = ckpt_lib.run_metadata(config, mesh)
    first_step, last_saved = 0, None
    restored = resume(checkpointer, abstract_state, train_iter, meta)
    if restored is not None:
      state, first_step = restored.state, int(jax.device_get(restored.state["step"]))
      last_saved = restored.step
    if first_step >= total_steps:
      logging.info("Already trained for %d of %d steps; nothing to do.", first_step, total_steps)
      checkpointer.close()
      writer.close()
      return {}

    # ---------------------------------------------------------------- Loop.
    logging.info("Training steps %d..%d (%.1f epochs of %d examples)", first_step + 1,
                 total_steps, total_steps / steps_per_epoch, config.data.num_examples)
    progress = metric_writers.Progress(total_steps, config.data.batch_size, first_step)
    preemption = ckpt_lib.PreemptionWatcher()
    logged: dict[str, float] = {}
    pending: list[tuple[int, dict]] = []  # (step, device metrics) since the last log line

    def check_finite():
      """Raises on a non-finite step (policy 'stop'); a no-op under policy 'skip'."""
      if skip_nonfinite:
        return
      for s, m in pending:
        if not bool(jax.device_get(m["finite"])):
          m = jax.device_get(m)
          where = (f"{checkpointer.directory}/{last_saved}" if last_saved is not None
                   else "none (no checkpoint saved yet)")
          raise NonFiniteLossError(
              f"non-finite loss at step {s}: "
              + ", ".join(f"{k}={float(v):.4g}" for k, v in m.items() if k != "finite")
              + f". Last good checkpoint: {where}"
              + " (config.nan_policy='skip' drops such updates instead)")

    try:
      for step in range(first_step + 1, total_steps + 1):
        batch = next(train_iter)
        device_batch = parallel.shard_batch({k: batch[k] for k in batch_keys}, mesh)
        state, metrics = compiled_step(state, device_batch)
        pending.append((step, metrics))
        # Every process asks every step (multi-host: they agree on the step to stop at).
        stop = preemption.should_stop(step)
        save = checkpointer.should_save(step, total_steps) or stop

        evaluated = {f"{name}/{metric}": value for name, ev in evals.items()
                     if step % ev.every_steps == 0 or step == total_steps
                     for metric, value in ev.run(state["params"])}
        if evaluated and is_writer:
          print(f"step {step}/{total_steps}  " + "  ".join(
              f"{k} {v:.4f}" for k, v in evaluated.items()), flush=True)
        if step % config.log.every_steps == 0 or step == total_steps:
          check_finite()
          host = [m for _, m in jax.device_get(pending)]
          pending = []
          logged = interval_means(host)
          logged.update(progress.update(step))
          logged["skipped_steps"] = float(jax.device_get(state["skipped_steps"]))
          logged["epoch"] = step / steps_per_epoch
          logged.update(pipeline.data_stats(train_iter))  # examples read / skipped
          logged.update(evaluated)
          writer.write_scalars(step, logged)
          writer.flush()
          if is_writer:
            print(f"step {step}/{total_steps}  loss {logged['loss']:.4f}  "
                  f"{logged['perf/steps_per_sec']:.2f} steps/s  "
                  f"{logged['perf/images_per_sec']:.1f} img/s  "
                  f"ETA {metric_writers.format_eta(logged['perf/eta_minutes'])}", flush=True)
        elif evaluated:  # an evaluator's step that is not a log step
          logged.update(evaluated)
          writer.write_scalars(step, evaluated)

        if save and last_saved != step:
          check_finite()  # never checkpoint weights that a non-finite step produced
          checkpointer.save(step, state, train_iter, config, meta, metrics=logged,
                            force=stop)
          last_saved = step
        if stop:
          break
    finally:
      preemption.close()
      checkpointer.close()  # waits for in-flight async saves, also when raising
      writer.close()

    if stop and step < total_steps:
      if is_writer:
        print(f"Stopped by {preemption.signal_name} after step {step} of {total_steps}. "
              f"Checkpoint: {checkpointer.directory}/{step}\n"
              f"      Rerun the same command to resume.", flush=True)
      return logged
    if is_writer:
      print(f"Done. Checkpoint: {checkpointer.directory}/{total_steps}\n"
            f"      Metrics:    {os.path.join(workdir, 'metrics.jsonl')}\n"
            f"      TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}",
            flush=True)
    return logged


def peek_batch(ds, keys) -> dict[str, np.ndarray]:
  """One per-process batch, to learn shapes and dtypes for ahead-of-time compilation."""
  batch = ds[0]
  missing = [k for k in keys if k not in batch]
  if missing:
    raise config_lib.ConfigError(
        f"the batch lacks {missing} (has {sorted(batch)}); check config.data.pp_train")
  return {k: np.asarray(batch[k]) for k in keys}


def resume(checkpointer: ckpt_lib.Checkpointer, abstract_state, train_iter, meta: dict
           ) -> ckpt_lib.Restored | None:
  """The newest readable checkpoint (None: start fresh), logged; the checkpointer is closed
  (waiting for nothing in flight) if restoring raises."""
  try:
    restored = checkpointer.restore_latest(abstract_state, train_iter)
  except BaseException:
    checkpointer.close()
    raise
  if restored is not None:
    logging.info("Resuming from %s/%d (saved on mesh %s by %s process(es); now mesh %s)",
                 checkpointer.directory, restored.step, restored.meta.get("mesh"),
                 restored.meta.get("processes"), meta["mesh"])
  return restored


def interval_means(host: list[dict]) -> dict[str, float]:
  """Means of the step metrics logged since the last log line. Non-finite steps (dropped
  under nan_policy='skip') are left out, or their numbers would poison the means."""
  good = [m for m in host if m["finite"]] or host
  return {k: float(np.mean([m[k] for m in good])) for k in good[0] if k != "finite"}


def place_weights(weights: dict, like: dict, what: str) -> dict:
  """Puts host weights onto the shardings of `like`, checking every shape."""
  def put(path, w, target):
    if tuple(np.shape(w)) != tuple(target.shape):
      raise ValueError(f"{what} weight {jax.tree_util.keystr(path)} has shape {np.shape(w)}, "
                       f"expected {target.shape}")
    return jax.device_put(np.asarray(w, target.dtype), target.sharding)
  return jax.tree_util.tree_map_with_path(put, weights, like)


def log_memory(compiled) -> None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return
  gib = 1 / 2**30
  logging.info(
      "Compiled train step, per device: arguments %.3f GiB, outputs %.3f GiB, "
      "temporaries %.3f GiB, generated code %.3f GiB",
      analysis.argument_size_in_bytes * gib, analysis.output_size_in_bytes * gib,
      analysis.temp_size_in_bytes * gib, analysis.generated_code_size_in_bytes * gib)


def setup_logging() -> None:
  """INFO lines from process 0; other processes report warnings and errors only."""
  index, count = parallel.process_index_and_count()
  tag = f"[p{index}] " if count > 1 else ""
  logging.basicConfig(level=logging.INFO if index == 0 else logging.WARNING,
                      format=f"%(asctime)s %(levelname)s {tag}%(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run_binary(prog: str, body, argv: list[str] | None) -> int:
  """Shared command-line wrapper of the binaries: logging, multi-process start-up, config
  parsing, then body(config, workdir); errors end in one line and an exit status:
  0 done or stopped cleanly by SIGTERM/SIGINT (checkpoint saved), 2 config error,
  3 non-finite loss under nan_policy='stop', 4 no readable checkpoint, 5 too many
  unreadable examples."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    setup_logging()
    # Before anything touches a device: JAX's backends start after the distributed client.
    if parallel.maybe_initialize_distributed():
      setup_logging()  # now tagged [pN]; INFO lines from process 0 only
    config, flags = config_lib.parse_command_line(argv, prog)
    if "workdir" not in flags:
      raise config_lib.ConfigError("--workdir=DIR is required")
    body(config, flags["workdir"])
  except config_lib.ConfigError as e:
    print(f"{prog}: config error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLossError as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return 3
  except ckpt_lib.CheckpointError as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return 4
  except pipeline.DataFailureError as e:
    print(f"{prog}: data error: {e}", file=sys.stderr)
    return 5
  return 0


def main(argv: list[str] | None = None) -> int:
  return run_binary("cxrjax.main", train, argv)


if __name__ == "__main__":
  sys.exit(main())
