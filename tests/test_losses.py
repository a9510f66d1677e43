"""Each pretraining loss against an independent NumPy computation from the same outputs; the
MLM / MRM heads on the masked positions only against the heads at every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_batch, tiny_config, to_jnp
from uniter_jax import sharding
from uniter_jax.losses import ot_distance, pretrain_loss
from uniter_jax.losses.pretrain import masked_budget, mlm_loss, mrckl_loss
from uniter_jax.masking import MaskingConfig, apply_objective, apply_region_masking
from uniter_jax.models import UniterForPretraining, UniterOutput

MCFG = MaskingConfig(mask_id=3, special_ids=(0, 1, 2, 3), random_range=(4, 100),
                     mlm_prob=0.3, mrm_prob=0.3)


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  model = UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  raw = to_jnp(random_batch(11, b=6, lt=10, li=7, cfg=cfg))
  return model, raw


def _log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _task_batch(raw, task):
  return apply_objective(jax.random.key(3), raw, task, MCFG)


def test_mlm_loss_matches_numpy(setup):
  model, raw = setup
  b = _task_batch(raw, "mlm")
  logits = np.asarray(model.mlm_logits(model.encode(b).txt))
  labels = np.asarray(b["txt_labels"])
  rows = [(i, j) for i in range(labels.shape[0]) for j in range(labels.shape[1])
          if labels[i, j] != -1]
  ref = np.mean([-_log_softmax(logits[i, j])[labels[i, j]] for i, j in rows])
  np.testing.assert_allclose(pretrain_loss(model, b, "mlm")["loss"], ref, rtol=1e-5)


def test_mrfr_loss_matches_numpy(setup):
  model, raw = setup
  b = _task_batch(raw, "mrfr")
  pred = np.asarray(model.mrfr_prediction(model.encode(b).img))
  m = np.asarray(b["img_masked"])
  ref = np.mean((pred[m] - np.asarray(raw["img_feat"])[m]) ** 2)  # original features
  np.testing.assert_allclose(pretrain_loss(model, b, "mrfr")["loss"], ref, rtol=1e-5)


def test_mrc_and_mrckl_losses_match_numpy(setup):
  model, raw = setup
  b = _task_batch(raw, "mrc")
  logits = np.asarray(model.mrc_logits(model.encode(b).img))
  m = np.asarray(b["img_masked"])
  q = np.asarray(raw["img_soft_labels"])[m].astype(np.float64)
  logp = _log_softmax(logits[m])
  hard = q[:, 1:].argmax(-1) + 1
  ref_mrc = np.mean(-logp[np.arange(len(hard)), hard])
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(q > 0, q * (np.log(q) - logp), 0.0)
  ref_kl = terms.mean()  # F.kl_div(reduction='none').mean(): over all elements
  np.testing.assert_allclose(pretrain_loss(model, b, "mrc")["loss"], ref_mrc, rtol=1e-5)
  np.testing.assert_allclose(pretrain_loss(model, b, "mrckl")["loss"], ref_kl, rtol=1e-5)


def test_majority_baseline_is_what_a_constant_predictor_scores():
  """The accuracies' chance level: a predictor always answering the commonest target."""
  rng = np.random.default_rng(0)
  classes = 9
  label = rng.choice(classes, size=(4, 12), p=[0.6] + [0.05] * 8)  # class 0 like background
  masked = rng.random((4, 12)) < 0.5
  q = np.full((4, 12, classes), 0.01)
  q[np.arange(4)[:, None], np.arange(12)[None], label] = 1.0
  q /= q.sum(-1, keepdims=True)
  constant = np.zeros((4, 12, classes), np.float32)
  constant[..., np.bincount(label[masked]).argmax()] = 5.0  # always the commonest class
  res = mrckl_loss(jnp.asarray(constant), jnp.asarray(q, jnp.float32), jnp.asarray(masked))
  expect = np.bincount(label[masked]).max() / masked.sum()
  np.testing.assert_allclose(res["majority_accuracy"], expect, rtol=1e-6)
  np.testing.assert_allclose(res["accuracy"], expect, rtol=1e-6)
  # MLM: labels -1 are not targets; a predictor that learned something beats it.
  words = np.where(masked, rng.choice([5, 7, 7, 7, 11], size=(4, 12)), -1)
  hit = np.zeros((4, 12, 20), np.float32)
  hit[np.arange(4)[:, None], np.arange(12)[None], np.maximum(words, 0)] = 5.0
  res = mlm_loss(jnp.asarray(hit), jnp.asarray(words))
  np.testing.assert_allclose(res["majority_accuracy"],
                             np.bincount(words[masked]).max() / masked.sum(), rtol=1e-6)
  assert res["accuracy"] == 1.0 > res["majority_accuracy"]


