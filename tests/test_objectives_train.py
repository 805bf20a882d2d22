"""Short pretraining runs of each objective on phantom CXRs through cxrjax.main.train.

Each objective trains a width-64, depth-2 ViT at 32 px with batch 8 for 120 steps on one
CPU device and must lower its loss; a one-step run on a (data=2, fsdp=4) mesh of the 8
virtual devices must reproduce the one-device first-step loss. The DINOv2 run is also
checked for collapse, and the contrastive and DINOv2 workdirs are used as EVA-X teachers.
"""

import json
import os

import jax
import numpy as np
import pytest

from cxrjax import checkpoint, config_lib, main
from cxrjax.data import phantom, pipeline
from cxrjax.objectives import contrastive, dinov2, evax_mim
from tiny import REPO, tiny_pretrain_config

pytestmark = pytest.mark.slow

STEPS = 120
TINY = ["--config.model.variant=micro/8", "--config.model.dtype=float32",
        "--config.data.image_size=32", "--config.data.source_size=40",
        "--config.data.batch_size=8", "--config.data.num_examples=512",
        "--config.log.every_steps=1", "--config.checkpoint.async_save=false",
        "--config.log.memory_analysis=false", "--config.schedule.warmup_steps=10"]

# Per objective: config file[:arg] and its extra overrides.
# Contrastive learning at batch 8 on near-identical 32 px phantoms needs milder views than
# the published recipe (crops of >= 60%, no jitter/blur), or it finds nothing to tell
# images apart within 120 steps.
RUNS = {
    "moco": ("teacher_b.py:runlocal,mode=image_image", [
        "--config.objective.crop_scale=(0.6, 1.0)", "--config.objective.jitter=0.0",
        "--config.objective.blur=(0.0, 0.0)", "--config.optim.lr=1e-3"]),
    "clip": ("teacher_b.py:runlocal,mode=auto", [
        "--config.data.source=phantom_reports", "--config.objective.max_report_len=64",
        "--config.objective.crop_scale=(0.8, 1.0)",
        "--config.objective.learnable_temperature=true", "--config.optim.lr=5e-4"]),
    "mae": ("mae_b.py:runlocal", ["--config.objective.decoder_width=64",
                                  "--config.objective.decoder_heads=2",
                                  "--config.optim.lr=2e-3"]),
    # LayerScale 1e-5 (CheXFound) makes every image's cls token equal to float rounding at
    # init, so KoLeo's nearest-neighbour distances are rounding noise and differ between
    # reduction orders (1 device vs mesh); without LayerScale they are well conditioned.
    "dinov2": ("chexfound_l.py:runlocal", ["--config.objective.local_crop_size=16",
                                           "--config.objective.teacher_temp_warmup_steps=50",
                                           "--config.optim.freeze_prototypes_steps=5",
                                           "--config.model.layerscale_init=0.0"]),
    # EVA-X MIM with the image-level term (tests/tiny.py's quickstart-based config), taught
    # by the "moco" run's encoder: the full EVA-X recipe, contrastive teacher -> MIM student.
    "evax_mim_contrastive": (None, ["--config.optim.lr=3e-3",
                                    "--config.schedule.warmup_steps=5"]),
}


# A phantom source with a synthetic report per image (the phantom has none). It states the
# view, the film penetration (terciles of the phantom's mean grey level: a dark film is
# over-penetrated) and the positive findings, all of which the image shows; penetration is
# the part a 2-block, 32 px model can learn within the test's 120 steps.
class ReportSource:
  def __init__(self, base):
    self.base = base

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    example = dict(self.base[i])
    found = [f for f, y in zip(phantom.FINDINGS, example["labels"]) if y > 0]
    grey = example["image"].mean()
    film = ("over-penetrated" if grey < 131 else "under-penetrated" if grey > 141
            else "adequately penetrated")
    example["report"] = (f"{example['view']} chest radiograph, {film}. "
                         + (", ".join(found) if found else "no acute findings") + ".")
    return example


@pipeline.register_source("phantom_reports")
def _phantom_reports(data_cfg, split):
  num = data_cfg.num_examples if split == "train" else data_cfg.num_eval_examples
  return ReportSource(phantom.PhantomSource(num, seed=data_cfg.phantom_seed,
                                            size=data_cfg.source_size, split=split))


