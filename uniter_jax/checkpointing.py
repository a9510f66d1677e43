"""Checkpoints (orbax) with exact resume; msgpack export (with its vocab, labels, config and
model card) and import of parameters."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, serialization

from uniter_jax import files, pytree
from uniter_jax.models import registry


# Orbax splits each replicated array among its replicas to save it (replica-parallel), slicing
# every array with a compiled program of its own: ~120 programs for the tiny model on 8 CPU
# devices, a first save of 58 s instead of 2 s here (measured under load). Arrays whose slice per
# replica would be under 1 MiB (biases, norms, every array of a small model) are written by one
# replica instead; large ones are still split. Checkpoints written either way restore alike.
def _save_small_arrays_whole() -> None:
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns of any override; this one is meant
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(ocp.type_handlers.get_type_handler(jax.Array),
                                     "_array_metadata_store", None),  # the default handler's
        min_slice_bytes_for_replica_parallel=1 << 20), override=True)
  finally:
    absl_logger.setLevel(level)


_save_small_arrays_whole()


def make_manager(directory: str, *, max_to_keep: int = 3, async_save: bool = True
                 ) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` holding the train state and the data position."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data"))


def latest_step(directory: str) -> int | None:
  """The newest checkpoint step under `directory` (None when there is none), read-only."""
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory)
           if d.isdigit() and os.path.isdir(os.path.join(directory, d))]
  return max(steps) if steps else None


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None,
         *, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})),
      force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target for `state`'s layout."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, dict, int] | None:
  """Restores the latest (or given) step into `abstract_state`'s shapes and shardings.

  The target's shardings decide the layout, so a checkpoint saved on 8 devices restores on
  1 and vice versa. Returns None when the directory has no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return out["state"], dict(out["data"] or {}), step


def restore_params_from_orbax(directory: str, abstract_params: Any) -> Any:
  """Only the parameters of the latest checkpoint under `directory` (for init_from)."""
  mngr = make_manager(directory, async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory}: no orbax checkpoint found (expected step folders)")
  target = {"params": abstract_params}
  # Restore args from the target's shardings: the arrays land where the caller asked (one
  # device for uniter_jax.load, the run's mesh for init_from), not on the saving run's devices.
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(
                                       target))))
  return restored["state"]["params"]


# ---------------------------------------------------------------------------------------
# msgpack export

MODEL_RECORD = "model_config.json"  # {"model_class", "model_kwargs", "config"}
PARAMS = "params.msgpack"
# What --mode=export writes beside those two (uniter_jax.exporting.export_extras); each may be absent
# (a run without a vocab or a label list, or an export written before they were added).
VOCAB = "vocab.txt"  # the run's vocabulary, copied byte for byte
ANS2LABEL = "ans2label.json"  # {label: output id}: VQA's answers, a classifier's class names
RUN_CONFIG = "config.json"  # the resolved config of the run that exported
MODEL_CARD = "MODEL_CARD.md"  # what the model is, how it was trained, its held-out metrics
EXTRA_FILES = (VOCAB, ANS2LABEL, RUN_CONFIG, MODEL_CARD)
EXPORT_FILES = frozenset((PARAMS, MODEL_RECORD) + EXTRA_FILES)


def write_model_record(path: str, rec: dict, *, overwrite: bool) -> None:
  files.write_bytes(path, json.dumps(rec, indent=2).encode(), overwrite=overwrite)


