"""Grain input pipelines: source -> shuffle -> decode/augment -> per-process shard -> batch.

The order follows DESIGN.md: `MapDataset.source` (random access), a seeded global shuffle
that reshuffles every epoch, per-example decoding and preprocessing with a per-element RNG
(deterministic for a seed and process count), this process's slice of the data, batching,
and an iterator whose state Orbax saves with every checkpoint (`grain.checkpoint`).

Bad examples (corrupt/truncated/empty files, unsupported modes, missing files, bad label
values) are skipped, never replaced: decoding marks them, batches are stacked from the good
rows only, and the iterator refills batches from the following ones, counting every
failure. Past `config.data.max_decode_failure_fraction` the run stops with an error that
lists the first failures. Skipping is done after the worker processes, in the training
process, so batches are identical for any number of workers.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np

from cxrjax.config_lib import ConfigError
from cxrjax.data import decode, labels as labels_lib, sources as sources_lib, subsets, \
    transforms

_SOURCES: dict[str, Callable[..., object]] = {}

# Keys a batch from `make_dataset` carries besides the examples' own; the iterator from
# `make_iterator` consumes and removes them.
FAILURES_KEY = "_failures"
READ_KEY = "_num_read"
_FAILURE = "_failure"


class DataFailureError(RuntimeError):
  """Too many examples could not be read."""


def register_source(name: str):
  """Registers factory(data_cfg, split) -> random-access source (len + getitem)."""
  def wrap(factory):
    _SOURCES[name] = factory
    return factory
  return wrap


def source_names() -> list[str]:
  return sorted(_SOURCES)


def _get(data_cfg, key, default):
  """Config keys added after a config was written (old checkpoints) fall back to defaults."""
  return data_cfg.get(key, default) if hasattr(data_cfg, "get") else default


# ----------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------


@register_source("phantom")
def _phantom_source(data_cfg: ml_collections.ConfigDict, split: str):
  from cxrjax.data import phantom  # pylint: disable=import-outside-toplevel
  num = data_cfg.num_examples if split == "train" else data_cfg.num_eval_examples
  return phantom.PhantomSource(num, seed=data_cfg.phantom_seed, size=data_cfg.source_size,
                               split=split)


def _required(data_cfg, key: str, source: str, what: str) -> str:
  value = _get(data_cfg, key, "")
  if not value:
    raise ConfigError(f"config.data.source={source!r} needs config.data.{key} ({what})")
  return value


@register_source("manifest")
def _manifest_source(data_cfg, split: str):
  path = _required(data_cfg, "manifest", "manifest", "a CSV/JSONL file; '{split}' in the "
                   "name is replaced by the split")
  templated = "{split}" in path
  try:
    source = sources_lib.ManifestSource(
        path.format(split=split) if templated else path,
        split=None if templated else split, image_root=_get(data_cfg, "data_dir", ""),
        label_names=tuple(_get(data_cfg, "label_names", ())))
  except sources_lib.ManifestError as e:
    raise ConfigError(f"config.data.manifest: {e}") from None
  limit = _get(data_cfg, "max_decode_failure_fraction", 0.01)
  if source.num_rows and len(source.skipped_rows) > limit * source.num_rows:
    raise DataFailureError(
        f"{len(source.skipped_rows)} of {source.num_rows} rows of {source.manifest} could not "
        f"be read, more than config.data.max_decode_failure_fraction={limit}; first: "
        + "; ".join(source.skipped_rows[:5]))
  if not len(source):
    raise ConfigError(f"config.data.manifest={path!r} has no rows for split {split!r}")
  return source


@register_source("folder")
def _folder_source(data_cfg, split: str):
  root = _required(data_cfg, "data_dir", "folder", "a folder of images; '{split}' in it is "
                   "replaced by the split")
  try:
    return sources_lib.FolderSource(root.format(split=split))
  except sources_lib.ManifestError as e:
    raise ConfigError(f"config.data.data_dir: {e}") from None


@register_source("array_record")
def _array_record_source(data_cfg, split: str):
  directory = _required(data_cfg, "data_dir", "array_record",
                        "the output folder of `python -m cxrjax.data.prepare`")
  try:
    return sources_lib.ArrayRecordSource(directory, split)
  except sources_lib.ManifestError as e:
    raise ConfigError(f"config.data.data_dir: {e}") from None


def _tfds_factory(default_name: str | None):
  def factory(data_cfg, split: str):
    name = _get(data_cfg, "tfds_name", "") or default_name
    if not name:
      raise ConfigError("config.data.source='tfds' needs config.data.tfds_name, e.g. "
                        "'chexpert' or 'covidx/v4'")
    try:
      return sources_lib.tfds_source(name, split, _get(data_cfg, "data_dir", ""))
    except sources_lib.ManifestError as e:
      raise ConfigError(f"config.data.tfds_name={name!r}: {e}") from None
  return factory


register_source("tfds")(_tfds_factory(None))
for _name in ("nih_cxr14", "chexpert", "mimic_cxr_jpg", "padchest", "vindr_cxr", "covidx",
              "siim_acr_pneumothorax", "rsna_pneumonia", "shenzhen_tb", "montgomery_tb",
              "cxr_lt_2024", "tbx11k", "object_cxr"):
  register_source(_name)(_tfds_factory(_name))


@register_source("mixture")
def _mixture_source(data_cfg, split: str):
  """config.data.sources: list of dicts, each overriding config.data keys plus 'weight'
  (and optional 'name'), e.g. [dict(source='folder', data_dir='/nih', weight=1.0), ...]."""
  components = list(_get(data_cfg, "sources", ()))
  if not components:
    raise ConfigError("config.data.source='mixture' needs config.data.sources: a list of "
                      "dicts like dict(source='folder', data_dir='...', weight=1.0)")
  built, weights, names = [], [], []
  for i, comp in enumerate(components):
    comp = dict(comp)
    if comp.get("source") in (None, "mixture"):
      raise ConfigError(f"config.data.sources[{i}]: 'source' must name a non-mixture source "
                        f"({', '.join(n for n in source_names() if n != 'mixture')})")
    weights.append(float(comp.pop("weight", 1.0)))
    names.append(str(comp.pop("name", f"{i}:{comp['source']}")))
    sub = ml_collections.ConfigDict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict")
                                    else dict(data_cfg))
    sub.sources = ()
    for key, value in comp.items():
      sub[key] = value
    built.append(make_source(sub, split))
  try:
    return sources_lib.MixtureSource(built, weights, names=names)
  except ValueError as e:
    raise ConfigError(f"config.data.sources: {e}") from None


def make_source(data_cfg: ml_collections.ConfigDict, split: str):
  """The registered source of `split`; 'train+val' concatenates splits (refitting a probe
  on train and validation after choosing its learning rate)."""
  if data_cfg.source not in _SOURCES:
    raise ConfigError(f"config.data.source={data_cfg.source!r} is not one of: "
                      f"{', '.join(source_names())}")
  if "+" in split:
    return ConcatSource([make_source(data_cfg, part) for part in split.split("+")])
  return _SOURCES[data_cfg.source](data_cfg, split)


class ConcatSource:
  """Random access over several sources in order (picklable for Grain workers)."""

  def __init__(self, parts):
    self.parts = list(parts)
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
    names = {tuple(getattr(p, "label_names", None) or ()) for p in self.parts}
    if len(names) > 1:
      raise ConfigError(f"the concatenated splits have different label names: {sorted(names)}")
    self.label_names = names.pop() or None

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> dict:
    part = int(np.searchsorted(self.offsets, i, side="right")) - 1
    return self.parts[part][i - int(self.offsets[part])]

  def __repr__(self) -> str:
    return f"ConcatSource({self.parts!r})"


# ----------------------------------------------------------------------------
# Per-element work: decode, labels, preprocessing.
# ----------------------------------------------------------------------------


class Standardize:
  """Raw record -> example in the batch contract (DESIGN.md), before augmentation.

  image: decoded to grey uint8 and resized to source_size x source_size (0: kept);
  labels: the uncertainty/missing policy applied, `label_mask` added; boxes padded to
  max_boxes with -1; byte strings (ids, reports) to str. Raises DataError for bad input.
  """

  def __init__(self, source_size: int = 0, label_policy: str = "u_ignore",
               missing_label: str = "mask", max_boxes: int = 16,
               label_names: tuple[str, ...] | None = None):
    self.source_size = int(source_size)
    self.label_policy, self.missing_label = label_policy, missing_label
    self.max_boxes = int(max_boxes)
    self.label_names = tuple(label_names) if label_names else None
    labels_lib.parse_policy(label_policy, self.label_names)  # fail early on a typo
    if missing_label not in labels_lib.MISSING:
      raise ConfigError(f"config.data.missing_label={missing_label!r} is not one of: "
                        f"{', '.join(labels_lib.MISSING)}")

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    ex = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) and k not in
              ("image", "seg") else v) for k, v in record.items() if k != "path"}
    name = str(ex.get("id", "")) or "<record>"
    image = record.get("image")
    if image is None:
      if "path" not in record:
        raise decode.DecodeError(f"{name}: record has neither 'image' nor 'path'")
      name = record["path"]
      image = decode.decode_file(record["path"], self.source_size)
    elif isinstance(image, (bytes, np.bytes_)):
      image = decode.decode_image(bytes(image), name, self.source_size)
    elif image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    ex["image"] = image
    if "seg" in ex and isinstance(ex["seg"], (bytes, np.bytes_)):
      ex["seg"] = decode.decode_mask(bytes(ex["seg"]), f"{name} (mask)")
      if ex["seg"].shape != image.shape[:2]:
        raise decode.DecodeError(f"{name}: mask is {ex['seg'].shape}, image {image.shape[:2]}")
    if "boxes" in ex:
      ex["boxes"] = self._pad_boxes(np.asarray(ex["boxes"], np.float32).reshape(-1, 5), name)
    if self.source_size and image.shape[:2] != (self.source_size, self.source_size):
      ex = transforms.resize_example(ex, self.source_size)
    if "labels" in ex and "label_mask" not in ex:
      try:
        ex["labels"], ex["label_mask"] = labels_lib.apply_policy(
            ex["labels"], self.label_policy, self.missing_label, self.label_names, rng)
      except ValueError as e:
        raise decode.DataError(f"{name}: {e}") from None
    return ex

  def _pad_boxes(self, boxes: np.ndarray, name: str) -> np.ndarray:
    valid = boxes[boxes[:, 0] >= 0]
    if len(valid) > self.max_boxes:
      # A config limit, not bad data: dropping boxes would silently lose annotations.
      raise ConfigError(f"{name} has {len(valid)} boxes, more than config.data.max_boxes="
                        f"{self.max_boxes}; raise config.data.max_boxes")
    out = np.full((self.max_boxes, 5), -1, np.float32)
    out[:len(valid)] = valid
    return out


class ElementFn:
  """Standardize + Preprocess for grain's random_map; a DataError becomes a failure marker
  (a dict with only `_failure`) so the batch step can drop it and count it."""

  def __init__(self, standardize: Standardize, pp: str):
    self.standardize = standardize
    self.preprocess = transforms.Preprocess(pp)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    try:
      example = self.standardize(record, rng)
    except decode.DataError as e:
      return {_FAILURE: str(e)}
    return self.preprocess(example, rng)


def is_failure(element: Any) -> bool:
  return isinstance(element, dict) and _FAILURE in element


def _stack(values: list[dict]) -> dict:
  keys = values[0].keys()
  for v in values[1:]:
    if v.keys() != keys:
      raise ValueError(f"examples in one batch have different keys: {sorted(keys)} vs "
                       f"{sorted(v.keys())}; do all sources produce the same fields?")
  return {k: np.stack([v[k] for v in values]) for k in keys}


class StackGood:
  """Batch function: stacks the good examples; records the failures and how many were read."""

  def __call__(self, values):
    good = [v for v in values if not is_failure(v)]
    batch = _stack(good) if good else {}
    batch[FAILURES_KEY] = np.array([v[_FAILURE] for v in values if is_failure(v)], dtype=str)
    batch[READ_KEY] = np.int64(len(values))
    return batch


# ----------------------------------------------------------------------------
# The map-style pipeline.
# ----------------------------------------------------------------------------


def per_process_batch_size(global_batch: int, process_count: int | None = None) -> int:
  count = jax.process_count() if process_count is None else process_count
  if global_batch % count:
    raise ConfigError(f"config.data.batch_size={global_batch} is not divisible by the "
                      f"{count} processes")
  return global_batch // count


class BatchedDataset(grain.MapDataset):
  """Batches of a map-style pipeline, plus what `make_iterator` needs to refill them.

  `ds[i]` is batch i with failed examples already removed (so it may hold fewer rows than
  batch_size); iterate through `make_iterator` for full batches.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, drop_remainder: bool,
               max_failure_fraction: float, failure_check_after: int, source: Any):
    super().__init__(parent)
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder
    self.max_failure_fraction = max_failure_fraction
    self.failure_check_after = failure_check_after
    self.source = source

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index]

  def __str__(self) -> str:
    return f"BatchedDataset(batch_size={self.batch_size})"


