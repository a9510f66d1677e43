"""Pretraining losses with the official reductions (docs/official.md, *Loss reductions*).

Every loss is a pure function of model outputs and dense targets with masks (static shapes,
no boolean indexing) and is computed in float32 whatever the model's compute dtype.
`pretrain_loss` ties model, targets and reduction together for one pretraining objective.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from uniter_jax.losses import ot as ot_lib

OBJECTIVES = ("mlm", "mrfr", "mrc", "mrckl", "itm")
# Official itm_ot_lambda in every released pretraining config.
DEFAULT_OT_LAMBDA = 0.1


def _count(mask: jax.Array) -> jax.Array:
  return jnp.maximum(mask.sum().astype(jnp.float32), 1.0)


def mlm_loss(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Cross-entropy averaged over target tokens (labels != -1). logits (..., V)."""
  logits = logits.astype(jnp.float32)
  valid = labels != -1
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  n = _count(valid)
  correct = (jnp.argmax(logits, -1) == labels) & valid
  return {"loss": jnp.sum(jnp.where(valid, nll, 0.0)) / n, "num_targets": valid.sum(),
          "accuracy": correct.sum() / n}


def mrfr_loss(pred: jax.Array, targets: jax.Array, masked: jax.Array) -> dict[str, jax.Array]:
  """Squared error averaged over all elements of the masked regions (official mse.mean())."""
  sq = jnp.square(pred.astype(jnp.float32) - targets.astype(jnp.float32))
  per_region = jnp.sum(sq, -1)
  n = _count(masked)
  return {"loss": jnp.sum(jnp.where(masked, per_region, 0.0)) / (n * pred.shape[-1]),
          "num_targets": masked.sum()}


def mrc_loss(logits: jax.Array, soft_targets: jax.Array, masked: jax.Array
             ) -> dict[str, jax.Array]:
  """Hard MRC: CE against argmax of the soft label without background (+1), mean over regions."""
  logits = logits.astype(jnp.float32)
  label = jnp.argmax(soft_targets[..., 1:], -1) + 1
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, label[..., None], -1)[..., 0]
  n = _count(masked)
  correct = (jnp.argmax(logits, -1) == label) & masked
  return {"loss": jnp.sum(jnp.where(masked, nll, 0.0)) / n, "num_targets": masked.sum(),
          "accuracy": correct.sum() / n}


def mrckl_loss(logits: jax.Array, soft_targets: jax.Array, masked: jax.Array
               ) -> dict[str, jax.Array]:
  """KL(q || p) elementwise (q log q - q log p, 0 where q = 0), mean over all elements."""
  q = soft_targets.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  kl = jnp.sum(xlogy(q, q) - q * logp, -1)
  n = _count(masked)
  correct = (jnp.argmax(logits, -1) == jnp.argmax(q, -1)) & masked
  return {"loss": jnp.sum(jnp.where(masked, kl, 0.0)) / (n * logits.shape[-1]),
          "num_targets": masked.sum(), "accuracy": correct.sum() / n}


def itm_loss(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """2-way cross-entropy averaged over the batch; class 1 = match."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), -1)[:, 0]
  acc = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))
  return {"loss": jnp.mean(nll), "accuracy": acc}


def pretrain_loss(model: Any, batch: Mapping[str, jax.Array], objective: str, *,
                  deterministic: bool = True, rngs: Any = None,
                  ot_lambda: float = DEFAULT_OT_LAMBDA, **ot_options: Any
                  ) -> dict[str, jax.Array]:
  """The scalar the official training loop back-propagates for `objective` on `batch`.

  `batch` already carries the objective's targets (uniter_jax.masking.apply_objective):
  mlm: txt_labels; mrfr: img_masked, feat_targets; mrc / mrckl: img_masked, label_targets;
  itm: itm_targets. For "itm" the result is ITM cross-entropy + ot_lambda * WRA, with
  `itm_loss`, `ot_loss` and the per-example `ot_distance` (B,) beside it; `ot_options` go
  to `uniter_jax.losses.ot.ot_distance` (solver="sinkhorn" | "ipot", ...).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown pretraining objective {objective!r}; choose from {OBJECTIVES}")
  out = model.encode(batch, deterministic=deterministic, rngs=rngs)
  if objective == "mlm":
    return mlm_loss(model.mlm_logits(out.txt), batch["txt_labels"])
  if objective == "mrfr":
    return mrfr_loss(model.mrfr_prediction(out.img), batch["feat_targets"],
                     batch["img_masked"])
  if objective in ("mrc", "mrckl"):
    fn = mrc_loss if objective == "mrc" else mrckl_loss
    return fn(model.mrc_logits(out.img), batch["label_targets"], batch["img_masked"])
  targets = batch["itm_targets"]
  res = itm_loss(model.itm_logits(out.pooled), targets)
  dist = ot_lib.ot_distance(out.txt, out.img, batch["txt_mask"], batch["img_mask"],
                            **ot_options)
  ot_loss, aux = ot_lib.wra_loss(dist, targets)
  return {"loss": res["loss"] + ot_lambda * ot_loss, "itm_loss": res["loss"],
          "accuracy": res["accuracy"], "ot_loss": ot_loss, "ot_distance": dist, **aux}
