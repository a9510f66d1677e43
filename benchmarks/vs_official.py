"""Pretraining train step: ours against the official PyTorch UNITER, side by side in one process.

    taskset -c 0 python benchmarks/vs_official.py --official DIR --sizes small,base \\
        --tasks mlm,mrfr,mrckl,itm --rounds 3 --steps 2 --out vs_official.json

DIR: a checkout of github ChenRocks/UNITER (its model/ and optim/ packages are imported from
there; benchmarks/official.py says how, and how to get torch). For each size both models start
from the same weights (the official init, read into ours with
uniter_jax.interop.load_official_checkpoint) and each objective runs on the same examples:

- official step: the model in train mode, `model(batch, task, compute_loss=True)` on a batch in
  the official collate layout (text padded to the batch's longest, regions to its most, masked
  positions only in the heads), the loss reduced as pretrain.py reduces it (mean; ITM: mean
  cross-entropy + 0.1 x the WRA term over positives and negatives), backward,
  clip_grad_norm_(5.0) and the official optim/adamw.py AdamW (torch.optim.AdamW when DIR has
  no optim/), zero_grad.
- our step: the trainer's jitted step (uniter_jax.train_step.make_train_step with the pretrain
  task's objective, optimizer, rules and mesh of configs/pretrain.py:base), float32, the text
  padded to the smallest of the config's text buckets (24, 40, 64) that holds the batch's
  longest and the regions to its region bucket (36), masking and ITM negatives drawn inside the
  step, WRA with the config's solver (sinkhorn; --ot-solver=ipot for the official algorithm).

Rounds alternate the two (official first in even rounds, ours first in odd ones) with a 1024^3
float32 matmul probe of torch and of XLA before each round, so both see the same machine; the
table gives the median step time of each over all rounds, examples/s and ours / official.

Same computation: before timing, each objective's loss on one batch with one fixed masking
(drawn by uniter_jax.masking, converted to the official layout), both models in eval mode, WRA
with IPOT on both sides: the largest difference is printed and recorded.

Threads: --threads (default 1) sets torch.set_num_threads and the XLA:CPU flags
(--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1) before jax starts; pin
the process to one core with `taskset -c 0` for a one-core comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import official  # noqa: E402  (benchmarks/official.py: imports no jax)

os.environ["XLA_FLAGS"] = official.thread_flags(official.threads_arg(sys.argv))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import train_step as bench_step  # noqa: E402  (benchmarks/train_step.py: sizes, ott check)
from configs import pretrain as pretrain_config  # noqa: E402
from uniter_jax import interop, sharding, train  # noqa: E402
from uniter_jax import train_step as step_lib  # noqa: E402
from uniter_jax.losses import pretrain_loss  # noqa: E402
from uniter_jax.masking import MaskingConfig, apply_objective  # noqa: E402
from uniter_jax.tasks import pretrain  # noqa: E402

TASKS = ("mlm", "mrfr", "mrckl", "itm")
CLS, SEP = 101, 102  # bert-base-cased


# -- one batch of examples, in our layout and in the official one --------------------------------

def examples(cfg, batch: int, min_len: int, max_len: int, regions: int, lt: int, li: int,
             seed: int) -> dict[str, np.ndarray]:
  """`batch` random image-text pairs in our layout: text of min_len..max_len tokens
  ([CLS] words [SEP]) padded to lt, `regions` post-ReLU features with boxes and detector soft
  labels padded to li."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_len, max_len + 1, batch)
  ids = rng.integers(106, cfg.vocab_size, (batch, lt))
  mask = np.arange(lt)[None] < lengths[:, None]
  ids[:, 0] = CLS
  ids[np.arange(batch), lengths - 1] = SEP
  img_mask = np.broadcast_to(np.arange(li) < regions, (batch, li))
  xy = rng.uniform(0.0, 0.8, (batch, li, 2))
  wh = rng.uniform(0.05, 1.0, (batch, li, 2)) * (1.0 - xy)
  pos = np.concatenate([xy, xy + wh, wh, wh[..., :1] * wh[..., 1:]], -1)
  logits = rng.standard_normal((batch, li, cfg.img_label_dim)) * 2.0
  soft = np.exp(logits - logits.max(-1, keepdims=True))
  return {"input_ids": np.where(mask, ids, 0).astype(np.int32), "txt_mask": mask,
          "img_feat": (np.maximum(rng.standard_normal((batch, li, cfg.img_dim)), 0)
                       * img_mask[..., None]).astype(np.float32),
          "img_pos": (pos * img_mask[..., None]).astype(np.float32), "img_mask": img_mask,
          "img_soft_labels": (soft / soft.sum(-1, keepdims=True)).astype(np.float32),
          "img_ids": np.arange(batch, dtype=np.int32)}