def make_config(name, *extra):
  spec, overrides = RUNS[name]
  if spec is None:
    return evax_contrastive_config(*overrides, *extra)
  argv = [f"--config={os.path.join(REPO, 'configs', spec)}", *TINY, *overrides, *extra]
  return config_lib.parse_command_line(argv, "test")[0]


def read_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if '"loss"' in l]


def train(config, workdir):
  main.train(config, str(workdir))
  return read_rows(workdir)


class Runs:
  """Trains each objective once (one device), lazily; keeps its workdir and metrics."""

  def __init__(self, tmp_path_factory):
    self.factory, self.done = tmp_path_factory, {}

  def config(self, name, *extra):
    if name == "evax_mim_contrastive":
      extra = (f"--config.objective.teacher={self('moco')[0]}", *extra)
    return make_config(name, *extra)

  def __call__(self, name):
    if name not in self.done:
      workdir = self.factory.mktemp(name)
      config = self.config(name, f"--config.total_steps={STEPS}", "--config.mesh.num_devices=1")
      self.done[name] = (workdir, train(config, workdir))
    return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(tmp_path_factory)


def assert_falls(losses, name, margin):
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert np.isfinite(losses).all(), name
  assert last < first - margin, f"{name}: loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("name, margin", [("moco", 0.05), ("clip", 0.1), ("mae", 0.05),
                                          ("dinov2", 0.5), ("evax_mim_contrastive", 0.05)])
def test_objective_trains_and_loss_falls(runs, name, margin):
  _, rows = runs(name)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  losses = np.array([r["loss"] for r in rows])
  assert_falls(losses, name, margin)
  if name in ("moco", "clip"):  # and ends below chance: 2 * 2T * log B, resp. log B
    chance = 4 * 0.2 * np.log(8) if name == "moco" else np.log(8)
    assert losses[-20:].mean() < chance - 0.05, (losses[-20:].mean(), chance)
  if name == "evax_mim_contrastive":  # both terms learn
    assert {"mim_loss", "image_loss", "mim_cosine"} <= set(rows[-1])
    assert_falls(np.array([r["image_loss"] for r in rows]), "image term", 0.05)
    assert_falls(np.array([r["mim_loss"] for r in rows]), "MIM term", 0.02)


def test_dinov2_does_not_collapse(runs):
  """Floors on the teacher's sharpened cls outputs, mean of the last 10 steps (K = 256):
  normalised entropy in (0.05, 0.99) and prototype usage (batch-marginal perplexity / K)
  above 0.05, i.e. more than 12 prototypes in use over the 16 global crops of a batch.

  Collapse to one prototype drives the entropy to 0 and the usage to 1/K = 0.004;
  collapse to one flat output drives the entropy to 1. In a 120-step run the teacher
  (momentum 0.994) has barely left its initialisation, so its outputs are still near-flat
  and the DINO term stays near log K; the loss falls through the KoLeo term (the student's
  cls tokens spread out) and iBOT.
  """
  _, rows = runs("dinov2")
  last, first = rows[-10:], rows[:10]
  mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
  assert 0.05 < mean(last, "dino/teacher_entropy") < 0.99, mean(last, "dino/teacher_entropy")
  assert mean(last, "dino/prototype_usage") > 0.05, mean(last, "dino/prototype_usage")
  assert mean(last, "koleo_loss") < mean(first, "koleo_loss") - 1.0
  assert np.isfinite([r["ibot_loss"] for r in rows]).all()
  assert rows[-1]["dino/teacher_temp"] == pytest.approx(0.07)
  assert rows[0]["dino/momentum"] == pytest.approx(0.994)


@pytest.mark.parametrize("name", ["moco", "clip", "mae", "dinov2", "evax_mim_contrastive"])
def test_sharded_first_step_matches_one_device(runs, tmp_path, name):
  """One step on a (data=2, fsdp=4) mesh of 8 devices: the same first-step loss."""
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.num_devices=0"]
  one = runs(name)[1][0]
  sharded = train(runs.config(name, "--config.total_steps=1", *mesh), tmp_path)[0]
  for key in [k for k in one if k == "loss" or k.endswith("_loss")]:  # every loss term
    np.testing.assert_allclose(sharded[key], one[key], rtol=2e-5, err_msg=key)


