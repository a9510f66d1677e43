"""The pretraining step: one jitted program for every task, micro-batch accumulation.

Per update (uniter_spec.md 3.9): draw the task from the mix ratios (one task for all
micro-batches, like the official MetaLoader), apply that task's masking / negatives from a
key folded with the step, forward + loss, sum the micro-batch gradients (the official loop
does not divide by the number of micro-batches), clip the sum, AdamW. `lax.switch` keeps
all tasks in one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax import batch as batch_lib
from uniter_jax import sharding
from uniter_jax.losses import pretrain_loss
from uniter_jax.masking import MaskingConfig, apply_task

# Per-task scalars every branch reports (zeros where a task does not define one), so that
# all lax.switch branches return the same structure.
_AUX = ("accuracy", "ot_pos", "ot_neg", "ot_loss", "itm_loss")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  tasks: tuple[str, ...]
  ratios: tuple[float, ...]
  masking: MaskingConfig
  ot_lambda: float = 0.1
  ot_options: tuple[tuple[str, Any], ...] = ()
  rules: sharding.Rules = sharding.FSDP_RULES


def model_fields(batch: Mapping[str, Any]) -> dict:
  """Keeps the fields of the batch contract (drops pipeline extras such as example_index)."""
  return {k: v for k, v in batch.items() if k in batch_lib.FIELDS}


def _task_loss(model, batch, task: str, key, cfg: StepConfig, deterministic: bool):
  k_mask, k_drop = jax.random.split(key)
  b = apply_task(k_mask, batch, task, cfg.masking)
  res = pretrain_loss(model, b, task, deterministic=deterministic, rngs=k_drop,
                      ot_lambda=cfg.ot_lambda, **dict(cfg.ot_options))
  aux = {name: jnp.asarray(res.get(name, 0.0), jnp.float32) for name in _AUX}
  return res["loss"], aux


def make_loss_fn(graphdef, cfg: StepConfig, deterministic: bool = False) -> Callable:
  """(params, rest, batch, task_index, key) -> (loss, aux) via lax.switch over tasks."""

  def loss_fn(params, rest, batch, task_index, key):
    def branch(task):
      def run(params, rest, batch, key):
        model = nnx.merge(graphdef, params, rest)
        return _task_loss(model, batch, task, key, cfg, deterministic)
      return run

    return jax.lax.switch(task_index, [branch(t) for t in cfg.tasks], params, rest, batch, key)

  return loss_fn


def draw_task(key: jax.Array, ratios: Sequence[float]) -> jax.Array:
  p = jnp.asarray(ratios, jnp.float32)
  return jax.random.choice(key, len(ratios), p=p / p.sum())


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig,
                    schedule: Callable | None = None) -> Callable:
  """state, batch -> state, metrics. The batch may carry a leading micro-batch axis.

  state = {"params": nnx.State, "rest": nnx.State (non-Param variables), "opt_state",
  "step": int32 scalar, "rng": PRNG key}. With micro-batches (`batch` arrays of shape
  (k, B, ...)) the k gradients are summed, as the official loop sums them.
  """
  loss_fn = make_loss_fn(graphdef, cfg, deterministic=False)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    with sharding.use_rules(cfg.rules):
      key = jax.random.fold_in(state["rng"], state["step"])
      k_task, k_micro = jax.random.split(key)
      task = draw_task(k_task, cfg.ratios)
      micro = batch["input_ids"].ndim == 3
      batches = batch if micro else jax.tree.map(lambda x: x[None], batch)
      n_micro = batches["input_ids"].shape[0]

      def one(carry, inp):
        i, b = inp
        (loss, aux), g = grad_fn(state["params"], state["rest"], b, task,
                                 jax.random.fold_in(k_micro, i))
        acc = jax.tree.map(jnp.add, carry, (g, loss, aux))
        return acc, None

      zeros = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.float32(0.0),
               {k: jnp.float32(0.0) for k in _AUX})
      (grads, loss, aux), _ = jax.lax.scan(one, zeros, (jnp.arange(n_micro), batches))
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      metrics = {"loss": loss / n_micro, "task": task, "grad_norm": optax.global_norm(grads),
                 **{k: v / n_micro for k, v in aux.items()}}
      if schedule is not None:
        metrics["lr"] = schedule(state["step"])
      new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
      return new_state, metrics

  return step


def make_eval_step(graphdef, cfg: StepConfig) -> Callable:
  """(params, rest, batch, key) -> per-task metrics, every task on the same batch."""
  loss_fn = make_loss_fn(graphdef, cfg, deterministic=True)

  def evaluate(params, rest, batch, key):
    with sharding.use_rules(cfg.rules):
      out = {}
      for i, task in enumerate(cfg.tasks):
        loss, aux = loss_fn(params, rest, batch, i, jax.random.fold_in(key, i))
        out[f"{task}/loss"] = loss
        if task in ("mlm", "mrc", "mrckl", "itm"):
          out[f"{task}/accuracy"] = aux["accuracy"]
        if task == "itm":
          out["itm/ot_pos"], out["itm/ot_neg"] = aux["ot_pos"], aux["ot_neg"]
      return out

  return evaluate
