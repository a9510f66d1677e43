"""UniterConfig: the sizes and numerics of a UNITER model."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

# Official sizes (docs/official.md, *Model*). "tiny" equals the parity fixture's model.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                 vocab_size=100, max_position_embeddings=64, img_dim=32, img_label_dim=11),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


@dataclasses.dataclass(frozen=True)
class UniterConfig:
  """Model hyperparameters. Defaults are UNITER-base with the BUTD feature sizes."""

  vocab_size: int = 28996
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  img_dim: int = 2048
  img_label_dim: int = 1601
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  # Numerics: matmuls run in `dtype`; LayerNorm, softmax and every loss run in float32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Layers are stacked and run with nnx.scan; remat_policy names a jax.checkpoint_policies
  # member ("nothing_saveable", "dots_saveable", ...) or None for no rematerialisation.
  scan_layers: bool = True
  remat_policy: str | None = None
  # Passed to jax.nn.dot_product_attention (None lets JAX pick; "cudnn" forces the fused
  # GPU kernel). Used whenever attention dropout is inactive (eval, or attention_dropout=0).
  attention_impl: str | None = None

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"UniterConfig.{name} must be float32, bfloat16 or float16, "
                         f"got {getattr(self, name)!r}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "UniterConfig":
    """`UniterConfig.preset("tiny" | "base" | "large", **overrides)`."""
    if name not in _PRESETS:
      raise ValueError(f"unknown UniterConfig preset {name!r}; choose from {sorted(_PRESETS)}")
    return cls(**{**_PRESETS[name], **overrides})

  @classmethod
  def from_official_json(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], *,
                         img_dim: int = 2048, img_label_dim: int = 1601,
                         **overrides: Any) -> "UniterConfig":
    """Reads an official config JSON (`config/uniter-base.json` style, BERT key names)."""
    if isinstance(path_or_dict, Mapping):
      cfg, where = dict(path_or_dict), "the given dict"
    else:
      where = os.fspath(path_or_dict)
      with open(where) as f:
        cfg = json.load(f)
    if "model_config" in cfg and "hidden_size" not in cfg:  # a fixture-style wrapper
      cfg = cfg.get("uniter_config", cfg["model_config"])
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"{where}: hidden_act {act!r} is not supported; UNITER uses 'gelu' (erf)")
    names = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                 num_layers="num_hidden_layers", num_heads="num_attention_heads",
                 intermediate_size="intermediate_size",
                 max_position_embeddings="max_position_embeddings",
                 type_vocab_size="type_vocab_size", hidden_dropout="hidden_dropout_prob",
                 attention_dropout="attention_probs_dropout_prob",
                 initializer_range="initializer_range")
    missing = [v for k, v in names.items()
               if v not in cfg and k not in ("type_vocab_size", "initializer_range",
                                             "hidden_dropout", "attention_dropout")]
    if missing:
      raise ValueError(f"{where}: missing key(s) {missing} in the official config JSON")
    kwargs = {k: cfg[v] for k, v in names.items() if v in cfg}
    return cls(**{**kwargs, "img_dim": img_dim, "img_label_dim": img_label_dim, **overrides})

  def to_official_json(self) -> dict[str, Any]:
    """The official config JSON keys for this model (for exporting to the PyTorch code)."""
    return {
        "attention_probs_dropout_prob": self.attention_dropout,
        "hidden_act": "gelu",
        "hidden_dropout_prob": self.hidden_dropout,
        "hidden_size": self.hidden_size,
        "initializer_range": self.initializer_range,
        "intermediate_size": self.intermediate_size,
        "max_position_embeddings": self.max_position_embeddings,
        "num_attention_heads": self.num_heads,
        "num_hidden_layers": self.num_layers,
        "type_vocab_size": self.type_vocab_size,
        "vocab_size": self.vocab_size,
    }

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UniterConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown UniterConfig field(s) {unknown}")
    return cls(**d)
