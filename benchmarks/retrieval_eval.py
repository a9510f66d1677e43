"""All-pairs retrieval scoring speed: caption x image pairs scored per second.

    python benchmarks/retrieval_eval.py --sizes tiny,base --texts 64 --images 64 \\
        --block-txt 8 --block-img 64 --dtype float32,bfloat16

Runs uniter_jax.tasks.retrieval_scores (the evaluator's jitted, mesh-sharded block scorer) on
random inputs of the official shapes (text 60 + [CLS]/[SEP] padded to 64, 36 regions x 2048
features) and extrapolates the time of Flickr30k test (1,000 images x 5,000 captions) and COCO
5k test (5,000 images x 25,000 captions). Prints one JSON line per (size, dtype). Compile time
is reported apart (the first block); the rate counts the other blocks.

Side by side with the official code (`--official DIR`, DIR a checkout of ChenRocks/UNITER or
any folder holding its `model/` package; torch needed, apex is replaced by torch LayerNorm):

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      taskset -c 0 python benchmarks/retrieval_eval.py --official DIR --sizes base \\
      --texts 4 --images 16 --block-txt 1 --block-img 16 --rounds 3

builds the official UniterForImageTextRetrieval (torch, one thread, eval mode, no_grad, fp32)
and ours from the same weights, then alternates, round by round in one process, the official
inference loop of train_itm.py (each caption at its own length against the images in
mini-batches) and ours (padded to the widest caption, and blocked by length with
trim_text=8), with a 1-thread fp32 matmul probe before each round. It reports pairs/s of
each (median of the rounds), the ratio, the largest score difference and the extrapolated
hours for the two test sets; and the two-stage option's cost (captions and images encoded
alone per second, the time and speed-up for Flickr30k / COCO at M = 20 and 50 re-ranked per
query, assuming the worst case of no overlap between the two directions' shortlists).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import jax  # noqa: E402
from flax import nnx  # noqa: E402

from uniter_jax import sharding  # noqa: E402
from uniter_jax.models import UniterConfig, registry  # noqa: E402
from uniter_jax.tasks import retrieval_rerank as rerank  # noqa: E402
from uniter_jax.tasks import retrieval_scores as scoring  # noqa: E402

import official  # noqa: E402  (benchmarks/official.py)

TEST_SETS = {"flickr30k_test": (5000, 1000), "coco_5k_test": (25000, 5000)}


def random_side(cfg: UniterConfig, n_txt: int, n_img: int, lt: int, li: int, seed: int = 0,
                lengths: np.ndarray | None = None):
  """Random captions ([CLS]-like first id; `lengths` valid tokens each, default all lt) and
  images (li regions, post-ReLU-like features)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(min(106, cfg.vocab_size // 2), cfg.vocab_size, (n_txt, lt)).astype(np.int32)
  ids[:, 0] = 1  # [CLS]-like; the ids do not change the cost
  lengths = np.full(n_txt, lt) if lengths is None else np.asarray(lengths)
  mask = np.arange(lt)[None] < lengths[:, None]
  texts = {"input_ids": np.where(mask, ids, 0), "txt_mask": mask}
  images = {"img_feat": np.maximum(rng.normal(size=(n_img, li, cfg.img_dim)), 0).astype(
                np.float32),
            "img_pos": rng.random((n_img, li, 7)).astype(np.float32),
            "img_mask": np.ones((n_img, li), bool)}
  return texts, images


def extrapolate(rate: float) -> dict:
  return {f"{name}_hours": round(t * i / rate / 3600, 2) for name, (t, i) in TEST_SETS.items()}


def bench(size: str, dtype: str, n_txt: int, n_img: int, bt: int, bi: int, lt: int,
          li: int) -> dict:
  cfg = UniterConfig.preset(size, max_position_embeddings=max(64, lt), remat_policy=None)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  rules = sharding.DATA_PARALLEL_RULES
  model = registry.build("UniterForImageTextRetrieval", cfg, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = scoring.make_block_scorer(scoring.graphdef_in(graphdef, cfg, dtype), rules)
  texts, images = random_side(cfg, n_txt, n_img, lt, li)
  with jax.set_mesh(mesh):
    t0 = time.time()
    scoring.score_all_pairs(fn, params, rest, {k: v[:bt] for k, v in texts.items()},
                            {k: v[:bi] for k, v in images.items()}, block_txt=bt, block_img=bi)
    compile_s = time.time() - t0
    t0 = time.time()
    scoring.score_all_pairs(fn, params, rest, texts, images, block_txt=bt, block_img=bi)
    dt = time.time() - t0
  rate = n_txt * n_img / dt
  return {"size": size, "dtype": dtype, "devices": jax.device_count(),
          "device": jax.devices()[0].device_kind, "pairs": n_txt * n_img, "block": [bt, bi],
          "pairs_per_s": round(rate, 1), "compile_and_first_block_s": round(compile_s, 1),
          **extrapolate(rate)}


# -- side by side with the official PyTorch code ------------------------------------------------

def official_and_ours(src: str, cfg: UniterConfig, seed: int = 0):
  """(official torch model, our model) with the same weights (the official init)."""
  from uniter_jax.interop import load_official_checkpoint
  torch = official.require_torch()
  off = official.import_official(src)
  torch.manual_seed(seed)
  ocfg = official.official_config(off, cfg)
  ref = off.itm.UniterForImageTextRetrieval(ocfg, cfg.img_dim, margin=0.2)
  ref.init_output()
  ref.eval()
  ours = load_official_checkpoint(official.state_dict_numpy(ref), cfg, task="itr")
  return ref, ours


def official_scores(ref, texts: dict, images: dict, mini: int) -> np.ndarray:
  """train_itm.py inference(): per caption, its tokens (own length) repeated against the
  images in mini-batches of `mini`; the ItmEvalDataset batch layout (all regions valid)."""
  import torch

  n_txt, n_img = len(texts["input_ids"]), len(images["img_feat"])
  out = np.zeros((n_txt, n_img), np.float32)
  feat, pos = torch.from_numpy(images["img_feat"]), torch.from_numpy(images["img_pos"])
  with torch.no_grad():
    for t in range(n_txt):
      tl = int(texts["txt_mask"][t].sum())
      ids = torch.from_numpy(texts["input_ids"][t, :tl].astype(np.int64))
      for st in range(0, n_img, mini):
        f, p = feat[st:st + mini], pos[st:st + mini]
        b, nbb = f.shape[0], f.shape[1]
        batch = {"input_ids": ids[None].expand(b, -1).clone(),
                 "position_ids": torch.arange(tl)[None],
                 "img_feat": f, "img_pos_feat": p,
                 "attn_masks": torch.ones(b, tl + nbb, dtype=torch.long),
                 "gather_index": torch.arange(tl + nbb)[None].expand(b, -1).clone()}
        out[t, st:st + b] = ref(batch, compute_loss=False)[:, 0].numpy()
  return out


def side_by_side(a) -> dict:
  torch = official.require_torch()
  torch.set_num_threads(1)
  size = a.sizes.split(",")[0]
  cfg = UniterConfig.preset(size, remat_policy=None)
  ref, ours = official_and_ours(a.official, cfg)
  lengths = np.random.default_rng(1).integers(a.min_len, a.txt_len + 1, a.texts)
  texts, images = random_side(cfg, a.texts, a.images, a.txt_len, a.regions, lengths=lengths)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
  fn = scoring.make_block_scorer(graphdef, sharding.DATA_PARALLEL_RULES)
  # Blocks no larger than the sides: a block wider than the captions or images there are
  # would score padding pairs (the default 8 x 32 on 4 x 16 is four times the work).
  kw = dict(block_txt=min(a.block_txt, a.texts), block_img=min(a.block_img, a.images))
  enc = {side: rerank.make_side_encoder(graphdef, sharding.DATA_PARALLEL_RULES, side)
         for side in ("text", "image")}
  runs = {"official": lambda: official_scores(ref, texts, images, a.block_img),
          "ours_padded": lambda: scoring.score_all_pairs(fn, params, rest, texts, images, **kw),
          "ours_trim8": lambda: scoring.score_all_pairs(fn, params, rest, texts, images,
                                                        trim_text=8, **kw),
          # the two-stage pre-rank: each caption / image alone, a block_img chunk per call
          "prerank_texts": lambda: rerank.encode_side(enc["text"], params, rest, texts,
                                                      min(a.texts, a.block_img)),
          "prerank_images": lambda: rerank.encode_side(enc["image"], params, rest, images,
                                                       a.block_img)}
  times: dict = {k: [] for k in runs}
  probes = []
  with jax.set_mesh(mesh):
    t0 = time.time()
    got = {k: f() for k, f in runs.items()}  # warm-up: compiles every width once
    warm_s = time.time() - t0
    for _ in range(a.rounds):
      probes.append(round(official.torch_matmul_gflops(), 1))
      for k, f in runs.items():
        t0 = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t0)
  pairs = a.texts * a.images
  med = {k: statistics.median(v) for k, v in times.items()}
  rate = {k: pairs / med[k] for k in ("official", "ours_padded", "ours_trim8")}
  out = {"size": size, "pairs": pairs, "text_lengths": sorted(lengths.tolist()),
         "regions": a.regions, "mini_batch": a.block_img,
         "block": [kw["block_txt"], kw["block_img"]],
         "threads": 1, "torch": torch.__version__, "jax": jax.__version__,
         "matmul_probe_gflops": probes, "warmup_s": round(warm_s, 1),
         "max_abs_score_diff": float(max(np.abs(got[k] - got["official"]).max()
                                         for k in ("ours_padded", "ours_trim8"))),
         "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()}}
  for k, r in rate.items():
    out[k] = {"pairs_per_s": round(r, 2), "ratio_to_official": round(r / rate["official"], 3),
              **extrapolate(r)}
  # Two-stage (tasks/retrieval_rerank.py): every caption and image encoded alone once, then
  # at most (n_txt + n_img) * M pairs re-ranked at the ours_trim8 rate.
  txt_s, img_s = med["prerank_texts"] / a.texts, med["prerank_images"] / a.images
  out["prerank"] = {"texts_per_s": round(1 / txt_s, 2), "images_per_s": round(1 / img_s, 2)}
  for m in (20, 50):
    for name, (t, i) in TEST_SETS.items():
      sec = t * txt_s + i * img_s + (t + i) * m / rate["ours_trim8"]
      out["prerank"][f"{name}_M{m}_hours"] = round(sec / 3600, 2)
      out["prerank"][f"{name}_M{m}_ratio_to_official"] = round(
          t * i / rate["official"] / sec, 1)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="tiny")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--texts", type=int, default=32)
  p.add_argument("--images", type=int, default=32)
  p.add_argument("--block-txt", type=int, default=8)
  p.add_argument("--block-img", type=int, default=32)
  p.add_argument("--txt-len", type=int, default=64)
  p.add_argument("--regions", type=int, default=36)
  p.add_argument("--official", default="", help="folder with the official model/ package: "
                 "run it side by side (first of --sizes; text lengths --min-len..--txt-len)")
  p.add_argument("--min-len", type=int, default=20)
  p.add_argument("--rounds", type=int, default=2)
  a = p.parse_args()
  if a.official:
    print(json.dumps(side_by_side(a)), flush=True)
    return
  for size in a.sizes.split(","):
    for dtype in a.dtype.split(","):
      print(json.dumps(bench(size, dtype, a.texts, a.images, a.block_txt, a.block_img,
                             a.txt_len, a.regions)), flush=True)


if __name__ == "__main__":
  main()