def test_itm_loss_with_wra_matches_numpy(setup):
  model, raw = setup
  b = _task_batch(raw, "itm")
  out = model.encode(b)
  logits = np.asarray(model.itm_logits(out.pooled))
  t = np.asarray(b["itm_targets"])
  assert 0 < t.sum() < len(t)
  xe = np.mean(-_log_softmax(logits)[np.arange(len(t)), t])
  dist = np.asarray(ot_distance(out.txt, out.img, b["txt_mask"], b["img_mask"], solver="ipot"))
  ot = (dist[t == 1].sum() - dist[t == 0].sum()) / len(t)
  res = pretrain_loss(model, b, "itm", solver="ipot")
  np.testing.assert_allclose(res["itm_loss"], xe, rtol=1e-5)
  np.testing.assert_allclose(res["ot_loss"], ot, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(res["loss"], xe + 0.1 * ot, rtol=1e-5)
  assert res["ot_distance"].shape == (6,)


def test_losses_are_float32_under_bfloat16_compute():
  cfg = tiny_config(dtype="bfloat16")
  model = UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  raw = to_jnp(random_batch(12, cfg=cfg))
  names = ("mlm", "mrfr", "mrckl", "itm")
  # One program for the four losses: compiling it costs less than dispatching them op by op.
  losses = nnx.jit(lambda m, raw: {t: pretrain_loss(m, _task_batch(raw, t), t)["loss"]
                                   for t in names})(model, raw)
  for task in names:
    loss = losses[task]
    assert loss.dtype == np.float32 and np.isfinite(loss), task


def test_unknown_objective_is_a_clear_error(setup):
  model, raw = setup
  with pytest.raises(ValueError, match="unknown pretraining objective"):
    pretrain_loss(model, raw, "nsp")


# -- heads only where there are targets (losses.pretrain.heads_on_targets) -------------------
HEAD_TASKS = ("mlm", "mrfr", "mrc", "mrckl")


def _every_position_masked(raw, task):
  """Every real token (MLM) or every real region (MRM) is a target: overflows any budget."""
  if task == "mlm":
    return {**raw, "input_ids": jnp.where(raw["txt_mask"], MCFG.mask_id, raw["input_ids"]),
            "txt_labels": jnp.where(raw["txt_mask"], raw["input_ids"], -1).astype(jnp.int32)}
  return apply_region_masking(jax.random.key(0), raw, prob=1.0)


class _GivenStates:
  """The pretraining model with its encoder outputs given: the heads' program is small."""

  def __init__(self, model, txt, img):
    self.model, self.out = model, UniterOutput(txt=txt, img=img, pooled=txt[:, 0])

  def encode(self, batch, **kwargs):
    del batch, kwargs
    return self.out

  def __getattr__(self, name):
    return getattr(self.model, name)


@pytest.fixture(scope="module")
def heads_both_ways(setup):
  """Loss results with heads at every position (margin None) and on the masked positions
  only (margin 0.25): with gradients (parameters and encoder outputs) for the usual masking
  (rate 0.3), the loss alone for every position masked; one program for all of them."""
  model, raw = setup
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  whole = to_jnp(random_batch(11, b=6, lt=10, li=7, cfg=model.config, txt_lens=[10] * 6,
                              num_bbs=[7] * 6))  # no padding: every slot is a real position
  h = model.config.hidden_size
  k_txt, k_img = jax.random.split(jax.random.key(4))
  states = (jax.random.normal(k_txt, (6, 10, h)), jax.random.normal(k_img, (6, 7, h)))

  @jax.jit
  def run(params, states, raw, whole):
    out = {}
    for task, kind in ((t, kind) for t in HEAD_TASKS for kind in ("usual", "all")):
      b = _task_batch(raw, task) if kind == "usual" else _every_position_masked(whole, task)
      for path, margin in (("full", None), ("masked", 0.25)):
        def loss(p, s, b=b, task=task, margin=margin):
          m = _GivenStates(nnx.merge(graphdef, p, rest), *s)
          res = pretrain_loss(m, b, task, mask_rate=0.3, masked_budget_margin=margin)
          return res["loss"], res
        if kind == "usual":
          (_, res), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, states)
        else:  # the loss only: a smaller program
          res, grads = loss(params, states)[1], None
        out[task, kind, path] = (res, grads)
    return out

  return jax.device_get(run(params, states, raw, whole))


