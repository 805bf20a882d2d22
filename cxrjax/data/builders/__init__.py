"""TFDS builders for public CXR datasets (manual download, array_record, no TF to read).

Source names (config.data.source) and TFDS names: the TFDS name is `cxrjax_<source>` so it
cannot clash with TFDS's own catalogue (which has a TensorFlow-only `chexpert`).

  python -m cxrjax.data.builders chexpert --manual_dir=/data/chexpert --data_dir=/data/tfds
"""

from __future__ import annotations

import importlib

# source name -> (module, class)
BUILDERS = {
    "nih_cxr14": ("nih_cxr14", "NihCxr14"),
    "chexpert": ("chexpert", "Chexpert"),
    "mimic_cxr_jpg": ("mimic_cxr_jpg", "MimicCxrJpg"),
    "padchest": ("padchest", "Padchest"),
    "vindr_cxr": ("vindr_cxr", "VindrCxr"),
    "covidx": ("covidx", "Covidx"),
    "siim_acr_pneumothorax": ("siim_acr", "SiimAcrPneumothorax"),
    "rsna_pneumonia": ("rsna_pneumonia", "RsnaPneumonia"),
    "shenzhen_tb": ("tb_masks", "ShenzhenTb"),
    "montgomery_tb": ("tb_masks", "MontgomeryTb"),
    "cxr_lt_2024": ("cxr_lt_2024", "CxrLt2024"),
    "tbx11k": ("tbx11k", "Tbx11k"),
    "object_cxr": ("object_cxr", "ObjectCxr"),
}
PREFIX = "cxrjax_"


def builder_class(source_name: str):
  """The builder class of a source name (importing TFDS and the dataset module)."""
  if source_name not in BUILDERS:
    raise KeyError(f"unknown dataset {source_name!r}; cxrjax builders: "
                   f"{', '.join(sorted(BUILDERS))}")
  module, cls = BUILDERS[source_name]
  return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def register_all() -> None:
  """Imports every builder so that tfds.builder('cxrjax_...') finds it."""
  for name in BUILDERS:
    builder_class(name)


def tfds_name(name: str) -> str:
  """'chexpert' / 'chexpert/1024' / 'cxrjax_chexpert/1024' -> 'cxrjax_chexpert[/1024]'."""
  base, sep, config = name.partition("/")
  base = base[len(PREFIX):] if base.startswith(PREFIX) else base
  if base not in BUILDERS:
    raise KeyError(f"unknown dataset {name!r}; cxrjax builders: {', '.join(sorted(BUILDERS))}")
  return f"{PREFIX}{base}{sep}{config}"
