"""Word-region alignment (WRA): optimal-transport distance between words and regions.

UNITER's WRA loss (docs/ot.md, *What the official code computes*) transports the
[CLS] w_1 .. w_n [SEP] outputs onto the region outputs with a cosine cost and an approximate
OT plan that carries no gradient, so d dist / d C = plan. The official solver is IPOT
(beta 0.5, 50 iterations, k 1), which in effect is converged entropic OT at an absolute
epsilon of beta / iterations = 0.01 (docs/ot.md, *IPOT with k = 1 is entropic OT at epsilon =
beta / iterations*). Two solvers are offered:

* "sinkhorn" (default): ott-jax log-domain Sinkhorn, fixed 100 iterations, epsilon annealed
  geometrically to 0.01. Distances agree with IPOT to about 1e-3.
* "ipot": a batched transcription of the official IPOT, for exact parity (about 1e-7).

Everything runs in float32 whatever the input dtype: at epsilon 0.01 bf16 loses 10-100x in
accuracy (docs/ot.md pitfall 12). Masks are True at valid positions; examples with no words or
no regions get distance 0, with finite values and gradients everywhere.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

# ott-jax is imported when the "sinkhorn" solver is first traced, so the model, the losses and
# the "ipot" solver work on a machine without it (e.g. a GPU host for benchmarks/train_step.py).
# Official F.normalize(eps=1e-5) divides by max(|x|, 1e-5); comparing squared norms with
# 1e-10 selects the same branch and avoids sqrt, whose gradient is infinite at 0.
_NORM_SQ_FLOOR = 1e-10
_HIGHEST = jax.lax.Precision.HIGHEST

Solver = Literal["sinkhorn", "ipot"]
_SOLVERS = ("sinkhorn", "ipot")
_DEFAULT_ITERS = {"sinkhorn": 100, "ipot": 50}


def _ott() -> tuple:
  """(epsilon_scheduler, geometry, linear_problem, sinkhorn) of ott-jax; a clear error where
  ott-jax is not installed."""
  try:
    from ott.geometry import epsilon_scheduler, geometry  # pylint: disable=import-outside-toplevel
    from ott.problems.linear import linear_problem  # pylint: disable=import-outside-toplevel
    from ott.solvers.linear import sinkhorn  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('the "sinkhorn" WRA solver needs ott-jax (pip install ott-jax, see '
                      'requirements.txt); solver="ipot" (the official algorithm) needs '
                      f"nothing more: --config.pretrain.ot.solver=ipot ({e})") from e
  return epsilon_scheduler, geometry, linear_problem, sinkhorn


def _safe_normalize(x: jax.Array) -> jax.Array:
  norm_sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(norm_sq, _NORM_SQ_FLOOR))


def ot_cost(
    txt_emb: jax.Array,
    img_emb: jax.Array,
    txt_mask: jax.Array,
    img_mask: jax.Array,
) -> jax.Array:
  """Masked cosine cost 1 - cos(word_m, region_n), (B, M, N) float32, 0 at padded pairs.

  Args:
    txt_emb: (B, M, D) word outputs, any float dtype.
    img_emb: (B, N, D) region outputs.
    txt_mask: (B, M), True at real words.
    img_mask: (B, N), True at real regions.
  """
  x = _safe_normalize(jnp.asarray(txt_emb, jnp.float32))
  y = _safe_normalize(jnp.asarray(img_emb, jnp.float32))
  # HIGHEST keeps fp32 operands on TPU/GPU too; default precision costs up to 3e-4 in the
  # distance and these einsums are tiny.
  cos = jnp.einsum("bmd,bnd->bmn", x, y, precision=_HIGHEST)
  joint = _joint_mask(txt_mask, img_mask)
  # Zero (not just finite) padded costs: the official code does so, and a non-finite padded
  # entry would make ott report divergence (docs/ot.md pitfall 6).
  return jnp.where(joint, 1.0 - cos, 0.0)


def _joint_mask(txt_mask: jax.Array, img_mask: jax.Array) -> jax.Array:
  return jnp.asarray(txt_mask, bool)[:, :, None] & jnp.asarray(img_mask, bool)[:, None, :]


def _masked_recip(x: jax.Array, valid: jax.Array) -> jax.Array:
  """1 / x where valid, else 0; the inner where keeps the unused branch finite for grads."""
  return jnp.where(valid, 1.0 / jnp.where(valid, x, 1.0), 0.0)


def _ipot_plan(
    cost: jax.Array,
    txt_valid: jax.Array,
    img_valid: jax.Array,
    *,
    beta: float,
    num_iters: int,
    k: int,
) -> jax.Array:
  """Official IPOT plan in (B, M, N) layout; masks must already be False for empty examples.

  The official code writes 1 / (len * s + 1e4 * pad), which is 1e-4 at pads; those values
  only ever multiply zero kernel entries, so using 0 at pads gives the same plan and also
  keeps examples without words or regions free of inf / NaN.
  """
  m = jnp.maximum(jnp.sum(txt_valid, axis=-1), 1).astype(jnp.float32)[:, None]
  n = jnp.maximum(jnp.sum(img_valid, axis=-1), 1).astype(jnp.float32)[:, None]
  joint = txt_valid[:, :, None] & img_valid[:, None, :]
  # exp(-C / beta) >= e^-4 for C in [0, 2]: applying the kernel once per outer step (rather
  # than exp(-C / 0.01) at once) is why IPOT never underflows.
  kernel = jnp.where(joint, jnp.exp(-cost / beta), 0.0)
  plan0 = joint.astype(jnp.float32)
  sigma0 = jnp.where(txt_valid, 1.0 / m, 0.0)

  def outer(_, carry):
    plan, sigma = carry
    q = kernel * plan
    delta = jnp.zeros_like(img_valid, jnp.float32)
    for _ in range(k):  # k is static and small (1 in every official config)
      q_sigma = jnp.einsum("bmn,bm->bn", q, sigma, precision=_HIGHEST)
      delta = _masked_recip(n * q_sigma, img_valid)
      q_delta = jnp.einsum("bmn,bn->bm", q, delta, precision=_HIGHEST)
      sigma = _masked_recip(m * q_delta, txt_valid)
    plan = delta[:, None, :] * q * sigma[:, :, None]
    return plan, sigma  # sigma carries over between outer steps, as in the official code

  plan, _ = jax.lax.fori_loop(0, num_iters, outer, (plan0, sigma0))
  return jnp.where(joint, plan, 0.0)


def _sinkhorn_plan(
    cost: jax.Array,
    txt_valid: jax.Array,
    img_valid: jax.Array,
    nonempty: jax.Array,
    *,
    epsilon: float | epsilon_scheduler.Epsilon,
    num_iters: int,
) -> jax.Array:
  """ott-jax log-domain Sinkhorn plan (B, M, N), vmapped over the batch."""
  _, geometry, linear_problem, sinkhorn = _ott()
  _, num_txt, num_img = cost.shape
  # Zero weight on padding is ott's only way to mask. Empty examples get a dummy uniform
  # problem instead: an all-zero marginal is a degenerate problem (docs/ot.md pitfalls 7, 8).
  n_txt = jnp.maximum(jnp.sum(txt_valid, axis=-1, keepdims=True), 1)
  n_img = jnp.maximum(jnp.sum(img_valid, axis=-1, keepdims=True), 1)
  a = jnp.where(nonempty[:, None], txt_valid / n_txt, 1.0 / num_txt).astype(jnp.float32)
  b = jnp.where(nonempty[:, None], img_valid / n_img, 1.0 / num_img).astype(jnp.float32)
  # min == max iterations: a static-length scan (no batched while loop waiting for the
  # slowest example); inner_iterations=1 divides it, so no iteration is dropped (docs/ot.md
  # pitfall 5). lse_mode because exp(-C / 0.01) underflows in fp32 (docs/ot.md pitfall 3).
  # No gradient enters the solver (its input is stop_gradient(C)), so implicit_diff=None
  # merely avoids building an implicit-diff rule that would never be used.
  solver = sinkhorn.Sinkhorn(
      lse_mode=True,
      min_iterations=num_iters,
      max_iterations=num_iters,
      inner_iterations=1,
      implicit_diff=None,
  )

  def solve_one(c: jax.Array, a_i: jax.Array, b_i: jax.Array) -> jax.Array:
    geom = geometry.Geometry(cost_matrix=c, epsilon=epsilon)
    return solver(linear_problem.LinearProblem(geom, a=a_i, b=b_i)).matrix

  plan = jax.vmap(solve_one)(jax.lax.stop_gradient(cost), a, b)
  joint = txt_valid[:, :, None] & img_valid[:, None, :]
  return jnp.where(joint, plan, 0.0)


def _epsilon_schedule(
    epsilon: float, eps_anneal: tuple[float, float] | None, num_iters: int
) -> float | epsilon_scheduler.Epsilon:
  if eps_anneal is None:
    return epsilon
  init, decay = eps_anneal
  epsilon_scheduler = _ott()[0]
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"eps_anneal decay must be in (0, 1], got {decay}")
  # ott uses target * max(init * decay**t, 1) at iteration t = 0..n-1. If the multiplier has
  # not reached 1 by the last iteration the potentials belong to a larger epsilon and the
  # plan built at the target is meaningless (all zeros in the worst case; docs/ot.md pitfall 4).
  last = init * decay ** (num_iters - 1)
  if last > 1.0:
    raise ValueError(
        f"eps_anneal={eps_anneal} does not reach the target epsilon within {num_iters} "
        f"iterations (init * decay**(num_iters-1) = {last:.3g} > 1); raise num_iters or "
        "lower init / decay"
    )
  return epsilon_scheduler.Epsilon(target=epsilon, init=init, decay=decay)


def ot_distance(
    txt_emb: jax.Array,
    img_emb: jax.Array,
    txt_mask: jax.Array,
    img_mask: jax.Array,
    *,
    solver: Solver = "sinkhorn",
    epsilon: float = 0.01,
    num_iters: int | None = None,
    eps_anneal: tuple[float, float] | None = (10.0, 0.9),
    beta: float = 0.5,
    ipot_k: int = 1,
    return_plan: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Per-example OT distance sum(C * stop_gradient(P)), (B,) float32.

  Gradients flow only through the cost C (d dist / d C = P, the official semantics); the
  solver itself is never differentiated.

  Args:
    txt_emb: (B, M, D) word outputs ([CLS] and [SEP] included), any float dtype.
    img_emb: (B, N, D) region outputs.
    txt_mask: (B, M), True at real words.
    img_mask: (B, N), True at real regions.
    solver: "sinkhorn" (ott-jax) or "ipot" (official algorithm, exact parity).
    epsilon: sinkhorn only; ABSOLUTE entropic regulariser. 0.01 = beta / iterations of the
      official IPOT. IPOT ignores it (its effective epsilon is beta / num_iters).
    num_iters: fixed iteration count; default 100 for sinkhorn, 50 for ipot.
    eps_anneal: sinkhorn only; (init, decay) of ott's geometric Epsilon schedule, or None
      for a constant epsilon. Must reach the target by the last iteration.
    beta: ipot only; proximal step size.
    ipot_k: ipot only; inner scaling steps per outer step.
    return_plan: also return the plan P, (B, M, N) float32, 0 at pads and empty examples.

  Returns:
    dist (B,), or (dist, plan) when return_plan. Examples with no words or no regions get 0.
  """
  if solver not in _SOLVERS:
    raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
  if num_iters is None:
    num_iters = _DEFAULT_ITERS[solver]
  if int(num_iters) != num_iters or num_iters < 1:
    raise ValueError(f"num_iters must be a positive integer, got {num_iters}")
  num_iters = int(num_iters)

  txt_mask = jnp.asarray(txt_mask, bool)
  img_mask = jnp.asarray(img_mask, bool)
  cost = ot_cost(txt_emb, img_emb, txt_mask, img_mask)
  nonempty = jnp.any(txt_mask, axis=-1) & jnp.any(img_mask, axis=-1)
  # Treat every slot of an empty example as padding: its plan is then exactly 0.
  txt_valid = txt_mask & nonempty[:, None]
  img_valid = img_mask & nonempty[:, None]

  if solver == "ipot":
    if beta <= 0:
      raise ValueError(f"beta must be > 0, got {beta}")
    if int(ipot_k) != ipot_k or ipot_k < 1:
      raise ValueError(f"ipot_k must be a positive integer, got {ipot_k}")
    plan = _ipot_plan(
        jax.lax.stop_gradient(cost),
        txt_valid,
        img_valid,
        beta=beta,
        num_iters=num_iters,
        k=int(ipot_k),
    )
  else:
    if epsilon <= 0:
      raise ValueError(f"epsilon must be > 0, got {epsilon}")
    plan = _sinkhorn_plan(
        cost,
        txt_valid,
        img_valid,
        nonempty,
        epsilon=_epsilon_schedule(epsilon, eps_anneal, num_iters),
        num_iters=num_iters,
    )

  plan = jax.lax.stop_gradient(plan)
  # <C, P> and not ott's reg_ot_cost, which adds the entropy term (docs/ot.md pitfall 10).
  dist = jnp.sum(cost * plan, axis=(1, 2))
  if return_plan:
    return dist, plan
  return dist


