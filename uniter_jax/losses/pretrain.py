"""Pretraining losses with the official reductions (docs/official.md, *Loss reductions*).

Every loss is a pure function of model outputs and dense targets with masks (static shapes,
no boolean indexing) and is computed in float32 whatever the model's compute dtype.
`pretrain_loss` ties model, targets and reduction together for one pretraining objective.

Heads only where there are targets: like the official `_compute_masked_hidden`, the MLM /
MRFR / MRC heads read only the masked positions (`heads_on_targets`). Shapes stay static: the
masked positions of each device's rows are gathered into a fixed budget of slots
(`masked_budget`); a batch with more masked positions than that runs the head on every
position instead (`lax.cond`), so the loss is always the same mean over the same targets.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from uniter_jax import flops as flops_lib
from uniter_jax import sharding
from uniter_jax.losses import ot as ot_lib

OBJECTIVES = ("mlm", "mrfr", "mrc", "mrckl", "itm")
# Official itm_ot_lambda in every released pretraining config.
DEFAULT_OT_LAMBDA = 0.1
# Official masking rate of text tokens and of regions.
DEFAULT_MASK_RATE = 0.15
# Head slots per group of rows = ceil(rate * (1 + margin) * positions) + rows (the forced
# target of a row with none), rounded up to a multiple of 8 (config.pretrain.
# masked_budget_margin; None or < 0 = heads everywhere). 32 rows of 64 real tokens: 416 of
# 2,048 slots, about 7 standard deviations above the mean masked count (~298); 8 rows: 104
# of 512, about 3.7. Padding and [CLS] / [SEP] (never masked) only widen the gap.
DEFAULT_MASKED_BUDGET_MARGIN = 0.25


def _count(mask: jax.Array) -> jax.Array:
  return jnp.maximum(mask.sum().astype(jnp.float32), 1.0)


def majority_share(labels: jax.Array, valid: jax.Array, num_classes: int) -> jax.Array:
  """The share of valid targets that are this batch's commonest target class.

  The most a constant predictor scores on the batch (and so at least what one constant scores
  over several batches): the chance level an accuracy has to beat. The synthetic detector's
  soft labels make background (class 0) the argmax of two regions in three, so MRC-kl
  accuracy reads about 0.72 before any learning.
  """
  w = valid.reshape(-1).astype(jnp.float32)
  counts = jnp.zeros((num_classes,), jnp.float32).at[
      jnp.where(valid, labels, 0).reshape(-1)].add(w)
  return counts.max() / _count(valid)


def mlm_loss(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Cross-entropy averaged over target tokens (labels != -1). logits (..., V)."""
  logits = logits.astype(jnp.float32)
  valid = labels != -1
  # One max and one exp-sum over the vocabulary, no (..., V) log-probabilities and no argmax:
  # the loss, its gradient and the accuracy of 416 x 28996 logits take 0.42x the time of
  # log_softmax + argmax on one CPU thread, same values. A target tied with the maximum
  # counts as correct (argmax would pick the first; ties have measure zero).
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), -1))
  target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  nll = lse - target
  n = _count(valid)
  correct = (target >= top) & valid
  return {"loss": jnp.sum(jnp.where(valid, nll, 0.0)) / n, "num_targets": valid.sum(),
          "accuracy": correct.sum() / n,
          "majority_accuracy": majority_share(labels, valid, logits.shape[-1])}


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
          "accuracy": correct.sum() / n,
          "majority_accuracy": majority_share(label, masked, logits.shape[-1])}


def mrckl_loss(logits: jax.Array, soft_targets: jax.Array, masked: jax.Array
               ) -> dict[str, jax.Array]:
  """KL(q || p) elementwise (q log q - q log p, 0 where q = 0), mean over all elements."""
  q = soft_targets.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  kl = jnp.sum(xlogy(q, q) - q * logp, -1)
  n = _count(masked)
  label = jnp.argmax(q, -1)
  correct = (jnp.argmax(logits, -1) == label) & masked
  return {"loss": jnp.sum(jnp.where(masked, kl, 0.0)) / (n * logits.shape[-1]),
          "num_targets": masked.sum(), "accuracy": correct.sum() / n,
          "majority_accuracy": majority_share(label, masked, logits.shape[-1])}


