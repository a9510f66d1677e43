"""VQA fine-tuning (docs/official.md, *Downstream heads: VQA*): UniterForVqa, soft-score BCE,
VQA accuracy, results.json."""

from __future__ import annotations

import functools
import json
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uniter_jax import checkpointing, train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import vqa as vqa_eval
from uniter_jax.models.vqa import vqa_loss
from uniter_jax.tasks import base, classify, register

ANS2LABEL = checkpointing.ANS2LABEL  # in a VQA dataset folder as in an export


def soft_targets(labels: jax.Array, scores: jax.Array, num_answers: int) -> jax.Array:
  """(B, F) answer ids (-1 = padding) and scores -> dense (B, num_answers) targets."""
  hot = jax.nn.one_hot(labels, num_answers, dtype=jnp.float32)  # -1 -> all zeros
  return jnp.sum(hot * scores[..., None].astype(jnp.float32), axis=1)


def _vqa_branch(model, batch, key, deterministic, *, num_answers):
  logits = model(batch, deterministic=deterministic, rngs=key)
  targets = soft_targets(batch["labels"], batch["scores"], num_answers)
  pred = jnp.argmax(logits, axis=-1)
  score = jnp.mean(jnp.take_along_axis(targets, pred[:, None], axis=1))
  return vqa_loss(logits, targets), {"score": score}


def ans2label_path(config, data: base.DataSpec) -> str:
  """config.data.ans2label, else the first train folder's ans2label.json."""
  return config.data.get("ans2label", "") or os.path.join(data.text_dirs[0], ANS2LABEL)


@functools.lru_cache(maxsize=8)
def read_answers(path: str) -> tuple[str, ...]:
  """label -> answer string, from an ans2label.json ({answer: id}, ids 0..N-1)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no answer vocabulary; write one with data_prep.vqa or set "
                            "--config.data.ans2label=PATH")
  with open(path, encoding="utf-8") as f:
    return answers_of(json.load(f), path)


def answers_of(a2l: Mapping[str, int], where: str = "ans2label") -> tuple[str, ...]:
  """{answer: id} with ids 0..N-1 -> the answers in id order."""
  label2ans = [""] * len(a2l)
  for a, i in a2l.items():
    if not 0 <= int(i) < len(a2l) or label2ans[int(i)]:
      raise ValueError(f"{where}: answer ids must be 0..{len(a2l) - 1}, each once ({a!r}: {i})")
    label2ans[int(i)] = a
  return tuple(label2ans)


class VqaTask(base.Task):
  """UniterForVqa over the answer vocabulary; lr_mul for the head comes from the config."""

  name = "vqa"
  model_class = "UniterForVqa"
  synthetic_splits = ("vqa_train", "vqa_val", "vqa_test")
  step_extra_fields = ("labels", "scores")

  def answers(self, config, data: base.DataSpec) -> tuple[str, ...]:
    return read_answers(ans2label_path(config, data))

  def check_data(self, config, data):
    self.answers(config, data)

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    """Answer ids must index the vocabulary; a split with no question is an error."""
    n = len(self.answers(config, data))
    labels = pipe.planner.fields.get("labels")
    if labels is None:
      raise fmt.DataError(f"{split} texts have no 'labels' field: not VQA records "
                          "(convert with data_prep.vqa)")
    top = max((int(np.max(l)) for l in labels if len(l)), default=-1)
    if top >= n:
      raise fmt.DataError(f"{split} texts use answer id {top}, outside the {n}-answer "
                          "vocabulary; convert the data with the same ans2label.json")

  def model_kwargs(self, config, data):
    return {"num_answers": len(self.answers(config, data))}

  def objective(self, config, data):
    n = len(self.answers(config, data))
    return step_lib.Objective(
        names=("vqa",), losses=(functools.partial(_vqa_branch, num_answers=n),),
        ratios=(1.0,), aux_names=("score",), logged={"vqa": (("train_score", "score"),)})

  # -- evaluation ------------------------------------------------------------------------------
  def _predict_split(self, ctx: base.RunContext, state, text_dirs, image_dirs, *, strict: bool):
    """Argmax answer id of every question of a split: {text index: answer id}, pipeline."""
    return classify.predict_split(
        ctx, state, text_dirs, image_dirs, strict=strict, what="question",
        check=lambda pipe, split: self.check_pipeline(ctx.config, ctx.data, pipe, split))

  def evaluators(self, ctx: base.RunContext):
    """"vqa": VQA accuracy (overall and per answer type) on the whole val split."""
    label2ans = self.answers(ctx.config, ctx.data)

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      preds, pipe = self._predict_split(ctx, state, ctx.data.val_text_dirs,
                                        ctx.data.val_image_dirs, strict=False)
      return {**vqa_eval.score_split(preds, label2ans, pipe.planner.fields),
              **classify.skipped(pipe, "questions")}

    return {"vqa": evaluate}

  def predictor(self, ctx: base.RunContext):
    label2ans = self.answers(ctx.config, ctx.data)

    def predict(state) -> dict:
      split, text_dirs, image_dirs = classify.predict_dirs(ctx)
      # Every question must be answered: a question whose image is missing is an error here.
      preds, pipe = self._predict_split(ctx, state, text_dirs, image_dirs, strict=True)
      qids = vqa_eval.question_ids(pipe.planner.text_ids, pipe.planner.fields)
      order = sorted(preds)
      path = os.path.join(ctx.workdir, "predictions", split, "results.json")
      vqa_eval.write_results(path, [qids[i] for i in order], [label2ans[preds[i]] for i in order])
      out = {"predictions": path, "questions": len(order)}
      f = pipe.planner.fields
      if "answers" in f or ("labels" in f and "scores" in f):  # a split with answers
        out.update(vqa_eval.score_split(preds, label2ans, f))
      return out

    return predict


register(VqaTask())