def to_official(b: dict[str, np.ndarray], task: str) -> dict:
  """Our batch, masked for `task` (uniter_jax.masking.apply_objective), in the official collate
  layout (data/data.py, mlm.py, mrm.py, itm.py of ChenRocks/UNITER): each example's text then
  its regions packed by `gather_index`, text padded to the longest, regions to the most."""
  torch = official.require_torch()
  tl, nb = b["txt_mask"].sum(1), b["img_mask"].sum(1)
  mt, mn, length = int(tl.max()), int(nb.max()), int((tl + nb).max())
  n = len(tl)
  gather = np.tile(np.arange(length), (n, 1))
  for i in range(n):
    gather[i, tl[i]:tl[i] + nb[i]] = mt + np.arange(nb[i])
  t = lambda x, dtype=None: torch.from_numpy(np.ascontiguousarray(x if dtype is None else x.astype(dtype)))
  out = {"input_ids": t(b["input_ids"][:, :mt], np.int64),
         "position_ids": t(np.arange(mt)[None], np.int64),
         "img_feat": t(b["img_feat"][:, :mn]), "img_pos_feat": t(b["img_pos"][:, :mn]),
         "attn_masks": t(np.arange(length)[None] < (tl + nb)[:, None], np.int64),
         "gather_index": t(gather, np.int64)}
  if task == "mlm":
    out["txt_labels"] = t(b["txt_labels"][:, :mt], np.int64)
  elif task in ("mrfr", "mrc", "mrckl"):
    masked = b["img_masked"][:, :mn]
    j = np.arange(length)[None] - tl[:, None]
    out["img_masks"] = t(masked)
    out["img_mask_tgt"] = t((j >= 0) & (j < nb[:, None]) & np.take_along_axis(
        masked, np.clip(j, 0, mn - 1), 1))
    key = "feat_targets" if task == "mrfr" else "label_targets"
    out[key] = t(b[key][:, :mn][masked])
  elif task == "itm":
    scatter = np.tile(np.arange(length), (n, 1))
    for i in range(n):
      scatter[i, tl[i]:] = mt + np.arange(length - tl[i])
    out["targets"] = t(b["itm_targets"], np.int64)
    out["ot_inputs"] = {"ot_scatter": t(scatter, np.int64), "scatter_max": int(scatter.max()),
                        "txt_pad": t(np.arange(mt)[None] >= tl[:, None]),
                        "img_pad": t(np.arange(mn)[None] >= nb[:, None])}
  return out


# -- the official step ----------------------------------------------------------------------------

def official_loss(model, batch: dict, task: str, ot_lambda: float):
  """The scalar pretrain.py back-propagates for one batch of `task`."""
  out = model(batch, task=task, compute_loss=True)
  if task != "itm":
    return out.mean()
  itm_loss, (pos, neg) = out
  return itm_loss.mean() + ot_lambda * (pos.sum() - neg.sum()) / (pos.size(0) + neg.size(0))


def eval_loss(graphdef, task: str, s: pretrain.PretrainSettings):
  """(params, rest, masked batch) -> our loss of `task` in eval mode (the trainer's reduction)."""

  def loss(params, rest, batch):
    return pretrain_loss(nnx.merge(graphdef, params, rest), batch, task, deterministic=True,
                         ot_lambda=s.ot_lambda, mask_rate=s.mask_rate(task),
                         masked_budget_margin=s.masked_budget_margin,
                         **dict(s.ot_options))["loss"]

  return loss


