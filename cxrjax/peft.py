"""Parameter-efficient fine-tuning on pure-dict parameter trees: BitFit and LoRA.

Everything here is a pure function of nested dicts of arrays, e.g.
`nnx.to_pure_dict(nnx.state(encoder, nnx.Param))` (nnx.List entries appear as int keys), so
the model code stays unchanged: the fine-tuning step splits the tree into trainable and
frozen parts (`partition`), differentiates only the trainable one, and reassembles the
full tree (`combine`) before calling the model.

Paths are the '/'-joined keys of a leaf, e.g. 'blocks/0/attn/q/kernel'.

BitFit (Ben Zaken et al. 2022): train only the biases (`bitfit_predicate`).

LoRA (Hu et al. 2021): W' = W + (alpha / rank) * A @ B, reshaped to W's shape, with
A [in, rank] from kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)) (loralib's and
HF peft's default) and B [rank, out] zeros, so training starts exactly at the base model.
Adapters are stored as {kernel path: {'a', 'b'}}, float32. '/' in those keys is safe for
Orbax (its parameter names join keys with '.', which a '.'-joined key could collide with;
tests/test_peft.py saves and restores one) and for cxrjax.checkpoint's '/'-joined checksum
names (no nested tree holds the same path). Adapters carry no logical axis names: they are
small and stay replicated.

Which kernel axes are LoRA's input is read from the path (first matching rule wins, and
the kernel must then have the rule's rank, otherwise ConfigError):
  .../attn/{q,k,v}/kernel   [embed, heads, kv]   in = first axis
  .../attn/proj/kernel      [heads, kv, embed]   in = first two axes
  any other .../kernel      2-D nnx.Linear [in, out] (MLP, patch embedding, head layers)
Anything else (convolutions, 3-D kernels outside attention) is refused, not guessed.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from cxrjax.config_lib import ConfigError

Params = Mapping[str, Any]


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined key names of a jax key path (DictKey, SequenceKey, GetAttrKey) or of a
  tuple of plain keys."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def check_same_paths(got: Params, want: Params, what: str) -> None:
  """Raises ConfigError naming missing/unexpected leaves unless both trees have the same
  leaf paths (weights loaded from elsewhere must fit the model exactly)."""
  got_paths = {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(got)}
  want_paths = {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)}
  if got_paths != want_paths:
    raise ConfigError(f"{what} do not fit the model: missing {sorted(want_paths - got_paths)[:5]}"
                      f", unexpected {sorted(got_paths - want_paths)[:5]}")


def partition(params: Params, predicate: Callable[[str], bool]) -> tuple[dict, dict]:
  """(leaves whose path satisfies `predicate`, all other leaves), as two nested dicts.

  Together they hold every leaf exactly once; branches left empty are omitted.
  """

  def split(tree: Params, prefix: str) -> tuple[dict, dict]:
    selected, rest = {}, {}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        sub_selected, sub_rest = split(value, path)
        if sub_selected:
          selected[key] = sub_selected
        if sub_rest:
          rest[key] = sub_rest
      elif predicate(path):
        selected[key] = value
      else:
        rest[key] = value
    return selected, rest

  return split(params, "")


def combine(a: Params, b: Params) -> dict:
  """The inverse of `partition`: one tree holding the leaves of both.

  Raises ValueError naming the path when both trees hold the same leaf.
  """

  def merge(left: Params, right: Params, prefix: str) -> dict:
    out = dict(left)
    for key, value in right.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if key not in out:
        out[key] = value
      elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
        out[key] = merge(out[key], value, path)
      else:
        raise ValueError(f"combine: both trees hold {path!r}")
    return out

  return merge(a, b, "")


def bitfit_predicate(path: str) -> bool:
  """BitFit: only biases (leaves named 'bias') are trained."""
  return path.rsplit("/", 1)[-1] == "bias"


# ----------------------------------------------------------------------------
# LoRA.
# ----------------------------------------------------------------------------


class KernelLayout(NamedTuple):
  pattern: str    # regex searched in the kernel's path
  ndim: int       # the kernel rank this layout has
  in_axes: int    # leading axes that form LoRA's input dimension
  description: str


KERNEL_LAYOUTS = (
    KernelLayout(r"(^|/)attn/[qkv]/kernel$", 3, 1, "attention q/k/v [embed, heads, kv]"),
    KernelLayout(r"(^|/)attn/proj/kernel$", 3, 2, "attention output [heads, kv, embed]"),
    KernelLayout(r"(^|/)kernel$", 2, 1, "nnx.Linear [in, out]"),
)


def kernel_in_axes(path: str, shape: Sequence[int]) -> int:
  """How many leading axes of the kernel at `path` are its input (see module docstring)."""
  for layout in KERNEL_LAYOUTS:
    if re.search(layout.pattern, path):
      if len(shape) != layout.ndim:
        break
      return layout.in_axes
  known = "; ".join(f"{layout.description} at paths matching {layout.pattern!r}"
                    for layout in KERNEL_LAYOUTS)
  raise ConfigError(f"LoRA cannot adapt kernel {path!r} of shape {tuple(shape)}: unknown "
                    f"layout; known layouts: {known}")


def _kernels(params: Params) -> dict[str, jax.Array]:
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if path_str(path).rsplit("/", 1)[-1] == "kernel"}


def lora_init(params: Params, *, targets: Sequence[str] = ("attn/q", "attn/v"),
              rank: int = 8, rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """LoRA adapters {kernel path: {'a': [in, rank], 'b': [rank, out]}} for every kernel whose
  path matches any regex in `targets` (re.search).

  Raises ConfigError for a rank < 1, an invalid regex, a target that matches no kernel
  (listing some kernel paths) or a matched kernel of unknown layout.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ConfigError(f"LoRA rank={rank!r} is invalid; expected a positive int")
  if isinstance(targets, str):
    targets = (targets,)
  kernels = _kernels(params)
  chosen: list[str] = []
  for target in targets:
    try:
      matches = [path for path in kernels if re.search(target, path)]
    except re.error as e:
      raise ConfigError(f"LoRA target {target!r} is not a valid regex: {e}") from e
    if not matches:
      examples = ", ".join(list(kernels)[:8]) or "(none)"
      raise ConfigError(f"LoRA target {target!r} matches no kernel; kernel paths include: "
                        f"{examples}")
    chosen.extend(path for path in matches if path not in chosen)
  keys = jax.random.split(rng, len(chosen))
  adapters = {}
  for key, path in zip(keys, chosen):
    shape = kernels[path].shape
    in_axes = kernel_in_axes(path, shape)
    fan_in, fan_out = math.prod(shape[:in_axes]), math.prod(shape[in_axes:])
    bound = 1.0 / math.sqrt(fan_in)
    adapters[path] = {
        "a": jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound),
        "b": jnp.zeros((rank, fan_out), jnp.float32),
    }
  return adapters


