"""One model registry: class name -> constructor, used by the trainer, exports and loaders.

A model is recorded as {"model_class", "model_kwargs", "config"} (WORKDIR/model_config.json,
EXPORT/model_config.json); `build_from_record` rebuilds exactly that model. A new head is
registered with `register(name, ctor, kwargs_of)` in uniter_jax/models/__init__.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from uniter_jax.models.config import UniterConfig


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """ctor(config, *, rngs, **kwargs) -> model; kwargs_of(model) -> the kwargs it was built with."""

  ctor: Callable[..., nnx.Module]
  kwargs_of: Callable[[nnx.Module], dict[str, Any]]


_MODELS: dict[str, ModelEntry] = {}


def register(name: str, ctor: Callable[..., nnx.Module],
             kwargs_of: Callable[[nnx.Module], dict[str, Any]] = lambda m: {}) -> None:
  """Makes `build(name, ...)` and `build_from_record` construct `ctor`."""
  _MODELS[name] = ModelEntry(ctor, kwargs_of)


def names() -> list[str]:
  return sorted(_MODELS)


def _entry(name: str) -> ModelEntry:
  if name not in _MODELS:
    raise ValueError(f"unknown model class {name!r}; registered: {names()}")
  return _MODELS[name]


def build(name: str, config: UniterConfig, *, seed: int = 0, rngs: nnx.Rngs | None = None,
          **kwargs: Any) -> nnx.Module:
  """The registered model `name` with fresh parameters (from `rngs`, else params=seed)."""
  return _entry(name).ctor(config, rngs=rngs or nnx.Rngs(params=seed), **kwargs)


def record(model: nnx.Module) -> dict[str, Any]:
  """What rebuilds `model`: its class name, constructor kwargs and UniterConfig."""
  name = type(model).__name__
  return {"model_class": name, "model_kwargs": _entry(name).kwargs_of(model),
          "config": model.config.to_dict()}


def make_record(name: str, config: UniterConfig, kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The record of a model that has not been built yet (the trainer writes it first)."""
  _entry(name)
  return {"model_class": name, "model_kwargs": dict(kwargs), "config": config.to_dict()}


def build_from_record(rec: Mapping[str, Any], *, abstract: bool = False, where: str = ""
                      ) -> nnx.Module:
  """Rebuilds a recorded model (abstract: shapes only, nothing allocated)."""
  if "model_class" not in rec or "config" not in rec:
    raise ValueError(f"{where or 'model record'}: expected keys model_class and config "
                     f"(written by an export or a training run), got {sorted(rec)}")
  cfg = UniterConfig.from_dict(rec["config"])
  make = lambda: build(rec["model_class"], cfg, **dict(rec.get("model_kwargs") or {}))  # noqa: E731
  return nnx.eval_shape(make) if abstract else make()


# A GROWN_TABLES entry meaning: the source rows first, then the model's own initial rows for
# the rest (VCR's word table: BERT's words + the object-reference tokens, init_word_embedding).
EXTEND = "extend"


def grow_table(model: nnx.Module, path: tuple[str, ...], arr: Any) -> Any | None:
  """A pretrained table with fewer rows than `model`'s, grown as the model declares.

  A model class lists such tables in GROWN_TABLES {"a/b/embedding": (source row of each
  target row, None = keep the model's initial row) or EXTEND}, e.g. NLVR2's token types
  (0, 1, 1) as the official init_type_embedding. Returns None when `path` is not declared or `arr`
  already has the model's rows (a fine-tuned checkpoint), so callers load it as it is.
  """
  rows = getattr(type(model), "GROWN_TABLES", {}).get("/".join(path))
  if rows == EXTEND:  # keep every source row; the model's extra rows keep their init
    node: Any = model
    for p in path:
      node = getattr(node, p)
    n = int(node.shape[0])
    rows = tuple(range(min(np.shape(arr)[0], n))) + (None,) * max(0, n - np.shape(arr)[0])
  if rows is None or np.shape(arr)[0] >= len(rows):
    return None
  src = np.asarray(arr)
  if any(r is not None and r >= src.shape[0] for r in rows):
    raise ValueError(f"{'/'.join(path)}: cannot grow a {src.shape[0]}-row table to "
                     f"{len(rows)} rows from source rows {rows}")
  current = None
  if None in rows:  # only then read the model's own values (it may be abstract otherwise)
    node: Any = model
    for p in path:
      node = getattr(node, p)
    current = np.asarray(node[...])
  return np.stack([src[r] if r is not None else current[i] for i, r in enumerate(rows)])


def copy_units(model: nnx.Module, flat: Mapping[Any, Any], *, torch_names: bool = False
               ) -> dict:
  """Fills heads a checkpoint lacks from another head's output units, as the model declares.

  A model class lists them in COPIED_UNITS {"target": ("source", unit)}, e.g. retrieval's
  rank_output = unit 1 of itm_output (official init_output()). `flat` maps our parameter
  paths (tuples; kernel (in, out)) or, with torch_names, official names (weight (out, in))
  to arrays. A target already in `flat` (a fine-tuned checkpoint) is kept as it is.
  """
  out = dict(flat)
  for target, (source, unit) in getattr(type(model), "COPIED_UNITS", {}).items():
    for ours, torch in (("kernel", "weight"), ("bias", "bias")):
      if torch_names:
        t, s, axis = (f"{target.replace('/', '.')}.{torch}",
                      f"{source.replace('/', '.')}.{torch}", 0)
      else:
        t, s, axis = (*target.split("/"), ours), (*source.split("/"), ours), -1
      if t not in out and s in out:
        out[t] = np.take(np.asarray(out[s]), [unit], axis=axis)
  return out


def fresh_heads(model: nnx.Module, rows_of: Callable[[tuple[str, ...]], int | None]
                ) -> tuple[str, ...]:
  """Top-level heads a loader must leave at their init because a table grew.

  A model class lists them in FRESH_WHEN_GROWN {"a/b/embedding": ("head", ...)}, e.g. VCR's
  2nd-stage pretraining: the official init_word_embedding replaces the MLM head `cls` when the
  word table grows. `rows_of(path)` gives the source's row count of a table (None: absent);
  a head is fresh when its table there has fewer rows than the model's.
  """
  out: list[str] = []
  for table, heads in getattr(type(model), "FRESH_WHEN_GROWN", {}).items():
    path = tuple(table.split("/"))
    node: Any = model
    for p in path:
      node = getattr(node, p)
    rows = rows_of(path)
    if rows is not None and rows < int(node.shape[0]):
      out += [h for h in heads if h not in out]
  return tuple(out)
