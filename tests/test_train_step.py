"""The jitted train step on the 8-device mesh: sharding, compiles, learning, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import random_batch, tiny_config, to_jnp
from uniter_jax import sharding, train
from uniter_jax import train_step as step_lib
from uniter_jax.masking import MaskingConfig, apply_objective
from uniter_jax.losses import pretrain_loss
from uniter_jax.models import UniterForPretraining
from uniter_jax.tasks import pretrain

OBJECTIVES = ("mlm", "mrfr", "mrckl", "itm")
MCFG = MaskingConfig(mask_id=3, special_ids=(0, 1, 2, 3), random_range=(4, 100))
RULES = sharding.FSDP_RULES


def _settings(names, ratios, ot_solver="ipot", masking=MCFG, loss_weights=()):
  return pretrain.PretrainSettings(mix=tuple(zip(names, ratios)), masking=masking,
                                   ot_options=(("solver", ot_solver),),
                                   loss_weights=loss_weights)


def _setup(mesh, ratios, lr=1e-3, clip=5.0, ot_solver="ipot", names=OBJECTIVES,
           loss_weights=()):
  cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
  model_fn = lambda: UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  graphdef, abs_params, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
  from uniter_jax import optim
  tx, schedule = optim.make_optimizer(abs_params, lr=lr, warmup_steps=1, total_steps=1000,
                                      grad_clip=clip)
  init_fn = step_lib.init_state_fn(model_fn, tx, 0)
  shardings = train.state_shardings(jax.eval_shape(init_fn), mesh, RULES)
  state = train.create_state(init_fn, shardings, mesh, RULES)
  s = _settings(names, ratios, ot_solver, loss_weights=loss_weights)
  step = step_lib.make_train_step(graphdef, tx, pretrain.objective(s), rules=RULES,
                                  schedule=schedule)
  return cfg, graphdef, tx, state, shardings, s, step


def _batch(mesh, seed=0, b=8, micro=False):
  raw = to_jnp(random_batch(seed, b=b, cfg=tiny_config()))
  raw = step_lib.model_fields(raw)
  return jax.device_put(raw, train.batch_shardings(raw, mesh, RULES, micro))


def test_sharded_params_one_compile_and_finite_loss(mesh):
  *_, state, shardings, _, step = _setup(mesh, (1.0, 1.0, 1.0, 1.0))
  golden = {
      ("uniter", "embeddings", "word_embeddings", "embedding"): P(None, "fsdp"),
      ("uniter", "encoder", "layer", "intermediate", "dense", "kernel"): P(None, "fsdp", None),
      ("uniter", "encoder", "layer", "output", "dense", "kernel"): P(None, None, "fsdp"),
      ("uniter", "encoder", "layer", "attention", "self_attn", "query", "bias"): P(None, None),
      ("uniter", "img_embeddings", "img_linear", "kernel"): P(None, "fsdp"),
      ("uniter", "img_embeddings", "LayerNorm", "scale"): P("fsdp",),
      ("cls", "predictions", "bias"): P(None,),
      ("itm_output", "kernel"): P("fsdp", None),
  }
  flat = dict(nnx.to_flat_state(state["params"]))
  for path, spec in golden.items():
    assert flat[path][...].sharding.spec == spec, path
  # Adam moments follow their parameters.
  mu = dict(nnx.to_flat_state(state["opt_state"][1].mu))
  assert mu[("uniter", "img_embeddings", "img_linear", "kernel")][...].sharding.spec == \
      P(None, "fsdp")
  batch = _batch(mesh)
  fn = jax.jit(step, in_shardings=(shardings, train.batch_shardings(batch, mesh, RULES, False)),
               out_shardings=(shardings, None), donate_argnums=(0,))
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, metrics = fn(state, batch)
      assert np.isfinite(metrics["loss"])
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  assert int(state["step"]) == 3


@pytest.fixture(scope="module")
def repeated_batch_losses():
  """Each objective's loss on one batch before and after 15 train steps on that batch.

  One device and one objective per train step (the multi-branch switch on the 8-device mesh
  is exercised above); the four objectives' steps run side by side in one program, which
  compiles much faster than four programs.
  """
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  eval_graphdef = nnx.graphdef(nnx.eval_shape(lambda: UniterForPretraining(
      tiny_config(), rngs=nnx.Rngs(0))))
  states, steps, evals, out_shardings = {}, {}, {}, {}
  for objective in OBJECTIVES:
    _, graphdef, tx, state, shardings, s, step = _setup(one, (1.0,), lr=3e-3,
                                                         names=(objective,))
    if objective == "itm":
      # Negatives are redrawn every step, and random pairs have no alignment to learn in 15
      # steps; with every pair a negative the ITM branch has a fittable target.
      s = dataclasses.replace(s, masking=dataclasses.replace(MCFG, itm_neg_prob=1.0))
      step = step_lib.make_train_step(graphdef, tx, pretrain.objective(s), rules=RULES)
    states[objective], steps[objective], out_shardings[objective] = state, step, shardings
    evals[objective] = pretrain.make_eval_step(eval_graphdef, s, RULES)
  batch = _batch(one, seed=1)
  fn = jax.jit(lambda states, batch: {o: steps[o](states[o], batch)[0] for o in OBJECTIVES},
               out_shardings=out_shardings, donate_argnums=(0,))

  @jax.jit
  def evaluate(states, batch):
    # Training redraws masks every step; the loss is measured with one fixed draw.
    key = jax.random.PRNGKey(5)
    return {o: evals[o](states[o]["params"], states[o]["rest"], batch, key)[
        f"{'itm_in_batch' if o == 'itm' else o}/loss"] for o in OBJECTIVES}

  with jax.set_mesh(one):
    before = evaluate(states, batch)
    for _ in range(15):
      states = fn(states, batch)
    after = evaluate(states, batch)
  return {o: (float(before[o]), float(after[o])) for o in OBJECTIVES}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_goes_down_on_a_repeated_batch(repeated_batch_losses, objective):
  before, after = repeated_batch_losses[objective]
  assert after < 0.95 * before, (before, after)


def test_accumulation_sums_microbatch_gradients_then_clips(mesh):
  """Also the branch's loss weight (config.pretrain.loss_weights): it scales the summed
  gradient before clipping and the update, as a weighted loss would."""
  k, weight = 3, 2.0
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  mesh = one
  cfg, graphdef, tx, state, shardings, _, step = _setup(one, (1.0,), clip=0.05,
                                                         names=("mlm",),
                                                         loss_weights=(("mlm", weight),))
  micro = [step_lib.model_fields(to_jnp(random_batch(10 + i, b=8, cfg=cfg))) for i in range(k)]
  stacked = train.stack_microbatches(micro)
  params0 = jax.tree.map(np.asarray, state["params"])
  opt0 = jax.tree.map(np.asarray, state["opt_state"])
  with jax.set_mesh(mesh):
    new_state, m = jax.jit(step)(state, stacked)

  # Independent reference: each micro-batch's gradient by jax.grad on its own, summed. One
  # jitted program serves every micro-batch (op-by-op dispatch of the model is far slower).
  key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
  _, k_micro = jax.random.split(key)

  @jax.jit
  def micro_grad(p, b, i):
    k_mask, k_drop = jax.random.split(jax.random.fold_in(k_micro, i))
    tb = apply_objective(k_mask, b, "mlm", MCFG)

    def loss(p):
      mdl = nnx.merge(graphdef, p, nnx.State({}))
      return pretrain_loss(mdl, tb, "mlm", deterministic=False, rngs=k_drop)["loss"]

    return jax.grad(loss)(p)

  total = None
  for i, b in enumerate(micro):
    g = micro_grad(params0, b, i)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  total = jax.tree.map(lambda g: weight * g, total)

  @jax.jit
  def reference_update(grads, opt, params):
    updates, _ = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates)

  expected = reference_update(total, opt0, params0)
  np.testing.assert_allclose(m["grad_norm"], optax.global_norm(total), rtol=1e-4)
  assert float(optax.global_norm(total)) > 0.05  # the clip really acts
  for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.parametrize("rows", [64, 48])
def test_itm_groups_follow_the_mesh_inside_the_step(mesh, rows):
  # No group size is configured: the step reads it off the batch and the mesh (8 shards), so
  # a token-budget batch of any multiple of 8 rows swaps images only within a device's rows.
  n = rows
  batch = dict(input_ids=jnp.zeros((n, 3), jnp.int32), txt_mask=jnp.ones((n, 3), bool),
               img_feat=jnp.asarray(np.arange(n, dtype=np.float32)[:, None, None]
                                    * np.ones((1, 2, 3), np.float32)),
               img_pos=jnp.zeros((n, 2, 7)), img_mask=jnp.ones((n, 2), bool),
               img_ids=jnp.arange(n, dtype=jnp.int32))
  batch = jax.device_put(batch, train.batch_shardings(batch, mesh, RULES, False))
  cfg = dataclasses.replace(MCFG, itm_neg_prob=1.0)

  def negatives(b, key):
    with sharding.use_rules(RULES):
      return apply_objective(key, b, "itm", cfg)["img_feat"][:, 0, 0]

  with jax.set_mesh(mesh):
    src = np.asarray(jax.jit(negatives)(batch, jax.random.key(2))).astype(int)
  group = n // 8
  assert (src != np.arange(n)).all()
  assert (src // group == np.arange(n) // group).all()
  # Outside a mesh the whole batch is one group: some swaps cross the 8 device slices.
  whole = np.asarray(apply_objective(jax.random.key(2), jax.device_get(batch), "itm", cfg)
                     ["img_feat"][:, 0, 0]).astype(int)
  assert (whole // group != np.arange(n) // group).any()


def test_mix_curriculum_blends_from_the_warmup_mix_into_the_final_mix():
  s = pretrain.PretrainSettings(mix=(("mlm", 1.0), ("itm", 3.0)), masking=MCFG,
                                warmup_mix=(("mlm", 6.0), ("mrfr", 2.0)), warmup_steps=100,
                                ramp_steps=50)
  assert s.names == ("mlm", "itm", "mrfr")
  warm, final = np.array([0.75, 0.0, 0.25]), np.array([0.25, 0.75, 0.0])
  for step, w in ((0, 0.0), (99, 0.0), (100, 0.0), (125, 0.5), (150, 1.0), (10_000, 1.0)):
    np.testing.assert_allclose(s.ratios_at(step), (1 - w) * warm + w * final, atol=1e-6,
                               err_msg=str(step))
  obj = pretrain.objective(s)
  assert obj.ratios == (1.0, 3.0, 0.0)  # the final mix (FLOP averages)
  np.testing.assert_allclose(obj.ratios_at(jnp.int32(0)), warm, atol=1e-6)
  assert obj.single(2).ratio_fn is None
  # Drawn inside the step: before the ramp ITM (index 1) is never chosen, after it MRFR never.
  keys = jax.random.split(jax.random.key(0), 400)
  early = jax.vmap(lambda k: step_lib.draw_branch(k, obj.ratios_at(jnp.int32(10))))(keys)
  late = jax.vmap(lambda k: step_lib.draw_branch(k, obj.ratios_at(jnp.int32(500))))(keys)
  assert 1 not in set(np.asarray(early).tolist()) and 2 not in set(np.asarray(late).tolist())
  assert abs(np.mean(np.asarray(late) == 1) - 0.75) < 0.07
  no_ramp = dataclasses.replace(s, ramp_steps=0)
  np.testing.assert_allclose(no_ramp.ratios_at(99), warm, atol=1e-6)
  np.testing.assert_allclose(no_ramp.ratios_at(100), final, atol=1e-6)


def test_lr_schedule_official_by_default_and_held_until_decay_start():
  from uniter_jax import optim  # pylint: disable=import-outside-toplevel
  counts = np.array([4, 9, 29, 49, 54, 74, 99])  # s = count + 1
  # Official get_lr_sched: lr * s / warmup, then lr * (total - s) / (total - warmup), floor 1e-8.
  official = optim.linear_warmup_decay(1.0, 10, 100)(counts)
  np.testing.assert_allclose(official, [0.5, 1.0, 70 / 90, 50 / 90, 0.5, 25 / 90, 1e-8],
                             rtol=1e-6)
  # decay_start=50: the same warmup, lr held until s = 50, then linear to 0 at s = 100.
  held = optim.linear_warmup_decay(1.0, 10, 100, decay_start=50)(counts)
  np.testing.assert_allclose(held, [0.5, 1.0, 1.0, 1.0, 0.9, 0.5, 1e-8], rtol=1e-6)
  # decay_start at or below warmup_steps is the official schedule.
  np.testing.assert_array_equal(optim.linear_warmup_decay(1.0, 10, 100, decay_start=5)(counts),
                                official)
