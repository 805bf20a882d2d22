"""Fine-tuning and evaluation binaries end to end on phantom CXRs (tiny models, CPU).

One tiny pretraining run is the backbone of every mode; each mode trains for a few dozen
steps, must lower its loss, must leave what it freezes bit-identical, and must write a
checkpoint that cxrjax.evaluate turns into results.json and plots.
"""

import json
import os

import jax
import numpy as np
import optax
import pytest

from cxrjax import checkpoint, config_lib, evaluate, finetune, main
from cxrjax.config_lib import ConfigError
from tests.tiny import REPO, tiny_pretrain_config

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  """A 4-step micro/8 EVA-X pretraining run at 32 px (its encoder is what we fine-tune)."""
  workdir = tmp_path_factory.mktemp("pretrain")
  main.train(tiny_pretrain_config("--config.mesh.num_devices=1"), str(workdir))
  return str(workdir)


def ft_config(config_file: str, *overrides: str, arg: str = ""):
  argv = [f"--config={os.path.join(REPO, 'configs', 'finetune', config_file)}:runlocal=True"
          + (f",{arg}" if arg else ""),
          f"--config.total_steps={STEPS}", "--config.log.every_steps=10",
          "--config.eval.every_steps=20", "--config.data.num_eval_examples=32",
          "--config.checkpoint.async_save=false", "--config.log.memory_analysis=false",
          "--config.mesh.num_devices=1", "--config.schedule.warmup_steps=5",
          "--config.data.num_examples=512", *overrides]
  return config_lib.parse_command_line(argv, "test")[0]


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def encoder_of_run(workdir, step):
  directory, _ = checkpoint.parse_workdir_spec(str(workdir))
  arrays = checkpoint.load_state_arrays(directory, step, ("params",), optional=("frozen",))
  config, _ = checkpoint.read_config(f"{workdir}:{step}")
  merged = finetune.full_params(arrays["params"], arrays.get("frozen"), config)
  return merged["encoder"]


def assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[path]),
                                  err_msg=jax.tree_util.keystr(path))


def run_eval(ft_workdir, out, *overrides):
  argv = [f"--config={os.path.join(REPO, 'configs', 'eval', 'default.py')}:runlocal=True",
          f"--config.checkpoint={ft_workdir}", "--config.mesh.num_devices=1",
          "--config.data.num_examples=32", *overrides]
  config, _ = config_lib.parse_command_line(argv, "test")
  return evaluate.evaluate(config, str(out))


MODES = {
    # name: (config file, config arg, overrides, frozen backbone?)
    "full": ("phantom.py", "", ("--config.optim.layer_decay=0.75",
                                "--config.mixup.mixup_alpha=0.2", "--config.mixup.cutmix_alpha=0.2"),
             False),
    "probe": ("phantom.py", "probe=True", (), True),
    "glori": ("phantom.py", "mode=frozen,head=glori",
              ("--config.optim.lr=3e-3", "--config.head.num_blocks=2"), True),
    "lora": ("phantom.py", "mode=lora", ("--config.optim.lr=3e-3",), True),
    "bitfit": ("phantom.py", "mode=bitfit", ("--config.optim.lr=3e-3",), False),
    "segmentation": ("phantom_seg.py", "", ("--config.optim.ema_decay=0.9",), False),
}


