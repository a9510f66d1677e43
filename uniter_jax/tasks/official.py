"""The loss each official fine-tuning script back-propagates, on batches converted with
uniter_jax.interop.from_official_batch(batch, task=...): for checking parity and gradients
against the official code (the trainer's objectives compute the same from pipeline batches)."""

from __future__ import annotations

from typing import Any, Mapping

import jax

from uniter_jax.models.nlvr2 import nlvr2_loss
from uniter_jax.models.refer import re_cls_loss, re_rank_loss
from uniter_jax.models.vcr import vcr_loss
from uniter_jax.models.retrieval import official_hard_negative_loss, rank_loss
from uniter_jax.models.vqa import vqa_loss


# The tasks whose training-loop loss official_loss reproduces.
OFFICIAL_TASKS = ("vqa", "ve", "nlvr2", "re", "vcr", "itr")


def official_loss(task: str, model: Any, batch: Mapping[str, jax.Array], *,
                  variant: str | None = None, mlp: int | None = None, loss: str = "cls",
                  negatives: jax.Array | None = None, margin: float = 0.2,
                  hard_negatives: bool = False, hard_size: int = 31,
                  deterministic: bool = True, rngs: Any = None) -> jax.Array:
  """The scalar train_{task}.py back-propagates for one batch.

  vqa / ve: BCE-with-logits over the dense `targets` (B, num_answers), mean x num_answers
  (train_vqa.py, train_ve.py). nlvr2: cross-entropy over `targets` (B,), mean
  (train_nlvr2.py); `variant`, when given, must be the model's. re: loss="cls" the
  cross-entropy over regions, loss="rank" the sigmoid hinge against `negatives` (B,) region
  indices (uniter_jax.models.refer.sample_negatives draws them as the official code does),
  both summed over the batch (train_re.py); `mlp`, when given, must be the model's. vcr:
  cross-entropy over 2 classes per (question, choice) row, mean (train_vcr.py).
  itr: the sigmoid hinge with `margin` over groups of `batch["sample_size"]` rows (column 0
  the positive), mean (train_itm.py); with hard_negatives, one anchor's rows (row 0 the gt)
  scored in eval mode, the gt + `hard_size` hardest kept, the hinge mean on those
  (train_itm_hard_negatives.py, before its division by train_batch_size).
  Pretraining objectives: uniter_jax.losses.pretrain_loss.
  """
  if task == "itr" and hard_negatives:  # scores all rows in eval mode first
    return official_hard_negative_loss(model, batch, hard_size, margin,
                                       deterministic=deterministic, rngs=rngs)
  if task not in OFFICIAL_TASKS:  # before the forward pass: the batch may not suit any model
    raise ValueError(f"official_loss: unknown task {task!r}; use one of {OFFICIAL_TASKS} "
                     "(pretraining objectives: uniter_jax.losses.pretrain_loss)")
  logits = model(batch, deterministic=deterministic, rngs=rngs)
  if task in ("vqa", "ve"):
    return vqa_loss(logits, batch["targets"])
  if task == "nlvr2":
    if variant is not None and variant != model.variant:
      raise ValueError(f"official_loss: variant={variant!r} but the model is "
                       f"{model.variant!r}")
    return nlvr2_loss(logits, batch["targets"])
  if task == "re":
    if mlp is not None and mlp != model.mlp:
      raise ValueError(f"official_loss: mlp={mlp!r} but the model has mlp={model.mlp}")
    if loss == "cls":
      return re_cls_loss(logits, batch["targets"], batch["img_mask"])
    if loss == "rank":
      if negatives is None:
        raise ValueError("official_loss('re', loss='rank') needs negatives=(B,) region "
                         "indices (models.refer.sample_negatives draws them)")
      return re_rank_loss(logits, batch["targets"], negatives, batch["img_mask"], margin)
    raise ValueError(f"official_loss: RE loss {loss!r}; use 'cls' or 'rank'")
  if task == "vcr":
    return vcr_loss(logits, batch["targets"])
  if task == "itr":
    # train_itm.py: groups of batch["sample_size"] rows (a Python int), column 0 positive.
    return rank_loss(logits, int(batch["sample_size"]), margin)
  raise AssertionError(task)  # every name of OFFICIAL_TASKS returns above