def official_optimizer(off, model, o):
  """The official optimizer (optim/misc.py build_optimizer: AdamW, no decay on bias and
  LayerNorm weights) with configs/pretrain.py:base's settings."""
  import types  # pylint: disable=import-outside-toplevel
  opts = types.SimpleNamespace(optim="adamw", learning_rate=o.lr, betas=(o.b1, o.b2),
                               weight_decay=o.weight_decay)
  if off.optim is not None:
    return off.optim.build_optimizer(model, opts)
  torch = official.require_torch()
  named = list(model.named_parameters())
  no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
  groups = [{"params": [p for n, p in named if not any(s in n for s in no_decay)],
             "weight_decay": o.weight_decay},
            {"params": [p for n, p in named if any(s in n for s in no_decay)],
             "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, foreach=False)


# -- side by side ---------------------------------------------------------------------------------

def release_memory() -> None:
  """Hands the heap memory freed by the last step back to the system (glibc malloc_trim), so
  one side's freed activations do not add to the other's peak (UNITER-base at batch 32 needs
  several GB per side). Outside the timed region."""
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:  # not glibc
    pass


def peak_rss_mb() -> int:
  """This process's peak resident memory so far."""
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def bucket(value: int, buckets) -> int:
  """The smallest bucket that holds `value` (the pipeline's padding)."""
  fits = [x for x in sorted(buckets) if x >= value]
  if not fits:
    raise SystemExit(f"error: {value} exceeds the largest bucket {max(buckets)}")
  return fits[0]


def run_size(size: str, a, off, config) -> dict:
  torch = official.require_torch()
  cfg = bench_step.model_config(size, dtype="float32", remat_policy=None)
  p, o = config.pretrain, config.optimizer
  solver = bench_step.usable_solver(a.ot_solver or p.ot.solver)
  options = dict(pretrain.ot_options(p.ot), solver=solver)
  margin = pretrain.masked_budget_margin(p)

  # Same weights: the official init (row 0 of the region mask embedding zeroed, as the
  # official forward does in place whenever regions are masked), read into ours.
  torch.manual_seed(a.seed)
  ref = off.pretrain.UniterForPretraining(official.official_config(off, cfg), cfg.img_dim,
                                          cfg.img_label_dim)
  with torch.no_grad():
    ref.uniter.img_embeddings.mask_embedding.weight[0].fill_(0)
  ours = interop.load_official_checkpoint(official.state_dict_numpy(ref), cfg, task="pretrain")
  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
  del ours
  opt = official_optimizer(off, ref, o)
  tx, schedule = train.make_optimizer(config, params)
  rules = train.rules_from(config)
  mesh = sharding.make_mesh(dict(config.mesh))

  lt = bucket(a.max_len, config.data.txt_buckets)
  li = bucket(a.regions, config.data.img_buckets)
  raw = examples(cfg, a.batch, a.min_len, a.max_len, a.regions, lt, li, a.seed)
  masking = MaskingConfig(mlm_prob=p.mlm_prob, mrm_prob=p.mrm_prob, itm_neg_prob=p.itm_neg_prob)

  def settings(task: str, ot: dict) -> pretrain.PretrainSettings:
    return pretrain.PretrainSettings(mix=((task, 1.0),), masking=masking,
                                     ot_lambda=float(p.ot_lambda),
                                     ot_options=tuple(ot.items()), masked_budget_margin=margin)

  state = {"params": params, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(a.seed)}
  shard = train.state_shardings(jax.eval_shape(lambda: state), mesh, rules)
  res = {"size": size, "params": int(sum(x.size for x in jax.tree.leaves(params))),
         "text_padding": {"official": int(raw["txt_mask"].sum(1).max()), "ours": lt},
         "regions": li, "ot_solver": solver, "tasks": {}}
  with jax.set_mesh(mesh):
    state = jax.device_put(state, shard)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in raw.items()},
                           train.batch_shardings(raw, mesh, rules, False))
    steps, fixed = {}, {}
    for task in a.tasks:
      # One fixed masking for the loss check and for the official batch of every round.
      s = settings(task, dict(options, solver="ipot"))
      masked = jax.tree.map(np.asarray, apply_objective(jax.random.PRNGKey(a.seed + 1), raw,
                                                        task, masking))
      fixed[task] = to_official(masked, task)
      mine = float(jax.jit(eval_loss(graphdef, task, s))(state["params"], state["rest"], masked))
      ref.eval()
      with torch.no_grad():
        theirs = float(official_loss(ref, fixed[task], task, float(p.ot_lambda)))
      ref.train()
      step = step_lib.make_train_step(graphdef, tx, pretrain.objective(settings(task, options)),
                                      rules=rules, schedule=schedule)
      t0 = time.perf_counter()
      steps[task] = jax.jit(step, in_shardings=(shard, train.batch_shardings(raw, mesh, rules,
                                                                             False)),
                            out_shardings=(shard, None), donate_argnums=(0,)
                            ).lower(state, batch).compile()
      compile_s = time.perf_counter() - t0
      mem = steps[task].memory_analysis()
      res["tasks"][task] = {"our_step_temp_mb": round(mem.temp_size_in_bytes / 2**20) if mem
                            else None, "loss_official": theirs, "loss_ours": mine,
                            "loss_abs_diff": abs(mine - theirs), "compile_s": round(compile_s, 1),
                            "official_s": [], "ours_s": []}
      print(f"{size} {task}: first-step loss official {theirs:.6f} ours {mine:.6f} "
            f"(|diff| {abs(mine - theirs):.2e}); our step compiled in {compile_s:.0f} s "
            f"(temp {res['tasks'][task]['our_step_temp_mb']} MB; peak RSS {peak_rss_mb()} MB)",
            flush=True)

    def run_official(task: str) -> float:
      t0 = time.perf_counter()
      loss = official_loss(ref, fixed[task], task, float(p.ot_lambda))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(ref.parameters(), o.grad_clip)
      opt.step()
      opt.zero_grad()
      dt = time.perf_counter() - t0
      del loss
      release_memory()
      return dt

    def run_ours(task: str) -> float:
      nonlocal state
      t0 = time.perf_counter()
      state, m = steps[task](state, batch)
      jax.block_until_ready(m["loss"])
      dt = time.perf_counter() - t0
      release_memory()
      return dt

    for task in a.tasks:  # warm-up: first calls allocate (both sides)
      run_official(task)
      run_ours(task)
    print(f"{size}: warm-up done (peak RSS {peak_rss_mb()} MB)", flush=True)
    probes = []
    for r in range(a.rounds):
      probes.append({"torch": round(official.torch_matmul_gflops(0.5), 1),
                     "xla": round(official.xla_matmul_gflops(0.5), 1)})
      for task in a.tasks:
        order = (("official", run_official), ("ours", run_ours))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
          res["tasks"][task][f"{name}_s"] += [fn(task) for _ in range(a.steps)]
      print(f"{size}: round {r + 1}/{a.rounds} done (probe GFLOP/s torch "
            f"{probes[-1]['torch']}, XLA {probes[-1]['xla']}; load {os.getloadavg()[0]:.1f})",
            flush=True)
  res["probes_gflops"] = probes
  for task, t in res["tasks"].items():
    for name in ("official", "ours"):
      t[f"{name}_s"] = [round(x, 3) for x in t[f"{name}_s"]]
      t[f"{name}_examples_per_s"] = round(a.batch / statistics.median(t[f"{name}_s"]), 3)
    t["ratio"] = round(t["ours_examples_per_s"] / t["official_examples_per_s"], 3)
  return res