def make_dataset(data_cfg: ml_collections.ConfigDict, *, split: str, pp: str,
                 seed: int, global_batch: int, repeat: bool,
                 process_index: int | None = None,
                 process_count: int | None = None) -> BatchedDataset:
  """The map-style pipeline up to batching (random access, cheap to inspect in tests).

  process_index/process_count default to JAX's; tests pass them to simulate hosts.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} must be in [0, process_count={count})")
  source = make_source(data_cfg, split)
  if split == "train" and data_cfg.source != "phantom" and len(source) != data_cfg.num_examples:
    logging.warning("config.data.num_examples=%d but the %s train split has %d examples; "
                    "epochs and schedules use num_examples", data_cfg.num_examples,
                    data_cfg.source, len(source))
  if split == "train" and _get(data_cfg, "train_fraction", 1.0) != 1.0:
    # Label-efficiency runs: a stratified, seeded subset (validated in subset_for_config).
    source = subsets.subset_for_config(source, data_cfg)
    logging.info("Training on %d examples (config.data.train_fraction=%s)", len(source),
                 data_cfg.train_fraction)
  standardize = Standardize(
      source_size=data_cfg.source_size,
      label_policy=_get(data_cfg, "label_policy", "u_ignore"),
      missing_label=_get(data_cfg, "missing_label", "mask"),
      max_boxes=_get(data_cfg, "max_boxes", 16),
      label_names=getattr(source, "label_names", None))
  ds = grain.MapDataset.source(source).seed(seed)
  if repeat:
    ds = ds.shuffle().repeat()
  # Augment before slicing so each element's RNG depends on its global index only; then
  # each process reads a disjoint, interleaved slice (lazily: only its own elements are
  # decoded). With P processes and a global batch of B, the P per-process batches at step t
  # together hold exactly the examples, augmented identically, of a 1-process run.
  ds = ds.random_map(ElementFn(standardize, pp))
  ds = ds[index::count]
  batch_size = per_process_batch_size(global_batch, count)
  batched = ds.batch(batch_size, drop_remainder=repeat, batch_fn=StackGood())
  return BatchedDataset(batched, batch_size, drop_remainder=repeat,
                        max_failure_fraction=_get(data_cfg, "max_decode_failure_fraction",
                                                  0.01),
                        failure_check_after=_get(data_cfg, "failure_check_after", 200),
                        source=source)


# ----------------------------------------------------------------------------
# The iterator: refill batches after skipped examples, count, stop past the limit.
# ----------------------------------------------------------------------------


class RefillIterDataset(grain.IterDataset):
  """Turns batches with failed rows removed back into batches of exactly batch_size."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool,
               max_failure_fraction: float, failure_check_after: int):
    super().__init__(parent)
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder
    self.max_failure_fraction = max_failure_fraction
    self.failure_check_after = failure_check_after

  def __iter__(self):
    return RefillIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"RefillIterDataset(batch_size={self.batch_size})"