def evax_contrastive_config(*overrides):
  config = tiny_pretrain_config("--config.model.dtype=float32", *overrides)
  with config.unlocked():
    contrastive.evax_image_term(config.objective, weight=0.5)
  return config


@pytest.mark.parametrize("name", ["moco", "dinov2"])
def test_teacher_run_is_usable_as_evax_teacher(runs, name):
  """A contrastive or DINOv2 workdir as config.objective.teacher of EVA-X MIM; the
  contrastive one also teaches the evax_mim_contrastive run above, whose loss falls."""
  workdir, _ = runs(name)
  config = tiny_pretrain_config(f"--config.objective.teacher={workdir}")
  objective = evax_mim.EvaxMIM(config)
  teacher_cfg, weights = checkpoint.load_encoder(str(workdir))
  assert objective.teacher_cfg.to_dict() == teacher_cfg.to_dict()
  # teacher_b uses MoCo v3's sin-cos positions; chexfound_l has registers.
  assert (teacher_cfg.pos_embed == "sincos") if name == "moco" else (
      teacher_cfg.num_registers == 4)
  jax.tree.map(np.testing.assert_array_equal, objective.frozen_weights(), weights)
  if name == "moco":
    student_dir, rows = runs("evax_mim_contrastive")
    with open(os.path.join(student_dir, "config.json")) as f:
      assert json.load(f)["objective"]["teacher"] == str(workdir)
    assert len(rows) == STEPS


def test_dinov2_high_resolution_continuation(runs):
  """A 48 px run continuing the 32 px one: its params and teacher, pos-embed resampled."""
  workdir, _ = runs("dinov2")
  config = make_config("dinov2", "--config.data.image_size=48", "--config.data.source_size=56",
                       f"--config.objective.init_from={workdir}", "--config.total_steps=2",
                       "--config.mesh.num_devices=1")
  objective = dinov2.DinoV2(config)
  params, frozen = objective.params_weights(), objective.frozen_weights()
  _, source = checkpoint.load_encoder(str(workdir))
  assert params["encoder"]["pos_embed"].shape == (1, 1 + 36, 64)       # 6x6 grid (was 4x4)
  assert frozen["teacher"]["encoder"]["pos_embed"].shape == (1, 1 + 36, 64)
  np.testing.assert_array_equal(params["encoder"]["pos_embed"][:, :1],
                                source["pos_embed"][:, :1])            # cls position kept
  np.testing.assert_array_equal(params["encoder"]["blocks"][0]["attn"]["q"]["kernel"],
                                source["blocks"][0]["attn"]["q"]["kernel"])
  assert params["dino_head"]["prototypes"].shape == (64, 256)
  assert int(frozen["step"]) == 0                                      # schedules restart
  rows = train(config, runs("dinov2")[0].parent / "highres")
  assert len(rows) == 2 and np.isfinite(rows[0]["loss"])


def test_dinov2_ema_teacher_serves_as_encoder(runs):
  """'WORKDIR#teacher' reads the EMA teacher (what CheXFound releases), e.g. as the EVA-X
  teacher or a fine-tuning init; it differs from the student after training."""
  workdir, _ = runs("dinov2")
  _, teacher = checkpoint.load_encoder(f"{workdir}#teacher")
  _, student = checkpoint.load_encoder(str(workdir))
  directory, step = checkpoint.parse_workdir_spec(str(workdir))
  frozen = checkpoint.load_state_arrays(directory, step, ("frozen",))["frozen"]
  np.testing.assert_array_equal(teacher["pos_embed"], frozen["teacher"]["encoder"]["pos_embed"])
  assert not np.array_equal(teacher["blocks"][0]["attn"]["q"]["kernel"],
                            student["blocks"][0]["attn"]["q"]["kernel"])
  with pytest.raises(config_lib.ConfigError, match="#bogus"):
    checkpoint.load_encoder(f"{workdir}#bogus")
