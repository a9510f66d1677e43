"""The generic train step: one jitted program per batch shape, for any task's `Objective`.

An `Objective` lists named loss branches, their mix ratios and the scalars they report. Per
update: draw one branch from the ratios (one branch for all micro-batches, like the
official MetaLoader, docs/official.md *Task mix and gradient accumulation*; a single-branch
objective such as VQA skips the draw), run it on each micro-batch with a key folded with the
step, sum the micro-batch gradients (the official loop does not divide by their number),
clip the sum, AdamW. `lax.switch` keeps all branches in one compiled program.

The step knows nothing of pretraining or of any task: tasks (uniter_jax.tasks) build their
Objective; the trainer (uniter_jax.train) passes the mesh's sharding rules.
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

# (model, batch, key, deterministic) -> (scalar loss, {aux name: scalar}).
BranchLoss = Callable[[nnx.Module, dict, jax.Array, bool], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What one update optimises: named loss branches, mix ratios and the scalars they report.

  names / losses / ratios: one entry per branch. aux_names: the scalars every branch returns
  (the step fills absent ones with 0, so all switch branches share one structure).
  logged: per branch name, (logged metric name, aux name) pairs that the trainer averages over
  the updates that drew that branch.
  ratio_fn: optional step -> (num_branches,) ratios, for a mix that changes during training
  (a curriculum); `ratios` are then the final ones (used for FLOP averages).
  weights: optional per-branch gradient weights (the loss scaled by its branch's weight for
  the update; the logged loss is not); empty = 1 for every branch.
  """

  names: tuple[str, ...]
  losses: tuple[BranchLoss, ...]
  ratios: tuple[float, ...]
  aux_names: tuple[str, ...] = ()
  logged: Mapping[str, tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)
  ratio_fn: Callable[[jax.Array], jax.Array] | None = None
  weights: tuple[float, ...] = ()

  def __post_init__(self):
    if not (len(self.names) == len(self.losses) == len(self.ratios)) or not self.names:
      raise ValueError(f"an Objective needs one name, loss and ratio per branch; got "
                       f"{len(self.names)} names, {len(self.losses)} losses, "
                       f"{len(self.ratios)} ratios")
    if any(r < 0 for r in self.ratios) or sum(self.ratios) <= 0:
      raise ValueError(f"branch ratios must be >= 0 with a positive sum, got {self.ratios}")
    if self.weights and (len(self.weights) != len(self.names) or min(self.weights) <= 0):
      raise ValueError(f"branch weights must be one positive number per branch "
                       f"{self.names}, got {self.weights}")

  def single(self, index: int) -> "Objective":
    """The objective restricted to branch `index` (e.g. to count one branch's FLOPs)."""
    return dataclasses.replace(self, names=(self.names[index],),
                               losses=(self.losses[index],), ratios=(1.0,), ratio_fn=None,
                               weights=(self.weights[index],) if self.weights else ())

  def ratios_at(self, step: jax.Array) -> jax.Array:
    """The mix ratios in force at `step` (traced)."""
    if self.ratio_fn is None:
      return jnp.asarray(self.ratios, jnp.float32)
    return jnp.asarray(self.ratio_fn(step), jnp.float32)


def model_fields(batch: Mapping[str, Any]) -> dict:
  """Keeps the fields of the batch contract (drops pipeline extras such as example_index)."""
  return {k: v for k, v in batch.items() if k in batch_lib.FIELDS}


def init_state_fn(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                  seed: int = 0) -> Callable[[], dict]:
  """() -> the train state the step reads and returns (run under jit or jax.eval_shape).

  state = {"params": nnx.State, "rest": nnx.State (non-Param variables), "opt_state",
  "step": int32 scalar, "rng": PRNG key}.
  """

  def init() -> dict:
    _, params, rest = nnx.split(model_fn(), nnx.Param, ...)
    return {"params": params, "rest": rest, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed)}

  return init


def make_loss_fn(graphdef, objective: Objective, deterministic: bool = False) -> Callable:
  """(params, rest, batch, branch_index, key) -> (loss, aux) via lax.switch over branches."""

  def branch(fn):
    def run(params, rest, batch, key):
      model = nnx.merge(graphdef, params, rest)
      loss, aux = fn(model, batch, key, deterministic)
      return loss, {n: jnp.asarray(aux.get(n, 0.0), jnp.float32) for n in objective.aux_names}
    return run

  def loss_fn(params, rest, batch, index, key):
    if len(objective.losses) == 1:  # no switch: nothing to choose
      return branch(objective.losses[0])(params, rest, batch, key)
    return jax.lax.switch(index, [branch(f) for f in objective.losses], params, rest, batch,
                          key)

  return loss_fn


def draw_branch(key: jax.Array, ratios: Sequence[float] | jax.Array) -> jax.Array:
  """The index of the branch this update runs, drawn with probability ratio / sum."""
  p = jnp.asarray(ratios, jnp.float32)
  return jax.random.choice(key, p.shape[0], p=p / p.sum())


def make_train_step(graphdef, tx: optax.GradientTransformation, objective: Objective, *,
                    rules: sharding.Rules = sharding.FSDP_RULES,
                    schedule: Callable | None = None) -> Callable:
  """state, batch -> state, metrics. The batch may carry a leading micro-batch axis.

  metrics: loss, grad_norm, branch (the index of the drawn branch), every aux scalar, and lr
  when a schedule is given. With micro-batches (`batch` arrays of shape (k, B, ...)) the k
  gradients are summed, as the official loop sums them. `rules` (the trainer's logical-axis
  table) is active while the step is traced, for activation constraints and per-device work.
  """
  loss_fn = make_loss_fn(graphdef, objective, deterministic=False)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    with sharding.use_rules(rules):
      key = jax.random.fold_in(state["rng"], state["step"])
      k_branch, k_micro = jax.random.split(key)
      branch = draw_branch(k_branch, objective.ratios_at(state["step"]))
      micro = batch["input_ids"].ndim == 3
      batches = batch if micro else jax.tree.map(lambda x: x[None], batch)
      n_micro = batches["input_ids"].shape[0]

      def one(carry, inp):
        i, b = inp
        (loss, aux), g = grad_fn(state["params"], state["rest"], b, branch,
                                 jax.random.fold_in(k_micro, i))
        return jax.tree.map(jnp.add, carry, (g, loss, aux)), None

      zeros = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.float32(0.0),
               {k: jnp.float32(0.0) for k in objective.aux_names})
      (grads, loss, aux), _ = jax.lax.scan(one, zeros, (jnp.arange(n_micro), batches))
      if objective.weights:  # = the branch's loss scaled by its weight
        w = jnp.asarray(objective.weights, jnp.float32)[branch]
        grads = jax.tree.map(lambda g: g * w.astype(g.dtype), grads)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      metrics = {"loss": loss / n_micro, "branch": branch,
                 "grad_norm": optax.global_norm(grads),
                 **{k: v / n_micro for k, v in aux.items()}}
      if schedule is not None:
        metrics["lr"] = schedule(state["step"])
      return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

  return step
