"""Optimizer: official AdamW, weight-decay mask, linear warmup / decay, clipping, lr_mul.

Official details (docs/official.md, *Optimisation*): AdamW with betas (0.9, 0.98), eps 1e-6, bias
correction, decoupled weight decay 0.01; no decay for any parameter whose official *name*
contains "bias", "LayerNorm.bias" or "LayerNorm.weight" (substring matching, so the
img/pos layer norms and the LayerNorms inside Sequential heads *are* decayed); gradients
clipped by global norm before the update; lr(s) with s counted from 1.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax


def linear_warmup_decay(lr: float, warmup_steps: int, total_steps: int,
                        decay_start: int = 0) -> Callable:
  """Official get_lr_sched: s = step + 1; warmup linear to lr, then linear to 0; floor 1e-8.

  decay_start > warmup_steps (not in UNITER) holds lr until s = decay_start and decays
  linearly to 0 at total_steps from there; 0 = the official schedule.
  """
  start = max(warmup_steps, decay_start)

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0
    warm = lr * s / max(warmup_steps, 1)
    decay = lr * jnp.clip((total_steps - s) / max(total_steps - start, 1), 0.0, 1.0)
    out = jnp.where(s < warmup_steps, warm, decay)
    return jnp.where(out <= 0.0, 1e-8, out)

  return schedule


def official_decay(official_name: str) -> bool:
  """Whether the official code applies weight decay to the tensor with this name."""
  return not any(s in official_name for s in ("bias", "LayerNorm.bias", "LayerNorm.weight"))


def _official_like_name(path: tuple[str, ...]) -> str:
  """Our param path -> the official name's spelling that the substring rule looks at."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  parts[-1] = {"scale": "weight", "kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
  # Sequential heads name their LayerNorm "net.2" / "vqa_output.2" officially: decayed.
  heads = ("feat_regress", "region_classifier", "vqa_output", "vcr_output", "re_output")
  if parts[0] in heads and "LayerNorm" in parts:
    parts = [p if p != "LayerNorm" else "2" for p in parts]
  return ".".join(parts)


def decay_mask(params: Any) -> Any:
  """A tree of bools (True = decay) matching `params` (an nnx.State of Params or pure dict)."""

  def one(path, _):
    keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
    keys = tuple(k for k in keys if k != "value")
    return official_decay(_official_like_name(keys))

  return jax.tree_util.tree_map_with_path(one, params)


def lr_multiplier_tree(params: Any, lr_mul: Mapping[str, float] | None) -> Any:
  """Per-parameter learning-rate multipliers by top-level module name (e.g. {"vqa_output": 10})."""
  lr_mul = dict(lr_mul or {})

  def one(path, _):
    top = getattr(path[0], "key", getattr(path[0], "name", path[0]))
    return float(lr_mul.get(str(top), 1.0))

  return jax.tree_util.tree_map_with_path(one, params)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-leaf factor (for lr_mul)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init, update)


def make_optimizer(params: Any, *, lr: float, warmup_steps: int, total_steps: int,
                   b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6,
                   weight_decay: float = 0.01, grad_clip: float | None = 5.0,
                   lr_mul: Mapping[str, float] | None = None,
                   mu_dtype: str | None = None, decay_start: int = 0
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """The official optimizer as an optax chain, and its schedule (for logging)."""
  schedule = linear_warmup_decay(lr, warmup_steps, total_steps, decay_start)
  parts = []
  if grad_clip is not None and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts += [
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, mask=decay_mask(params)),
      optax.scale_by_learning_rate(schedule),
  ]
  if lr_mul:
    parts.append(scale_by_tree(lr_multiplier_tree(params, lr_mul)))
  return optax.chain(*parts), schedule