def lora_apply(params: Params, lora: Mapping[str, Mapping[str, jax.Array]], *,
               alpha: float, rank: int) -> dict:
  """`params` with every adapted kernel replaced by W + (alpha / rank) * A @ B.

  The update is computed in float32 and cast back to W's dtype; other leaves are returned
  as they are. Differentiable in both trees, and jit-friendly (all checks are on shapes).
  """
  scale = alpha / rank
  applied = set()

  def update(path, w):
    name = path_str(path)
    if name not in lora:
      return w
    a, b = lora[name]["a"], lora[name]["b"]
    if a.shape[1] != rank or b.shape[0] != rank:
      raise ValueError(f"LoRA adapter {name!r} has rank {a.shape[1]} (a {a.shape}, b "
                       f"{b.shape}), but rank={rank} was given")
    if a.shape[0] * b.shape[1] != math.prod(w.shape):
      raise ValueError(f"LoRA adapter {name!r} (a {a.shape}, b {b.shape}) does not fit the "
                       f"kernel of shape {w.shape}")
    applied.add(name)
    delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)).reshape(w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

  out = jax.tree_util.tree_map_with_path(update, params)
  missing = sorted(set(lora) - applied)
  if missing:
    raise ValueError(f"LoRA adapters for {missing[:4]} match no parameter of the tree")
  return out


def lora_merge(params: Params, lora: Mapping[str, Mapping[str, jax.Array]], *,
               alpha: float, rank: int) -> dict:
  """Export: the base params with the adapters folded in, a plain tree the unchanged
  model loads (the same computation as lora_apply, named for what the caller does)."""
  return lora_apply(params, lora, alpha=alpha, rank=rank)
