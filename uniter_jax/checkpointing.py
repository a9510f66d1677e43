"""Checkpoints (orbax) with exact resume, and msgpack export / import of parameters."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, serialization

from uniter_jax import files, pytree
from uniter_jax.models import registry


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
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, partial_restore=True)))
  return restored["state"]["params"]


# ---------------------------------------------------------------------------------------
# msgpack export

MODEL_RECORD = "model_config.json"  # {"model_class", "model_kwargs", "config"}
PARAMS = "params.msgpack"


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
  it): only params.msgpack and a model_config.json that names a model class."""
  if not os.path.isdir(directory):
    return "is not a folder"
  other = sorted(set(os.listdir(directory)) - {PARAMS, MODEL_RECORD})
  if other:
    return f"holds files an export does not write ({', '.join(other[:5])})"
  if not is_model_record(os.path.join(directory, MODEL_RECORD)):
    return f"has no {MODEL_RECORD} written by an export"
  return None


def export_msgpack(model: nnx.Module, directory: str, *, overwrite: bool = False) -> str:
  """Writes DIR/params.msgpack (pure dict of parameters) and DIR/model_config.json as one unit:
  both go to a fresh folder that is renamed into place, so DIR never holds the params of one
  model beside the config of another. An existing DIR is replaced only with overwrite
  (config.export_overwrite) and when it is an export (not_an_export)."""
  directory = os.path.abspath(directory)
  flag = "overwrite=True (--config.export_overwrite=True)"
  files.check_replaceable(directory, overwrite=overwrite, not_ours=not_an_export, flag=flag)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  tmp = files.temp_dir_beside(directory)
  try:
    files.write_bytes(os.path.join(tmp, PARAMS), serialization.msgpack_serialize(params),
                      overwrite=False)
    write_model_record(os.path.join(tmp, MODEL_RECORD), registry.record(model), overwrite=False)
    files.publish_dir(tmp, directory, overwrite=overwrite, not_ours=not_an_export, flag=flag)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(directory, PARAMS)


def read_msgpack(path: str) -> dict:
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def load_params_into(model: nnx.Module, pure: dict, *, strict: bool = True,
                     where: str = "") -> list[str]:
  """Copies a pure parameter dict into `model`. Returns the model paths left untouched.

  With strict, a missing or extra parameter is an error naming it; shapes must match,
  except tables the model declares grown from fewer pretrained rows (registry.grow_table).
  Extra top-level heads in `pure` (e.g. pretraining heads when fine-tuning) are allowed
  when strict=False, and parameters the file lacks keep their init.
  """
  state = nnx.state(model, nnx.Param)
  flat_ours = pytree.flatten(nnx.to_pure_dict(state))
  flat_in = pytree.flatten(pure)
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