def _assert_same(full, masked):
  (res_f, g_f), (res_m, g_m) = full, masked
  for name in ("loss", "accuracy", "num_targets"):
    if name in res_f:
      np.testing.assert_allclose(res_m[name], res_f[name], rtol=1e-6, err_msg=name)
  if g_f is None:
    return
  leaves_f, leaves_m = jax.tree.leaves(g_f), jax.tree.leaves(g_m)
  scale = max(float(np.abs(x).max()) for x in leaves_f)
  assert scale > 0
  for a, b in zip(leaves_m, leaves_f):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("task", HEAD_TASKS)
def test_heads_on_masked_positions_equal_full_heads(heads_both_ways, task):
  full, masked = heads_both_ways[task, "usual", "full"], heads_both_ways[task, "usual", "masked"]
  assert float(full[0]["full_heads"]) == 1.0 and float(masked[0]["full_heads"]) == 0.0
  _assert_same(full, masked)


@pytest.mark.parametrize("task", HEAD_TASKS)
def test_masked_heads_overflow_falls_back_to_the_exact_full_loss(heads_both_ways, task):
  # Every position is a target, more than the budget: the full-width heads run, exactly.
  full, masked = heads_both_ways[task, "all", "full"], heads_both_ways[task, "all", "masked"]
  positions = 6 * (10 if task == "mlm" else 7)
  assert int(masked[0]["num_targets"]) == positions > masked_budget(positions, 6, 0.3, 0.25)
  assert float(masked[0]["full_heads"]) == 1.0
  _assert_same(full, masked)


def test_masked_budget_is_static_and_bounded():
  assert masked_budget(64 * 64, 64, 0.15, 0.25) == 832  # ceil(768) + 64, a multiple of 8
  assert masked_budget(60, 6, 0.3, 0.25) == 32
  assert masked_budget(10, 4, 0.5, 0.5) == 10  # never more than every position


def test_masked_heads_per_device_groups_match_full_heads(mesh, setup):
  # Under the (4, 2) mesh each device's rows gather their own masked positions.
  model, _ = setup
  cfg = model.config
  raw = to_jnp(random_batch(13, b=16, lt=12, li=9, cfg=cfg))
  tasks = ("mlm", "mrckl")
  k_txt, k_img = jax.random.split(jax.random.key(5))
  states = (jax.random.normal(k_txt, (16, 12, cfg.hidden_size)),
            jax.random.normal(k_img, (16, 9, cfg.hidden_size)))

  @nnx.jit
  def run(model, raw, states):
    with sharding.use_rules(sharding.FSDP_RULES):
      given = _GivenStates(model, *states)
      return {(t, path): pretrain_loss(given, _task_batch(raw, t), t, mask_rate=0.3,
                                       masked_budget_margin=m)
              for t in tasks for path, m in (("full", None), ("masked", 0.25))}

  with jax.set_mesh(mesh):
    out = jax.device_get(run(model, raw, states))
  for t in tasks:
    full, masked = out[t, "full"], out[t, "masked"]
    assert masked["full_heads"] == 0.0
    np.testing.assert_allclose(masked["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(masked["accuracy"], full["accuracy"], rtol=1e-6)
