"""What the classification tasks share: the argmax of every text of a split, and the split
the predictor writes. VQA (answer vocabulary), SNLI-VE (3 labels) and NLVR2 (true / false)
build on it; each adds its loss, metrics and result file."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.tasks import base


def host(x) -> np.ndarray:
  """A global array on every host (the eval outputs are small)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _argmax_fn(ctx: base.RunContext) -> Callable:
  """One jitted argmax per run (kept in ctx.cache: it compiles once per batch shape)."""
  if "argmax" not in ctx.cache:
    graphdef = ctx.graphdef

    def predict(params, rest, batch):
      model = nnx.merge(graphdef, params, rest)
      return jnp.argmax(model(batch, deterministic=True), axis=-1)

    ctx.cache["argmax"] = jax.jit(predict)
  return ctx.cache["argmax"]


def predict_split(ctx: base.RunContext, state, text_dirs, image_dirs, *, strict: bool,
                  check: Callable | None = None, what: str = "text"
                  ) -> tuple[dict[int, int], object]:
  """Argmax class of every text of a split: ({text index: class id}, the pipeline).

  Every text is visited exactly once (eval batches pad the last one with empty rows);
  `check(pipe, split_name)` validates the split's fields before anything runs.
  """
  pipe = ctx.pipeline(text_dirs, image_dirs, train=False, drop_remainder=False,
                      num_epochs=1, strict=strict)
  if check is not None:
    check(pipe, ",".join(text_dirs))
  fn = _argmax_fn(ctx)
  preds: dict[int, int] = {}
  with jax.set_mesh(ctx.mesh):
    for batch in pipe:
      top = host(fn(state["params"], state["rest"], step_lib.model_fields(batch)))
      for i, a in zip(host(batch["example_index"]).tolist(), top.tolist()):
        if i < 0:  # a padding row of the last batch
          continue
        if i in preds:
          raise RuntimeError(f"{what} #{i} was predicted twice; the eval pipeline must "
                             f"visit each {what} once")
        preds[i] = a
  expected = set(np.nonzero(pipe.planner.valid)[0].tolist())
  lost = expected - set(preds)
  if lost:
    raise RuntimeError(f"{len(lost)} {what}s got no prediction (e.g. {sorted(lost)[:5]})")
  return preds, pipe


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
