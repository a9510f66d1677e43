"""`uniter_jax.load(path)`: the right model, with its parameters, from anything we write or read.

Accepted sources:
  * an export folder (params.msgpack + model_config.json), or the params.msgpack itself;
  * a training workdir (model_config.json + checkpoints/), or its checkpoints/ folder:
    the parameters of the latest orbax checkpoint;
  * an official UNITER checkpoint (.pt / .bin / .npz / .safetensors), with its official
    config JSON (`config=`) or sizes read off the weights; the task (pretraining or VQA) is
    read off the head names unless `task=` says it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from uniter_jax import checkpointing
from uniter_jax.models import registry

_OFFICIAL_SUFFIXES = (".pt", ".bin", ".pth", ".npz", ".safetensors")


def load(path: str | os.PathLike, *, config: Any = None, task: str | None = None,
         **task_kwargs: Any) -> nnx.Module:
  """The model stored at `path`, built from its own record (see the module docstring).

  config / task / task_kwargs apply to official checkpoints only (see
  uniter_jax.interop.load_official_checkpoint).
  """
  path = os.fspath(path)
  if path.endswith(_OFFICIAL_SUFFIXES):
    return _load_official(path, config, task, task_kwargs)
  if config is not None or task is not None or task_kwargs:
    raise ValueError(f"{path}: config= and task= are for official checkpoints only; an "
                     "export or a workdir records its own model")
  if path.endswith(".msgpack"):
    return checkpointing.load_msgpack(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such export folder, workdir or checkpoint file")
  if os.path.exists(os.path.join(path, checkpointing.PARAMS)):
    return checkpointing.load_msgpack(os.path.join(path, checkpointing.PARAMS))
  return _load_workdir(path)


def _load_workdir(path: str) -> nnx.Module:
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
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        params)
  restored = checkpointing.restore_params_from_orbax(ckpt_dir, target)
  return nnx.merge(graphdef, restored, rest)


def _load_official(path: str, config: Any, task: str | None, task_kwargs: dict) -> nnx.Module:
  from uniter_jax import interop  # pylint: disable=import-outside-toplevel
  from uniter_jax.interop import io  # pylint: disable=import-outside-toplevel
  tensors = io.read_tensors(path)
  task = task or interop.checkpoint.task_of(tensors, {n: np.shape(a) for n, a in tensors.items()})
  return interop.load_official_checkpoint(tensors, config, task=task, **task_kwargs)
