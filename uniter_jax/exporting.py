"""What `--mode=export` writes beside the parameters: the run's config, vocab, label list and a
model card, so an export folder can be used and shared without its workdir
(checkpointing.EXPORT_FILES)."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys

import jax
import numpy as np
from flax import nnx

from uniter_jax import checkpointing
from uniter_jax.models import registry
from uniter_jax.tasks.base import DataSpec

def param_count(params) -> int:
  """Number of parameters in a tree of arrays (or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def config_json(config) -> bytes:
  """The resolved config as WORKDIR/config.json and an export's config.json hold it."""
  return config.to_json_best_effort(indent=2, sort_keys=True).encode()


def label_names(task, config, spec: DataSpec) -> tuple[str, ...]:
  """The task's output labels by id: VQA's answer list, a classifier's class names (VE, NLVR2);
  () where outputs are not named classes (pretraining, retrieval, RE boxes, VCR choices)."""
  if hasattr(task, "answers"):
    return tuple(task.answers(config, spec))
  return tuple(getattr(task, "class_names", ()))


def latest_eval(workdir: str, step: int) -> dict | None:
  """The newest row of WORKDIR/eval/metrics.jsonl (training's held-out evals and --mode=eval)
  at or before `step`; a later row belongs to parameters that were never checkpointed."""
  path = os.path.join(workdir, "eval", "metrics.jsonl")
  if not os.path.exists(path):
    return None
  found = None
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:  # a line cut short by a killed run: never a complete eval
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
        found = row
  return found


def _table(rows: list[tuple[str, object]]) -> list[str]:
  """A two-column Markdown table."""
  return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _folders(dirs: list[str]) -> str:
  """Folders as one Markdown cell."""
  return ", ".join(f"`{d}`" for d in dirs) or "-"


def model_card(config, workdir: str, spec: DataSpec, model: nnx.Module, *, step: int,
               eval_row: dict | None, vocab_hash: str | None, labels: tuple[str, ...]) -> str:
  """MODEL_CARD.md: the model, how it was trained, its latest held-out metrics (values as
  repr(float), exactly those of WORKDIR/eval/metrics.jsonl) and how to make it again."""
  from uniter_jax import __version__  # pylint: disable=import-outside-toplevel
  rec = registry.record(model)
  mc = rec["config"]
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  trained = (f"{step} (checkpoint of `{workdir}`; config.total_steps {config.total_steps})"
             if step else f"0: the parameters of config.init_from `{config.init_from}`")
  out = [f"# {rec['model_class']} ({config.task})", "",
         f"Exported by uniter_jax {__version__} on {date} from the workdir `{workdir}`.", "",
         "## Model", "", *_table([
             ("class", f"`{rec['model_class']}`"),
             ("task kwargs", f"`{json.dumps(rec['model_kwargs'], sort_keys=True)}`"),
             ("layers / hidden / heads / intermediate",
              f"{mc['num_layers']} / {mc['hidden_size']} / {mc['num_heads']} / "
              f"{mc['intermediate_size']}"),
             ("vocab / max positions / token types",
              f"{mc['vocab_size']} / {mc['max_position_embeddings']} / {mc['type_vocab_size']}"),
             ("image features / region labels", f"{mc['img_dim']} / {mc['img_label_dim']}"),
             ("parameters", f"{param_count(nnx.state(model, nnx.Param)):,}"),
             ("param dtype / compute dtype", f"{mc['param_dtype']} / {mc['dtype']}"),
             ("labels", f"{len(labels)} ({checkpointing.ANS2LABEL})" if labels else "-")]),
         "", "## Training", "", *_table([
             ("steps trained", trained),
             ("config.init_from", f"`{config.init_from}`" if config.init_from else "-"),
             ("train texts", _folders(spec.text_dirs)),
             ("train images", _folders(spec.image_dirs)),
             ("held-out texts", _folders(spec.val_text_dirs)),
             ("held-out images", _folders(spec.val_image_dirs)),
             ("vocab", f"`{spec.vocab}` (hash {vocab_hash}; copied to {checkpointing.VOCAB})"
              if spec.vocab else "-")]), ""]
  if eval_row:
    out += [f"## Held-out evaluation (step {eval_row['step']})", "",
            f"The latest row of `{os.path.join(workdir, 'eval', 'metrics.jsonl')}`"
            + (f" (the parameters are from step {step})." if eval_row["step"] != step else "."),
            "", "| metric | value |", "|---|---|",
            *(f"| {k} | {v!r} |" for k, v in eval_row.items() if k != "step"), ""]
  else:
    out += ["## Held-out evaluation", "", "None recorded in the workdir "
            "(`eval/metrics.jsonl`): run `--mode=eval`, then export again.", ""]
  return "\n".join(out + _reproduce(config)) + "\n"


def _reproduce(config) -> list[str]:
  """The card's last sections: using the export, and making it again."""
  argv = sys.argv if os.path.basename(sys.argv[0]) == "main.py" else None
  made = ([f"This export was made by `{shlex.join(['python', *argv])}`; the same flags "
           "without `--mode=export` (and with a new `--workdir`) train it again, if training "
           "used them too.", ""] if argv else [])
  return [
      "## Use", "",
      "    import uniter_jax",
      "    from uniter_jax import checkpointing",
      "    model = uniter_jax.load(EXPORT_DIR)  # the model class and sizes of model_config.json",
      "    extras = checkpointing.read_export_extras(EXPORT_DIR)  # vocab, labels, config", "",
      "## Reproduce", "", *made,
      f"`{checkpointing.RUN_CONFIG}` holds every setting of the run that exported (task "
      f"`{config.task}`); training from it:", "",
      "    import json, ml_collections",
      "    from uniter_jax import train",
      f"    with open(\"EXPORT_DIR/{checkpointing.RUN_CONFIG}\") as f:",
      "      config = ml_collections.ConfigDict(json.load(f))",
      "    train.train_and_evaluate(config, \"NEW_WORKDIR\")"]


def export_extras(config, workdir: str, task, spec: DataSpec, model: nnx.Module, *,
                  step: int, vocab_hash: str | None) -> dict[str, bytes]:
  """The files of an export beside its parameters: config.json, vocab.txt (copied),
  ans2label.json (where the task has labels) and MODEL_CARD.md."""
  out = {checkpointing.RUN_CONFIG: config_json(config)}
  if spec.vocab:
    with open(spec.vocab, "rb") as f:
      out[checkpointing.VOCAB] = f.read()
  labels = label_names(task, config, spec)
  if labels:
    out[checkpointing.ANS2LABEL] = json.dumps({a: i for i, a in enumerate(labels)}).encode()
  card = model_card(config, workdir, spec, model, step=step, eval_row=latest_eval(workdir, step),
                    vocab_hash=vocab_hash, labels=labels)
  out[checkpointing.MODEL_CARD] = card.encode()
  return out
