"""FLOP counting of the train step (used for MFU and the input benchmark's step rate)."""

import numpy as np
from flax import nnx

from helpers import tiny_config
from uniter_jax import flops, optim, sharding
from uniter_jax.masking import MaskingConfig
from uniter_jax.models import UniterForPretraining
from uniter_jax.tasks import pretrain


def _flops(num_layers: int, name: str = "mrfr", margin: float | None = 0.25) -> float:
  cfg = tiny_config(num_layers=num_layers)
  _, params, _ = nnx.split(nnx.eval_shape(lambda: UniterForPretraining(cfg, rngs=nnx.Rngs(0))),
                           nnx.Param, ...)
  tx, _ = optim.make_optimizer(params, lr=1e-3, warmup_steps=1, total_steps=10)
  objective = pretrain.objective(pretrain.PretrainSettings(
      mix=((name, 1.0),), masking=MaskingConfig(), masked_budget_margin=margin))
  flat = flops.unscanned(cfg)
  return flops.branch_flops(lambda: UniterForPretraining(flat, rngs=nnx.Rngs(0)), tx, objective,
                            flops.abstract_batch(cfg, 4, 16, 8),
                            sharding.DATA_PARALLEL_RULES)[name]


def test_every_layer_is_counted_once():
  # XLA counts a scanned body once; the unscanned count must grow linearly with depth.
  f1, f2, f3 = _flops(1), _flops(2), _flops(3)
  per_layer = f2 - f1
  assert per_layer > 0.2 * f1
  np.testing.assert_allclose(f3 - f2, per_layer, rtol=1e-2)
  # Forward + backward of one layer: at least 6 x its matmul weights x tokens.
  cfg = tiny_config()
  weights = 4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size
  assert per_layer >= 6 * weights * 4 * (16 + 8)


def test_mix_average():
  assert flops.mean_step_flops({"a": 10.0, "b": 40.0}, {"a": 3.0, "b": 1.0}) == 17.5


def test_masked_heads_count_their_usual_path():
  # XLA counts a lax.cond as its costliest branch, here the rare full-width fallback: the
  # count must follow the gathered heads (16 of 64 text slots: about 11% less here).
  full, masked = _flops(1, "mlm", None), _flops(1, "mlm", 0.25)
  assert masked < 0.92 * full, (masked, full)
