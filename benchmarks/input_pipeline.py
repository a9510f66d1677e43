"""Input pipeline throughput: examples/s and MB/s for the UNITER-base shapes, beside what a step eats.

    python benchmarks/input_pipeline.py                      # synthetic data in a temp folder
    python benchmarks/input_pipeline.py --text-dir T --image-dir I   # your converted data
    python benchmarks/input_pipeline.py --step-examples-per-s 900    # compare with a measured step
    python benchmarks/input_pipeline.py --accelerator-tflops 197 --mfu 0.4   # e.g. one TPU v5e chip
    taskset -c 0 python benchmarks/input_pipeline.py --baseline HEAD   # this tree vs a git revision

Per core: the rate is divided by the cores the process may run on (its affinity mask, e.g.
`taskset -c 0`; TensorFlow sizes its tf.data and op thread pools from that mask too).
`--baseline REV` measures uniter_jax/data/pipeline.py as of git revision REV (or a copy of it
at the path REV) side by side with
the working tree's, whole epochs alternating (REV, ours, REV, ours, ...) so that load on a
shared machine hits both alike, and checks that both yield equal batches.

Synthetic data: `--images` images with 36 to 100 regions x 2048 float16 features (plus 1601-d soft
labels with --soft-labels), `--texts-per-image` captions of 8 to 60 tokens. Measures host batches
(tf.data + join + padding; no device transfer) after `--warmup` batches, and reports MB/s of
feature bytes delivered. What one UNITER-base pretraining step consumes is either measured
(`--step-examples-per-s`, from benchmarks/train_step.py on the target accelerator) or derived:
XLA's FLOP count of the base step (uniter_jax.flops, official task mix, per example at the padded
shapes the pipeline produced) and an accelerator's peak at a given MFU (default: one H100,
989 dense bf16 TFLOP/s, at 40% MFU). The verdict compares input and step rates.
"""

from __future__ import annotations

import argparse
import importlib.util
import linecache
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uniter_jax.data import write_dataset  # noqa: E402
from uniter_jax.data.pipeline import InputPipeline, PipelineConfig  # noqa: E402



