"""Grain input pipelines: source -> shuffle -> per-process shard -> preprocess -> batch.

The order follows DESIGN.md: `MapDataset.source` (random access), a seeded global shuffle
that reshuffles every epoch, this process's slice of the data, per-example preprocessing
with a per-element RNG (deterministic for a seed and process count), batching, and an
iterator whose state Orbax saves with every checkpoint (`grain.checkpoint`).
"""

from __future__ import annotations

from typing import Callable

import grain
import jax
import ml_collections

from cxrjax.config_lib import ConfigError
from cxrjax.data import transforms

_SOURCES: dict[str, Callable[..., object]] = {}


def register_source(name: str):
  """Registers factory(data_cfg, split) -> random-access source (len + getitem)."""
  def wrap(factory):
    _SOURCES[name] = factory
    return factory
  return wrap


def source_names() -> list[str]:
  return sorted(_SOURCES)


@register_source("phantom")
def _phantom_source(data_cfg: ml_collections.ConfigDict, split: str):
  from cxrjax.data import phantom  # pylint: disable=import-outside-toplevel
  num = data_cfg.num_examples if split == "train" else data_cfg.num_eval_examples
  return phantom.PhantomSource(num, seed=data_cfg.phantom_seed, size=data_cfg.source_size,
                               split=split)


def make_source(data_cfg: ml_collections.ConfigDict, split: str):
  if data_cfg.source not in _SOURCES:
    raise ConfigError(f"config.data.source={data_cfg.source!r} is not one of: "
                      f"{', '.join(source_names())}")
  return _SOURCES[data_cfg.source](data_cfg, split)


def per_process_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ConfigError(f"config.data.batch_size={global_batch} is not divisible by the "
                      f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


def make_dataset(data_cfg: ml_collections.ConfigDict, *, split: str, pp: str,
                 seed: int, global_batch: int, repeat: bool) -> grain.MapDataset:
  """The map-style pipeline up to batching (random access, cheap to inspect in tests)."""
  ds = grain.MapDataset.source(make_source(data_cfg, split)).seed(seed)
  if repeat:
    ds = ds.shuffle().repeat()
  # Augment before slicing so each element's RNG depends on its global index only; then
  # each process reads a disjoint, interleaved slice (lazily: only its own elements are
  # decoded). With P processes and a global batch of B, the P per-process batches at step t
  # together hold exactly the examples, augmented identically, of a 1-process run.
  ds = ds.random_map(transforms.Preprocess(pp))
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(per_process_batch_size(global_batch), drop_remainder=repeat)


def make_iterator(ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict):
  """An iterator with worker processes (when configured) and checkpointable state."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                               prefetch_buffer_size=data_cfg.prefetch))
  if data_cfg.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(it_ds)
