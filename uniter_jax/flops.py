"""FLOPs of one pretraining step, counted by XLA on an unrolled (unscanned) copy of the model.

XLA's cost analysis counts a loop body once, so a model whose layers run under `nnx.scan`
would report about 1/num_layers of its encoder FLOPs. Lowering a copy with
`scan_layers=False` (tracing only: nothing is compiled or materialised) gives the true count.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax import train_step
from uniter_jax.models import UniterConfig, UniterForPretraining


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


def train_step_flops(cfg: UniterConfig, tx: optax.GradientTransformation,
                     step_cfg: train_step.StepConfig, batch: Mapping[str, jax.ShapeDtypeStruct]
                     ) -> dict[str, float]:
  """FLOPs of one update for each task of `step_cfg` (one task runs per update)."""
  flat = dataclasses.replace(cfg, scan_layers=False, remat_policy=None)
  model_fn = lambda: UniterForPretraining(flat, rngs=nnx.Rngs(0))
  graphdef, _, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)

  def init():
    _, params, rest = nnx.split(model_fn(), nnx.Param, ...)
    return {"params": params, "rest": rest, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}

  state = jax.eval_shape(init)
  out = {}
  for task in step_cfg.tasks:
    one = dataclasses.replace(step_cfg, tasks=(task,), ratios=(1.0,))
    cost = jax.jit(train_step.make_train_step(graphdef, tx, one)).lower(state, batch)
    cost = cost.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    out[task] = float(cost["flops"]) if cost and "flops" in cost else float("nan")
  return out


def mean_step_flops(per_task: Mapping[str, float], ratios: Mapping[str, float]) -> float:
  """Expected FLOPs per update under the task mix."""
  total = sum(ratios.values())
  return sum(per_task[t] * r / total for t, r in ratios.items())
