"""Random-access sources for private and mixed data: manifests, folders, prepared shards.

A source is anything with `__len__` and `__getitem__(i) -> record` that pickles cheaply
(Grain sends it to every worker). Records are dicts of *undecoded* data:
  image | path   encoded bytes (or an array), or a file to read
  labels         raw float32 [K]: 1, 0, -1 uncertain, NaN missing (see labels.py)
  seg, boxes     optional: PNG bytes / [N, 5] (class, x0, y0, x1, y1) in image pixels
  id             string
Decoding, label policies and resizing happen later, per element in the pipeline, where a
bad file is skipped and counted instead of stopping the run.

Labels are always looked up by column *name*, never by position, so a reordered or
extended CSV cannot shift labels.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import struct
from typing import Any, Sequence

import numpy as np

from cxrjax.data import decode, labels as labels_lib

# Manifest columns that are not labels.
RESERVED_COLUMNS = ("path", "id", "split")


class ManifestError(ValueError):
  """The manifest as a whole is unusable (missing file, no path column...)."""


class StringTable:
  """Many strings in one bytes blob + offsets: ~1/4 the memory of a list of str and
  pickled in one copy, which matters when a million paths go to every worker."""

  def __init__(self, strings: Sequence[str]):
    encoded = [s.encode("utf-8") for s in strings]
    self._offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
    self._blob = b"".join(encoded)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, i: int) -> str:
    return self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8")


# ----------------------------------------------------------------------------
# CSV / JSONL manifests.
# ----------------------------------------------------------------------------


def _is_raw_label(text: str) -> bool:
  try:
    labels_lib.parse_raw_value(text, "")
    return True
  except ValueError:
    return False


class ManifestSource:
  """`path,label1,label2,...` CSV (header required) or JSONL rows for private data.

  CSV: `path` is required; `id` and `split` are optional; with `label_names` given, exactly
  those columns are labels (a missing one is an error, other columns are ignored and
  reported); without, every other column whose cells are mostly 1/0/-1/blank is a label
  and the rest (Sex, Age, ...) are ignored and reported.
  JSONL: {"path": ..., "labels": {"name": value, ...} or [values] (needs label_names),
  "id": ..., "split": ...}; a name absent from a row's dict is a missing (NaN) label.
  A row that cannot be read (wrong field count, bad value, no path) is skipped, counted in
  `skipped_rows` and reported; paths are relative to `image_root` (default: the
  manifest's folder).
  """

  def __init__(self, path: str, *, split: str | None = None, image_root: str = "",
               label_names: Sequence[str] = ()):
    if not os.path.isfile(path):
      raise ManifestError(f"manifest {path!r} does not exist")
    self.manifest = path
    self.image_root = image_root or os.path.dirname(os.path.abspath(path))
    self.skipped_rows: list[str] = []
    self.ignored_columns: list[str] = []
    given = tuple(label_names)
    if path.endswith((".jsonl", ".json")):
      rows, names = self._read_jsonl(path, given)
    else:
      rows, names = self._read_csv(path, given)
    self.num_rows = len(rows) + len(self.skipped_rows)
    if split is not None and any(r[3] is not None for r in rows):
      rows = [r for r in rows if r[3] == split]
    self.label_names = names
    self._paths = StringTable([r[0] for r in rows])
    self._ids = StringTable([r[1] for r in rows])
    self._labels = (np.stack([r[2] for r in rows]) if rows
                    else np.zeros((0, len(names)), np.float32))
    if self.ignored_columns:
      logging.warning("%s: columns not used as labels: %s", path,
                      ", ".join(self.ignored_columns))
    if self.skipped_rows:
      logging.warning("%s: skipped %d of %d rows; first: %s", path, len(self.skipped_rows),
                      self.num_rows, "; ".join(self.skipped_rows[:5]))

  # CSV ---------------------------------------------------------------------

  def _read_csv(self, path, given):
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      try:
        header = [h.strip() for h in next(reader)]
      except StopIteration:
        raise ManifestError(f"manifest {path!r} is empty; expected a header row "
                            "'path,label1,...'") from None
      body = list(reader)
    if "path" not in header:
      raise ManifestError(f"manifest {path!r} has no 'path' column; columns: {header}")
    if len(set(header)) != len(header):
      dup = sorted({h for h in header if header.count(h) > 1})
      raise ManifestError(f"manifest {path!r} has duplicate columns {dup}")
    col = {h: i for i, h in enumerate(header)}
    candidates = [h for h in header if h not in RESERVED_COLUMNS]
    if given:
      missing = [n for n in given if n not in col]
      if missing:
        raise ManifestError(f"manifest {path!r} lacks label columns {missing} of "
                            f"config.data.label_names; columns: {header}")
      names = given
      self.ignored_columns = [h for h in candidates if h not in given]
    else:
      # A column is a label when most of its cells are 1/0/-1/blank: a few bad cells then
      # skip their rows (counted) instead of silently dropping the whole class.
      names, self.ignored_columns = [], []
      for h in candidates:
        cells = [r[col[h]] for r in body if len(r) == len(header)]
        good = sum(_is_raw_label(c) for c in cells)
        (names if cells and good > len(cells) / 2 else self.ignored_columns).append(h)
      names = tuple(names)
    rows = []
    for lineno, r in enumerate(body, start=2):
      where = f"{path}:{lineno}"
      if not any(c.strip() for c in r):
        continue  # blank line
      if len(r) != len(header):
        self.skipped_rows.append(f"{where}: {len(r)} fields, header has {len(header)}")
        continue
      rel = r[col["path"]].strip()
      if not rel:
        self.skipped_rows.append(f"{where}: empty path")
        continue
      try:
        raw = np.array([labels_lib.parse_raw_value(r[col[n]], f"{where} column {n!r}")
                        for n in names], np.float32)
      except ValueError as e:
        self.skipped_rows.append(str(e))
        continue
      rows.append((self._resolve(rel), r[col["id"]].strip() if "id" in col else rel, raw,
                   r[col["split"]].strip() if "split" in col else None))
    return rows, tuple(names)

  # JSONL -------------------------------------------------------------------

  def _read_jsonl(self, path, given):
    parsed = []
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{path}:{lineno}"
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          self.skipped_rows.append(f"{where}: invalid JSON ({e.msg})")
          continue
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or not obj["path"]:
          self.skipped_rows.append(f"{where}: expected an object with a 'path' string")
          continue
        parsed.append((where, obj))
    names = list(given)
    if not given:  # names in order of first appearance (list-valued labels need names)
      for _, obj in parsed:
        for n in (obj.get("labels") or {}) if isinstance(obj.get("labels"), dict) else ():
          if n not in names:
            names.append(n)
    names = tuple(names)
    rows, unknown = [], set()
    for where, obj in parsed:
      value = obj.get("labels", {})
      try:
        if isinstance(value, dict):
          unknown.update(k for k in value if k not in names)
          raw = [labels_lib.parse_raw_value("" if value.get(n) is None else str(value[n]),
                                            f"{where} label {n!r}") for n in names]
        elif isinstance(value, list):
          if len(value) != len(names):
            raise ValueError(f"{where}: {len(value)} label values for {len(names)} names "
                             f"(config.data.label_names={list(names)})")
          raw = [labels_lib.parse_raw_value("" if v is None else str(v), f"{where}[{i}]")
                 for i, v in enumerate(value)]
        else:
          raise ValueError(f"{where}: 'labels' must be an object or a list")
      except ValueError as e:
        self.skipped_rows.append(str(e))
        continue
      rows.append((self._resolve(obj["path"]), str(obj.get("id", obj["path"])),
                   np.array(raw, np.float32), obj.get("split")))
    self.ignored_columns = sorted(unknown)
    return rows, names

  def _resolve(self, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(self.image_root, rel)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, i: int) -> dict:
    return {"path": self._paths[i], "labels": self._labels[i], "id": self._ids[i]}

  def label_matrix(self) -> np.ndarray:
    """Raw labels float32 [N, K] of every row (already in memory; no image is read)."""
    return self._labels.copy()

  def __repr__(self):
    return (f"ManifestSource({self.manifest!r}, {len(self)} rows, "
            f"{len(self.label_names)} labels)")


class FolderSource:
  """Every PNG/JPEG/DICOM under a folder (recursively, sorted): unlabelled pretraining data.

  Labels are empty ([0]); use a manifest for labelled private data.
  """

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise ManifestError(f"image folder {root!r} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
      dirnames.sort()
      files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if decode.is_image_file(f))
    if not files:
      raise ManifestError(f"image folder {root!r} holds no {'/'.join(decode.IMAGE_EXTENSIONS)} "
                          "files")
    self.root = root
    self.label_names: tuple[str, ...] = ()
    self._paths = StringTable(files)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, i: int) -> dict:
    path = self._paths[i]
    return {"path": path, "labels": np.zeros(0, np.float32),
            "id": os.path.relpath(path, self.root)}

  def __repr__(self):
    return f"FolderSource({self.root!r}, {len(self)} images)"


# ----------------------------------------------------------------------------
# Records in array_record shards (written by cxrjax.data.prepare).
# ----------------------------------------------------------------------------

_MAGIC = b"CXR1"


def pack(record: dict[str, Any]) -> bytes:
  """dict of bytes / str / numbers / arrays -> bytes. A JSON header describes the fields, so
  reading needs neither pickle (unsafe on foreign files) nor TensorFlow."""
  header, buffers = [], []
  for key, value in record.items():
    if isinstance(value, bytes):
      header.append([key, "bytes", None, None, len(value)])
      buffers.append(value)
    elif isinstance(value, str):
      data = value.encode("utf-8")
      header.append([key, "str", None, None, len(data)])
      buffers.append(data)
    else:
      array = np.ascontiguousarray(value)
      if array.dtype.kind not in "biuf":
        raise TypeError(f"pack: field {key!r} has dtype {array.dtype}; expected numbers")
      data = array.tobytes()
      header.append([key, "array", array.dtype.str, list(array.shape), len(data)])
      buffers.append(data)
  head = json.dumps(header).encode("utf-8")
  return _MAGIC + struct.pack("<I", len(head)) + head + b"".join(buffers)


def unpack(data: bytes) -> dict[str, Any]:
  if data[:4] != _MAGIC:
    raise decode.DecodeError(f"record does not start with {_MAGIC!r}; not written by "
                             "cxrjax.data.prepare")
  (n,) = struct.unpack("<I", data[4:8])
  header = json.loads(data[8:8 + n])
  out, pos = {}, 8 + n
  for key, kind, dtype, shape, size in header:
    chunk = data[pos:pos + size]
    pos += size
    if kind == "bytes":
      out[key] = chunk
    elif kind == "str":
      out[key] = chunk.decode("utf-8")
    else:
      out[key] = np.frombuffer(chunk, np.dtype(dtype)).reshape(shape).copy()
  return out


def shard_paths(directory: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, f"{split}-*-of-*.array_record")))


class ArrayRecordSource:
  """Shards written by `python -m cxrjax.data.prepare` (metadata.json + array_record)."""

  def __init__(self, directory: str, split: str):
    meta_path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta_path):
      raise ManifestError(f"{directory!r} has no metadata.json; expected the output folder "
                          "of `python -m cxrjax.data.prepare`")
    with open(meta_path, encoding="utf-8") as f:
      self.metadata = json.load(f)
    splits = self.metadata.get("splits", {})
    if split not in splits:
      raise ManifestError(f"{directory!r} has no split {split!r}; prepared splits: "
                          f"{', '.join(sorted(splits)) or 'none'}")
    paths = shard_paths(directory, split)
    expected = splits[split]["num_shards"]
    if len(paths) != expected:
      raise ManifestError(f"{directory!r}: split {split!r} has {len(paths)} shards, "
                          f"metadata.json says {expected}; is `prepare` still running?")
    import grain  # pylint: disable=import-outside-toplevel
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self.label_names = tuple(self.metadata.get("label_names", ()))
    self.directory, self.split = directory, split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    return unpack(self._source[i])

  def __repr__(self):
    return f"ArrayRecordSource({self.directory!r}, split={self.split!r}, {len(self)} records)"


# ----------------------------------------------------------------------------
# TFDS builders (array_record, read with as_data_source: no TensorFlow needed).
# ----------------------------------------------------------------------------


class NamedSource:
  """Forwards to a random-access source and carries its label names."""

  def __init__(self, source, label_names: Sequence[str], name: str = ""):
    self._source = source
    self.label_names = tuple(label_names)
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    return self._source[i]

  def __repr__(self):
    return f"NamedSource({self.name or self._source!r}, {len(self)} records)"


def tfds_source(name: str, split: str, data_dir: str = "") -> NamedSource:
  """`name` (e.g. 'chexpert', 'covidx/v4_512') prepared under data_dir -> data source."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from cxrjax.data import builders  # pylint: disable=import-outside-toplevel
  try:
    full = builders.tfds_name(name)
  except KeyError as e:
    raise ManifestError(e.args[0]) from None
  builders.register_all()
  try:
    builder = tfds.builder(full, data_dir=data_dir or None)
  except Exception as e:  # unknown config names etc.  # pylint: disable=broad-except
    raise ManifestError(f"cannot open TFDS dataset {full!r}: {e}") from None
  if not builder.is_prepared():
    raise ManifestError(
        f"dataset {full!r} is not prepared in {builder.data_dir!r}; run "
        f"`python -m cxrjax.data.builders {name} --manual_dir=DIR "
        f"--data_dir={data_dir or '~/tensorflow_datasets'}` first")
  available = list(builder.info.splits.keys())
  aliases = {"val": "validation", "validation": "val"}
  chosen = split if split in available else aliases.get(split)
  if chosen not in available:
    raise ManifestError(f"dataset {full!r} has no split {split!r}; splits: "
                        f"{', '.join(available)}")
  label_names = tuple(builder.info.metadata.get("label_names", ())) if builder.info.metadata \
      else ()
  return NamedSource(builder.as_data_source(split=chosen), label_names, f"{full}:{chosen}")


# ----------------------------------------------------------------------------
# Weighted mixtures (pretraining on several merged datasets).
# ----------------------------------------------------------------------------


class MixtureSource:
  """Concatenation of sources where component c fills a share `weights[c]` of the indices.

  Length defaults to the total size of the components. A component whose share is larger
  than its size is cycled (index mod its length); one whose share is smaller is subsampled
  at evenly spaced indices, so every part of it is represented. The pipeline's global
  shuffle then interleaves components. Records keep only `image`/`path`, `id` and a
  `source` index, plus `labels` when all components have the same label names.
  """

  def __init__(self, sources: Sequence, weights: Sequence[float], length: int = 0,
               names: Sequence[str] = ()):
    if len(sources) != len(weights) or not sources:
      raise ValueError(f"mixture: {len(sources)} sources but {len(weights)} weights")
    weights = np.asarray(weights, np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
      raise ValueError(f"mixture weights {weights.tolist()} must be >= 0 with a positive sum")
    empty = [i for i, s in enumerate(sources) if len(s) == 0 and weights[i] > 0]
    if empty:
      raise ValueError(f"mixture components {empty} are empty but have positive weight")
    self._sources = list(sources)
    self.names = tuple(names) or tuple(f"source{i}" for i in range(len(sources)))
    total = int(length) or sum(len(s) for s in sources)
    shares = weights / weights.sum() * total
    counts = np.floor(shares).astype(np.int64)
    # Largest remainders get the leftover slots, so counts sum exactly to `total`.
    for i in np.argsort(-(shares - counts), kind="stable")[:total - counts.sum()]:
      counts[i] += 1
    self.counts = counts
    self._starts = np.concatenate([[0], np.cumsum(counts)])
    label_sets = {tuple(getattr(s, "label_names", ())) for s in sources}
    self.label_names = label_sets.pop() if len(label_sets) == 1 else ()
    self._keep_labels = bool(self.label_names)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, i: int) -> dict:
    c = int(np.searchsorted(self._starts, i, side="right")) - 1
    source = self._sources[c]
    j, count, size = int(i - self._starts[c]), int(self.counts[c]), len(source)
    record = source[j * size // count if count <= size else j % size]
    out = {k: record[k] for k in ("image", "path") if k in record}
    rid = record.get("id", "")
    out["id"] = f"{self.names[c]}:{rid.decode() if isinstance(rid, bytes) else rid}"
    out["source"] = np.int32(c)
    out["labels"] = (record["labels"] if self._keep_labels
                     else np.zeros(0, np.float32))
    return out

  def __repr__(self):
    parts = ", ".join(f"{n}: {int(c)}" for n, c in zip(self.names, self.counts))
    return f"MixtureSource({parts})"
