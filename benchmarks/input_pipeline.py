r"""Input-pipeline throughput: images/s through decode + training augmentation at 224 px.

  python benchmarks/input_pipeline.py [--images=256] [--batch=32] [--workers=0,1,2]

Measures the full cxrjax path (grain MapDataset -> decode -> augment -> batch -> refill
iterator) for: phantom CXRs rendered at 256 px, and array_record shards written by
`cxrjax.data.prepare` from 256 px and 512 px PNG and JPEG images, each with 0/1/2 Grain
worker processes; plus the DINOv2 multi-crop transform. Prints a Markdown table (the
BENCHMARKS.md data section) and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN_PP = "random_resized_crop(224, scale=(0.5, 1.0))|to_channels(3)|normalize('evax')"
# DINOv2 multi-crop (cxrjax.data.multiview; it normalises its own crops).
MULTI_CROP_PP = "multi_crop(224, 96, num_local=8)"


def make_shards(root: str, size: int, fmt: str, count: int) -> str:
  """Phantom radiographs saved as PNG/JPEG, then converted by cxrjax.data.prepare."""
  from cxrjax.data import phantom, prepare  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder = os.path.join(root, f"src{size}{fmt}")
  os.makedirs(folder, exist_ok=True)
  for i in range(count):
    image = phantom.render(i, seed=0, size=size)["image"]
    ext = "png" if fmt == "png" else "jpg"
    Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.{ext}"), quality=95)
  out = os.path.join(root, f"shards{size}{fmt}")
  prepare.prepare(prepare.parse_args([
      "--input", folder, "--output", out, "--image_size", str(size), "--format", fmt,
      "--shard_size", "1000", "--workers", "2", "--quiet"]))
  return out


def measure(cfg, pp: str, batch: int, images: int) -> float:
  from cxrjax.data import pipeline  # pylint: disable=import-outside-toplevel
  ds = pipeline.make_dataset(cfg, split="train", pp=pp, seed=0, global_batch=batch,
                             repeat=True, process_index=0, process_count=1)
  it = pipeline.make_iterator(ds, cfg)
  for _ in range(2):  # warm-up: worker start-up, first-shard opening
    next(it)
  steps = max(1, images // batch)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256, help="images timed per setting")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--dataset_size", type=int, default=256,
                      help="images per prepared dataset (reused cyclically)")
  parser.add_argument("--only", default="", help="run settings whose name contains this")
  parser.add_argument("--json", default="", help="write results here")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import PIL  # pylint: disable=import-outside-toplevel
  from cxrjax import config_blocks  # pylint: disable=import-outside-toplevel
  from cxrjax.data import multiview  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  workers = [int(w) for w in args.workers.split(",")]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    # (label, source, shards (size, format) or None, preprocessing)
    settings = [("phantom (rendered) 256 px", "phantom", None, TRAIN_PP)]
    for size in (256, 512):
      for fmt in ("png", "jpeg"):
        settings.append((f"array_record {fmt.upper()} {size} px", "array_record", (size, fmt),
                         TRAIN_PP))
    settings.append(("array_record JPEG 256 px, DINOv2 multi-crop 2x224+8x96",
                     "array_record", (256, "jpeg"), MULTI_CROP_PP))
    shards = {}
    for label, source, data_dir, pp in settings:
      if args.only not in label:
        continue
      if data_dir is not None and data_dir not in shards:
        shards[data_dir] = make_shards(tmp, *data_dir, args.dataset_size)
      for w in workers:
        cfg = config_blocks.pretrain_base().data
        cfg.update(source=source, source_size=256 if source == "phantom" else 0,
                   num_examples=args.dataset_size, num_workers=w, num_threads=2, prefetch=2,
                   data_dir=shards[data_dir] if data_dir else "")
        rate = measure(cfg, pp, args.batch, args.images)
        rows.append({"setting": label, "workers": w, "images_per_s": round(rate, 1)})
        print(f"{label:55s} workers={w}: {rate:8.1f} img/s", flush=True)

  cores = os.cpu_count()
  header = (f"Date {datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"{cores} CPU cores, Python {platform.python_version()}, jax {jax.__version__}, "
            f"grain {importlib.metadata.version('grain')}, "
            f"Pillow {PIL.__version__}, numpy {np.__version__}")
  print("\n" + header + "\n")
  print("| setting | " + " | ".join(f"{w} workers" for w in workers) + " |")
  print("|---|" + "---|" * len(workers))
  for label in dict.fromkeys(r["setting"] for r in rows):
    vals = [next(r["images_per_s"] for r in rows if r["setting"] == label and r["workers"] == w)
            for w in workers]
    print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"header": header, "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
