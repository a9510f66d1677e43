"""Train-step speed: ms/step, examples/s, tokens/s, MFU and compile time, on arrays made on device.

    python benchmarks/train_step.py --sizes tiny,base --batch 32 --steps 10

Official shapes: text up to 60 tokens (+[CLS]/[SEP] -> 64 padded), 36 regions x 2048 features.
MFU uses XLA's FLOP count of the step (on an unscanned copy, averaged over the task mix).
Runs the same jitted pretraining step as the trainer (lax.switch over MLM, MRFR, MRC-kl, ITM
with WRA) without TensorFlow or the input pipeline. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from uniter_jax import flops as flops_lib, metrics, optim, sharding, train_step  # noqa: E402
from uniter_jax.masking import MaskingConfig  # noqa: E402
from uniter_jax.models import UniterConfig, UniterForPretraining  # noqa: E402
from uniter_jax.tasks import pretrain  # noqa: E402


def make_batch(cfg: UniterConfig, b: int, lt: int, li: int, key) -> dict:
  k1, k2, k3, k4 = jax.random.split(key, 4)
  soft = jax.nn.softmax(jax.random.normal(k3, (b, li, cfg.img_label_dim)), -1)
  return {
      "input_ids": jax.random.randint(k1, (b, lt), 106, cfg.vocab_size).at[:, 0].set(101),
      "txt_mask": jnp.ones((b, lt), bool),
      "img_feat": jax.random.normal(k2, (b, li, cfg.img_dim)),
      "img_pos": jax.random.uniform(k4, (b, li, 7)),
      "img_mask": jnp.ones((b, li), bool),
      "img_soft_labels": soft,
      "img_ids": jnp.arange(b, dtype=jnp.int32),
  }


def bench(size: str, batch: int, steps: int, dtype: str, lt: int, li: int, solver: str) -> dict:
  cfg = UniterConfig.preset(size, dtype=dtype, max_position_embeddings=max(64, lt),
                            remat_policy=None)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  rules = sharding.DATA_PARALLEL_RULES
  model_fn = lambda: UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  graphdef, abs_params, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
  tx, schedule = optim.make_optimizer(abs_params, lr=5e-5, warmup_steps=10, total_steps=1000)

  init = train_step.init_state_fn(model_fn, tx)
  shard = sharding.state_shardings(jax.eval_shape(init), mesh, rules)
  mix = {"mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0, "itm": 2.0}  # in-domain base config
  objective = pretrain.objective(pretrain.PretrainSettings(
      mix=tuple(mix.items()), masking=MaskingConfig(), ot_options=(("solver", solver),)))
  step = train_step.make_train_step(graphdef, tx, objective, rules=rules, schedule=schedule)
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shard)()
    b = jax.device_put(make_batch(cfg, batch, lt, li, jax.random.PRNGKey(1)),
                       sharding.batch_sharding(mesh, rules))
    fn = jax.jit(step, out_shardings=(shard, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, b)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
  # Counted on an unscanned copy (XLA counts a scanned layer once), averaged over the mix.
  flat = flops_lib.unscanned(cfg)
  per_branch = flops_lib.branch_flops(lambda: UniterForPretraining(flat, rngs=nnx.Rngs(0)), tx,
                                      objective, jax.eval_shape(lambda: b), rules)
  flops = flops_lib.mean_step_flops(per_branch, mix)
  peak = metrics.device_peak_flops()
  return {"size": size, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "dtype": dtype, "batch": batch, "txt_len": lt, "regions": li, "ot_solver": solver,
          "ms_per_step": round(dt * 1e3, 2), "examples_per_s": round(batch / dt, 1),
          "tokens_per_s": round(batch * (lt + li) / dt, 1),
          "mfu": None if not (flops and peak) else round(flops / dt / (peak * jax.device_count()), 4),
          "gflops_per_example": round(flops / batch / 1e9, 2),
          "compile_s": round(compile_s, 1), "jax": jax.__version__}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="tiny,base,large")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--txt-len", type=int, default=64)
  p.add_argument("--regions", type=int, default=36)
  p.add_argument("--ot-solver", default="sinkhorn")
  a = p.parse_args()
  for size in a.sizes.split(","):
    print(json.dumps(bench(size, a.batch, a.steps, a.dtype, a.txt_len, a.regions, a.ot_solver)),
          flush=True)


if __name__ == "__main__":
  main()
