"""Each pretraining loss against an independent NumPy computation from the same outputs."""

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import random_batch, tiny_config, to_jnp
from uniter_jax.losses import ot_distance, pretrain_loss
from uniter_jax.masking import MaskingConfig, apply_objective
from uniter_jax.models import UniterForPretraining

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