@pytest.fixture(scope="module")
def runs(backbone, tmp_path_factory):
  done = {}

  def get(mode):
    if mode not in done:
      file, arg, overrides, _ = MODES[mode]
      workdir = tmp_path_factory.mktemp(f"ft_{mode}")
      config = ft_config(file, f"--config.init_from={backbone}", *overrides, arg=arg)
      finetune.train(config, str(workdir))
      done[mode] = str(workdir)
    return done[mode]
  return get


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_trains_and_evaluates(mode, runs, backbone, tmp_path):
  workdir = runs(mode)
  logged = rows(workdir)
  losses = [r["loss"] for r in logged if "loss" in r]
  assert len(losses) >= 3 and all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0], losses
  with open(os.path.join(workdir, finetune.SELECTION_FILE)) as f:
    selection = json.load(f)
  assert selection["split"] == "val" and selection["best"]["step"] in (20, STEPS)
  assert [h["step"] for h in selection["history"]] == [20, STEPS]

  if MODES[mode][3]:  # frozen backbone: bit-identical to the pretraining run's encoder
    _, source = checkpoint.load_encoder(backbone)
    directory, _ = checkpoint.parse_workdir_spec(str(workdir))
    arrays = checkpoint.load_state_arrays(directory, STEPS, ("params", "frozen"))
    assert "encoder" not in arrays["params"]         # nothing of it trains...
    assert_trees_equal(arrays["frozen"]["encoder"], source)  # ...and it is unchanged
    if mode == "lora":  # the adapters moved, so the effective encoder differs
      assert arrays["params"]["lora"]
      assert not np.array_equal(encoder_of_run(workdir, STEPS)["blocks"][0]["attn"]["q"]["kernel"],
                                source["blocks"][0]["attn"]["q"]["kernel"])
  if mode == "bitfit":  # only biases moved
    _, source = checkpoint.load_encoder(backbone)
    tuned = encoder_of_run(workdir, STEPS)
    moved = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tuned)
             if not np.array_equal(x, dict(jax.tree_util.tree_leaves_with_path(source))[p])}
    assert moved and all("bias" in m for m in moved), moved

  results = run_eval(workdir, tmp_path / "eval")
  assert results["checkpoint"]["step"] == selection["best"]["step"]
  assert os.path.exists(tmp_path / "eval" / "results.json")
  for plot in results["plots"]:
    assert os.path.getsize(tmp_path / "eval" / plot) > 1000
  if mode == "segmentation":
    assert results["segmentation"]["mean"]["dice_dataset"] is not None
    assert results["checkpoint"]["weights"] == "ema"  # the run kept an EMA and selected on it
  else:
    mean = results["classification"]["mean"]["auroc"]
    assert 0 <= mean["value"] <= 1 and mean["ci_low"] <= mean["value"] <= mean["ci_high"]
    assert results["localization"]["model"] and "random_init" in results["localization"]
    assert os.path.exists(tmp_path / "eval" / results["predictions_csv"])


def test_probe_selects_a_learning_rate(runs):
  with open(os.path.join(runs("probe"), finetune.SELECTION_FILE)) as f:
    selection = json.load(f)
  lrs = selection["probe_lrs"]
  assert len(lrs) == 6 and len(selection["history"][-1]["per_copy"]) == 6
  best = selection["best"]
  assert best["lr"] == lrs[best["copy"]]
  assert best["value"] == max(max(h["per_copy"]) for h in selection["history"])


def test_bf16_and_flip_tta_inference_agree_with_fp32(runs, tmp_path):
  common = ("--config.localization.method=", "--config.plots.enabled=false")
  fp32 = run_eval(runs("full"), tmp_path / "fp32", *common)
  bf16 = run_eval(runs("full"), tmp_path / "bf16", *common, "--config.dtype=bfloat16",
                  "--config.tta_flip=true")
  a, b = (r["classification"]["mean"]["auroc"]["value"] for r in (fp32, bf16))
  assert abs(a - b) < 0.1, (a, b)


def test_evaluate_refuses_thresholds_from_the_evaluated_split(runs, tmp_path):
  with pytest.raises(ConfigError, match="threshold_split"):
    run_eval(runs("full"), tmp_path / "e", "--config.threshold_split=test")


def test_resume_after_finish_is_a_no_op(runs, backbone):
  workdir = runs("full")
  before = rows(workdir)
  config = ft_config("phantom.py", f"--config.init_from={backbone}",
                     *MODES["full"][2])
  assert finetune.train(config, workdir) == {}
  assert rows(workdir) == before


