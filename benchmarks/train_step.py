"""Train-step speed: ms/step, examples/s, tokens/s, MFU and compile time, on arrays made on device.

    python benchmarks/train_step.py --sizes tiny,base --batch 32 --steps 10
    python benchmarks/train_step.py --sizes tiny,small --objectives mlm,mrfr,mrckl \
        --heads masked,full --dtype float32     # masked-position heads against full-width ones

Official shapes: text up to 60 tokens (+[CLS]/[SEP] -> 64 padded), 36 regions x 2048 features.
MFU uses XLA's FLOP count of the step (on an unscanned copy, averaged over the task mix).
Runs the same jitted pretraining step as the trainer (lax.switch over MLM, MRFR, MRC-kl, ITM
with WRA) without the input pipeline. Prints one JSON line per size, objective and heads.

--objectives: "mix" (the in-domain base mix, one switch) or a comma list of objectives, each
timed on its own. --heads: "masked" (the trainer's default: MLM / MRM heads on the masked
positions, config.pretrain.masked_budget_margin), "full" (heads at every position) or both,
then a ratio line per size and objective. Sizes: the UniterConfig presets, and "small" (4
layers of 256 with the real vocabulary and detector sizes, so the heads weigh as in base).

Needs jax, flax and optax only: no TensorFlow, ml_collections or ott-jax. Without ott-jax the
ITM + WRA branch uses the "ipot" solver (the official algorithm) and says so.
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
from uniter_jax.losses.pretrain import DEFAULT_MASKED_BUDGET_MARGIN  # noqa: E402
from uniter_jax.masking import MaskingConfig  # noqa: E402
from uniter_jax.models import UniterConfig, UniterForPretraining  # noqa: E402
from uniter_jax.tasks import pretrain  # noqa: E402


# Benchmark-only sizes beside the presets.
SIZES = {"small": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)}
MIX = {"mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0, "itm": 2.0}  # in-domain base config


def model_config(size: str, **overrides) -> UniterConfig:
  if size in SIZES:
    return UniterConfig(**SIZES[size], **overrides)
  return UniterConfig.preset(size, **overrides)


def word_ids(cfg: UniterConfig) -> tuple[int, int]:
  """[low, high) of ordinary word ids: bert-base-cased's, or 4.. for a toy vocabulary."""
  return (106 if cfg.vocab_size > 1000 else 4), cfg.vocab_size


def masking(cfg: UniterConfig) -> MaskingConfig:
  """The official masking, its special ids inside a toy vocabulary too."""
  if cfg.vocab_size > 1000:
    return MaskingConfig()
  return MaskingConfig(mask_id=3, special_ids=(0, 1, 2, 3), random_range=word_ids(cfg))


def make_batch(cfg: UniterConfig, b: int, lt: int, li: int, key) -> dict:
  k1, k2, k3, k4 = jax.random.split(key, 4)
  cls = 101 if cfg.vocab_size > 1000 else 1  # [CLS]
  soft = jax.nn.softmax(jax.random.normal(k3, (b, li, cfg.img_label_dim)), -1)
  return {
      "input_ids": jax.random.randint(k1, (b, lt), *word_ids(cfg)).at[:, 0].set(cls),
      "txt_mask": jnp.ones((b, lt), bool),
      "img_feat": jax.random.normal(k2, (b, li, cfg.img_dim)),
      "img_pos": jax.random.uniform(k4, (b, li, 7)),
      "img_mask": jnp.ones((b, li), bool),
      "img_soft_labels": soft,
      "img_ids": jnp.arange(b, dtype=jnp.int32),
  }


