"""NLVR2 fine-tuning (docs/official.md, *Downstream heads: NLVR2*): UniterForNlvr2 in the
variant config.nlvr2.variant, 2-way cross-entropy, accuracy and consistency, and the
official `identifier,True|False` CSV."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import nlvr2 as nlvr2_eval
from uniter_jax.models.nlvr2 import VARIANTS, nlvr2_loss
from uniter_jax.tasks import base, classify, register

_HOW = "convert NLVR2 with data_prep.nlvr2: two images per text, target 1 = True, 0 = False"


def _nlvr2_branch(model, batch, key, deterministic):
  logits = model(batch, deterministic=deterministic, rngs=key)
  target = batch["target"]
  accuracy = jnp.mean((jnp.argmax(logits, -1) == target).astype(jnp.float32))
  return nlvr2_loss(logits, target), {"accuracy": accuracy}


class Nlvr2Task(base.Task):
  """A statement about a (left, right) image pair: true or false."""

  name = "nlvr2"
  model_class = "UniterForNlvr2"
  synthetic_splits = ("nlvr2_train", "nlvr2_val", "nlvr2_test")
  step_extra_fields = ("target",)

  def model_kwargs(self, config, data):
    variant = config.nlvr2.variant
    if variant not in VARIANTS:
      raise ValueError(f"config.nlvr2.variant={variant!r}: choose one of {VARIANTS}")
    return {"variant": variant, "use_img_type": bool(config.nlvr2.use_img_type)}

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    classify.check_labels(pipe, split, "target", 2, _HOW)
    if pipe.planner.images_per_text != 2:
      raise fmt.DataError(f"{split}: NLVR2 texts must name two images (left, right); "
                               f"these name {pipe.planner.images_per_text} ({_HOW})")

  def objective(self, config, data):
    return step_lib.Objective(names=("nlvr2",), losses=(_nlvr2_branch,), ratios=(1.0,),
                              aux_names=("accuracy",),
                              logged={"nlvr2": (("train_accuracy", "accuracy"),)})

  def _predict(self, ctx, state, text_dirs, image_dirs, *, strict: bool):
    return classify.predict_split(
        ctx, state, text_dirs, image_dirs, strict=strict, what="statement",
        check=lambda pipe, split: self.check_pipeline(ctx.config, ctx.data, pipe, split))

  @staticmethod
  def _scores(preds: dict[int, int], pipe) -> dict:
    """Accuracy, consistency and the majority baseline over the labelled statements."""
    labels = np.asarray(pipe.planner.fields["target"])
    out = classify.accuracy_by_class(preds, labels, ("false", "true"), "nlvr2")
    idx = [i for i in sorted(preds) if labels[i] >= 0]
    if idx:
      ids = _identifiers(pipe)
      out["nlvr2/consistency"] = nlvr2_eval.consistency(
          [ids[i] for i in idx], [preds[i] == labels[i] for i in idx])
    return out

  def evaluators(self, ctx: base.RunContext):
    """"nlvr2": accuracy (overall, per gold label), consistency, majority baseline on val."""

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      preds, pipe = self._predict(ctx, state, ctx.data.val_text_dirs, ctx.data.val_image_dirs,
                                  strict=False)
      return {**self._scores(preds, pipe), **classify.skipped(pipe, "statements")}

    return {"nlvr2": evaluate}

  def predictor(self, ctx: base.RunContext):
    def predict(state) -> dict:
      split, text_dirs, image_dirs = classify.predict_dirs(ctx)
      preds, pipe = self._predict(ctx, state, text_dirs, image_dirs, strict=True)
      ids = _identifiers(pipe)
      order = sorted(preds)
      path = os.path.join(ctx.workdir, "predictions", split, "results.csv")
      nlvr2_eval.write_csv(path, [ids[i] for i in order], [preds[i] for i in order])
      return {"predictions": path, "statements": len(order), **self._scores(preds, pipe)}

    return predict


def _identifiers(pipe) -> list[str]:
  """The NLVR2 identifier of each text (its `identifier` field, else its text id)."""
  return list(pipe.planner.fields.get("identifier") or pipe.planner.text_ids)


register(Nlvr2Task())
