"""The loss each official fine-tuning script back-propagates, on batches converted with
uniter_jax.interop.from_official_batch(batch, task=...): for checking parity and gradients
against the official code (the trainer's objectives compute the same from pipeline batches)."""

from __future__ import annotations

from typing import Any, Mapping

import jax

from uniter_jax.models.nlvr2 import nlvr2_loss
from uniter_jax.models.vqa import vqa_loss


def official_loss(task: str, model: Any, batch: Mapping[str, jax.Array], *,
                  variant: str | None = None, deterministic: bool = True,
                  rngs: Any = None) -> jax.Array:
  """The scalar train_{task}.py back-propagates for one batch.

  vqa / ve: BCE-with-logits over the dense `targets` (B, num_answers), mean x num_answers
  (train_vqa.py, train_ve.py). nlvr2: cross-entropy over `targets` (B,), mean
  (train_nlvr2.py); `variant`, when given, must be the model's. Pretraining objectives:
  uniter_jax.losses.pretrain_loss.
  """
  logits = model(batch, deterministic=deterministic, rngs=rngs)
  if task in ("vqa", "ve"):
    return vqa_loss(logits, batch["targets"])
  if task == "nlvr2":
    if variant is not None and variant != model.variant:
      raise ValueError(f"official_loss: variant={variant!r} but the model is "
                       f"{model.variant!r}")
    return nlvr2_loss(logits, batch["targets"])
  raise ValueError(f"official_loss: unknown task {task!r}; use 'vqa', 've' or 'nlvr2' "
                   "(pretraining objectives: uniter_jax.losses.pretrain_loss)")
