"""Batched, sharded prediction over a whole split (validation during fine-tuning, evaluation).

Every example is predicted exactly once: the pipeline runs without shuffling or repetition,
the last partial batch is padded to the global batch (so one compiled function serves every
batch and the batch stays evenly sharded) and the padding rows are dropped again. Unreadable
examples are skipped and counted by the pipeline, as in training.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from cxrjax import parallel

# Host-side fields kept per example next to the predictions (strings never go to devices).
HOST_KEYS = ("id",)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
  """Pads every array to `size` rows by repeating the last row; returns (batch, real rows)."""
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f"a batch of {n} rows is larger than the batch size {size}")
  if n == size:
    return batch, n
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}, n


def predict_split(predict_fn: Callable[[dict[str, jax.Array]], dict[str, jax.Array]],
                  batches: Iterable[dict[str, Any]], mesh, *, batch_size: int,
                  device_keys: Sequence[str], keep_keys: Sequence[str] = (),
                  max_batches: int = 0) -> dict[str, np.ndarray]:
  """Runs `predict_fn` over `batches` (per-process batches from pipeline.make_iterator).

  predict_fn: jitted, takes the device batch ({k: [B, ...]} for device_keys) and returns
    {name: [B, ...]} arrays. batch_size: the per-process batch size of the pipeline.
  Returns the outputs plus the `keep_keys` batch fields (labels, masks, boxes...) and ids,
  concatenated over the split in pipeline order (all processes' rows on every process;
  ids only in single-process runs). Several processes must see the same number of batches.
  """
  outputs: dict[str, list[np.ndarray]] = {}
  count = 0
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch = {k: v for k, v in batch.items() if not k.startswith("_")}
    if not batch or len(batch.get("image", ())) == 0:
      continue
    arrays = {k: np.asarray(batch[k]) for k in (*device_keys, *keep_keys) if k in batch}
    padded, real = pad_batch(arrays, batch_size)
    device_batch = parallel.shard_batch({k: padded[k] for k in device_keys}, mesh)
    result = predict_fn(device_batch)
    kept = {k: padded[k] for k in keep_keys if k in padded}
    kept["_valid"] = np.arange(batch_size) < real
    result, kept = _to_host(result), _to_host(kept, on_host=True)
    valid = kept.pop("_valid")
    rows = {k: v[valid] for k, v in {**result, **kept}.items()}
    if jax.process_count() == 1:  # strings cannot be gathered across processes
      for k in HOST_KEYS:
        if k in batch:
          rows[k] = np.asarray(batch[k])[:real].astype(str)
    for k, v in rows.items():
      outputs.setdefault(k, []).append(v)
    count += real
  if not outputs:
    raise ValueError("the split produced no readable examples")
  logging.info("Predicted %d examples", count)
  return {k: np.concatenate(v) for k, v in outputs.items()}


def _to_host(tree: dict, on_host: bool = False) -> dict[str, np.ndarray]:
  """Host arrays; with several processes, every process's rows in process order (the
  order in which shard_batch lays out the global batch)."""
  if jax.process_count() == 1:
    return tree if on_host else jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
