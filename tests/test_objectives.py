"""Unit tests of the contrastive, MAE and DINOv2 objectives, their losses, data ops and
optimizer extras. Every loss is checked against an independent NumPy version written from
the reference code (moco-v3, CLIP, mae, dinov2) on small random inputs.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from cxrjax import config_lib, optim, optim_extras, validation  # noqa: F401
from cxrjax.config_lib import ConfigError
from cxrjax.data import multiview, pipeline, transforms
from cxrjax.objectives import contrastive, dinov2, evax_mim, losses, mae
from tiny import REPO

RNG = np.random.default_rng(0)


def np_log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
  return np.exp(np_log_softmax(x, axis))


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------
# Losses against NumPy.
# ----------------------------------------------------------------------------


def test_info_nce_and_clip_match_numpy():
  q, k = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5))
  temp = 0.2
  logits = np_normalize(q) @ np_normalize(k).T / temp
  want = -np.mean([np_log_softmax(logits[i])[i] for i in range(6)])
  np.testing.assert_allclose(losses.info_nce(q, k, 1 / temp), want, rtol=1e-5)
  want_clip = 0.5 * (want - np.mean([np_log_softmax(logits.T[i])[i] for i in range(6)]))
  np.testing.assert_allclose(losses.clip_loss(q, k, 1 / temp), want_clip, rtol=1e-5)
  # Perfectly aligned, orthogonal pairs give ~0 loss.
  assert float(losses.info_nce(np.eye(6), np.eye(6), 100.0)) < 1e-3


def test_masked_cosine_loss_uses_masked_positions_only():
  pred, target = RNG.normal(size=(2, 7, 4)), RNG.normal(size=(2, 7, 4))
  mask = RNG.uniform(size=(2, 7)) < 0.5
  cos = np.sum(np_normalize(pred) * np_normalize(target), -1)
  want = 1 - cos[mask].mean()
  loss, mean_cos = evax_mim.masked_cosine_loss(pred, target, mask)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(mean_cos, cos[mask].mean(), rtol=1e-5)
  changed = pred.copy()
  changed[~mask] = RNG.normal(size=changed[~mask].shape)
  np.testing.assert_allclose(evax_mim.masked_cosine_loss(changed, target, mask)[0], want,
                             rtol=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_numpy_on_masked_patches_only(norm_pix):
  p, b, size = 4, 2, 8
  images = RNG.normal(size=(b, size, size, 3))
  mask = np.zeros((b, 4), bool)
  mask[0, [1, 3]] = mask[1, [0, 1, 2]] = True
  pred = RNG.normal(size=(b, 4, p * p * 3))
  # MAE patchify: 'nchpwq->nhwpqc' -> per patch (p, q, c).
  target = images.reshape(b, 2, p, 2, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 4, -1)
  if norm_pix:  # torch .var() is unbiased
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, ddof=1, keepdims=True) + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  want = per_patch[mask].mean()
  np.testing.assert_allclose(losses.mae_loss(pred, images, mask, p, norm_pix), want, rtol=1e-5)
  pred2 = pred.copy()
  pred2[~mask] += 5.0
  np.testing.assert_allclose(losses.mae_loss(pred2, images, mask, p, norm_pix), want,
                             rtol=1e-5)


def np_dino_loss(s_global, s_local, t_probs, temp):
  """dinov2 ssl_meta_arch: local crops vs both teacher crops; global i vs teacher 1 - i."""
  terms = []
  for s in s_local:
    for t in t_probs:
      terms.append(-np.mean(np.sum(t * np_log_softmax(s / temp), -1)))
  swapped = np.concatenate([t_probs[1], t_probs[0]])
  global_ce = -np.mean(np.sum(swapped * np_log_softmax(np.concatenate(s_global) / temp), -1))
  n_terms = 2 * len(s_local) + 2
  return (sum(terms) + 2 * global_ce) / n_terms


def test_dino_loss_with_centering_matches_numpy():
  b, k, n_local = 3, 11, 4
  s_global, s_local = RNG.normal(size=(2, b, k)), RNG.normal(size=(n_local, b, k))
  t_logits, center = RNG.normal(size=(2, b, k)), RNG.normal(size=(1, k)) * 0.1
  t_temp, s_temp = 0.04, 0.1
  t_probs = np_softmax((t_logits - center) / t_temp)
  got_probs = losses.softmax_center(t_logits, center, t_temp)
  np.testing.assert_allclose(got_probs, t_probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      losses.dino_multicrop_loss(s_global, s_local, got_probs, s_temp),
      np_dino_loss(s_global, s_local, t_probs, s_temp), rtol=1e-5)
  # No local crops: the global pair terms only.
  np.testing.assert_allclose(
      losses.dino_multicrop_loss(s_global, None, got_probs, s_temp),
      np_dino_loss(s_global, [], t_probs, s_temp), rtol=1e-5)


def test_ibot_loss_on_masked_tokens_matches_numpy():
  m, t, k = 4, 6, 9
  s, t_probs = RNG.normal(size=(m, t, k)), np_softmax(RNG.normal(size=(m, t, k)))
  mask = RNG.uniform(size=(m, t)) < 0.4
  mask[2] = False  # an unmasked image adds nothing but counts in the denominator
  mask[0, 0] = True
  ce = -np.sum(t_probs * np_log_softmax(s / 0.1), -1)
  want = sum(ce[i][mask[i]].mean() for i in range(m) if mask[i].any()) / m
  np.testing.assert_allclose(losses.ibot_loss(s, t_probs, mask, 0.1), want, rtol=1e-5)
  # The fixed-slot gather used by the objective gives the same loss.
  idx, valid = dinov2.masked_positions(jnp.asarray(mask), 5)
  take = lambda x: np.take_along_axis(x, np.asarray(idx)[..., None], 1)  # noqa: E731
  np.testing.assert_allclose(losses.ibot_loss(take(s), take(t_probs), valid, 0.1), want,
                             rtol=1e-5)
  assert int(valid.sum()) == int(np.minimum(mask.sum(1), 5).sum())


def np_sinkhorn(logits, temp, iters=3):
  """dinov2 sinkhorn_knopp_teacher (single process), K x B as in the paper."""
  q = np.exp(logits / temp).T
  k, b = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(1, keepdims=True)
    q /= k
    q /= q.sum(0, keepdims=True)
    q /= b
  return (q * b).T


def test_sinkhorn_knopp_matches_numpy_and_balances():
  logits = RNG.normal(size=(12, 7))
  got = np.asarray(losses.sinkhorn_knopp(logits, 0.5))
  np.testing.assert_allclose(got, np_sinkhorn(logits, 0.5), rtol=1e-5)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)         # each sample: a distribution
  # Each prototype gets ~B/K after 3 iterations, exactly B/K once converged.
  np.testing.assert_allclose(got.sum(0), 12 / 7, rtol=0.25)
  many = np.asarray(losses.sinkhorn_knopp(logits, 0.5, num_iterations=50))
  np.testing.assert_allclose(many.sum(0), 12 / 7, rtol=1e-4)
  # Weights restrict the problem to the valid rows, exactly as a gather would.
  weights = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
  masked = np.asarray(losses.sinkhorn_knopp(logits, 0.5, weights=weights))
  np.testing.assert_allclose(masked[weights], np_sinkhorn(logits[weights], 0.5), rtol=1e-5)
  assert (masked[~weights] == 0).all()
  # Sharp temperatures stay finite.
  assert np.isfinite(np.asarray(losses.sinkhorn_knopp(logits * 20, 0.04))).all()


def test_koleo_matches_numpy():
  x = RNG.normal(size=(9, 5))
  xn = np_normalize(x)
  dots = xn @ xn.T
  np.fill_diagonal(dots, -1)
  nn_idx = dots.argmax(1)
  dist = np.linalg.norm(xn - xn[nn_idx] + 1e-8, axis=-1)
  np.testing.assert_allclose(losses.koleo_loss(x), -np.mean(np.log(dist + 1e-8)), rtol=1e-5)
  # Spreading points apart lowers it.
  spread = np.eye(9)
  assert float(losses.koleo_loss(spread)) < float(losses.koleo_loss(x + 5.0))


def test_collapse_diagnostics():
  k = 16
  uniform_rows = np.full((8, k), 1 / k)
  one_hot_same = np.tile(np.eye(k)[:1], (8, 1))
  one_hot_distinct = np.eye(k)[:8]
  np.testing.assert_allclose(losses.entropy(uniform_rows), math.log(k), rtol=1e-6)
  np.testing.assert_allclose(losses.entropy(one_hot_same), 0.0, atol=1e-7)
  np.testing.assert_allclose(losses.prototype_usage(one_hot_same), 1 / k, rtol=1e-6)
  np.testing.assert_allclose(losses.prototype_usage(one_hot_distinct), 8 / k, rtol=1e-6)


def test_schedules():
  np.testing.assert_allclose(losses.cosine_schedule(0, 0.994, 1.0, 100), 0.994)
  np.testing.assert_allclose(losses.cosine_schedule(50, 0.994, 1.0, 100), 0.997, rtol=1e-6)
  np.testing.assert_allclose(losses.cosine_schedule(100, 0.994, 1.0, 100), 1.0)
  np.testing.assert_allclose(losses.cosine_schedule(500, 0.994, 1.0, 100), 1.0)


# ----------------------------------------------------------------------------
# Data ops.
# ----------------------------------------------------------------------------


def grey_example(size=48, seed=0):
  image = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
  return {"image": image, "id": "x"}


def test_multi_crop_and_ibot_mask():
  pp = transforms.Preprocess(
      "multi_crop(32, local_size=16, num_local=3, flip=0.5)|ibot_mask(8, ratio=(0.1, 0.5), "
      "prob=1.0, min_block=2)")
  out = pp(grey_example(), np.random.default_rng(1))
  assert out["global_crops"].shape == (2, 32, 32, 3) and out["global_crops"].dtype == np.float32
  assert out["local_crops"].shape == (3, 16, 16, 3)
  assert out["ibot_mask"].shape == (2, 16) and out["ibot_mask"].dtype == bool
  counts = out["ibot_mask"].sum(1)
  assert ((counts >= 1) & (counts <= 7)).all(), counts   # int(16 * U(0.1, 0.5))
  again = pp(grey_example(), np.random.default_rng(1))
  for key in ("global_crops", "local_crops", "ibot_mask"):
    np.testing.assert_array_equal(out[key], again[key])
  # Views differ from one another; crops are normalised with the EVA-X grey statistics.
  assert not np.allclose(out["global_crops"][0], out["global_crops"][1])
  never = transforms.Preprocess("multi_crop(32, local_size=16, num_local=0)|ibot_mask(8, "
                                "prob=0.0)")(grey_example(), np.random.default_rng(0))
  assert never["local_crops"].shape == (0, 16, 16, 3) and not never["ibot_mask"].any()


def test_ibot_masked_crop_fraction_matches_probability():
  op = transforms.Preprocess("ibot_mask(8, ratio=(0.1, 0.5), prob=0.5, min_block=2)")
  ex = {"global_crops": np.zeros((2, 64, 64, 3), np.float32)}
  rng = np.random.default_rng(0)
  masks = np.stack([op(ex, rng)["ibot_mask"] for _ in range(300)])     # [300, 2, 64]
  masked = masks.any(-1)
  assert 0.42 < masked.mean() < 0.58
  ratios = masks.sum(-1)[masked] / 64
  assert ratios.min() >= 0.09 and ratios.max() < 0.5 and 0.25 < ratios.mean() < 0.35


def test_two_views_random_mask_and_tokenizer():
  out = transforms.Preprocess("two_views(24, scale=(0.2, 1.0))|random_mask(0.75, patch_size=8)")(
      {"image": RNG.integers(0, 255, (40, 40), dtype=np.uint8)}, np.random.default_rng(0))
  assert out["view1"].shape == out["view2"].shape == (24, 24, 3)
  assert not np.allclose(out["view1"], out["view2"])
  tok = multiview.ByteTokenizer(max_len=16)
  ids = tok.encode("Cardiomegaly.  Small  EFFUSION ")
  assert ids.dtype == np.int32 and ids.shape == (16,)
  assert tok.decode(ids) == "cardiomegaly. sm"
  np.testing.assert_array_equal(tok.encode(ids), ids)       # ids pass through
  with pytest.raises(ValueError, match="token ids"):
    tok.encode(np.array([300]))
  masked = transforms.Preprocess("random_mask(0.75, patch_size=8)")(
      {"image": np.zeros((32, 48))}, np.random.default_rng(0))["mae_mask"]
  assert masked.shape == (24,) and masked.sum() == 24 - int(24 * 0.25)


# ----------------------------------------------------------------------------
# Objectives on a real tiny batch.
# ----------------------------------------------------------------------------


def objective_config(name, *overrides):
  argv = [f"--config={os.path.join(REPO, 'configs', name)}", "--config.model.variant=micro/8",
          "--config.data.image_size=32", "--config.data.source_size=40",
          "--config.data.batch_size=4", "--config.data.num_examples=64",
          "--config.total_steps=10", "--config.mesh.num_devices=1", *overrides]
  return config_lib.parse_command_line(argv, "test")[0]


def dino_config(*overrides):
  return objective_config("chexfound_l.py:runlocal", "--config.objective.local_crop_size=16",
                          *overrides)


def first_batch(config, objective):
  pp = config.data.pp_train.format(image_size=config.data.image_size)
  pp = "|".join(p for p in (pp, objective.preprocess()) if p)
  ds = pipeline.make_dataset(config.data, split="train", pp=pp, seed=0,
                             global_batch=config.data.batch_size, repeat=False)
  return {k: jnp.asarray(ds[0][k]) for k in objective.batch_keys}


def split_both(objective):
  """The trainable and frozen pure dicts, built as cxrjax.main builds them (same key)."""
  model = objective.build_model(nnx.Rngs(0))
  frozen = objective.build_frozen(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  fgraphdef, fstate = nnx.split(frozen)
  return graphdef, nnx.to_pure_dict(params), fgraphdef, nnx.to_pure_dict(fstate)


@pytest.fixture(scope="module")
def dino():
  # Softmax centering here (its center updates are checked); the training test runs the
  # Sinkhorn-Knopp default of chexfound_l.
  config = dino_config("--config.objective.centering=centering",
                       "--config.objective.teacher_temp_warmup_steps=11")
  objective = dinov2.DinoV2(config)
  return config, objective, split_both(objective), first_batch(config, objective)


@pytest.fixture(scope="module")
def moco():
  config = objective_config("teacher_b.py:runlocal", "--config.objective.mode=image_image")
  objective = contrastive.Contrastive(config)
  return config, objective, split_both(objective), first_batch(config, objective)


def test_teachers_start_equal_to_students(dino, moco):
  _, _, (_, params, _, frozen), _ = dino
  jax.tree.map(np.testing.assert_array_equal, frozen["teacher"], params)
  _, _, (_, params, _, frozen), _ = moco
  for name in ("encoder", "projector"):
    jax.tree.map(np.testing.assert_array_equal, frozen[name], params[name])


def test_dino_prototypes_are_sharded_on_vocab(dino):
  _, objective, _, _ = dino
  abstract = nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  assert tuple(specs["dino_head"]["prototypes"].get_value()) == ("embed", "vocab")
  assert tuple(specs["ibot_head"]["prototype_scale"].get_value()) == ("vocab",)


@pytest.mark.parametrize("which", ["dino", "moco"])
def test_no_gradient_reaches_the_teacher_and_ema_update(which, request):
  config, objective, (graphdef, params, fgraphdef, frozen), batch = request.getfixturevalue(which)
  # Every float variable of the frozen side (teacher, momentum encoder, centers).
  float_keys = [k for k in frozen if k != "step"]

  def loss(params, floats):
    fz = nnx.merge(fgraphdef, dict(frozen, **floats))
    return objective.loss(nnx.merge(graphdef, params), fz, batch, train=True,
                          rngs=nnx.Rngs(dropout=jax.random.PRNGKey(0)))

  (value, aux), (g_student, g_teacher) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(params, {k: frozen[k] for k in float_keys})
  assert np.isfinite(value)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  assert optax.tree.norm(g_student) > 0

  # EMA: teacher = m * teacher + (1 - m) * student, m from the cosine schedule.
  step = 3
  moved = jax.tree.map(lambda p: p + 1.0, params)
  new = objective.update_frozen(frozen, moved, aux, jnp.asarray(step))
  m = float(objective.momentum(step))
  assert m == pytest.approx(losses.cosine_schedule(step, config.objective.momentum, 1.0,
                                                   objective.total_steps))
  names = ["teacher"] if which == "dino" else ["encoder", "projector"]
  for name in names:
    source = moved if which == "dino" else moved[name]
    jax.tree.map(lambda n, t, s: np.testing.assert_allclose(n, m * t + (1 - m) * s, rtol=1e-6),
                 new[name], frozen[name], source)
  if which == "dino":
    assert int(new["step"]) == step + 1   # the teacher-temperature clock follows the step
    assert aux["state/dino_center"].shape == (1, 256)
    for name in ("dino_center", "ibot_center"):  # centers: EMA with momentum 0.9
      np.testing.assert_allclose(new[name], 0.9 * frozen[name] + 0.1 * aux[f"state/{name}"],
                                 rtol=1e-6)


def test_dino_temperature_warmup(dino):
  _, objective, _, _ = dino
  assert float(objective.teacher_temp(0)) == pytest.approx(0.04)
  assert float(objective.teacher_temp(5)) == pytest.approx(0.055)
  assert float(objective.teacher_temp(10)) == pytest.approx(0.07)
  assert float(objective.teacher_temp(1000)) == pytest.approx(0.07)


def test_mae_encoder_sees_only_visible_patches():
  config = objective_config("mae_b.py:runlocal", "--config.objective.decoder_width=32",
                            "--config.objective.decoder_heads=2")
  objective = mae.MAE(config)
  model = objective.build_model(nnx.Rngs(0))
  batch = first_batch(config, objective)
  assert batch["mae_mask"].shape == (4, 16) and int(batch["mae_mask"].sum(1)[0]) == 12
  keep = jnp.argsort(batch["mae_mask"].astype(jnp.int32), axis=1, stable=True)[:, :4]
  encode = nnx.jit(lambda m, x, k: m.encode_visible(x, k, train=False, rngs=None))
  tokens = encode(model, batch["image"], keep)
  assert tokens.shape == (4, 1 + 4, 64)
  # Changing the pixels of masked patches leaves the encoding unchanged.
  patches = losses.patchify(batch["image"], 8)
  noisy = jnp.where(batch["mae_mask"][..., None], patches + 3.0, patches)
  noisy = noisy.reshape(4, 4, 4, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(4, 32, 32, 3)
  np.testing.assert_allclose(encode(model, noisy, keep), tokens, atol=1e-5)
  loss, _ = nnx.jit(lambda m, b: objective.loss(m, None, b, train=False, rngs=None))(model, batch)
  assert np.isfinite(loss) and 0.5 < float(loss) < 3.0


def test_clip_mode_loss_and_text_padding():
  config = objective_config("teacher_b.py:runlocal", "--config.objective.mode=image_text",
                            "--config.objective.learnable_temperature=true")
  objective = contrastive.Contrastive(config)
  assert objective.batch_keys == ("image", "report") and not hasattr(objective,
                                                                     "update_frozen")
  model = objective.build_model(nnx.Rngs(0))
  assert objective.build_frozen(nnx.Rngs(0)) is None
  np.testing.assert_allclose(model.logit_scale[...], math.log(1 / 0.2), rtol=1e-6)
  tok = multiview.ByteTokenizer(128)
  ids = np.stack([tok.encode(t) for t in ("no finding", "cardiomegaly", "", "effusion")])
  # Padding does not change a report's embedding (the reports fit in 32 bytes).
  text = nnx.jit(lambda m, x: m.text_encoder(x))
  np.testing.assert_allclose(text(model, jnp.asarray(ids[:, :32])), text(model, jnp.asarray(ids)),
                             atol=1e-5)
  batch = {"image": jnp.asarray(RNG.normal(size=(4, 32, 32, 3)), jnp.float32),
           "report": jnp.asarray(ids)}
  loss, aux = nnx.jit(lambda m, b: objective.loss(m, None, b, train=False, rngs=None))(
      model, batch)
  assert abs(float(loss) - math.log(4)) < 0.5 and 0 <= float(aux["contrastive/accuracy"]) <= 1


# ----------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, override, match", [
    ("teacher_b.py:runlocal", "--config.objective.mode=both", "objective.mode='both'"),
    ("teacher_b.py:runlocal", "--config.data.pp_train=normalize('evax')", "pp_train"),
    ("chexfound_l.py:runlocal", "--config.objective.centering=sinkhorn", "centering"),
    ("chexfound_l.py:runlocal", "--config.model.mask_token=false", "mask_token"),
    ("chexfound_l.py:runlocal", "--config.objective.local_crop_size=12", "local_crop_size"),
    ("chexfound_l.py:runlocal", "--config.objective.ibot.mask_ratio=(0.5, 0.1)", "mask_ratio"),
    ("mae_b.py:runlocal", "--config.model.rope=true", "rope"),
    ("mae_b.py:runlocal", "--config.objective.mask_ratio=1.0", "mask_ratio"),
])
def test_config_errors_name_the_key(name, override, match):
  config = objective_config(name, override)
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(config)


def test_config_arguments():
  with pytest.raises(ConfigError, match="res=300"):
    config_lib.load_config(os.path.join(REPO, "configs", "chexfound_l.py:res=300"))
  with pytest.raises(ConfigError, match="mode='x'"):
    config_lib.load_config(os.path.join(REPO, "configs", "teacher_b.py:mode=x"))
  hi = config_lib.load_config(os.path.join(REPO, "configs", "chexfound_l.py:res=448"))
  assert hi.model.img_size == 448 and hi.objective.global_crop_size == 448
  assert hi.objective.local_crop_size == 128 and hi.data.batch_size == 112
  full = config_lib.load_config(os.path.join(REPO, "configs", "chexfound_l.py"))
  d, i = full.objective.dino, full.objective.ibot
  heads = nnx.eval_shape(lambda: [
      dinov2.DinoHead(1024, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.num_layers,
                      rngs=nnx.Rngs(0)) for h in (d, i)])
  assert heads[0].prototypes.shape == (384, 131072) and heads[1].prototypes.shape == (256, 131072)
  assert i.separate_head and i.loss_weight == 3.0 and full.objective.momentum == 0.994
  # dinov2 swiglufused: hidden (int(4096 * 2/3) + 7) // 8 * 8 = 2736.
  assert int(1024 * full.model.mlp_ratio) == 2736 and full.model.num_registers == 4
  full.total_steps = 1000  # the weight-decay cosine follows total_steps
  assert full.optim.weight_decay_steps == 1000


# ----------------------------------------------------------------------------
# Optimizer extras.
# ----------------------------------------------------------------------------


def test_layerwise_lr_decay_and_patch_embed_multiplier():
  params = {"encoder": {"patch_embed": {"kernel": 1.0}, "pos_embed": 1.0,
                        "blocks": {0: {"w": 1.0}, 1: {"w": 1.0}, 2: {"w": 1.0}},
                        "norm": {"scale": 1.0}},
            "dino_head": {"prototypes": 1.0}}
  mult = optim_extras.lr_multipliers(params, layer_decay=0.5, patch_embed_lr_mult=0.2)
  # dinov2 get_vit_lr_decay_rate: decay ** (num_layers + 1 - layer_id), 3 blocks.
  assert mult["encoder"]["patch_embed"]["kernel"] == pytest.approx(0.5 ** 4 * 0.2)
  assert mult["encoder"]["pos_embed"] == pytest.approx(0.5 ** 4)
  assert [mult["encoder"]["blocks"][i]["w"] for i in range(3)] == pytest.approx(
      [0.5 ** 3, 0.5 ** 2, 0.5])
  assert mult["encoder"]["norm"]["scale"] == 1.0 and mult["dino_head"]["prototypes"] == 1.0


def test_adamw_dinov2_freezes_prototypes_and_schedules_weight_decay():
  block = ml_collections.ConfigDict(optim_extras.dinov2_optim_block(
      lr=0.1, weight_decay=0.5, weight_decay_end=0.1, weight_decay_steps=4,
      layer_decay=1.0, patch_embed_lr_mult=0.0, freeze_prototypes_steps=2))
  assert "adamw_dinov2" in optim.optimizer_names()
  tx = optim_extras.adamw_dinov2(block, optax.constant_schedule(0.1))
  params = {"encoder": {"patch_embed": {"kernel": jnp.ones((2, 2))},
                        "w": jnp.ones((2, 2))},
            "head": {"prototypes": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.zeros_like, params)   # only weight decay moves the weights
  state = tx.init(params)
  seen = []
  for _ in range(5):
    updates, state = tx.update(grads, state, params)
    seen.append(jax.tree.map(lambda u: float(u[0, 0]), updates))
  wd = [float(optim_extras.weight_decay_schedule(0.5, 0.1, 4)(t)) for t in range(5)]
  assert wd[0] == pytest.approx(0.5) and wd[4] == pytest.approx(0.1)
  for t, u in enumerate(seen):
    assert u["encoder"]["w"] == pytest.approx(-0.1 * wd[t], rel=1e-5)
    assert u["encoder"]["patch_embed"]["kernel"] == 0.0          # lr multiplier 0
    assert u["head"]["prototypes"] == (0.0 if t < 2 else pytest.approx(-0.1 * wd[t], rel=1e-5))