def test_layer_decay_gives_per_layer_learning_rates():
  """First AdamW step with unit gradients moves each weight by lr * decay^(L + 1 - layer)."""
  config = ft_config("phantom.py", "--config.init_from=random", "--config.optim.layer_decay=0.5",
                     "--config.optim.weight_decay=0", "--config.optim.lr=0.1")
  config, _ = finetune.resolve_config(config)
  from cxrjax.models import classifier
  from flax import nnx
  model = classifier.Classifier(config.model, config.head, 6, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = finetune.make_optimizer(config, optax.constant_schedule(0.1))
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  depth = 2  # micro
  expected = {"patch_embed": 0.5 ** (depth + 1), "blocks/0": 0.5 ** depth,
              "blocks/1": 0.5 ** (depth - 1)}
  enc = updates["encoder"]
  np.testing.assert_allclose(np.abs(enc["patch_embed"]["kernel"]), 0.1 * expected["patch_embed"],
                             rtol=1e-4)
  np.testing.assert_allclose(np.abs(enc["blocks"][0]["attn"]["q"]["kernel"]),
                             0.1 * expected["blocks/0"], rtol=1e-4)
  np.testing.assert_allclose(np.abs(enc["blocks"][1]["attn"]["proj"]["kernel"]),
                             0.1 * expected["blocks/1"], rtol=1e-4)
  head_kernel = jax.tree.leaves(updates["head"])[0]
  np.testing.assert_allclose(np.abs(head_kernel), 0.1, rtol=1e-4)


def test_bad_config_values_are_refused():
  with pytest.raises(ConfigError, match="config.mode='half'"):
    config_lib.validate(ft_config("phantom.py", "--config.mode=half", "--config.init_from=random"))
  with pytest.raises(ConfigError, match="probe_lrs"):
    config_lib.validate(ft_config("phantom.py", "--config.mode=full", "--config.init_from=random",
                                  "--config.probe_lrs=(0.1, 0.01)"))
  with pytest.raises(ConfigError, match="train_fraction"):
    config_lib.validate(ft_config("phantom.py", "--config.data.train_fraction=0",
                                  "--config.init_from=random"))


def test_predict_a_folder_of_png_and_dicom(runs, tmp_path):
  """Prediction-only evaluation of unlabelled files: one CSV row per readable image, the
  corrupt file skipped and counted, no metrics."""
  from PIL import Image
  from cxrjax.data import phantom
  pydicom = pytest.importorskip("pydicom")
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(phantom.render(i, size=48)["image"]).save(folder / f"img{i}.png")
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(folder / "scan.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
  pixels = phantom.render(9, size=48)["image"].astype(np.uint16) * 16
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = pixels.tobytes()
  ds.save_as(str(folder / "scan.dcm"), enforce_file_format=True)
  (folder / "broken.png").write_bytes(b"not an image")
  results = run_eval(runs("full"), tmp_path / "eval", "--config.data.source=folder",
                     f"--config.data.data_dir={folder}", "--config.localization.method=",
                     "--config.plots.enabled=false",
                     "--config.data.max_decode_failure_fraction=0.5")
  assert results["data"]["examples_skipped"] == 1
  assert "classification" not in results and results["num_examples"] == 4
  with open(tmp_path / "eval" / "predictions.csv") as f:
    lines = f.read().splitlines()
  assert lines[0].startswith("id,prob_cardiomegaly") and "label_" not in lines[0]
  assert sorted(line.split(",")[0] for line in lines[1:]) == [
      "img0.png", "img1.png", "img2.png", "scan.dcm"]


def test_sweep_over_fractions_writes_the_label_efficiency_curve(backbone, tmp_path, capsys):
  from cxrjax import sweep
  base = [f"--config={os.path.join(REPO, 'configs', 'finetune', 'phantom.py')}:runlocal=True",
          f"--config.init_from={backbone}", "--config.total_steps=6", "--config.mesh.num_devices=1",
          "--config.eval.every_steps=6", "--config.data.num_eval_examples=16",
          "--config.log.memory_analysis=false", "--config.checkpoint.async_save=false",
          f"--eval_config={os.path.join(REPO, 'configs', 'eval', 'default.py')}:runlocal=True",
          "--fractions=0.25,1", "--seeds=3", f"--workdir={tmp_path}"]
  assert sweep.sweep([*base, "--dry_run=true"]) == []
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 4 and "--config.data.train_fraction=0.25" in printed[0]
  points = sweep.sweep(base)
  assert [(p["fraction"], p["seed"]) for p in points] == [(0.25, 3), (1.0, 3)]
  assert all(0 <= p["value"] <= 1 for p in points)
  assert os.path.getsize(tmp_path / "label_efficiency.png") > 1000
  with open(tmp_path / "f0.25_s3" / "finetune" / "config.json") as f:
    assert json.load(f)["data"]["train_fraction"] == 0.25


def test_probe_refit_on_train_and_val(runs, backbone, tmp_path):
  """After choosing the lr on validation, refit one head on train+val; the result is the
  last step (nothing is selected on data it trained on)."""
  with open(os.path.join(runs("probe"), finetune.SELECTION_FILE)) as f:
    lr = json.load(f)["best"]["lr"]
  with pytest.raises(ConfigError, match="train_split"):
    config_lib.validate(ft_config("phantom.py", "--config.data.train_split=train+val",
                                  f"--config.init_from={backbone}", arg="probe=True"))
  config = ft_config("phantom.py", "--config.data.train_split=train+val",
                     f"--config.probe_lrs=({lr},)", "--config.total_steps=10",
                     f"--config.init_from={backbone}", arg="probe=True")
  finetune.train(config, str(tmp_path / "refit"))
  with open(tmp_path / "refit" / finetune.SELECTION_FILE) as f:
    selection = json.load(f)
  assert selection["refit_on"] == "train+val" and selection["best"]["step"] == 10
  assert selection["best"]["lr"] == lr and selection["best"]["value"] is None
  assert not any("val/auroc" in r for r in rows(tmp_path / "refit"))
  results = run_eval(tmp_path / "refit", tmp_path / "eval", "--config.localization.method=",
                     "--config.plots.enabled=false")
  assert results["checkpoint"]["step"] == 10 and results["classification"]["mean"]["auroc"]
