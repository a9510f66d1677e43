"""On the 8-device mesh with FSDP-sharded parameters every loss equals the unsharded value."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import random_batch, tiny_config, to_jnp
from uniter_jax import sharding
from uniter_jax.losses import pretrain_loss
from uniter_jax.masking import MaskingConfig, apply_objective
from uniter_jax.models import UniterForPretraining

MCFG = MaskingConfig(mask_id=3, special_ids=(0, 1, 2, 3), random_range=(4, 100))


def test_sharded_losses_equal_unsharded(mesh):
  cfg = tiny_config()
  ref_model = UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  rules = sharding.FSDP_RULES
  model = sharding.create_sharded(lambda: UniterForPretraining(cfg, rngs=nnx.Rngs(0)),
                                  mesh, rules)
  kernel = model.uniter.encoder.layer.intermediate.dense.kernel[...]
  assert kernel.sharding.spec == P(None, "fsdp", None)
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (2, 32, 128)
  raw = to_jnp(random_batch(21, b=8, cfg=cfg))
  graphdef, state = nnx.split(model)
  ref_graphdef, ref_state = nnx.split(ref_model)
  batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, rules, x.ndim), raw)
  tasks = ("mlm", "mrfr", "mrc", "mrckl", "itm")

  def losses(graphdef, state, batch):
    m = nnx.merge(graphdef, state)
    # One ITM group for the whole batch in both runs (inside the mesh the default would be
    # one group per device, a different draw).
    return {task: pretrain_loss(m, apply_objective(jax.random.key(9), batch, task, MCFG, 8),
                                task, solver="ipot")["loss"] for task in tasks}

  # The unsharded reference: one program on one device, outside the mesh.
  ref = jax.jit(functools.partial(losses, ref_graphdef))(ref_state, raw)

  @jax.jit
  def f(state, batch):
    with sharding.use_rules(rules):
      return losses(graphdef, state, batch)

  with jax.set_mesh(mesh):
    got = f(state, jax.device_put(raw, batch_sh))
  for task in tasks:
    np.testing.assert_allclose(got[task], ref[task], rtol=2e-5, err_msg=task)