def table(results: list[dict]) -> str:
  """Markdown: examples/s ours / official per size and task."""
  lines = ["| size | task | official ex/s | ours ex/s | ours / official | first-step loss |diff| |",
           "|---|---|---|---|---|---|"]
  for r in results:
    for task, t in r["tasks"].items():
      name = "itm + WRA" if task == "itm" else task
      lines.append(f"| {r['size']} | {name} | {t['official_examples_per_s']:.2f} | "
                   f"{t['ours_examples_per_s']:.2f} | **{t['ratio']:.2f}** | "
                   f"{t['loss_abs_diff']:.1e} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--official", required=True, help="folder with the official model/ package "
                 "(a checkout of github ChenRocks/UNITER)")
  p.add_argument("--sizes", default="small", help="small (4 x 256, real vocab) and/or base")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--min-len", type=int, default=20, help="shortest text, [CLS]/[SEP] included")
  p.add_argument("--max-len", type=int, default=60, help="longest text, [CLS]/[SEP] included")
  p.add_argument("--regions", type=int, default=36)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2, help="timed steps of each side per round")
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--ot-solver", default="", help="our WRA solver (default: the config's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="write the results as JSON here")
  a = p.parse_args()
  a.tasks = [t for t in a.tasks.split(",") if t]
  bad = [t for t in a.tasks if t not in TASKS]
  if bad:
    raise SystemExit(f"error: --tasks {bad}: use some of {','.join(TASKS)}")
  torch = official.require_torch()
  torch.set_num_threads(a.threads)
  warnings.filterwarnings("ignore", category=UserWarning)  # the official AdamW's add_ overload
  off = official.import_official(a.official)
  config = pretrain_config.get_config("base")
  info = {"machine": official.machine(), "threads": a.threads,
          "xla_flags": os.environ["XLA_FLAGS"], "torch": torch.__version__,
          "jax": jax.__version__, "batch": a.batch, "text_lengths": [a.min_len, a.max_len],
          "rounds": a.rounds, "steps_per_round": a.steps, "date": time.strftime("%Y-%m-%d %H:%M %Z")}
  print(json.dumps(info), flush=True)
  results = [run_size(size, a, off, config) for size in a.sizes.split(",")]
  print(table(results))
  print(f"probes (GFLOP/s of a 1024^3 float32 matmul, torch / XLA, per round): "
        + "; ".join(f"{r['size']}: " + ", ".join(f"{x['torch']}/{x['xla']}"
                                                   for x in r["probes_gflops"])
                    for r in results) + f"; load average now {os.getloadavg()[0]:.2f}")
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      json.dump({**info, "results": results}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
