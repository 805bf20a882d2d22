"""Reading and writing checkpoint files: PyTorch `.pt/.pth` (needs torch) and safetensors.

Safetensors is read and written here with numpy alone (the format is an 8-byte header
length, a JSON header and raw little-endian data), so the parity tests and `--to=timm`
export need neither torch nor the safetensors package. PyTorch files are only ever read
with `torch.load(weights_only=True)`: a pickle that would construct anything beyond
tensors and containers is refused, never executed.

Loaded tensors come back as a flat `{name: np.ndarray}`: wrappers (`teacher`,
`model_ema`, `model`, `module`, `state_dict`) are descended and training prefixes
(`module.`, `backbone.`) stripped; floating tensors of any precision become float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import struct
from typing import Any, Mapping

import numpy as np

from cxrjax.convert import mappings


class ConvertError(ValueError):
  """A conversion problem the user can act on; the CLI prints it and exits 2."""


@dataclasses.dataclass
class Loaded:
  tensors: dict[str, np.ndarray]
  format: str                      # 'safetensors' | 'torch'
  wrappers: list[str]              # wrapper keys descended, outermost first
  prefix: str                      # training prefix stripped ('' if none)
  dropped: list[str]               # keys outside the selected wrapper/prefix
  metadata: dict[str, str]         # safetensors header metadata
  source_dtypes: list[str]         # distinct stored dtypes (e.g. ['float16'])


# ----------------------------------------------------------------------------
# Safetensors (numpy only).
# ----------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
  # bfloat16 is the upper half of a float32: shifting its bits up is exact.
  return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Returns (tensors, header metadata, stored dtype names)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConvertError(f"{path} is not a safetensors file: only {size} bytes")
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= size - 8:
      raise ConvertError(f"{path} is not a safetensors file: header length {n} does not "
                         f"fit a {size}-byte file")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConvertError(f"{path} is not a safetensors file: its header is not JSON ({e})")
    data = f.read()
  if not isinstance(header, dict):
    raise ConvertError(f"{path} is not a safetensors file: header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  tensors, dtypes = {}, set()
  for name, info in header.items():
    try:
      dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
      raise ConvertError(f"{path}: safetensors entry {name!r} is malformed: {info!r}")
    if not 0 <= start <= end <= len(data):
      raise ConvertError(f"{path}: tensor {name!r} lies outside the file "
                         f"(bytes {start}..{end} of {len(data)}); the file is truncated")
    dtypes.add(dtype)
    if dtype == "BF16":
      raw = np.frombuffer(data[start:end], dtype="<u2")
      array = _bf16_to_f32(raw)
    elif dtype in _ST_DTYPES:
      array = np.frombuffer(data[start:end], dtype=np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
    else:
      raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype}, which cxrjax does "
                         f"not read; supported: BF16, {', '.join(_ST_DTYPES)}")
    count = int(np.prod(shape, dtype=np.int64))
    if array.size != count:
      raise ConvertError(f"{path}: tensor {name!r} holds {array.size} values for shape "
                         f"{tuple(shape)}")
    tensors[name] = array.reshape(shape).copy()
  return tensors, {str(k): str(v) for k, v in metadata.items()}, sorted(dtypes)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (float32/float16/int...) in safetensors format, names sorted."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blobs, offset = [], 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _ST_NAMES:
      raise ConvertError(f"cannot write tensor {name!r} of dtype {array.dtype} to "
                         "safetensors")
    blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the reference writer aligns the data to 8 bytes
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# PyTorch files.
# ----------------------------------------------------------------------------


def sniff(path: str) -> str | None:
  """'torch' (zip or legacy pickle), 'safetensors', or None for anything else."""
  with open(path, "rb") as f:
    head = f.read(16)
  size = os.path.getsize(path)
  if head[:4] == b"PK\x03\x04":
    return "torch"
  # Legacy torch.save: a pickle (PROTO opcode 0x80, protocol 2-5) of a magic number.
  if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
    return "torch"
  if len(head) >= 9:
    (n,) = struct.unpack("<Q", head[:8])
    if 2 <= n <= size - 8 and head[8:9] == b"{":
      return "safetensors"
  return None


def _torch_load(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConvertError(
        f"{path} is a PyTorch checkpoint; reading it needs the optional extra "
        "`pip install 'cxrjax[torch]'` (or convert the file to safetensors elsewhere)")
  # Training scripts (EVA-X, MAE) often store their argparse.Namespace beside the
  # weights; rebuilding one only sets attributes, so it is the one class allowed.
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConvertError(
        f"refusing to load {path}: it pickles Python objects beyond tensors and "
        f"containers, and cxrjax never unpickles code (torch.load(weights_only=True): "
        f"{first}). Re-save only the state dict, or convert to safetensors in a "
        "trusted environment.")
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConvertError(f"{path} is not a readable PyTorch checkpoint: {first}")


def _to_numpy(value: Any) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  value = value.detach().cpu()
  if value.is_floating_point():
    value = value.to(torch.float32)
  return value.numpy()


def _is_tensor(value: Any) -> bool:
  return hasattr(value, "detach") and hasattr(value, "shape")


def _unwrap(obj: Any, path: str, select: str | None) -> tuple[Mapping, list[str]]:
  """Descends wrapper dicts to the state dict (a mapping holding tensors)."""
  trail: list[str] = []
  if select:
    for key in select.split("."):
      if not isinstance(obj, Mapping) or key not in obj:
        found = sorted(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConvertError(f"{path}: --select={select!r}: no key {key!r} at "
                           f"{'.'.join(trail) or 'top level'}; keys there: {found}")
      obj = obj[key]
      trail.append(key)
  while isinstance(obj, Mapping) and not any(_is_tensor(v) for v in obj.values()):
    for key in mappings.WRAPPERS:
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        trail.append(key)
        break
    else:
      keys = sorted(map(str, obj))[:20]
      raise ConvertError(
          f"{path}: no state dict found at {'.'.join(trail) or 'the top level'}: keys "
          f"{keys} hold no tensors and none is a wrapper ({', '.join(mappings.WRAPPERS)}); "
          "pick the dict with --select=KEY[.KEY]")
  if not isinstance(obj, Mapping):
    raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict "
                       "(a mapping of parameter names to tensors)")
  return obj, trail


def _strip_prefix(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str,
                                                            list[str]]:
  """Strips training prefixes (repeatedly: `module.backbone.`); keys outside the prefix
  (DINO/iBOT heads beside `backbone.`) are returned as dropped."""
  stripped, others = "", []
  changed = True
  while changed:
    changed = False
    for prefix in mappings.WRAPPER_PREFIXES:
      if any(k.startswith(prefix) for k in tensors):
        others += [stripped + k for k in sorted(tensors) if not k.startswith(prefix)]
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        stripped += prefix
        changed = True
        break
  return tensors, stripped, others


def load(path: str, select: str | None = None) -> Loaded:
  """Reads a checkpoint file into float32 numpy arrays; see the module docstring."""
  if not os.path.isfile(path):
    raise ConvertError(f"{path}: no such file")
  kind = sniff(path)
  metadata: dict[str, str] = {}
  if kind == "safetensors":
    flat, metadata, dtypes = read_safetensors(path)
    trail: list[str] = []
    skipped: list[str] = []
    if select:
      raise ConvertError(f"{path}: --select applies to PyTorch files; safetensors files "
                         "are flat")
    tensors = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
               for k, v in flat.items()}
    dtypes = [{"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(d, d.lower())
              for d in dtypes]
  elif kind == "torch":
    obj = _torch_load(path)
    state, trail = _unwrap(obj, path, select)
    tensors, dtypes_set, skipped = {}, set(), []
    for k, v in state.items():
      if _is_tensor(v):
        dtypes_set.add(str(v.dtype).replace("torch.", ""))
        tensors[str(k)] = _to_numpy(v)
      else:
        skipped.append(str(k))
    if not tensors:
      raise ConvertError(f"{path}: the state dict at {'.'.join(trail) or 'top level'} "
                         "holds no tensors")
    dtypes = sorted(dtypes_set)
  else:
    raise ConvertError(
        f"{path} is not a checkpoint: expected a PyTorch .pt/.pth (zip or pickle) or a "
        f".safetensors file, found {size_and_head(path)}")
  tensors, prefix, outside = _strip_prefix(tensors)
  return Loaded(tensors=tensors, format=kind, wrappers=trail, prefix=prefix,
                dropped=outside + skipped, metadata=metadata, source_dtypes=dtypes)


def size_and_head(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(12)
  return f"{os.path.getsize(path)} bytes starting {head!r}"
