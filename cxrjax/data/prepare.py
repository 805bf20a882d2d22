r"""Converts a folder or manifest of DICOM/PNG/JPEG radiographs into array_record shards.

  python -m cxrjax.data.prepare --input=/data/private/labels.csv --output=/data/prepared \
      --image_size=512 [--format=png|jpeg] [--shard_size=2000] [--workers=8]

`--input` is a CSV/JSONL manifest (`path,label...`, see cxrjax.data.sources.ManifestSource;
a `split` column assigns splits) or a folder (every image, unlabelled, into --split).
Images are decoded (DICOM: rescale, VOI window, MONOCHROME1 inversion), shrunk so the
longer side is at most --image_size and stored as 8-bit grey PNG (lossless) or JPEG with
their raw labels. Read them with config.data.source='array_record', data_dir=OUTPUT.

Restartable: each shard is written to a temporary file and renamed when complete, and a
rerun with the same arguments skips finished shards. Unreadable images are skipped,
counted and listed in OUTPUT/failures-<split>.txt; more than --max_failure_fraction of a
split stops the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import sys
from typing import Sequence

import numpy as np

from cxrjax.data import decode, sources

FORMAT_VERSION = "cxrjax-array_record-v1"


class PrepareError(RuntimeError):
  pass


def _encode_one(args) -> tuple[bytes | None, str]:
  """(record fields) -> (packed record or None, failure message)."""
  path, labels, rid, image_size, fmt, quality = args
  try:
    image, _ = decode.decode_with_size(decode.read_file(path), path, image_size)
    image = decode.resize_max(image, image_size)
  except decode.DataError as e:
    return None, str(e)
  data = decode.encode_png(image) if fmt == "png" else decode.encode_jpeg(image, quality)
  return sources.pack({"image": data, "labels": np.asarray(labels, np.float32), "id": rid}), ""


def _write_shard(chunk, final, args, pool, bar, writer_cls) -> dict:
  jobs = [(r["path"], r["labels"], r["id"], args.image_size, args.format, args.quality)
          for r in chunk]
  results = pool.imap(_encode_one, jobs, chunksize=8) if pool else map(_encode_one, jobs)
  tmp = final + ".tmp"
  writer = writer_cls(tmp, "group_size:1")  # group_size 1: fast random access
  done = {"written": 0, "failed": []}
  for packed, error in results:
    if packed is None:
      done["failed"].append(error)
    else:
      writer.write(packed)
      done["written"] += 1
    bar.update(1)
  writer.close()
  with open(final + ".json", "w", encoding="utf-8") as f:
    json.dump(done, f)
  os.replace(tmp, final)  # the shard counts as done only once it is complete
  return done


def _shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def _fingerprint(records: Sequence[dict], args) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([args.image_size, args.format, args.quality, args.shard_size]).encode())
  for r in records:
    h.update(r["path"].encode("utf-8") + b"\0" + np.asarray(r["labels"], np.float32).tobytes())
  return h.hexdigest()


def _read_input(args) -> tuple[dict[str, list[dict]], tuple[str, ...]]:
  if os.path.isdir(args.input):
    src = sources.FolderSource(args.input)
    return {args.split: [src[i] for i in range(len(src))]}, ()
  src = sources.ManifestSource(args.input, image_root=args.image_root)
  if src.skipped_rows:
    logging.warning("%d manifest rows skipped; first: %s", len(src.skipped_rows),
                    src.skipped_rows[0])
  splits: dict[str, list[dict]] = {}
  # Manifest splits come from a `split` column when present (ManifestSource filters by it).
  present = _split_values(args.input)
  for split in present or [args.split]:
    part = sources.ManifestSource(args.input, image_root=args.image_root,
                                  split=split if present else None,
                                  label_names=src.label_names)
    splits[split] = [part[i] for i in range(len(part))]
  return splits, src.label_names


def _split_values(path: str) -> list[str]:
  import csv  # pylint: disable=import-outside-toplevel
  values: list[str] = []
  if path.endswith((".jsonl", ".json")):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          s = json.loads(line).get("split") if line.strip() else None
        except (json.JSONDecodeError, AttributeError):
          continue
        if s and s not in values:
          values.append(s)
    return values
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    if "split" not in (reader.fieldnames or []):
      return []
    for row in reader:
      s = (row.get("split") or "").strip()
      if s and s not in values:
        values.append(s)
  return values


def prepare(args) -> dict:
  """Runs the conversion; returns the metadata written to OUTPUT/metadata.json."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  os.makedirs(args.output, exist_ok=True)
  splits, label_names = _read_input(args)
  state_path = os.path.join(args.output, "prepare.json")
  fingerprint = _fingerprint([r for recs in splits.values() for r in recs], args)
  if os.path.exists(state_path):
    with open(state_path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous.get("fingerprint") != fingerprint:
      raise PrepareError(f"{args.output} holds shards prepared from other input or settings "
                       f"({state_path}); use an empty --output folder")
  else:
    with open(state_path, "w", encoding="utf-8") as f:
      json.dump({"fingerprint": fingerprint, "input": args.input}, f)

  meta = {"format": FORMAT_VERSION, "label_names": list(label_names),
          "image_size": args.image_size, "image_format": args.format, "splits": {}}
  pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
  try:
    for split, records in splits.items():
      count = max(1, -(-len(records) // args.shard_size))
      written = failed = 0
      failures: list[str] = []
      bar = tqdm(total=len(records), desc=f"prepare {split}", unit="img", file=sys.stderr,
                 disable=args.quiet)
      for index in range(count):
        chunk = records[index * args.shard_size:(index + 1) * args.shard_size]
        final = os.path.join(args.output, _shard_name(split, index, count))
        summary_path = final + ".json"
        if os.path.exists(final) and os.path.exists(summary_path):
          with open(summary_path, encoding="utf-8") as f:
            done = json.load(f)  # finished in an earlier run
          bar.update(len(chunk))
        else:
          done = _write_shard(chunk, final, args, pool, bar, ArrayRecordWriter)
        written += done["written"]
        failed += len(done["failed"])
        failures += done["failed"]
      bar.close()
      with open(os.path.join(args.output, f"failures-{split}.txt"), "w", encoding="utf-8") as f:
        f.writelines(m + "\n" for m in failures)
      if failed:
        logging.warning("%s: skipped %d of %d images (listed in failures-%s.txt)", split,
                        failed, len(records), split)
      if failed > args.max_failure_fraction * len(records):
        raise PrepareError(f"{split}: {failed} of {len(records)} images could not be read, more "
                         f"than --max_failure_fraction={args.max_failure_fraction}; first: "
                         + " | ".join(failures[:3]))
      if written == 0:
        raise PrepareError(f"{split}: no image could be written")
      meta["splits"][split] = {"num_examples": written, "num_failed": failed,
                               "num_shards": count}
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  with open(os.path.join(args.output, "metadata.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  return meta


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m cxrjax.data.prepare",
                              description=__doc__.strip().splitlines()[0])
  p.add_argument("--input", required=True, help="manifest CSV/JSONL or image folder")
  p.add_argument("--output", required=True, help="folder for shards + metadata.json")
  p.add_argument("--image_size", type=int, default=512, help="longest side stored (px)")
  p.add_argument("--format", choices=("png", "jpeg"), default="png")
  p.add_argument("--quality", type=int, default=95, help="JPEG quality")
  p.add_argument("--shard_size", type=int, default=2000, help="images per shard")
  p.add_argument("--split", default="train", help="split name when the input has none")
  p.add_argument("--image_root", default="", help="base of relative manifest paths "
                 "(default: the manifest's folder)")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--max_failure_fraction", type=float, default=0.01)
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  if args.image_size <= 0 or args.shard_size <= 0:
    p.error("--image_size and --shard_size must be positive")
  return args


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  args = parse_args(argv)
  try:
    meta = prepare(args)
  except (sources.ManifestError, PrepareError) as e:
    print(f"prepare: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {args.output}: " + ", ".join(
      f"{s}={v['num_examples']} ({v['num_failed']} skipped)" for s, v in meta["splits"].items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