class RefillIterator(grain.DatasetIterator):
  """State: the parent's state before the partly used batch, how many of its rows were
  used, and the running counts; restoring re-reads that batch (without recounting it)."""

  _LOG_FIRST = 20

  def __init__(self, parent, spec: RefillIterDataset):
    super().__init__(parent)
    self._spec = spec
    self._current: dict | None = None
    self._rows = 0
    self._used = 0
    self._state_before = parent.get_state()
    self._restore_used = 0
    self.num_read = 0
    self.num_failed = 0
    self.recent_failures: list[str] = []

  # Stats -------------------------------------------------------------------

  def stats(self) -> dict[str, float]:
    return {"data/examples_read": float(self.num_read),
            "data/examples_skipped": float(self.num_failed),
            "data/skipped_fraction": self.num_failed / max(1, self.num_read)}

  def _account(self, batch: dict) -> None:
    failures = [str(f) for f in batch[FAILURES_KEY]]
    self.num_read += int(batch[READ_KEY])
    for message in failures:
      self.num_failed += 1
      if self.num_failed <= self._LOG_FIRST:
        logging.warning("Skipped example %d: %s", self.num_failed, message)
      elif self.num_failed % 100 == 0:
        logging.warning("Skipped %d of %d examples so far; latest: %s", self.num_failed,
                        self.num_read, message)
    self.recent_failures = (self.recent_failures + failures)[-10:]
    self._check(final=False)

  def _check(self, final: bool) -> None:
    limit = self._spec.max_failure_fraction
    if not self.num_failed or (self.num_read < self._spec.failure_check_after and not final):
      return
    if self.num_failed > limit * self.num_read:
      raise DataFailureError(
          f"{self.num_failed} of {self.num_read} examples ({self.num_failed / self.num_read:.1%})"
          f" could not be read, more than config.data.max_decode_failure_fraction={limit}. "
          f"Latest failures: " + " | ".join(self.recent_failures[-5:]))

  # Iteration ---------------------------------------------------------------

  def _fetch(self) -> None:
    self._state_before = self._parent.get_state()
    batch = next(self._parent)
    if self._restore_used:  # re-reading the batch we were inside at the checkpoint
      self._used, self._restore_used = self._restore_used, 0
    else:
      self._account(batch)
      self._used = 0
    batch.pop(FAILURES_KEY)
    batch.pop(READ_KEY)
    self._current = batch
    self._rows = len(next(iter(batch.values()))) if batch else 0

  def __next__(self) -> dict:
    parts, need = [], self._spec.batch_size
    while need:
      if self._current is None or self._used >= self._rows:
        try:
          self._fetch()
        except StopIteration:
          self._current = None
          self._check(final=True)
          if parts and not self._spec.drop_remainder:
            break
          raise
        continue
      take = min(need, self._rows - self._used)
      parts.append({k: v[self._used:self._used + take] for k, v in self._current.items()})
      self._used += take
      need -= take
    if len(parts) == 1 and need == 0 and len(next(iter(parts[0].values()))) == self._rows:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    inside = self._current is not None and self._used < self._rows
    return {"parent": self._state_before if inside else self._parent.get_state(),
            "used": self._used if inside else 0,
            "num_read": self.num_read, "num_failed": self.num_failed}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._current, self._rows, self._used = None, 0, 0
    self._restore_used = int(state["used"])
    self.num_read, self.num_failed = int(state["num_read"]), int(state["num_failed"])

  def __str__(self) -> str:
    return "RefillIterator"


def make_iterator(ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict):
  """An iterator with worker processes (when configured) and checkpointable state."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                               prefetch_buffer_size=data_cfg.prefetch))
  if data_cfg.num_workers > 0:
    # Grain's workers read absl flags; our binaries parse their own command line, so mark
    # absl's (defaults only) as parsed or the first worker fails with UnparsedFlagAccessError.
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  if isinstance(ds, BatchedDataset):
    it_ds = RefillIterDataset(it_ds, ds.batch_size, ds.drop_remainder,
                              ds.max_failure_fraction, ds.failure_check_after)
  return iter(it_ds)


def data_stats(iterator) -> dict[str, float]:
  """Examples read/skipped so far by an iterator from `make_iterator` (for metrics)."""
  return iterator.stats() if isinstance(iterator, RefillIterator) else {}
