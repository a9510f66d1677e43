"""FLOPs of one update per objective branch, counted by XLA on an unscanned copy of the model.

XLA's cost analysis counts a loop body once, so a model whose layers run under `nnx.scan`
would report about 1/num_layers of its encoder FLOPs. Lowering a copy with
`scan_layers=False` (tracing only: nothing is compiled or materialised) gives the true count.
Each branch is lowered on its own: a `lax.switch` counts as its costliest branch. So does a
`lax.cond`: code with an exact but rarely taken fallback (the full-width pretraining heads of
uniter_jax.losses.pretrain.heads_on_targets) traces only its usual path while `counting()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax import metrics, sharding, train_step
from uniter_jax.models import UniterConfig

_COUNTING: contextvars.ContextVar[bool] = contextvars.ContextVar("uniter_flops_counting",
                                                                default=False)


def counting() -> bool:
  """True while `branch_flops` traces a step (to count FLOPs; the program is never run)."""
  return _COUNTING.get()


@contextlib.contextmanager
def _counting():
  token = _COUNTING.set(True)
  try:
    yield
  finally:
    _COUNTING.reset(token)


def unscanned(cfg: UniterConfig) -> UniterConfig:
  """The same model with its layers unrolled (for counting FLOPs only)."""
  return dataclasses.replace(cfg, scan_layers=False, remat_policy=None)


def abstract_batch(cfg: UniterConfig, batch: int, txt_len: int, regions: int,
                   feat_dtype=jnp.float32) -> dict:
  """ShapeDtypeStructs of a raw pretraining batch (the fields the step reads)."""
  s = jax.ShapeDtypeStruct
  return {
      "input_ids": s((batch, txt_len), jnp.int32), "txt_mask": s((batch, txt_len), bool),
      "img_feat": s((batch, regions, cfg.img_dim), feat_dtype),
      "img_pos": s((batch, regions, 7), jnp.float32), "img_mask": s((batch, regions), bool),
      "img_soft_labels": s((batch, regions, cfg.img_label_dim), jnp.float32),
      "img_ids": s((batch,), jnp.int32),
  }


def branch_flops(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                 objective: train_step.Objective, batch: Mapping[str, jax.ShapeDtypeStruct],
                 rules: sharding.Rules = sharding.FSDP_RULES) -> dict[str, float]:
  """FLOPs of one update for each branch of `objective` (build model_fn on `unscanned`)."""
  out = {}
  # Logical names resolve under an active mesh too.
  with sharding.use_rules(rules), _counting():
    graphdef = nnx.graphdef(nnx.eval_shape(model_fn))
    state = jax.eval_shape(train_step.init_state_fn(model_fn, tx))
    for i, name in enumerate(objective.names):
      step = train_step.make_train_step(graphdef, tx, objective.single(i), rules=rules)
      flops = metrics.compiled_flops(jax.jit(step).lower(state, batch))
      out[name] = float("nan") if flops is None else flops
  return out


def mean_step_flops(per_branch: Mapping[str, float], ratios: Mapping[str, float]) -> float:
  """Expected FLOPs per update under the mix."""
  total = sum(ratios.values())
  return sum(per_branch[t] * r / total for t, r in ratios.items())