def masked_budget(positions: int, rows: int, rate: float, margin: float) -> int:
  """The static number of head slots for `positions` slots of `rows` rows, at most positions.

  ceil(rate * (1 + margin) * positions) + rows (one forced target per row at most), rounded
  up to a multiple of 8. VCR's 2nd stage forces one per segment (up to 3 a row); the margin,
  taken over padded positions, has held those too (README, *VCR*: no overflow measured).
  """
  k = math.ceil(rate * (1.0 + margin) * positions - 1e-9) + rows
  return min(positions, -(-k // 8) * 8)


def heads_on_targets(head_loss: Callable[..., dict], states: jax.Array, masked: jax.Array,
                     targets: Sequence[jax.Array] = (), *, rate: float = DEFAULT_MASK_RATE,
                     margin: float | None = DEFAULT_MASKED_BUDGET_MARGIN) -> dict:
  """head_loss(states, masked, *targets) on the masked positions only, exactly.

  states (B, L, H); masked (B, L) bool (the targets); targets: (B, L, ...) arrays.
  `head_loss` maps states of any leading shape (..., H) with a mask and targets of the same
  leading shape to a dict of scalars, and must ignore the unmasked positions (the losses of
  this module do). Each group of rows (one group per device, as for ITM negatives) gathers
  its masked positions into `masked_budget` slots, in order, the unused slots unmasked. When
  any group has more masked positions than slots, `head_loss` runs on the full (B, L) states
  instead (lax.cond; under jax.checkpoint, so the untaken branch keeps no large residuals):
  no target is ever dropped. `margin` None or < 0, or a budget of every position: always
  the full states. The result has `full_heads` besides: 1.0 where the full states were used.
  """
  b, length = masked.shape
  full = lambda h, m, *t: {**head_loss(h, m, *t), "full_heads": jnp.float32(1.0)}
  if margin is None or margin < 0:
    return full(states, masked, *targets)
  shards = sharding.batch_shards()
  groups = shards if b % shards == 0 else 1
  n = b // groups * length
  k = masked_budget(n, b // groups, rate, margin)
  if k >= n:
    return full(states, masked, *targets)

  grouped = lambda x: x.reshape(groups, n, *x.shape[2:])
  m = grouped(masked.astype(bool))
  count = m.sum(1)
  # Slot of each masked position (its rank in the group); unmasked ones go out of bounds.
  slot = jnp.where(m, jnp.cumsum(m, axis=1) - 1, k)
  rows = jnp.arange(groups)[:, None]
  idx = jnp.zeros((groups, k), jnp.int32).at[rows, slot].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (groups, n)), mode="drop")
  valid = jnp.arange(k)[None] < count[:, None]
  take = jax.vmap(lambda x, i: x[i])

  def gathered(h, *t):
    h = sharding.constrain(take(grouped(h), idx), ("act_batch", None, "act_embed"))
    return {**head_loss(h, valid, *(take(grouped(x), idx) for x in t)),
            "full_heads": jnp.float32(0.0)}

  if flops_lib.counting():  # XLA would count the conditional as its costliest branch
    return gathered(states, *targets)
  overflow = jnp.any(count > k)
  return jax.lax.cond(overflow, jax.checkpoint(lambda h, *t: full(h, masked, *t)), gathered,
                      states, *targets)


def itm_loss(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """2-way cross-entropy averaged over the batch; class 1 = match."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), -1)[:, 0]
  acc = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))
  return {"loss": jnp.mean(nll), "accuracy": acc}


def pretrain_loss(model: Any, batch: Mapping[str, jax.Array], objective: str, *,
                  deterministic: bool = True, rngs: Any = None,
                  ot_lambda: float = DEFAULT_OT_LAMBDA, mask_rate: float = DEFAULT_MASK_RATE,
                  masked_budget_margin: float | None = DEFAULT_MASKED_BUDGET_MARGIN,
                  **ot_options: Any) -> dict[str, jax.Array]:
  """The scalar the official training loop back-propagates for `objective` on `batch`.

  `batch` already carries the objective's targets (uniter_jax.masking.apply_objective):
  mlm: txt_labels; mrfr: img_masked, feat_targets; mrc / mrckl: img_masked, label_targets;
  itm: itm_targets. For "itm" the result is ITM cross-entropy + ot_lambda * WRA, with
  `itm_loss`, `ot_loss` and the per-example `ot_distance` (B,) beside it; `ot_options` go
  to `uniter_jax.losses.ot.ot_distance` (solver="sinkhorn" | "ipot", ...).

  MLM / MRFR / MRC heads run on the masked positions only (`heads_on_targets`, budget from
  `mask_rate`, the batch's masking probability, and `masked_budget_margin`; None = every
  position). The value is the same either way; `full_heads` (1.0 / 0.0) says whether the
  heads ran at every position (gathering off, or more masked positions than the budget).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown pretraining objective {objective!r}; choose from {OBJECTIVES}")
  out = model.encode(batch, deterministic=deterministic, rngs=rngs)
  on_targets = lambda fn, h, m, t: heads_on_targets(fn, h, m, t, rate=mask_rate,
                                                    margin=masked_budget_margin)
  if objective == "mlm":
    labels = batch["txt_labels"]
    return on_targets(lambda h, m, y: mlm_loss(model.mlm_logits(h), jnp.where(m, y, -1)),
                      out.txt, labels != -1, (labels,))
  if objective == "mrfr":
    return on_targets(lambda h, m, y: mrfr_loss(model.mrfr_prediction(h), y, m),
                      out.img, batch["img_masked"], (batch["feat_targets"],))
  if objective in ("mrc", "mrckl"):
    fn = mrc_loss if objective == "mrc" else mrckl_loss
    return on_targets(lambda h, m, y: fn(model.mrc_logits(h), y, m),
                      out.img, batch["img_masked"], (batch["label_targets"],))
  targets = batch["itm_targets"]
  res = itm_loss(model.itm_logits(out.pooled), targets)
  dist = ot_lib.ot_distance(out.txt, out.img, batch["txt_mask"], batch["img_mask"],
                            **ot_options)
  ot_loss, aux = ot_lib.wra_loss(dist, targets)
  return {"loss": res["loss"] + ot_lambda * ot_loss, "itm_loss": res["loss"],
          "accuracy": res["accuracy"], "ot_loss": ot_loss, "ot_distance": dist, **aux}
