"""Label vocabularies of the public CXR datasets and uncertainty policies.

Builders and manifests store *raw* label values: 1 positive, 0 negative, -1 uncertain
(CheXpert labeller) and NaN for "not mentioned / not annotated". The policy that turns raw
values into training targets is applied when reading, so one prepared dataset serves every
policy. A `label_mask` of 0 marks a target that must not contribute to the loss: the
batch never carries guessed labels unless a policy asks for it explicitly.

Policies for uncertain (-1) labels (U-Ignore/U-Ones/U-Zeros: Irvin et al. 2019; label
smoothing, "LSR-Ones/LSR-Zeros": Pham et al. 2021):
  u_ignore        -1 -> masked
  u_ones          -1 -> 1
  u_zeros         -1 -> 0
  u_smooth_ones   -1 -> U(0.55, 0.85)   (alias: smooth)
  u_smooth_zeros  -1 -> U(0, 0.30)
Missing (NaN) labels: 'mask' (default, DESIGN.md) or 'negative' (the CheXpert paper's
reading of a blank: not mentioned -> 0).
A policy string may set classes separately: 'u_zeros,Atelectasis=u_ones,Edema=u_ones'.
"""

from __future__ import annotations

import numpy as np

UNCERTAIN = -1.0

CHEXPERT_14 = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")
# The 5 CheXpert competition tasks (Irvin et al. 2019, Table 2).
CHEXPERT_5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# NIH ChestX-ray14 (Wang et al. 2017), in the order used by CheXNet and EVA-X.
CXR14 = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia")
# BBox_List_2017.csv spells one class differently from Data_Entry_2017.csv.
CXR14_BBOX_ALIASES = {"Infiltrate": "Infiltration"}

# CXR-LT 2024 (MICCAI challenge on long-tailed, multi-label CXR classification): 40 findings.
CXR_LT_2024 = (
    "Adenopathy", "Atelectasis", "Azygos Lobe", "Calcification of the Aorta", "Cardiomegaly",
    "Clavicle Fracture", "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum",
    "Fibrosis", "Fissure", "Fracture", "Granuloma", "Hernia", "Hydropneumothorax", "Infarction",
    "Infiltration", "Kyphosis", "Lobar Atelectasis", "Lung Lesion", "Lung Opacity", "Mass",
    "Nodule", "Normal", "Pleural Effusion", "Pleural Other", "Pleural Thickening",
    "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum", "Pneumothorax", "Pulmonary Embolism",
    "Pulmonary Hypertension", "Rib Fracture", "Round(ed) Atelectasis", "Subcutaneous Emphysema",
    "Support Devices", "Tortuous Aorta", "Tuberculosis")

# VinDr-CXR (PhysioNet 1.0.0): 22 local findings (with boxes) then 6 global diagnoses,
# the column order of annotations/image_labels_{train,test}.csv.
VINDR_LOCAL = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion")
VINDR_GLOBAL = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases",
                "No finding")
VINDR = VINDR_LOCAL + VINDR_GLOBAL

# PadChest (Bustos et al. 2020) has ~190 terms; these are its most frequent radiological
# findings, lower-case as in the CSV. The full term list of every image is kept as text.
PADCHEST = (
    "normal", "pleural effusion", "cardiomegaly", "pneumonia", "atelectasis", "nodule",
    "infiltrates", "consolidation", "alveolar pattern", "interstitial pattern", "emphysema",
    "pneumothorax", "fracture", "mass", "scoliosis", "aortic elongation", "aortic atheromatosis",
    "hilar enlargement", "costophrenic angle blunting", "hemidiaphragm elevation",
    "hiatal hernia", "COPD signs", "calcified granuloma", "laminar atelectasis", "kyphosis",
    "vertebral degenerative changes", "pleural thickening", "tuberculosis", "bronchiectasis",
    "air trapping", "flattened diaphragm", "tracheal shift", "granuloma")

COVIDX_V3 = ("normal", "pneumonia", "COVID-19")
COVIDX_V4 = ("negative", "positive")
TBX11K_IMAGE = ("healthy", "sick_but_non_tb", "tb")
TBX11K_BOX = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
OBJECT_CXR = ("foreign_object",)
RSNA_PNEUMONIA = ("Lung Opacity",)
SIIM_PNEUMOTHORAX = ("Pneumothorax",)
TUBERCULOSIS = ("Tuberculosis",)
LUNG_SEG = ("background", "lung")

