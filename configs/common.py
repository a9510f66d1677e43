"""Helpers shared by the config files (big_vision style `get_config(arg)` variants)."""

from __future__ import annotations

import ml_collections

from uniter_jax import sharding


def parse_arg(arg: str | None, **defaults):
  """'base,steps=10' -> ConfigDict(variant='base', steps=10) over the given defaults."""
  out = ml_collections.ConfigDict(dict(defaults))
  for i, part in enumerate(p for p in (arg or "").split(",") if p):
    if "=" not in part:
      if i == 0 and "variant" in defaults:
        out.variant = part
      else:
        out[part] = True
      continue
    k, v = part.split("=", 1)
    t = type(defaults.get(k, "")) if defaults.get(k) is not None else str
    out[k] = (v.lower() in ("1", "true", "yes")) if t is bool else t(v)
  return out


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """Model fields for UniterConfig (preset name + overrides); -1 = take it from the data."""
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.vocab_size = -1
  c.img_dim = -1
  c.img_label_dim = -1
  c.dtype = "float32"
  c.remat_policy = ""
  c.attention_impl = ""
  c.overrides = ml_collections.ConfigDict(overrides)
  return c


def mesh_config(c: ml_collections.ConfigDict, fsdp: bool = True) -> None:
  """Mesh axes and the one logical-axis rules table (data parallel = fsdp size 1)."""
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  rules = sharding.FSDP_RULES if fsdp else sharding.DATA_PARALLEL_RULES
  c.sharding_rules = [list(r) for r in rules]
