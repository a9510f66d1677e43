"""What the classification tasks share: the argmax of every text of a split, the split the
predictor writes, accuracy per class, and LabelTask (one int label per text). VQA (answer
vocabulary) uses the first parts; SNLI-VE (3 labels) and NLVR2 (true / false) are LabelTasks
that add their loss, metrics and result file."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import sharding
from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.tasks import base


def _argmax_fn(ctx: base.RunContext) -> Callable:
  """One jitted argmax per run (kept in ctx.cache: it compiles once per batch shape)."""
  if "argmax" not in ctx.cache:
    graphdef = ctx.graphdef

    def predict(params, rest, batch):
      model = nnx.merge(graphdef, params, rest)
      return {"argmax": jnp.argmax(model(batch, deterministic=True), axis=-1)}

    ctx.cache["argmax"] = jax.jit(predict)
  return ctx.cache["argmax"]


def run_split(ctx: base.RunContext, state, pipe, fn: Callable, *, what: str = "text",
              extra_fields: tuple[str, ...] = ()) -> dict[int, dict[str, np.ndarray]]:
  """Runs the jitted `fn(params, rest, model_batch) -> {name: (B, ...)}` over an eval
  pipeline; returns {text index: {name: that text's row}}. `extra_fields`: task fields
  the function reads besides the model's.

  Every text is visited exactly once (eval batches pad the last one with empty rows).
  """
  rows: dict[int, dict[str, np.ndarray]] = {}
  with jax.set_mesh(ctx.mesh):
    for batch in pipe:
      inputs = {**step_lib.model_fields(batch), **{k: batch[k] for k in extra_fields}}
      out = {k: sharding.to_host(v)
             for k, v in fn(state["params"], state["rest"], inputs).items()}
      for r, i in enumerate(sharding.to_host(batch["example_index"]).tolist()):
        if i < 0:  # a padding row of the last batch
          continue
        if i in rows:
          raise RuntimeError(f"{what} #{i} was predicted twice; the eval pipeline must "
                             f"visit each {what} once")
        rows[i] = {k: v[r] for k, v in out.items()}
  expected = set(np.nonzero(pipe.planner.valid)[0].tolist())
  lost = expected - set(rows)
  if lost:
    raise RuntimeError(f"{len(lost)} {what}s got no prediction (e.g. {sorted(lost)[:5]})")
  return rows


def eval_pipeline(ctx: base.RunContext, text_dirs, image_dirs, *, strict: bool,
                  check: Callable | None = None):
  """One pass over a split in order; `check(pipe, split_name)` validates its fields first."""
  pipe = ctx.pipeline(text_dirs, image_dirs, train=False, drop_remainder=False,
                      num_epochs=1, strict=strict)
  if check is not None:
    check(pipe, ",".join(text_dirs))
  return pipe


def predict_split(ctx: base.RunContext, state, text_dirs, image_dirs, *, strict: bool,
                  check: Callable | None = None, what: str = "text"
                  ) -> tuple[dict[int, int], object]:
  """Argmax class of every text of a split: ({text index: class id}, the pipeline)."""
  pipe = eval_pipeline(ctx, text_dirs, image_dirs, strict=strict, check=check)
  rows = run_split(ctx, state, pipe, _argmax_fn(ctx), what=what)
  return {i: int(r["argmax"]) for i, r in rows.items()}, pipe


def predict_dirs(ctx: base.RunContext) -> tuple[str, list[str], list[str]]:
  """(split name, text dirs, image dirs) that --mode=predict writes (config.predict_split)."""
  split = ctx.config.get("predict_split", "test")
  dirs = {"test": (ctx.data.test_text_dirs, ctx.data.test_image_dirs),
          "val": (ctx.data.val_text_dirs, ctx.data.val_image_dirs)}
  if split not in dirs:
    raise ValueError(f"config.predict_split={split!r}: use 'test' or 'val'")
  if not dirs[split][0]:
    raise ValueError(f"no {split} texts: set --config.data.{split}_text_dirs")
  return (split,) + dirs[split]


def skipped(pipe, what: str = "texts") -> dict:
  """{"skipped_<what>": n} when the split had texts the pipeline could not use (else {})."""
  n = int(np.sum(~pipe.planner.valid))
  return {f"skipped_{what}": n} if n else {}


def check_labels(pipe, split: str, field: str, num_classes: int, how: str) -> np.ndarray:
  """The split's int labels; a missing field or a label outside 0..num_classes-1 is an error."""
  labels = pipe.planner.fields.get(field)
  if labels is None:
    raise fmt.DataError(f"{split}: texts have no {field!r} field ({how})")
  labels = np.asarray(labels)
  bad = labels[(labels < -1) | (labels >= num_classes)]
  if bad.size:
    raise fmt.DataError(f"{split}: label {int(bad[0])} in {field!r} is outside "
                         f"0..{num_classes - 1} ({how})")
  return labels


def accuracy_by_class(preds: dict[int, int], labels: np.ndarray, names: tuple[str, ...],
                      prefix: str) -> dict[str, float]:
  """Accuracy over the labelled texts (label -1 = unlabelled, left out), and per gold class."""
  idx = np.array(sorted(i for i in preds if labels[i] >= 0), np.int64)
  if not idx.size:
    return {}
  gold = labels[idx]
  hit = np.array([preds[i] for i in idx.tolist()]) == gold
  out = {f"{prefix}/accuracy": float(hit.mean()), f"{prefix}/examples": int(idx.size)}
  for c, name in enumerate(names):
    if np.any(gold == c):
      out[f"{prefix}/accuracy_{name}"] = float(hit[gold == c].mean())
  # What always answering the most frequent gold class would score (chance reference).
  out[f"{prefix}/majority_baseline"] = float(np.bincount(gold).max() / gold.size)
  return out


class LabelTask(base.Task):
  """A task whose texts carry one int `target` (a class id): SNLI-VE, NLVR2.

  Subclasses set `class_names`, `what` / `whats` (a text, singular and plural: "statement",
  "statements"), `how` (how to make such data, for error messages) and `loss(logits, target)`; they may add metrics
  (`extra_metrics`) and must say how predictions are written (`write_predictions`).
  """

  step_extra_fields = ("target",)
  class_names: tuple[str, ...] = ()
  what, whats = "text", "texts"
  how = ""

  @staticmethod
  def loss(logits, target):
    raise NotImplementedError

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    check_labels(pipe, split, "target", len(self.class_names), self.how)

  def objective(self, config, data):
    def branch(model, batch, key, deterministic):
      logits = model(batch, deterministic=deterministic, rngs=key)
      target = batch["target"]
      accuracy = jnp.mean((jnp.argmax(logits, -1) == target).astype(jnp.float32))
      return self.loss(logits, target), {"accuracy": accuracy}

    return step_lib.Objective(names=(self.name,), losses=(branch,), ratios=(1.0,),
                              aux_names=("accuracy",),
                              logged={self.name: (("train_accuracy", "accuracy"),)})

  def _predict(self, ctx: base.RunContext, state, text_dirs, image_dirs, *, strict: bool):
    return predict_split(
        ctx, state, text_dirs, image_dirs, strict=strict, what=self.what,
        check=lambda pipe, split: self.check_pipeline(ctx.config, ctx.data, pipe, split))

  def scores(self, preds: dict[int, int], pipe) -> dict:
    """Accuracy (overall, per gold class), the majority baseline and extra_metrics."""
    labels = np.asarray(pipe.planner.fields["target"])
    return {**accuracy_by_class(preds, labels, self.class_names, self.name),
            **self.extra_metrics(preds, labels, pipe)}

  def extra_metrics(self, preds: dict[int, int], labels: np.ndarray, pipe) -> dict:
    del preds, labels, pipe
    return {}

  def write_predictions(self, ctx: base.RunContext, split: str, preds: dict[int, int],
                        pipe) -> str:
    """Writes the task's result file under WORKDIR/predictions/<split>/; returns its path."""
    raise NotImplementedError

  def evaluators(self, ctx: base.RunContext):
    """`<name>`: the held-out (val) scores of every labelled text."""

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      preds, pipe = self._predict(ctx, state, ctx.data.val_text_dirs, ctx.data.val_image_dirs,
                                  strict=False)
      return {**self.scores(preds, pipe), **skipped(pipe, self.whats)}

    return {self.name: evaluate}

  def predictor(self, ctx: base.RunContext):
    def predict(state) -> dict:
      split, text_dirs, image_dirs = predict_dirs(ctx)
      # Every text must get a prediction: one whose image is missing is an error here.
      preds, pipe = self._predict(ctx, state, text_dirs, image_dirs, strict=True)
      path = self.write_predictions(ctx, split, preds, pipe)
      return {"predictions": path, self.whats: len(preds), **self.scores(preds, pipe)}

    return predict
