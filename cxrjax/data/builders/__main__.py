"""Prepares one dataset from its manual download into array_record files.

  python -m cxrjax.data.builders chexpert[/CONFIG] --manual_dir=DIR [--data_dir=DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cxrjax.data.builders",
                                   description=__doc__.strip().splitlines()[0])
  parser.add_argument("dataset", help="e.g. chexpert, nih_cxr14/1024, covidx/v4_512")
  parser.add_argument("--manual_dir", required=True,
                      help="folder holding the dataset as downloaded (see --instructions)")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
  parser.add_argument("--instructions", action="store_true",
                      help="print the manual download instructions and exit")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from cxrjax.data import builders  # pylint: disable=import-outside-toplevel
  try:
    name = builders.tfds_name(args.dataset)
  except KeyError as e:
    print(f"error: {e.args[0]}", file=sys.stderr)
    return 2
  cls = builders.builder_class(name.partition("/")[0][len(builders.PREFIX):])
  if args.instructions:
    print(cls.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return 0
  builders.register_all()
  builder = tfds.builder(name, data_dir=args.data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
  print(f"Prepared {name} in {builder.data_dir}: "
        + ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
