"""All-pairs retrieval scoring speed: caption x image pairs scored per second.

    python benchmarks/retrieval_eval.py --sizes tiny,base --texts 64 --images 64 \\
        --block-txt 8 --block-img 64 --dtype float32,bfloat16

Runs uniter_jax.tasks.retrieval_scores (the evaluator's jitted, mesh-sharded block scorer) on
random inputs of the official shapes (text 60 + [CLS]/[SEP] padded to 64, 36 regions x 2048
features) and extrapolates the time of Flickr30k test (1,000 images x 5,000 captions) and COCO
5k test (5,000 images x 25,000 captions). Prints one JSON line per (size, dtype). Compile time
is reported apart (the first block); the rate counts the other blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import jax  # noqa: E402
from flax import nnx  # noqa: E402

from uniter_jax import sharding  # noqa: E402
from uniter_jax.models import UniterConfig, registry  # noqa: E402
from uniter_jax.tasks import retrieval_scores as scoring  # noqa: E402

TEST_SETS = {"flickr30k_test": (5000, 1000), "coco_5k_test": (25000, 5000)}


def random_side(cfg: UniterConfig, n_txt: int, n_img: int, lt: int, li: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(min(106, cfg.vocab_size // 2), cfg.vocab_size, (n_txt, lt)).astype(np.int32)
  ids[:, 0] = 1  # [CLS]-like; the ids do not change the cost
  texts = {"input_ids": ids, "txt_mask": np.ones((n_txt, lt), bool)}
  images = {"img_feat": rng.normal(size=(n_img, li, cfg.img_dim)).astype(np.float32),
            "img_pos": rng.random((n_img, li, 7)).astype(np.float32),
            "img_mask": np.ones((n_img, li), bool)}
  return texts, images


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
  out = {"size": size, "dtype": dtype, "devices": jax.device_count(),
         "device": jax.devices()[0].device_kind, "pairs": n_txt * n_img, "block": [bt, bi],
         "pairs_per_s": round(rate, 1), "compile_and_first_block_s": round(compile_s, 1)}
  for name, (t, i) in TEST_SETS.items():
    out[f"{name}_hours"] = round(t * i / rate / 3600, 2)
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
  a = p.parse_args()
  for size in a.sizes.split(","):
    for dtype in a.dtype.split(","):
      print(json.dumps(bench(size, dtype, a.texts, a.images, a.block_txt, a.block_img,
                             a.txt_len, a.regions)), flush=True)


if __name__ == "__main__":
  main()