POLICIES = ("u_ignore", "u_ones", "u_zeros", "u_smooth_ones", "u_smooth_zeros")
ALIASES = {"smooth": "u_smooth_ones", "ignore": "u_ignore", "ones": "u_ones",
           "zeros": "u_zeros"}
MISSING = ("mask", "negative")
_SMOOTH_RANGE = {"u_smooth_ones": (0.55, 0.85), "u_smooth_zeros": (0.0, 0.30)}


def _policy_name(name: str, where: str) -> str:
  name = ALIASES.get(name.strip(), name.strip())
  if name not in POLICIES:
    raise ValueError(f"{where}: unknown uncertainty policy {name!r}; expected one of "
                     f"{', '.join(POLICIES + tuple(ALIASES))}")
  return name


def parse_policy(spec: str, names: tuple[str, ...] | None = None) -> tuple[str, dict]:
  """'u_zeros,Atelectasis=u_ones' -> ('u_zeros', {'Atelectasis': 'u_ones'})."""
  default, per_class = "u_ignore", {}
  for part in (p for p in spec.split(",") if p.strip()):
    if "=" in part:
      cls, _, pol = part.partition("=")
      cls = cls.strip()
      if names is not None and cls not in names:
        raise ValueError(f"label policy {spec!r}: class {cls!r} is not a label of this "
                         f"dataset ({', '.join(names)})")
      per_class[cls] = _policy_name(pol, f"label policy {spec!r}")
    else:
      default = _policy_name(part, f"label policy {spec!r}")
  return default, per_class


def apply_policy(raw: np.ndarray, policy: str = "u_ignore", missing: str = "mask",
                 names: tuple[str, ...] | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Raw values [K] -> (labels float32 [K], label_mask float32 [K])."""
  raw = np.asarray(raw, np.float32)
  if missing not in MISSING:
    raise ValueError(f"missing-label policy {missing!r}: expected one of {MISSING}")
  bad = ~np.isnan(raw) & ~np.isin(raw, (1.0, 0.0, UNCERTAIN))
  if bad.any():
    raise ValueError(f"raw label values {raw[bad].tolist()} at {np.flatnonzero(bad).tolist()}"
                     " are not 1, 0, -1 or NaN")
  default, per_class = parse_policy(policy, names)
  labels = np.where(np.isnan(raw), 0.0, raw).astype(np.float32)
  mask = np.ones_like(labels)
  if missing == "mask":
    mask[np.isnan(raw)] = 0.0
  uncertain = np.flatnonzero(raw == UNCERTAIN)
  for k in uncertain:
    pol = per_class.get(names[k], default) if names is not None and k < len(names) else default
    if pol == "u_ignore":
      labels[k], mask[k] = 0.0, 0.0
    elif pol == "u_ones":
      labels[k] = 1.0
    elif pol == "u_zeros":
      labels[k] = 0.0
    else:
      if rng is None:
        raise ValueError(f"policy {pol} draws random targets and needs an rng")
      labels[k] = rng.uniform(*_SMOOTH_RANGE[pol])
  return labels, mask


def multi_hot(names_present, vocabulary: tuple[str, ...], where: str = "",
              strict: bool = True) -> np.ndarray:
  """Names -> float32 0/1 over `vocabulary`; unknown names raise unless strict=False."""
  out = np.zeros(len(vocabulary), np.float32)
  index = {n: i for i, n in enumerate(vocabulary)}
  for name in names_present:
    if name in index:
      out[index[name]] = 1.0
    elif strict:
      raise ValueError(f"{where}: unknown label {name!r}; expected one of "
                       f"{', '.join(vocabulary)}")
  return out


def one_hot(name: str, vocabulary: tuple[str, ...], where: str = "") -> np.ndarray:
  if name not in vocabulary:
    raise ValueError(f"{where}: unknown class {name!r}; expected one of "
                     f"{', '.join(vocabulary)}")
  out = np.zeros(len(vocabulary), np.float32)
  out[vocabulary.index(name)] = 1.0
  return out


def parse_raw_value(text: str, where: str) -> float:
  """CSV cell -> raw label value: '1', '1.0', '0', '-1', '' / 'nan' -> NaN."""
  t = text.strip()
  if t == "" or t.lower() in ("nan", "none", "null"):
    return float("nan")
  try:
    v = float(t)
  except ValueError:
    raise ValueError(f"{where}: label value {text!r} is not a number (expected 1, 0, -1 "
                     "or blank)") from None
  if v not in (1.0, 0.0, UNCERTAIN):
    raise ValueError(f"{where}: label value {text!r} is not 1, 0, -1 or blank")
  return v
