"""Weight conversion: numerical parity with the PyTorch reference models, export round
trip, and the errors a user meets.

The fixtures (tests/fixtures/convert, made by make_fixtures.py with timm / transformers)
hold tiny random models' weights in each source layout, an input and the reference
features, so the cxrjax side of every parity test runs without torch. Tests that need
torch (.pt files) or timm / transformers (live references) skip without them.
"""

import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cxrjax import checkpoint, models
from cxrjax.convert import core, torch_io
from cxrjax.convert.__main__ import main as cli_main
from cxrjax.convert.torch_io import ConvertError

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "convert")
REPO = os.path.dirname(HERE)
TOL = 1e-4  # max abs difference of features, fp32


def fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


# Tiny models run once each: XLA's cheapest CPU optimisation level halves compile time.
@functools.partial(jax.jit, static_argnums=0, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
def _forward(graphdef, state, images):
  return nnx.merge(graphdef, state)(images)


def run_encoder(model_cfg, params, images_nchw: np.ndarray) -> dict:
  """Runs the cxrjax encoder (fp32, last block returned) on NCHW images."""
  cfg = ml_collections.ConfigDict(dict(
      model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg,
      dtype="float32", return_blocks=[-1]))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  images = np.asarray(images_nchw, np.float32).transpose(0, 2, 3, 1)
  return jax.tree.map(np.asarray, _forward(graphdef, state, images))


def max_diffs(out: dict, expected) -> dict:
  diffs = {}
  for key in expected.files:
    if key == "image":
      continue
    got = out["blocks"][0] if key == "block_last" else out[key]
    assert got.shape == expected[key].shape, key
    diffs[key] = float(np.abs(got - expected[key]).max())
  return diffs


def convert_to(tmp_path, source, name, **kwargs):
  out = str(tmp_path / name.replace(".", "_"))
  core.convert(source, fixture(name + ".safetensors"), out, dtype="float32", **kwargs)
  return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Workdirs converted from the fixtures, once per module: (source, name) -> workdir."""
  cache = {}

  def get(source: str, name: str) -> str:
    if (source, name) not in cache:
      cache[source, name] = convert_to(tmp_path_factory.mktemp("converted"), source, name)
    return cache[source, name]

  return get


# (source, weights file, reference, config fields the import must infer)
EVA_TS = dict(mlp="swiglu", sub_ln=False, rope=True, qkv_bias="qv", pool="mean", fc_norm=True,
              variant="micro/8", img_size=32)
EVA_B = dict(EVA_TS, sub_ln=True)
CASES = [
    ("evax", "eva_ts.evax_mim", "eva_ts", EVA_TS),
    ("timm", "eva_ts.timm", "eva_ts", EVA_TS),
    ("evax", "eva_b.evax_ft", "eva_b", EVA_B),
    ("timm", "eva_b.timm", "eva_b", EVA_B),
    ("timm", "vit.timm", "vit", dict(mlp="gelu", qkv_bias=True, rope=False, pool="cls",
                                     fc_norm=False, mlp_ratio=2.0)),
    ("dinov2", "dinov2_reg.orig", "dinov2_reg",
     dict(mlp="swiglu", num_registers=4, qkv_bias=True, pool="cls", rope=False)),
    ("dinov2", "dinov2_reg.hf", "dinov2_hf",
     dict(mlp="swiglu", num_registers=2, qkv_bias=True, pool="cls", rope=False)),
    ("mae", "mae.hf", "mae_hf", dict(mlp="gelu", qkv_bias=True, norm_eps=1e-12)),
]


@pytest.mark.parametrize("source,name,ref,expect", CASES, ids=[c[1] for c in CASES])
def test_parity_with_reference(converted, source, name, ref, expect):
  """Each source layout converts to a workdir that checkpoint.load_encoder reads, and
  the encoder reproduces the PyTorch reference features."""
  workdir = converted(source, name)
  model_cfg, params = checkpoint.load_encoder(workdir)
  for key, value in expect.items():
    assert model_cfg[key] == value, (key, model_cfg[key])
  expected = np.load(fixture(ref + ".npz"))
  diffs = max_diffs(run_encoder(model_cfg, params, expected["image"]), expected)
  assert max(diffs.values()) <= TOL, diffs
  with open(os.path.join(workdir, "checkpoints", "0", "meta", "metadata")) as f:
    meta = json.load(f)
  assert meta["report"]["layout"] and len(meta["sha256"]) == 64


def test_mae_original_layout_drops_decoder(tmp_path):
  """facebookresearch/mae files are timm ViT blocks plus decoder_* and mask_token."""
  tensors, _, _ = torch_io.read_safetensors(fixture("vit.timm.safetensors"))
  tensors.update({"mask_token": np.zeros((1, 1, 32), np.float32),
                  "decoder_embed.weight": np.zeros((32, 64), np.float32),
                  "decoder_pos_embed": np.zeros((1, 17, 32), np.float32),
                  "decoder_blocks.0.attn.qkv.weight": np.zeros((96, 32), np.float32),
                  "decoder_norm.weight": np.ones(32, np.float32),
                  "decoder_pred.bias": np.zeros(192, np.float32)})
  path = str(tmp_path / "mae_pretrain.safetensors")
  torch_io.write_safetensors(path, tensors)
  imported = core.import_checkpoint(path, "mae", dtype="float32")
  dropped = {k for k, _ in imported.report.dropped}
  assert {"mask_token", "decoder_blocks.0.attn.qkv.weight", "head.weight"} <= dropped
  expected = np.load(fixture("vit.npz"))
  diffs = max_diffs(run_encoder(imported.model, imported.params, expected["image"]), expected)
  assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("source,name,timm_class", [
    ("evax", "eva_b.evax_ft", "Eva"),
    ("dinov2", "dinov2_reg.orig", "VisionTransformer"),
    ("evax", "eva_ts.evax_mim", "Eva"),
])
def test_round_trip_through_timm_is_exact(tmp_path, converted, source, name, timm_class):
  """cxrjax -> timm safetensors -> cxrjax gives bit-identical params and config."""
  workdir = converted(source, name)
  exported = str(tmp_path / "encoder.safetensors")
  assert cli_main(["--to=timm", f"--in={workdir}:0", f"--out={exported}"]) == 0
  meta = torch_io.read_safetensors(exported)[1]
  assert meta[core.META_TIMM_CLASS] == timm_class
  back = str(tmp_path / "back")
  core.convert("timm", exported, back, dtype="float32")
  cfg_a, params_a = checkpoint.load_encoder(workdir)
  cfg_b, params_b = checkpoint.load_encoder(back)
  assert cfg_a.to_dict() == cfg_b.to_dict()
  flat_a, flat_b = core.flatten(params_a), core.flatten(params_b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def test_converted_workdir_serves_as_evax_teacher(converted):
  """config.objective.teacher=<converted dir> loads the imported encoder as the frozen
  teacher (the EVA-X recipe's use of an imported MGCA/DINOv2/timm model)."""
  from cxrjax.objectives.evax_mim import EvaxMIM  # pylint: disable=import-outside-toplevel
  from tiny import tiny_pretrain_config  # pylint: disable=import-outside-toplevel
  workdir = converted("timm", "vit.timm")
  objective = EvaxMIM(tiny_pretrain_config(f"--config.objective.teacher={workdir}"))
  assert objective.teacher_cfg.variant == "micro/8" and objective.teacher_width == 64
  weights = core.flatten(objective.frozen_weights())
  want = core.flatten(checkpoint.load_encoder(workdir)[1])
  assert weights.keys() == want.keys()
  np.testing.assert_array_equal(weights["blocks.1.attn.q.kernel"],
                                want["blocks.1.attn.q.kernel"])


def test_img_size_resamples_pos_embed_like_the_model(tmp_path, converted):
  """--img_size=64 stores the pos-embed that the 32 px model computes for itself at
  64 px (VisionTransformer.embed resamples with layers.resample_pos_embed), so both give
  the same features at 64 px; the cls row is kept."""
  from cxrjax.models import layers  # pylint: disable=import-outside-toplevel
  large = str(tmp_path / "large")
  core.convert("timm", fixture("vit.timm.safetensors"), large, dtype="float32", img_size=64)
  cfg_s, params_s = checkpoint.load_encoder(converted("timm", "vit.timm"))
  cfg_l, params_l = checkpoint.load_encoder(large)
  assert cfg_s.img_size == 32 and cfg_l.img_size == 64
  pos_s, pos_l = params_s["pos_embed"], params_l["pos_embed"]
  assert pos_l.shape == (1, 1 + 64, 64)
  np.testing.assert_array_equal(pos_l[:, :1], pos_s[:, :1])
  runtime = np.asarray(layers.resample_pos_embed(pos_s[:, 1:], (4, 4), (8, 8)))
  np.testing.assert_allclose(pos_l[:, 1:], runtime, atol=1e-6)
  params_l = dict(params_l, pos_embed=pos_s)
  del params_l["pos_embed"]
  assert core.flatten(params_l).keys() <= core.flatten(params_s).keys()


def test_patch_kernel_pi_resize_preserves_embeddings():
  """Growing the patch 8 -> 12: embedding an upsampled patch with the resized kernel
  equals embedding the original patch (FlexiViT PI-resize is exact when growing)."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
  patches = rng.normal(size=(5, 3, 8, 8)).astype(np.float32)
  new = core.resample_patch_kernel(kernel, 12)
  up = np.asarray(jax.image.resize(patches, (5, 3, 12, 12), "linear", antialias=True))
  want = np.einsum("nchw,dchw->nd", patches, kernel)
  got = np.einsum("nchw,dchw->nd", up, new)
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)


def test_patch_size_flag(tmp_path):
  out = str(tmp_path / "p16")
  imported = core.convert("timm", fixture("vit.timm.safetensors"), out, patch_size=16)
  assert imported.model["variant"] == "micro/16" and imported.model["img_size"] == 64
  assert checkpoint.load_encoder(out)[1]["patch_embed"]["kernel"].shape == (16 * 16 * 3, 64)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def _cli_error(capsys, *argv) -> str:
  assert cli_main(list(argv)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ")
  return err


def test_not_a_checkpoint(tmp_path, capsys):
  bogus = tmp_path / "notes.pth"
  bogus.write_text("these are my notes, not weights\n")
  err = _cli_error(capsys, "--from=evax", f"--in={bogus}", f"--out={tmp_path / 'o'}")
  assert "is not a checkpoint" in err and "notes.pth" in err
  truncated = tmp_path / "cut.safetensors"
  truncated.write_bytes(open(fixture("vit.timm.safetensors"), "rb").read()[:5000])
  err = _cli_error(capsys, "--from=timm", f"--in={truncated}", f"--out={tmp_path / 'o'}")
  assert "truncated" in err
  assert not (tmp_path / "o").exists()


def test_wrong_architecture_lists_unexpected_keys(tmp_path, capsys):
  # A timm ViT is not an EVA-X model: its k bias (fused qkv.bias) has no EVA-02 name.
  err = _cli_error(capsys, "--from=evax", f"--in={fixture('vit.timm.safetensors')}",
                   f"--out={tmp_path / 'o'}")
  assert "wrong architecture" in err and "blocks.0.attn.qkv.bias" in err
  # An EVA-X model is not DINOv2.
  err = _cli_error(capsys, "--from=dinov2", f"--in={fixture('eva_ts.evax_mim.safetensors')}",
                   f"--out={tmp_path / 'o'}")
  assert "blocks.0.attn.q_bias" in err and "mlp.w12" not in err
  # A CNN is not a ViT at all.
  cnn = str(tmp_path / "resnet.safetensors")
  torch_io.write_safetensors(cnn, {"conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
                                   "bn1.running_mean": np.zeros(8, np.float32)})
  err = _cli_error(capsys, "--from=timm", f"--in={cnn}", f"--out={tmp_path / 'o'}")
  assert "not a timm ViT checkpoint" in err and "conv1.weight" in err
  # A variant that does not match the weights.
  err = _cli_error(capsys, "--from=timm", f"--in={fixture('vit.timm.safetensors')}",
                   "--variant=S/8", f"--out={tmp_path / 'o'}")
  assert "width 384" in err and "width-64" in err


def test_missing_keys_table_and_allow_missing(tmp_path, capsys):
  tensors, _, _ = torch_io.read_safetensors(fixture("vit.timm.safetensors"))
  del tensors["blocks.1.norm2.weight"]
  path = str(tmp_path / "partial.safetensors")
  torch_io.write_safetensors(path, tensors)
  err = _cli_error(capsys, "--from=timm", f"--in={path}", f"--out={tmp_path / 'o'}")
  assert "missing cxrjax param" in err and "blocks.1.norm2.scale" in err
  imported = core.import_checkpoint(path, "timm", allow_missing=True)
  assert [k for k, _ in imported.report.missing] == ["blocks.1.norm2.scale"]


def test_unsupported_feature_and_unexpected_allowed(tmp_path, capsys):
  tensors, _, _ = torch_io.read_safetensors(fixture("eva_b.evax_ft.safetensors"))
  tensors["blocks.0.attn.inner_attn_ln.weight"] = np.ones(64, np.float32)
  path = str(tmp_path / "evaclip.safetensors")
  torch_io.write_safetensors(path, tensors)
  err = _cli_error(capsys, "--from=evax", f"--in={path}", f"--out={tmp_path / 'o'}")
  assert "inner_attn_ln" in err and "not implemented" in err
  tensors = torch_io.read_safetensors(fixture("eva_b.evax_ft.safetensors"))[0]
  tensors["something_else.weight"] = np.ones(3, np.float32)
  torch_io.write_safetensors(path, tensors)
  _cli_error(capsys, "--from=evax", f"--in={path}", f"--out={tmp_path / 'o'}")
  imported = core.import_checkpoint(path, "evax", allow_unexpected=True)
  assert imported.report.unexpected == [("something_else.weight", "3")]


def test_existing_output_needs_overwrite(tmp_path, capsys):
  out = str(tmp_path / "w")
  assert cli_main(["--from=timm", f"--in={fixture('vit.timm.safetensors')}", f"--out={out}"]) == 0
  err = _cli_error(capsys, "--from=timm", f"--in={fixture('vit.timm.safetensors')}",
                   f"--out={out}")
  assert "--overwrite" in err
  assert cli_main(["--from=timm", f"--in={fixture('vit.timm.safetensors')}", f"--out={out}",
                   "--overwrite"]) == 0


def test_pt_file_without_torch_names_the_extra(tmp_path, monkeypatch):
  fake = tmp_path / "eva_x_tiny_patch16_merged520k_mim.pt"
  fake.write_bytes(b"PK\x03\x04" + b"\0" * 64)
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ConvertError, match=r"cxrjax\[torch\]"):
    torch_io.load(str(fake))


def test_cli_without_torch(tmp_path, monkeypatch, capsys):
  """With torch unavailable, `python -m cxrjax.convert` still runs: an error is one line
  and exit status 2; a safetensors conversion succeeds."""
  code = ("import sys, runpy; sys.modules['torch'] = None; "
          "runpy.run_module('cxrjax.convert', run_name='__main__')")
  bad = subprocess.run(
      [sys.executable, "-c", code, "--from=mae", f"--in={REPO}/pyproject.toml",
       f"--out={tmp_path / 'x'}"], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert bad.returncode == 2, bad.stderr
  assert bad.stderr.count("\n") == 1 and "is not a checkpoint" in bad.stderr
  monkeypatch.setitem(sys.modules, "torch", None)
  assert cli_main(["--from=dinov2", f"--in={fixture('dinov2_reg.orig.safetensors')}",
                   f"--out={tmp_path / 'w'}"]) == 0
  out = capsys.readouterr().out
  assert "variant micro/8" in out and "dino_head.mlp.0.weight" in out


# ----------------------------------------------------------------------------
# PyTorch files (need torch).
# ----------------------------------------------------------------------------


def _torch_state(name: str, dtype=None):
  torch = pytest.importorskip("torch")
  tensors = torch_io.read_safetensors(fixture(name + ".safetensors"))[0]
  return {k: torch.from_numpy(np.array(v)).to(dtype or torch.float32)
          for k, v in tensors.items()}


class Opaque:
  """Stands for any class a malicious or careless pickle would construct."""

  def __reduce__(self):
    return (os.getcwd, ())  # harmless, but code: weights_only loading must refuse it


def test_pt_wrappers_half_precision_and_ema_first(tmp_path):
  torch = pytest.importorskip("torch")
  ema = _torch_state("eva_b.evax_ft", torch.bfloat16)
  stale = {k: torch.zeros_like(v) for k, v in ema.items()}
  path = str(tmp_path / "eva_x_base_patch16_ft.pth")
  torch.save({"model": stale, "model_ema": ema, "epoch": 9,
              "args": argparse.Namespace(lr=1e-3, model="eva_x_base")}, path)
  imported = core.import_checkpoint(path, "evax", dtype="float32")
  assert imported.report.wrappers == ["model_ema"]
  assert imported.report.stored_dtypes == ["bfloat16"]
  expected = np.load(fixture("eva_b.npz"))
  diffs = max_diffs(run_encoder(imported.model, imported.params, expected["image"]), expected)
  assert max(diffs.values()) <= TOL, diffs


def test_pt_chexfound_teacher_dict(tmp_path):
  torch = pytest.importorskip("torch")
  state = _torch_state("dinov2_reg.orig", torch.float16)  # keys already under backbone.
  path = str(tmp_path / "teacher_checkpoint.pth")
  torch.save({"teacher": state, "iteration": 5}, path)
  imported = core.import_checkpoint(path, "dinov2", dtype="float32")
  assert imported.report.wrappers == ["teacher"] and imported.report.prefix == "backbone."
  expected = np.load(fixture("dinov2_reg.npz"))
  diffs = max_diffs(run_encoder(imported.model, imported.params, expected["image"]), expected)
  assert max(diffs.values()) <= TOL, diffs


def test_pickle_with_code_is_refused(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.zeros(2)}, "hook": Opaque()}, str(path))
  err = _cli_error(capsys, "--from=timm", f"--in={path}", f"--out={tmp_path / 'o'}")
  assert "refusing to load" in err and "evil.pth" in err


# ----------------------------------------------------------------------------
# Live references (need timm / transformers; CI without them relies on the fixtures).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("source,name,ref", [("evax", "eva_b.evax_ft", "eva_b"),
                                             ("evax", "eva_ts.evax_mim", "eva_ts"),
                                             ("dinov2", "dinov2_reg.orig", "dinov2_reg")])
def test_live_exported_file_loads_in_timm(tmp_path, converted, source, name, ref):
  """The export is a strict timm state dict and timm reproduces the cxrjax features."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  workdir = converted(source, name)
  exported = str(tmp_path / "encoder.safetensors")
  core.export_timm(workdir, exported)
  model = core.build_timm_model(exported)
  expected = np.load(fixture(ref + ".npz"))
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(expected["image"].astype(np.float32)))
    pooled = model.forward_head(tokens, pre_logits=True).numpy()
  cfg, params = checkpoint.load_encoder(workdir)
  ours = run_encoder(cfg, params, expected["image"])
  assert np.abs(pooled - ours["cls"]).max() <= TOL
  assert np.abs(pooled - expected["cls"]).max() <= TOL


def test_live_hf_dinov2_and_mae(tmp_path):
  """Random HF models (transformers' own state-dict names) against cxrjax."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8)
  dino = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      num_register_tokens=3, use_swiglu_ffn=True, layerscale_value=0.5, **small)).eval()
  mae = transformers.ViTMAEModel(transformers.ViTMAEConfig(
      mask_ratio=0.0, intermediate_size=128, **small)).eval()
  x = torch.randn(2, 3, 32, 32)
  noise = torch.arange(16, dtype=torch.float32).expand(2, 16)
  with torch.no_grad():
    want = {"dinov2": dino(pixel_values=x).last_hidden_state,
            "mae": mae(pixel_values=x, noise=noise).last_hidden_state}
  for source, model in (("dinov2", dino), ("mae", mae)):
    path = str(tmp_path / f"{source}.safetensors")
    torch_io.write_safetensors(path, {k: v.numpy() for k, v in model.state_dict().items()})
    imported = core.import_checkpoint(path, source, dtype="float32")
    out = run_encoder(imported.model, imported.params, x.numpy())
    n_prefix = 1 + imported.model["num_registers"]
    assert np.abs(out["patch"] - want[source][:, n_prefix:].numpy()).max() <= TOL
    assert np.abs(out["cls"] - want[source][:, 0].numpy()).max() <= TOL
