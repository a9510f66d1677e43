"""The train step shared by pretraining and fine-tuning: one jitted program per shape.

An `Objective` lists loss branches and their mix ratios. Per update (uniter_spec.md 3.9):
draw the branch from the ratios (one branch for all micro-batches, like the official
MetaLoader; a single-branch objective such as VQA skips the draw), run it on each
micro-batch with a key folded with the step, sum the micro-batch gradients (the official
loop does not divide by their number), clip the sum, AdamW. `lax.switch` keeps all
branches in one compiled program.

Pretraining builds its objective from a `StepConfig` (tasks, masking, OT options); a
fine-tuning task (uniter_jax.tasks) passes its own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax import batch as batch_lib
from uniter_jax import sharding
from uniter_jax.losses import pretrain_loss
from uniter_jax.masking import (MaskingConfig, apply_task, mask_focus_words,
                                 with_other_images)

# Per-task scalars every pretraining branch reports (zeros where a task does not define
# one), so that all lax.switch branches return the same structure.
_AUX = ("accuracy", "ot_pos", "ot_neg", "ot_loss", "itm_loss")

# (model, batch, key, deterministic) -> (scalar loss, {name: scalar}).
BranchLoss = Callable[[nnx.Module, dict, jax.Array, bool], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What one update optimises: named loss branches, mix ratios and the scalars they report.

  Every branch must return the same `aux` names (the step fills absent ones with 0).
  """

  names: tuple[str, ...]
  losses: tuple[BranchLoss, ...]
  ratios: tuple[float, ...]
  aux_names: tuple[str, ...] = ()
  rules: sharding.Rules = sharding.FSDP_RULES


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


def pretrain_objective(cfg: StepConfig) -> Objective:
  """The pretraining mix as an Objective: one branch per task, masking inside the branch."""
  losses = tuple(functools.partial(_pretrain_branch, task=t, cfg=cfg) for t in cfg.tasks)
  return Objective(names=tuple(cfg.tasks), losses=losses, ratios=tuple(cfg.ratios),
                   aux_names=_AUX, rules=cfg.rules)


def _pretrain_branch(model, batch, key, deterministic, *, task, cfg):
  return _task_loss(model, batch, task, key, cfg, deterministic)


def _as_objective(obj: Objective | StepConfig) -> Objective:
  return obj if isinstance(obj, Objective) else pretrain_objective(obj)


def make_loss_fn(graphdef, cfg: Objective | StepConfig, deterministic: bool = False
                 ) -> Callable:
  """(params, rest, batch, branch_index, key) -> (loss, aux) via lax.switch over branches."""
  obj = _as_objective(cfg)

  def branch(fn):
    def run(params, rest, batch, key):
      model = nnx.merge(graphdef, params, rest)
      loss, aux = fn(model, batch, key, deterministic)
      return loss, {n: jnp.asarray(aux.get(n, 0.0), jnp.float32) for n in obj.aux_names}
    return run

  def loss_fn(params, rest, batch, index, key):
    if len(obj.losses) == 1:  # no switch: nothing to choose
      return branch(obj.losses[0])(params, rest, batch, key)
    return jax.lax.switch(index, [branch(f) for f in obj.losses], params, rest, batch, key)

  return loss_fn


def draw_task(key: jax.Array, ratios: Sequence[float]) -> jax.Array:
  p = jnp.asarray(ratios, jnp.float32)
  return jax.random.choice(key, len(ratios), p=p / p.sum())


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: Objective | StepConfig,
                    schedule: Callable | None = None) -> Callable:
  """state, batch -> state, metrics. The batch may carry a leading micro-batch axis.

  `cfg` is a fine-tuning Objective or the pretraining StepConfig. metrics["task"] is the
  index of the drawn branch.

  state = {"params": nnx.State, "rest": nnx.State (non-Param variables), "opt_state",
  "step": int32 scalar, "rng": PRNG key}. With micro-batches (`batch` arrays of shape
  (k, B, ...)) the k gradients are summed, as the official loop sums them.
  """
  obj = _as_objective(cfg)
  loss_fn = make_loss_fn(graphdef, obj, deterministic=False)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    with sharding.use_rules(obj.rules):
      key = jax.random.fold_in(state["rng"], state["step"])
      k_task, k_micro = jax.random.split(key)
      task = draw_task(k_task, obj.ratios)
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
               {k: jnp.float32(0.0) for k in obj.aux_names})
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
      if cfg.masking.focus_ids and "mlm" in cfg.tasks:
        # Grounding probe: every focus word hidden; read from its own image vs another.
        model = nnx.merge(graphdef, params, rest)
        probe = mask_focus_words(batch, cfg.masking)
        for name, b in (("own_image", probe), ("other_image", with_other_images(probe))):
          res = pretrain_loss(model, b, "mlm", deterministic=True)
          out[f"mlm_focus/accuracy_{name}"] = res["accuracy"]
      return out

  return evaluate