def read_model_record(path: str) -> dict:
  """A model_config.json written by an export or a training run."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: an export folder or workdir holds the "
                            "model_config.json that names the model class and its config")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def is_model_record(path: str) -> bool:
  """Whether `path` is a model_config.json this project wrote (it names a model class)."""
  try:
    rec = read_model_record(path)
  except (OSError, ValueError):
    return False
  return isinstance(rec, dict) and "model_class" in rec


def not_an_export(directory: str) -> str | None:
  """Why `directory` is not an export this project wrote (None: it is, and overwrite may replace
  it): plain files named as an export's (EXPORT_FILES) only, and a model_config.json that names a
  model class."""
  if not os.path.isdir(directory):
    return "is not a folder"
  entries = set(os.listdir(directory))
  other = sorted(entries - EXPORT_FILES)
  if other:
    return f"holds files an export does not write ({', '.join(other[:5])})"
  # Replacing the folder deletes what is inside: a folder under an export file's name is not ours.
  odd = sorted(e for e in entries if os.path.islink(os.path.join(directory, e))
               or not os.path.isfile(os.path.join(directory, e)))
  if odd:
    return f"holds {', '.join(odd)}, which an export writes as a plain file"
  if not is_model_record(os.path.join(directory, MODEL_RECORD)):
    return f"has no {MODEL_RECORD} written by an export"
  return None


def write_export_files(model: nnx.Module, directory: str,
                       extras: Mapping[str, bytes] | None = None) -> None:
  """Writes params.msgpack, model_config.json and `extras` ({name in EXTRA_FILES: bytes}) into
  the existing folder `directory` (a fresh temporary folder: nothing there is replaced)."""
  extras = dict(extras or {})
  unknown = sorted(set(extras) - set(EXTRA_FILES))
  if unknown:  # not_an_export would then refuse to replace the export with a later one
    raise ValueError(f"{unknown}: not files an export holds ({', '.join(EXTRA_FILES)})")
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  files.write_bytes(os.path.join(directory, PARAMS), serialization.msgpack_serialize(params),
                    overwrite=False)
  write_model_record(os.path.join(directory, MODEL_RECORD), registry.record(model),
                     overwrite=False)
  for name, data in extras.items():
    files.write_bytes(os.path.join(directory, name), data, overwrite=False)


def export_msgpack(model: nnx.Module, directory: str, *, overwrite: bool = False,
                   extras: Mapping[str, bytes] | None = None) -> str:
  """Writes DIR/params.msgpack (pure dict of parameters), DIR/model_config.json and `extras`
  (the other EXPORT_FILES, as bytes) as one unit: all go to a fresh folder that is renamed into
  place, so DIR never holds the params of one model beside the config, vocab or answers of
  another. Files are 0644, DIR 0755 (an export is for sharing). An existing DIR is replaced only
  with overwrite (config.export_overwrite) and when it is an export (not_an_export)."""
  directory = os.path.abspath(directory)
  flag = "overwrite=True (--config.export_overwrite=True)"
  files.check_replaceable(directory, overwrite=overwrite, not_ours=not_an_export, flag=flag)
  tmp = files.temp_dir_beside(directory)
  try:
    write_export_files(model, tmp, extras)
    files.make_shareable(tmp)
    files.publish_dir(tmp, directory, overwrite=overwrite, not_ours=not_an_export, flag=flag)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(directory, PARAMS)


@dataclasses.dataclass(frozen=True)
class ExportExtras:
  """What an export holds beside its parameters; None where it lacks that file."""

  vocab: str | None  # path of vocab.txt (tokenise inputs with it)
  ans2label: dict[str, int] | None  # ans2label.json: {label: output id}
  labels: tuple[str, ...] | None  # label of each output id (ans2label inverted)
  config: dict | None  # config.json: the resolved config of the run that exported
  model_card: str | None  # path of MODEL_CARD.md


def read_export_extras(path: str) -> ExportExtras:
  """The vocab, label list, run config and model card of an export folder (or of the folder of
  its params.msgpack). An export written before these files existed gives None for each."""
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  rec = read_model_record(os.path.join(directory, MODEL_RECORD))  # an export, not any folder
  found = {n: os.path.join(directory, n) for n in EXTRA_FILES
           if os.path.isfile(os.path.join(directory, n))}
  labels = _read_labels(found[ANS2LABEL], rec) if ANS2LABEL in found else None
  config = None
  if RUN_CONFIG in found:
    with open(found[RUN_CONFIG], encoding="utf-8") as f:
      config = json.load(f)
  return ExportExtras(
      vocab=found.get(VOCAB), labels=labels, config=config, model_card=found.get(MODEL_CARD),
      ans2label=None if labels is None else {a: i for i, a in enumerate(labels)})


def _read_labels(path: str, rec: dict) -> tuple[str, ...]:
  """The labels of ans2label.json by id, checked (ids 0..N-1, each once) as training checks a
  VQA answer list, and against the recorded model's answer count."""
  from uniter_jax.tasks import vqa  # pylint: disable=import-outside-toplevel
  # Read here, not through vqa.read_answers' cache: an export may be replaced by a newer one
  # within one process.
  with open(path, encoding="utf-8") as f:
    labels = vqa.answers_of(json.load(f), path)
  n = (rec.get("model_kwargs") or {}).get("num_answers")
  if n is not None and n != len(labels):
    raise ValueError(f"{path}: {len(labels)} labels, but the model ({MODEL_RECORD}) has {n} "
                     "answers; the export's files belong to different models")
  return labels