def plan_marginal_error(
    plan: jax.Array, txt_mask: jax.Array, img_mask: jax.Array
) -> jax.Array:
  """L1 error of both marginals of a plan against uniform-on-valid weights, (B,).

  For monitoring (docs/ot.md, *Tolerances we know*): IPOT-50 gives about 5e-3 on
  random data; much more means the fixed iteration budget is too small. 0 for empty examples.
  """
  txt_mask = jnp.asarray(txt_mask, bool)
  img_mask = jnp.asarray(img_mask, bool)
  nonempty = jnp.any(txt_mask, axis=-1) & jnp.any(img_mask, axis=-1)
  a = txt_mask / jnp.maximum(jnp.sum(txt_mask, axis=-1, keepdims=True), 1)
  b = img_mask / jnp.maximum(jnp.sum(img_mask, axis=-1, keepdims=True), 1)
  plan = jnp.asarray(plan, jnp.float32)
  err = jnp.sum(jnp.abs(plan.sum(2) - a), -1) + jnp.sum(jnp.abs(plan.sum(1) - b), -1)
  return jnp.where(nonempty, err, 0.0)


def wra_loss(
    ot_dist: jax.Array,
    itm_targets: jax.Array,
    example_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """WRA loss (sum_pos d - sum_neg d) / max(#valid, 1) and {"ot_pos", "ot_neg"} means.

  The official loop divides by the whole per-device ITM batch (n_pos + n_neg); dividing by
  the global number of valid examples is the same when per-device batches are equal. The
  caller adds itm_ot_lambda (0.1) times the loss to the ITM cross-entropy.

  Args:
    ot_dist: (B,) distances from ot_distance.
    itm_targets: (B,) int, 1 = matched pair, 0 = negative.
    example_mask: (B,) bool, False at batch padding (ignored everywhere); None = all valid.
  """
  dist = jnp.asarray(ot_dist, jnp.float32)
  valid = (
      jnp.ones(dist.shape, bool) if example_mask is None else jnp.asarray(example_mask, bool)
  )
  pos = valid & (jnp.asarray(itm_targets) == 1)
  neg = valid & ~pos
  # where (not multiply) so a NaN / inf distance at batch padding cannot leak in.
  sum_pos = jnp.sum(jnp.where(pos, dist, 0.0))
  sum_neg = jnp.sum(jnp.where(neg, dist, 0.0))
  n_pos = jnp.sum(pos)
  n_neg = jnp.sum(neg)
  loss = (sum_pos - sum_neg) / jnp.maximum(n_pos + n_neg, 1)
  aux = {
      "ot_pos": sum_pos / jnp.maximum(n_pos, 1),
      "ot_neg": sum_neg / jnp.maximum(n_neg, 1),
  }
  return loss, aux
