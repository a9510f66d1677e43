"""NLVR2 fine-tuning (docs/official.md, *Downstream heads: NLVR2*): UniterForNlvr2 in the
variant config.nlvr2.variant, 2-way cross-entropy, accuracy and consistency, and the
official `identifier,True|False` CSV."""

from __future__ import annotations

import os

from uniter_jax.data import format as fmt
from uniter_jax.evaluators import nlvr2 as nlvr2_eval
from uniter_jax.models.nlvr2 import VARIANTS, nlvr2_loss
from uniter_jax.tasks import base, classify, register


class Nlvr2Task(classify.LabelTask):
  """A statement about a (left, right) image pair: true (1) or false (0)."""

  name = "nlvr2"
  model_class = "UniterForNlvr2"
  synthetic_splits = ("nlvr2_train", "nlvr2_val", "nlvr2_test")
  class_names = ("false", "true")
  what, whats = "statement", "statements"
  how = "convert NLVR2 with data_prep.nlvr2: two images per text, target 1 = True, 0 = False"
  loss = staticmethod(nlvr2_loss)

  def model_kwargs(self, config, data):
    variant = config.nlvr2.variant
    if variant not in VARIANTS:
      raise ValueError(f"config.nlvr2.variant={variant!r}: choose one of {VARIANTS}")
    return {"variant": variant, "use_img_type": bool(config.nlvr2.use_img_type)}

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    super().check_pipeline(config, data, pipe, split)
    if pipe.planner.images_per_text != 2:
      raise fmt.DataError(f"{split}: NLVR2 texts must name two images (left, right); "
                          f"these name {pipe.planner.images_per_text} ({self.how})")

  def extra_metrics(self, preds, labels, pipe) -> dict:
    """Consistency: the fraction of sentences whose every labelled example is right."""
    idx = [i for i in sorted(preds) if labels[i] >= 0]
    if not idx:
      return {}
    ids = _identifiers(pipe)
    return {"nlvr2/consistency": nlvr2_eval.consistency(
        [ids[i] for i in idx], [preds[i] == labels[i] for i in idx])}

  def write_predictions(self, ctx: base.RunContext, split, preds, pipe) -> str:
    """results.csv: `identifier,True|False` per statement, as train_nlvr2.py writes it."""
    ids = _identifiers(pipe)
    order = sorted(preds)
    path = os.path.join(ctx.workdir, "predictions", split, "results.csv")
    return nlvr2_eval.write_csv(path, [ids[i] for i in order], [preds[i] for i in order])


def _identifiers(pipe) -> list[str]:
  """The NLVR2 identifier of each text (its `identifier` field, else its text id)."""
  return list(pipe.planner.fields.get("identifier") or pipe.planner.text_ids)


register(Nlvr2Task())