def read_msgpack(path: str) -> dict:
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def load_params_into(model: nnx.Module, pure: dict, *, strict: bool = True,
                     where: str = "") -> list[str]:
  """Copies a pure parameter dict into `model`. Returns the model paths left untouched.

  With strict, a missing or extra parameter is an error naming it; shapes must match,
  except tables the model declares grown from fewer pretrained rows (registry.grow_table;
  heads the model re-initialises then are not read, registry.fresh_heads). Extra top-level
  heads in `pure` (e.g. pretraining heads when fine-tuning) are allowed when strict=False,
  and parameters the file lacks keep their init.
  """
  state = nnx.state(model, nnx.Param)
  flat_ours = pytree.flatten(nnx.to_pure_dict(state))
  flat_in = pytree.flatten(pure)
  # Heads the model re-initialises when a table grows (VCR 2nd stage's MLM head) stay at init.
  fresh = registry.fresh_heads(model, lambda p: np.shape(flat_in[p])[0] if p in flat_in
                               else None)
  flat_in = {k: v for k, v in flat_in.items() if k[0] not in fresh}
  for k, v in list(flat_in.items()):  # e.g. NLVR2's 3-row type table from a 2-row one
    grown = registry.grow_table(model, k, v)
    if grown is not None:
      flat_in[k] = grown
  flat_in = registry.copy_units(model, flat_in)  # e.g. retrieval's rank_output from ITM
  missing = sorted(set(flat_ours) - set(flat_in))
  extra = sorted(set(flat_in) - set(flat_ours))
  if strict and (missing or extra):
    raise ValueError(f"{where}: parameters do not match the model: missing {missing[:10]}, "
                     f"unexpected {extra[:10]}")
  for k in set(flat_ours) & set(flat_in):
    if tuple(np.shape(flat_ours[k])) != tuple(np.shape(flat_in[k])):
      raise ValueError(f"{where}: parameter {'/'.join(k)} has shape {np.shape(flat_in[k])} "
                       f"in the file but {np.shape(flat_ours[k])} in the model")
  merged = {k: flat_in.get(k, v) for k, v in flat_ours.items()}
  nnx.replace_by_pure_dict(state, pytree.unflatten(merged))
  nnx.update(model, state)
  return ["/".join(k) for k in missing]


def load_msgpack(path: str, model: nnx.Module | None = None, *, strict: bool = True
                 ) -> nnx.Module:
  """Loads a params.msgpack into `model`, or into the model its model_config.json names."""
  if model is None:
    rec_path = os.path.join(os.path.dirname(path), MODEL_RECORD)
    # Shapes only when every parameter comes from the file (no random init to pay for).
    model = registry.build_from_record(read_model_record(rec_path), abstract=strict,
                                       where=rec_path)
  load_params_into(model, read_msgpack(path), strict=strict, where=path)
  return model
