"""SNLI-VE fine-tuning (docs/official.md, *Downstream heads: SNLI-VE*): the VQA head with 3
outputs, BCE-with-logits on the one-hot label (mean x 3, as train_ve.py), accuracy overall
and per class, results.json."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from uniter_jax import files
from uniter_jax.models.vqa import VE_NUM_LABELS, vqa_loss
from uniter_jax.tasks import base, classify, register


class VeTask(classify.LabelTask):
  """UniterForVisualEntailment on [CLS] hypothesis [SEP] + the premise image's regions."""

  name = "ve"
  model_class = "UniterForVisualEntailment"
  synthetic_splits = ("ve_train", "ve_val", "ve_test")
  class_names = ("contradiction", "entailment", "neutral")  # official label ids 0, 1, 2
  what, whats = "hypothesis", "hypotheses"
  how = "convert SNLI-VE with data_prep.snli_ve: target 0 contradiction, 1 entailment, 2 neutral"

  @staticmethod
  def loss(logits, target):
    """BCE on the one-hot label (the official VE collate's targets), mean x 3."""
    return vqa_loss(logits, jax.nn.one_hot(target, VE_NUM_LABELS, dtype=jnp.float32))

  def write_predictions(self, ctx: base.RunContext, split, preds, pipe) -> str:
    """results.json: [{"id": text id, "label": class name}, ...]."""
    ids = pipe.planner.text_ids
    rows = [{"id": ids[i], "label": self.class_names[preds[i]]} for i in sorted(preds)]
    path = os.path.join(ctx.workdir, "predictions", split, "results.json")
    files.write_bytes(path, json.dumps(rows, indent=0).encode(), overwrite=True)
    return path


register(VeTask())
