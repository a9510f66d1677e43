"""On the 8-device mesh with FSDP-sharded parameters every loss equals the unsharded value."""

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
  for task in ("mlm", "mrfr", "mrc", "mrckl", "itm"):
    # One ITM group for the whole batch in both runs (inside the mesh the default would be
    # one group per device, a different draw).
    b = apply_objective(jax.random.key(9), raw, task, MCFG, itm_group_size=8)
    # The unsharded reference, jitted on one device outside the mesh (op-by-op is slower).
    ref = jax.jit(lambda s, b: pretrain_loss(nnx.merge(ref_graphdef, s), b, task,
                                             solver="ipot")["loss"])(ref_state, b)

    @jax.jit
    def f(state, batch):
      with sharding.use_rules(rules):
        m = nnx.merge(graphdef, state)
        return pretrain_loss(m, apply_objective(jax.random.key(9), batch, task, MCFG, 8), task,
                             solver="ipot")["loss"]

    with jax.set_mesh(mesh):
      got = f(state, jax.device_put(raw, batch_sh))
    np.testing.assert_allclose(got, ref, rtol=2e-5, err_msg=task)