def build(size: str, batch: int, dtype: str, lt: int, li: int, solver: str,
          mix: dict | None = None, heads: str = "masked") -> dict:
  """The trainer's pretraining step for `mix`, compiled for one batch made on device.

  Returns {"step": compiled (state, batch) -> (state, metrics) with the state donated,
  "state", "batch", "mesh", "cfg", "tx", "objective", "rules", "mix", "compile_s"}.
  """
  cfg = model_config(size, dtype=dtype, max_position_embeddings=max(64, lt), remat_policy=None)
  mix = dict(mix or MIX)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  rules = sharding.DATA_PARALLEL_RULES
  model_fn = lambda: UniterForPretraining(cfg, rngs=nnx.Rngs(0))
  graphdef, abs_params, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
  tx, schedule = optim.make_optimizer(abs_params, lr=5e-5, warmup_steps=10, total_steps=1000)

  init = train_step.init_state_fn(model_fn, tx)
  shard = sharding.state_shardings(jax.eval_shape(init), mesh, rules)
  margin = DEFAULT_MASKED_BUDGET_MARGIN if heads == "masked" else None
  objective = pretrain.objective(pretrain.PretrainSettings(
      mix=tuple(mix.items()), masking=masking(cfg), ot_options=(("solver", solver),),
      masked_budget_margin=margin))
  step = train_step.make_train_step(graphdef, tx, objective, rules=rules, schedule=schedule)
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shard)()
    b = jax.device_put(make_batch(cfg, batch, lt, li, jax.random.PRNGKey(1)),
                       sharding.batch_sharding(mesh, rules))
    fn = jax.jit(step, out_shardings=(shard, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
  return {"step": compiled, "state": state, "batch": b, "mesh": mesh, "cfg": cfg, "tx": tx,
          "objective": objective, "rules": rules, "mix": mix, "compile_s": compile_s}


def bench(size: str, batch: int, steps: int, dtype: str, lt: int, li: int, solver: str,
          mix: dict | None = None, heads: str = "masked") -> dict:
  built = build(size, batch, dtype, lt, li, solver, mix, heads)
  compiled, state, b, mesh = built["step"], built["state"], built["batch"], built["mesh"]
  cfg, tx, objective, rules, mix = (built[k] for k in ("cfg", "tx", "objective", "rules", "mix"))
  compile_s = built["compile_s"]
  with jax.set_mesh(mesh):
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    t0, c0 = time.perf_counter(), time.process_time()
    full_heads = 0.0
    for _ in range(steps):
      state, m = compiled(state, b)
      full_heads += m["full_heads"]
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    cpu = (time.process_time() - c0) / steps
  # Counted on an unscanned copy (XLA counts a scanned layer once), averaged over the mix.
  flat = flops_lib.unscanned(cfg)
  per_branch = flops_lib.branch_flops(lambda: UniterForPretraining(flat, rngs=nnx.Rngs(0)), tx,
                                      objective, jax.eval_shape(lambda: b), rules)
  flops = flops_lib.mean_step_flops(per_branch, mix)
  peak = metrics.device_peak_flops()
  return {"size": size, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "objectives": ",".join(mix), "heads": heads,
          # Share of the timed steps whose masked positions overflowed the budget (full heads).
          "full_heads_share": None if heads == "full" else round(float(full_heads) / steps, 3),
          "dtype": dtype, "batch": batch, "txt_len": lt, "regions": li, "ot_solver": solver,
          "ms_per_step": round(dt * 1e3, 2), "examples_per_s": round(batch / dt, 1),
          # This process's CPU time per step (all threads): steadier than wall time on a
          # shared CPU host, meaningless on an accelerator.
          "cpu_ms_per_step": round(cpu * 1e3, 2),
          "tokens_per_s": round(batch * (lt + li) / dt, 1),
          "mfu": None if not (flops and peak) else round(flops / dt / (peak * jax.device_count()), 4),
          "gflops_per_example": round(flops / batch / 1e9, 4),
          "compile_s": round(compile_s, 1), "jax": jax.__version__}


def has_ott() -> bool:
  try:
    import ott  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def usable_solver(solver: str) -> str:
  """`solver`, or "ipot" (the official algorithm, no ott-jax needed) when it is "sinkhorn" and
  ott-jax is not installed; says so on stderr."""
  if solver == "sinkhorn" and not has_ott():
    print('ott-jax is not installed: ITM + WRA runs the "ipot" solver instead of "sinkhorn" '
          "(pip install ott-jax for the default solver)", file=sys.stderr, flush=True)
    return "ipot"
  return solver


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="tiny,base,large")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--txt-len", type=int, default=64)
  p.add_argument("--regions", type=int, default=36)
  p.add_argument("--ot-solver", default="sinkhorn")
  p.add_argument("--objectives", default="mix",
                 help='"mix" (the base mix in one step) or objectives timed one by one, '
                      'e.g. mlm,mrfr,mrckl')
  p.add_argument("--heads", default="masked", help="masked, full, or masked,full")
  a = p.parse_args()
  mixes = [MIX] if a.objectives == "mix" else [{o: 1.0} for o in a.objectives.split(",")]
  solver = usable_solver(a.ot_solver) if any("itm" in m for m in mixes) else a.ot_solver
  for size in a.sizes.split(","):
    for mix in mixes:
      rows = {}
      for heads in a.heads.split(","):
        rows[heads] = bench(size, a.batch, a.steps, a.dtype, a.txt_len, a.regions, solver,
                            mix, heads)
        print(json.dumps(rows[heads]), flush=True)
      if {"masked", "full"} <= set(rows):
        full, masked = rows["full"], rows["masked"]
        print(json.dumps({"size": size, "objectives": ",".join(mix),
                          "full_over_masked_ms": round(full["ms_per_step"]
                                                       / masked["ms_per_step"], 3),
                          "full_over_masked_cpu_ms": round(full["cpu_ms_per_step"]
                                                           / masked["cpu_ms_per_step"], 3),
                          "full_over_masked_gflops": round(full["gflops_per_example"]
                                                           / max(masked["gflops_per_example"],
                                                                 1e-9), 3)}), flush=True)


if __name__ == "__main__":
  main()