def base_step_gflops_per_token() -> float:
  """XLA's FLOPs per (text + region) token of a UNITER-base pretraining update, official mix.

  Counted at 64 text x 64 regions per example; the cost is close to linear in tokens at these
  lengths (attention is a small share), so other padded shapes scale by their token count.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from uniter_jax import flops, optim, sharding  # pylint: disable=import-outside-toplevel
  from uniter_jax.masking import MaskingConfig  # pylint: disable=import-outside-toplevel
  from uniter_jax.models import UniterConfig, UniterForPretraining  # pylint: disable=import-outside-toplevel
  from uniter_jax.tasks import pretrain  # pylint: disable=import-outside-toplevel

  cfg = UniterConfig.preset("base", dtype="bfloat16")
  _, params, _ = nnx.split(nnx.eval_shape(lambda: UniterForPretraining(cfg, rngs=nnx.Rngs(0))),
                           nnx.Param, ...)
  tx, _ = optim.make_optimizer(params, lr=5e-5, warmup_steps=1, total_steps=10)
  mix = {"mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0, "itm": 2.0}  # in-domain base config
  objective = pretrain.objective(pretrain.PretrainSettings(mix=tuple(mix.items()),
                                                          masking=MaskingConfig()))
  b, lt, li = 8, 64, 64
  flat = flops.unscanned(cfg)
  per_branch = flops.branch_flops(lambda: UniterForPretraining(flat, rngs=nnx.Rngs(0)), tx,
                                  objective, flops.abstract_batch(cfg, b, lt, li, jnp.bfloat16),
                                  sharding.DATA_PARALLEL_RULES)
  return flops.mean_step_flops(per_branch, mix) / (b * (lt + li)) / 1e9


def make_synthetic(root: str, images: int, texts_per_image: int, soft: bool, seed: int = 0) -> tuple[str, str]:
  """Writes a synthetic image dataset and text dataset in the base shapes; returns their folders."""
  rng = np.random.default_rng(seed)

  def imgs():
    for i in range(images):
      n = int(rng.integers(36, 101))
      rec = {"image_id": f"img{i}", "features": rng.standard_normal((n, 2048), np.float32).astype(np.float16),
             "norm_bb": rng.uniform(size=(n, 6)).astype(np.float32), "conf": np.sort(rng.uniform(size=n))[::-1]}
      if soft:
        rec["soft_labels"] = rng.dirichlet(np.ones(1601), size=n).astype(np.float16)
      yield rec

  def txts():
    for i in range(images):
      for j in range(texts_per_image):
        yield {"id": f"{i}_{j}", "image_id": f"img{i}", "input_ids": rng.integers(106, 28996, rng.integers(8, 61)).tolist()}

  img_dir, txt_dir = os.path.join(root, "img"), os.path.join(root, "txt")
  write_dataset(img_dir, images=imgs(), shard_mb=64)
  write_dataset(txt_dir, texts=txts(), tokenizer={"cls_id": 101, "sep_id": 102, "vocab_size": 28996})
  return txt_dir, img_dir


def pipeline_at(rev: str):
  """uniter_jax/data/pipeline.py as of git revision `rev` (or a copy of it at the path `rev`),
  imported as a separate module."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.isfile(rev):
    with open(rev, encoding="utf-8") as f:
      src = f.read()
  else:
    src = subprocess.run(["git", "show", f"{rev}:uniter_jax/data/pipeline.py"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
  spec = importlib.util.spec_from_loader(f"pipeline_at_{abs(hash(rev))}", loader=None)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  filename = f"{rev}:uniter_jax/data/pipeline.py"
  linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # for autograph
  exec(compile(src, filename, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def epoch_rate(make_pipe) -> tuple[float, float, int, list[dict]]:
  """(examples/s, examples per CPU second, examples, batches) of one whole epoch of a fresh
  pipeline (tf.data built, read, joined, batched; NumPy batches on the host). CPU seconds are
  the process's, all threads: on a loaded machine they move far less than wall time."""
  pipe = make_pipe()
  t0, c0 = time.perf_counter(), time.process_time()
  batches = list(pipe.host_batches())
  n = sum(int((b["example_index"] >= 0).sum()) for b in batches)
  return n / (time.perf_counter() - t0), n / (time.process_time() - c0), n, batches


def compare(args, txt, img, cfg) -> None:
  """Whole epochs of each variant, alternating (--baseline REV's pipeline.py, ours at
  --vs-feat-dtype, ours): rates, ratios, and whether REV's batches equal ours."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  one = dataclasses.replace(cfg, num_epochs=1)
  variants = {}
  if args.baseline:
    old = pipeline_at(args.baseline)
    variants[args.baseline] = lambda: old.InputPipeline(
        txt, img, config=old.PipelineConfig(**dataclasses.asdict(one)), process_index=0,
        process_count=1)
  if args.vs_feat_dtype:
    variants[f"ours {args.vs_feat_dtype}"] = lambda: InputPipeline(
        txt, img, config=dataclasses.replace(one, feat_dtype=args.vs_feat_dtype),
        process_index=0, process_count=1)
  variants[f"ours {cfg.feat_dtype}"] = lambda: InputPipeline(txt, img, config=one,
                                                             process_index=0, process_count=1)
  cores = len(os.sched_getaffinity(0))
  rates: dict = {k: [] for k in variants}
  per_cpu: dict = {k: [] for k in variants}
  first: dict = {}
  for r in range(args.rounds + 1):  # round 0 warms the page cache and TF; not counted
    for name, make in variants.items():
      rate, cpu_rate, n, batches = epoch_rate(make)
      if r:
        rates[name].append(rate)
        per_cpu[name].append(cpu_rate)
      first.setdefault(name, batches)
  print(f"\n{cores} core(s) (affinity {sorted(os.sched_getaffinity(0))}), load "
        f"{os.getloadavg()[0]:.1f}, {args.rounds} alternating epochs of {n} examples each:")
  ours = np.median(rates[f"ours {cfg.feat_dtype}"])
  ours_cpu = np.median(per_cpu[f"ours {cfg.feat_dtype}"])
  for name, rs in rates.items():
    cpu = np.median(per_cpu[name])
    print(f"  {name:>16}: {np.median(rs):5.0f} examples/s ({np.median(rs) / cores:.0f} per core; "
          f"epochs {', '.join(f'{x:.0f}' for x in rs)}), {cpu:.0f} per CPU second; "
          f"ours {cfg.feat_dtype} / this: {ours / np.median(rs):.2f}x wall, "
          f"{ours_cpu / cpu:.2f}x CPU")
  if args.baseline:
    a, b = first[args.baseline], first[f"ours {cfg.feat_dtype}"]
    same = len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))
    print(f"  batches of {args.baseline} and ours equal: {same}")


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--text-dir", nargs="*", default=None)
  ap.add_argument("--image-dir", nargs="*", default=None)
  ap.add_argument("--images", type=int, default=600)
  ap.add_argument("--texts-per-image", type=int, default=5)
  ap.add_argument("--soft-labels", action="store_true")
  ap.add_argument("--token-budget", type=int, default=16384)
  ap.add_argument("--feat-dtype", default="float16")
  ap.add_argument("--window-shards", type=int, default=2)
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--step-examples-per-s", type=float, default=0.0,
                  help="examples/s one UNITER-base train step consumes, measured by "
                       "benchmarks/train_step.py; 0 = derive it from FLOPs (below)")
  ap.add_argument("--accelerator-tflops", type=float, default=989.0,
                  help="peak dense bf16 TFLOP/s of the accelerator to feed (H100: 989)")
  ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed")
  ap.add_argument("--baseline", default="", help="a git revision: measure its pipeline.py and "
                  "ours side by side (whole epochs, alternating) instead")
  ap.add_argument("--vs-feat-dtype", default="", help="also measure ours with this feat_dtype "
                  "(e.g. float32), alternating")
  ap.add_argument("--rounds", type=int, default=3, help="--baseline: epochs per variant")
  args = ap.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    if args.text_dir and args.image_dir:
      txt, img = args.text_dir, args.image_dir
    else:
      t0 = time.time()
      txt, img = make_synthetic(tmp, args.images, args.texts_per_image, args.soft_labels)
      txt, img = [txt], [img]
      print(f"synthetic data written in {time.time() - t0:.1f}s")
    cfg = PipelineConfig(token_budget=args.token_budget, feat_dtype=args.feat_dtype, window_shards=args.window_shards,
                         txt_buckets=(24, 40, 64), img_buckets=(36, 64, 100))
    if args.baseline or args.vs_feat_dtype:
      compare(args, txt, img, cfg)
      return
    t0 = time.time()
    pipe = InputPipeline(txt, img, config=cfg, process_index=0, process_count=1)
    print(f"pipeline built in {time.time() - t0:.1f}s\n{pipe.report()}")
    it = pipe.host_batches()
    for _ in range(args.warmup):
      next(it)
    n_ex = n_bytes = n_tok = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
      b = next(it)
      n_ex += b["input_ids"].shape[0]
      n_tok += b["input_ids"].size + b["img_mask"].size
      n_bytes += sum(v.nbytes for v in b.values())
    dt = time.perf_counter() - t0
  rate = n_ex / dt
  cores = len(os.sched_getaffinity(0))
  print(f"\ninput pipeline: {rate:.0f} examples/s ({rate / cores:.0f} per core), "
        f"{n_bytes / dt / 2**20:.0f} MB/s of batch arrays ({args.batches} batches, {cores} of "
        f"{os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}, feat_dtype {args.feat_dtype})")
  if args.step_examples_per_s > 0:
    step_rate, how = args.step_examples_per_s, "measured"
  else:
    gflops = base_step_gflops_per_token() * n_tok / n_ex
    step_rate = args.accelerator_tflops * 1e3 * args.mfu / gflops
    how = (f"derived: {gflops:.1f} GFLOP per example at these padded shapes, "
           f"{args.accelerator_tflops:.0f} TFLOP/s x {args.mfu:.0%} MFU per accelerator")
  print(f"train step (UNITER-base) consumes: {step_rate:.0f} examples/s per accelerator ({how})")
  print("verdict: " + (f"input keeps up ({rate / step_rate:.2f} accelerators fed per host)"
                       if rate >= step_rate else
                       f"input is {step_rate / rate:.1f}x too slow for one accelerator on this host"))


if __name__ == "__main__":
  main()
