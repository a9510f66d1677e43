"""VCR fine-tuning (docs/official.md, *Downstream heads: VCR*): Q->A and QA->R as a per-choice
binary classifier, trained on both in every update (the official training mixes its qa and
qar datasets), evaluated as Q->A, QA->R (under the gold answer) and Q->AR accuracy.

Text records (the synthetic world's vcr_* splits; VCR converted to the same fields) hold the
question as `input_ids`, the 4 answers and 4 rationales as `input_ids_as` / `input_ids_rs` with
`lens_as` / `lens_rs`, and `qa_target` / `qar_target` (-1 = unknown, a test set).
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import files
from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.models.vcr import vcr_loss
from uniter_jax.tasks import base, classify, register
from uniter_jax.tasks.vcr_inputs import NUM_CHOICES, choice_batch, choice_targets, stacked

HOW = ("VCR texts need input_ids_as / lens_as / input_ids_rs / lens_rs (4 choices each) and "
       "qa_target / qar_target, as the synthetic world's vcr_* splits")
CHOICE_FIELDS = ("input_ids_as", "lens_as", "input_ids_rs", "lens_rs")
KINDS = ("qa", "qar")


class VcrTask(base.Task):
  """UniterForVcr on 4 (question, choice) sequences per question, built in the step."""

  name = "vcr"
  model_class = "UniterForVcr"
  synthetic_splits = ("vcr_train", "vcr_val", "vcr_test")
  step_extra_fields = CHOICE_FIELDS + ("qa_target", "qar_target")

  def check_data(self, config, data) -> None:
    """The longest sequence (question + answer + rationale) must fit the position table."""
    longest = max(config.data.txt_buckets) + 2 * (config.vcr.max_choice_len + 1)
    if longest > config.model.max_position_embeddings:
      raise ValueError(
          f"VCR sequences reach {longest} tokens (text bucket {max(config.data.txt_buckets)} "
          f"+ 2 x (config.vcr.max_choice_len {config.vcr.max_choice_len} + [SEP])) but "
          f"config.model.max_position_embeddings is {config.model.max_position_embeddings}; "
          "lower config.vcr.max_choice_len or config.data.txt_buckets")

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    fields = pipe.planner.fields
    missing = [f for f in CHOICE_FIELDS + ("qa_target", "qar_target") if f not in fields]
    if missing:
      raise fmt.DataError(f"{split}: texts lack {missing} ({HOW})")
    longest = max(max(max(v) for v in fields[k]) for k in ("lens_as", "lens_rs"))
    if longest > config.vcr.max_choice_len:
      raise fmt.DataError(f"{split}: a choice has {longest} tokens, more than "
                          f"config.vcr.max_choice_len={config.vcr.max_choice_len}; raise it")
    counts = {len(v) for k in ("lens_as", "lens_rs") for v in fields[k]}
    if counts != {NUM_CHOICES}:
      raise fmt.DataError(f"{split}: every question needs {NUM_CHOICES} answers and "
                          f"{NUM_CHOICES} rationales; found {sorted(counts)} ({HOW})")
    if pipe.config.shuffle:  # the training pipeline: every question needs its gold choices
      valid = pipe.planner.valid
      unknown = int(np.sum(valid & ((np.asarray(fields["qa_target"]) < 0)
                                    | (np.asarray(fields["qar_target"]) < 0))))
      if unknown:
        raise fmt.DataError(f"{split}: {unknown} questions have no qa_target / qar_target "
                            "(-1); training needs both (a test split goes in "
                            "config.data.test_text_dirs)")

  @staticmethod
  def _score_rows(max_choice_len: int) -> Callable:
    """(model, batch, deterministic, key, answers) -> class-1 logits (K, B, 4) and logits
    (4BK, 2) of K choice sets, in one forward pass: Q->A, then QA->R under each of `answers`
    ((B,) arrays; None = the gold answer)."""
    width = int(max_choice_len)

    def score(model, batch, deterministic, key, answers):
      sets = [choice_batch(batch, "qa", max_choice_len=width)]
      sets += [choice_batch(batch, "qar", max_choice_len=width, answer=a) for a in answers]
      logits = model(stacked(sets), deterministic=deterministic, rngs=key)
      return logits[:, 1].reshape(len(sets), -1, NUM_CHOICES), logits

    return score

  def objective(self, config, data):
    """One branch: each question's Q->A and QA->R sequences in one forward pass, 2-way CE
    per sequence, mean over all 8 (the official loader mixes qa and qar sequences in a batch)."""
    score = self._score_rows(int(config.vcr.max_choice_len))

    def branch(model, batch, key, deterministic):
      scores, logits = score(model, batch, deterministic, key, [None])
      target = jnp.concatenate([choice_targets(batch, k) for k in KINDS])
      aux = {f"{k}_accuracy": jnp.mean((jnp.argmax(scores[i], 1) == batch[f"{k}_target"]
                                        ).astype(jnp.float32)) for i, k in enumerate(KINDS)}
      return vcr_loss(logits, target), aux

    return step_lib.Objective(
        names=(self.name,), losses=(branch,), ratios=(1.0,),
        aux_names=tuple(f"{k}_accuracy" for k in KINDS),
        logged={self.name: tuple((f"train_{k}_accuracy", f"{k}_accuracy") for k in KINDS)})

  # -- evaluation ----------------------------------------------------------------------------
  def _score_fn(self, ctx: base.RunContext, conditioned: bool) -> Callable:
    """Jitted: class-1 logits, qa (B, 4) and qar (B, 4) (gold answer) or qar_all (B, 4, 4)."""
    key = f"vcr_scores_{conditioned}"
    if key not in ctx.cache:
      ctx.cache[key] = make_scorer(ctx.graphdef, int(ctx.config.vcr.max_choice_len),
                                   conditioned)
    return ctx.cache[key]

  def _run(self, ctx, state, text_dirs, image_dirs, *, strict: bool, conditioned: bool):
    pipe = classify.eval_pipeline(
        ctx, text_dirs, image_dirs, strict=strict,
        check=lambda pipe, split: self.check_pipeline(ctx.config, ctx.data, pipe, split))
    rows = classify.run_split(ctx, state, pipe, self._score_fn(ctx, conditioned),
                              what="question", extra_fields=self.step_extra_fields)
    return rows, pipe

  @staticmethod
  def _metrics(rows: dict, pipe) -> dict:
    f = pipe.planner.fields
    idx = np.array(sorted(rows), np.int64)
    qa_t, qar_t = np.asarray(f["qa_target"])[idx], np.asarray(f["qar_target"])[idx]
    known = (qa_t >= 0) & (qar_t >= 0)
    if not known.any():
      return {}
    qa = np.array([rows[i]["qa"].argmax() for i in idx]) == qa_t
    qar = np.array([rows[i]["qar"].argmax() for i in idx]) == qar_t
    chance = 1.0 / rows[int(idx[0])]["qa"].shape[-1]  # a uniform pick among the choices
    return {"vcr/qa_accuracy": float(qa[known].mean()),
            "vcr/qar_accuracy": float(qar[known].mean()),
            "vcr/q_ar_accuracy": float((qa & qar)[known].mean()),
            "vcr/qa_chance": chance, "vcr/qar_chance": chance, "vcr/q_ar_chance": chance ** 2,
            "vcr/questions": int(known.sum()), **classify.skipped(pipe, "questions")}

  def evaluators(self, ctx: base.RunContext):
    """`vcr`: Q->A, QA->R (under the gold answer) and Q->AR accuracy on val."""

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      rows, pipe = self._run(ctx, state, ctx.data.val_text_dirs, ctx.data.val_image_dirs,
                             strict=False, conditioned=False)
      return self._metrics(rows, pipe)

    return {self.name: evaluate}

  def predictor(self, ctx: base.RunContext):
    """The leaderboard CSV: annot_id, answer_0..3, rationale_conditioned_on_a{i}_{j} (logits)."""

    def predict(state) -> dict:
      split, text_dirs, image_dirs = classify.predict_dirs(ctx)
      rows, pipe = self._run(ctx, state, text_dirs, image_dirs, strict=True, conditioned=True)
      header = (["annot_id"] + [f"answer_{i}" for i in range(NUM_CHOICES)]
                + [f"rationale_conditioned_on_a{i}_{j}" for i in range(NUM_CHOICES)
                   for j in range(NUM_CHOICES)])
      ids = pipe.planner.text_ids
      lines = [header] + [[ids[i]] + [f"{v:.6f}" for v in rows[i]["qa"]]
                          + [f"{v:.6f}" for v in rows[i]["qar_all"].reshape(-1)]
                          for i in sorted(rows)]
      path = os.path.join(ctx.workdir, "predictions", split, "vcr_results.csv")
      text = "".join(",".join(map(str, line)) + "\n" for line in lines)
      files.write_bytes(path, text.encode(), overwrite=True)
      # Accuracies as the official test mode would score them (gold answer's rationales).
      scored = {i: {"qa": r["qa"], "qar": r["qar_all"][max(int(
          pipe.planner.fields["qa_target"][i]), 0)]} for i, r in rows.items()}
      return {"predictions": path, "questions": len(rows), **self._metrics(scored, pipe)}

    return predict



def make_scorer(graphdef, max_choice_len: int, conditioned: bool) -> Callable:
  """jit (params, rest, batch) -> class-1 logits: qa (B, 4) and qar (B, 4) under the gold
  answer, or (conditioned, the official test mode) qar_all (B, 4, 4) under each answer."""
  score = VcrTask._score_rows(max_choice_len)  # pylint: disable=protected-access

  def fn(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    if not conditioned:
      s, _ = score(model, batch, True, None, [None])
      return {"qa": s[0], "qar": s[1]}
    answers = [jnp.full_like(batch["qa_target"], a) for a in range(NUM_CHOICES)]
    s, _ = score(model, batch, True, None, answers)
    return {"qa": s[0], "qar_all": jnp.moveaxis(s[1:], 0, 1)}

  return jax.jit(fn)

register(VcrTask())
