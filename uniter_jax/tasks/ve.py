"""SNLI-VE fine-tuning (docs/official.md, *Downstream heads: SNLI-VE*): the VQA head with 3
outputs, BCE-with-logits on the one-hot label (mean x 3, as train_ve.py), accuracy overall
and per class, results.json."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from uniter_jax import files
from uniter_jax import train_step as step_lib
from uniter_jax.models.vqa import VE_NUM_LABELS, vqa_loss
from uniter_jax.tasks import base, classify, register

# Official label ids (SNLI-VE gold_label).
LABELS = ("contradiction", "entailment", "neutral")
_HOW = "convert SNLI-VE with data_prep.snli_ve: target 0 contradiction, 1 entailment, 2 neutral"


def one_hot_targets(labels: jax.Array) -> jax.Array:
  """(B,) label ids -> (B, 3) float32 one-hot targets (the official VE collate's)."""
  return jax.nn.one_hot(labels, VE_NUM_LABELS, dtype=jnp.float32)


def _ve_branch(model, batch, key, deterministic):
  logits = model(batch, deterministic=deterministic, rngs=key)
  target = batch["target"]
  accuracy = jnp.mean((jnp.argmax(logits, -1) == target).astype(jnp.float32))
  return vqa_loss(logits, one_hot_targets(target)), {"accuracy": accuracy}


class VeTask(base.Task):
  """UniterForVisualEntailment on [CLS] hypothesis [SEP] + the premise image's regions."""

  name = "ve"
  model_class = "UniterForVisualEntailment"
  synthetic_splits = ("ve_train", "ve_val", "ve_test")
  step_extra_fields = ("target",)

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    classify.check_labels(pipe, split, "target", VE_NUM_LABELS, _HOW)

  def objective(self, config, data):
    return step_lib.Objective(names=("ve",), losses=(_ve_branch,), ratios=(1.0,),
                              aux_names=("accuracy",),
                              logged={"ve": (("train_accuracy", "accuracy"),)})

  def _predict(self, ctx, state, text_dirs, image_dirs, *, strict: bool):
    return classify.predict_split(
        ctx, state, text_dirs, image_dirs, strict=strict, what="hypothesis",
        check=lambda pipe, split: self.check_pipeline(ctx.config, ctx.data, pipe, split))

  def evaluators(self, ctx: base.RunContext):
    """"ve": accuracy, per gold class, and the majority-class baseline on the val split."""

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      preds, pipe = self._predict(ctx, state, ctx.data.val_text_dirs, ctx.data.val_image_dirs,
                                  strict=False)
      labels = classify.check_labels(pipe, "val", "target", VE_NUM_LABELS, _HOW)
      return {**classify.accuracy_by_class(preds, labels, LABELS, "ve"),
              **classify.skipped(pipe, "hypotheses")}

    return {"ve": evaluate}

  def predictor(self, ctx: base.RunContext):
    def predict(state) -> dict:
      split, text_dirs, image_dirs = classify.predict_dirs(ctx)
      preds, pipe = self._predict(ctx, state, text_dirs, image_dirs, strict=True)
      ids = pipe.planner.text_ids
      rows = [{"id": ids[i], "label": LABELS[preds[i]]} for i in sorted(preds)]
      path = os.path.join(ctx.workdir, "predictions", split, "results.json")
      files.write_bytes(path, json.dumps(rows, indent=0).encode(), overwrite=True)
      labels = classify.check_labels(pipe, split, "target", VE_NUM_LABELS, _HOW)
      return {"predictions": path, "hypotheses": len(rows),
              **classify.accuracy_by_class(preds, labels, LABELS, "ve")}

    return predict


register(VeTask())
