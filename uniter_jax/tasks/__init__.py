"""Tasks the shared trainer runs: `get(config.task)`; `register(task)` adds one."""

from uniter_jax.tasks.base import DataSpec, RunContext, Task
from uniter_jax.tasks.official import official_loss

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
  """Makes `config.task = task.name` run `task`."""
  _REGISTRY[task.name] = task
  return task


def get(name: str) -> Task:
  """The task registered under `name` (importing the built-in ones registers them)."""
  from uniter_jax.tasks import nlvr2, pretrain, pretrain_vcr, refer, retrieval, vcr, ve, vqa  # noqa: F401  pylint: disable=import-outside-toplevel
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


__all__ = ["DataSpec", "RunContext", "Task", "get", "official_loss", "register"]
