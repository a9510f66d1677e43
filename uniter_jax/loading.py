"""`uniter_jax.load(path)`: the right model, with its parameters, from anything we write or read.

Accepted sources:
  * an export folder (params.msgpack + model_config.json), or the params.msgpack itself;
  * a training workdir (model_config.json + checkpoints/), or its checkpoints/ folder:
    the parameters of the latest orbax checkpoint;
  * an official UNITER checkpoint (.pt / .bin / .npz / .safetensors), with its official
    config JSON (`config=`) or sizes read off the weights; the task (pretraining or VQA) is
    read off the head names unless `task=` says it.

With `mesh=` every parameter is placed on that mesh, sharded by its logical axis names through
the rules table (`rules=`, default the configs' FSDP rules), as the trainer places its state;
an orbax checkpoint is restored straight into those shardings (no whole copy on one device).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from uniter_jax import checkpointing, sharding
from uniter_jax.models import registry

_OFFICIAL_SUFFIXES = (".pt", ".bin", ".pth", ".npz", ".safetensors")


def load(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | Mapping[str, int] | None = None,
         rules: sharding.Rules | None = None, config: Any = None, task: str | None = None,
         **task_kwargs: Any) -> nnx.Module:
  """The model stored at `path`, built from its own record (see the module docstring).

  mesh: a jax Mesh, or its shape ({"data": 4, "fsdp": 2}; -1 = the remaining devices), to
  shard the parameters over (default: one device). rules: the logical-axis rules table
  (default sharding.FSDP_RULES, the configs' `sharding_rules`).
  config / task / task_kwargs apply to official checkpoints only (see
  uniter_jax.interop.load_official_checkpoint).
  """
  path = os.fspath(path)
  if rules is not None and mesh is None:
    raise ValueError("load: rules= places parameters on a mesh; pass mesh= too")
  mesh = as_mesh(mesh)
  rules = sharding.FSDP_RULES if rules is None else rules
  if path.endswith(_OFFICIAL_SUFFIXES):
    return place(_load_official(path, config, task, task_kwargs), mesh, rules)
  if config is not None or task is not None or task_kwargs:
    raise ValueError(f"{path}: config= and task= are for official checkpoints only; an "
                     "export or a workdir records its own model")
  if path.endswith(".msgpack"):
    return place(checkpointing.load_msgpack(path), mesh, rules)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such export folder, workdir or checkpoint file")
  if os.path.exists(os.path.join(path, checkpointing.PARAMS)):
    return place(checkpointing.load_msgpack(os.path.join(path, checkpointing.PARAMS)), mesh,
                 rules)
  return _load_workdir(path, mesh, rules)


def as_mesh(mesh: jax.sharding.Mesh | Mapping[str, int] | None) -> jax.sharding.Mesh | None:
  """A Mesh as it is; a shape ({"data": 4, "fsdp": 2}) as a mesh over every device."""
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  return sharding.make_mesh(dict(mesh))


def place(model: nnx.Module, mesh: jax.sharding.Mesh | None, rules: sharding.Rules
          ) -> nnx.Module:
  """`model` with its state on `mesh`, each variable sharded by its logical names under
  `rules` (the trainer's sharding.state_shardings); unchanged when mesh is None."""
  if mesh is None:
    return model
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
  return model


def _load_workdir(path: str, mesh: jax.sharding.Mesh | None, rules: sharding.Rules
                  ) -> nnx.Module:
  """The latest orbax checkpoint of a workdir (or of its checkpoints/ folder)."""
  workdir, ckpt_dir = path, os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_dir) and os.path.basename(os.path.normpath(path)) == "checkpoints":
    workdir, ckpt_dir = os.path.dirname(os.path.normpath(path)), path
  rec_path = os.path.join(workdir, checkpointing.MODEL_RECORD)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{path}: neither an export folder ({checkpointing.PARAMS}) nor a "
                            "workdir with checkpoints/")
  model = registry.build_from_record(checkpointing.read_model_record(rec_path), abstract=True,
                                     where=rec_path)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, params)
  else:  # restored straight into the trainer's shardings
    shardings = sharding.state_shardings(params, mesh, rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)
  restored = checkpointing.restore_params_from_orbax(ckpt_dir, target)
  return place(nnx.merge(graphdef, restored, rest), mesh, rules)


def _load_official(path: str, config: Any, task: str | None, task_kwargs: dict) -> nnx.Module:
  from uniter_jax import interop  # pylint: disable=import-outside-toplevel
  from uniter_jax.interop import io  # pylint: disable=import-outside-toplevel
  tensors = io.read_tensors(path)
  task = task or interop.checkpoint.task_of(tensors, {n: np.shape(a) for n, a in tensors.items()})
  return interop.load_official_checkpoint(tensors, config, task=task, **task_kwargs)
