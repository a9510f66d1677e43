"""Builds the world in memory: pictures, detections, region features, splits and every task's text.

Every image and every (task, split) gets its own random stream derived from (seed, key) with
numpy's SeedSequence, so the output does not depend on iteration order and one seed gives the
same bytes everywhere.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import multiprocessing
import zlib

import numpy as np
from PIL import Image

from data_prep.synthetic import detector, featurizer, render
from data_prep.synthetic.tasks import captions, lexicon as lx, nlvr2, refexp, vcr, ve, vqa

SPLITS = ("train", "val", "test")
RETRIEVAL_TEST_IMAGES = 100  # like Flickr30k's 1k test images, scaled to this world
MIN_IMAGES = 20  # NLVR2 pairs need two images in every split


@dataclasses.dataclass(frozen=True)
class Config:
  """What to generate. Per-image counts are per split where they differ (train, val, test)."""

  num_images: int = 2000
  seed: int = 0
  img_dim: int = 128
  captions_per_image: int = 5
  # Few VQA training questions next to many captions, so pretraining has something to give.
  vqa_per_image: tuple[int, int, int] = (1, 3, 3)
  nlvr2_pairs_per_image: tuple[float, float, float] = (1.0, 2.0, 2.0)
  re_per_image: int = 2
  vcr_per_image: int = 2


def rng_for(seed: int, *key) -> np.random.Generator:
  """An independent stream for (seed, key...); string keys are hashed with crc32 (stable)."""
  ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
  return np.random.default_rng(np.random.SeedSequence([seed, *ints]))


def image_id(i: int) -> str:
  return f"synth_{i:06d}"


@dataclasses.dataclass
class World:
  config: Config
  pictures: list[lx.Picture]
  pngs: list[bytes]  # rendered RGB pictures, PNG-encoded
  features: list[np.ndarray]  # (n_regions, img_dim) float32
  split_of: dict[str, str]  # image id -> split

  def split(self, name: str) -> list[lx.Picture]:
    return [p for p in self.pictures if self.split_of[p.fname] == name]


def split_sizes(n: int) -> dict[str, int]:
  """test: ~10% capped at RETRIEVAL_TEST_IMAGES; val: ~10%; train: the rest."""
  if n < MIN_IMAGES:
    raise ValueError(f"num_images={n} is too small: need at least {MIN_IMAGES} (2 per held-out split)")
  n_test = min(RETRIEVAL_TEST_IMAGES, n // 10)
  n_val = n // 10
  return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def make_image(seed: int, i: int, img_dim: int) -> tuple[lx.Picture, bytes, np.ndarray]:
  """Renders, detects and featurizes image i (a pure function of its arguments)."""
  rng = rng_for(seed, "image", i)
  sc, img = render.make_scene(rng)
  regions = detector.detect(rng, sc)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "png", compress_level=3)  # level 3: 2.5x faster than 6, +12% size
  feats = featurizer.featurize(img, regions.boxes, img_dim)
  return lx.Picture(image_id(i), sc, regions), buf.getvalue(), feats


def _make_chunk(args) -> list:
  seed, lo, hi, img_dim = args
  return [make_image(seed, i, img_dim) for i in range(lo, hi)]


def build_images(cfg: Config, workers: int = 1) -> World:
  """Every image of the world; workers > 1 spreads them over spawned processes (same bytes)."""
  n = cfg.num_images
  chunk = 100
  jobs = [(cfg.seed, lo, min(n, lo + chunk), cfg.img_dim) for lo in range(0, n, chunk)]
  if workers > 1 and len(jobs) > 1:
    # spawn, not fork: the caller may hold JAX/TF threads, which fork can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
      parts = list(ex.map(_make_chunk, jobs))
  else:
    parts = [_make_chunk(j) for j in jobs]
  made = [x for part in parts for x in part]
  sizes = split_sizes(n)
  order = rng_for(cfg.seed, "splits").permutation(n)
  split_of = {}
  start = 0
  for name in SPLITS:
    for i in sorted(order[start:start + sizes[name]]):
      split_of[image_id(int(i))] = name
    start += sizes[name]
  return World(cfg, [m[0] for m in made], [m[1] for m in made], [m[2] for m in made], split_of)


def build_texts(world: World) -> dict[str, list[dict]]:
  """All text examples as plain dicts, keyed by '{task}_{split}' (not yet tokenised)."""
  cfg = world.config
  out: dict[str, list[dict]] = {}
  for si, split in enumerate(SPLITS):
    pics = world.split(split)
    cap = []
    rng = rng_for(cfg.seed, "captions", split)
    for p in pics:
      for k, c in enumerate(captions.captions(rng, p, cfg.captions_per_image)):
        cap.append(dict(id=f"{p.fname}-c{k}", image_id=p.fname, text=c))
    if split != "test":
      out[f"pretrain_{split}"] = cap
    out[f"retrieval_{split}"] = cap

    rng = rng_for(cfg.seed, "vqa", split)
    recs = []
    for p in pics:
      for k, q in enumerate(vqa.questions(rng, p, cfg.vqa_per_image[si])):
        recs.append(dict(id=f"{p.fname}-q{k}", image_id=p.fname, **q))
    out[f"vqa_{split}"] = recs

    rng = rng_for(cfg.seed, "nlvr2", split)
    recs = []
    n_pairs = max(2, int(round(cfg.nlvr2_pairs_per_image[si] * len(pics))))
    for k in range(10 * n_pairs):
      if len(recs) == n_pairs:
        break
      a, b = rng.choice(len(pics), 2, replace=False)
      st = nlvr2.statement(rng, pics[int(a)], pics[int(b)])
      if st is not None:
        j = len(recs)
        recs.append(dict(id=f"nlvr2-{split}-{j:06d}", image_id=[pics[int(a)].fname, pics[int(b)].fname],
                         identifier=f"{split}-{j}", **st))
    out[f"nlvr2_{split}"] = recs

    rng = rng_for(cfg.seed, "ve", split)
    recs = []
    for p in pics:
      for k, h in enumerate(ve.hypotheses(rng, p)):
        recs.append(dict(id=f"{p.fname}-h{k}", image_id=p.fname, **h))
    out[f"ve_{split}"] = recs

    rng = rng_for(cfg.seed, "re", split)
    recs = []
    for p in pics:
      for k, r in enumerate(refexp.refs(rng, p, cfg.re_per_image)):
        recs.append(dict(id=f"{p.fname}-r{k}", image_id=p.fname, image_w=p.scene.width,
                         image_h=p.scene.height, **r))
    out[f"re_{split}"] = recs

    rng = rng_for(cfg.seed, "vcr", split)
    recs = []
    for p in pics:
      asked = set()
      for k in range(cfg.vcr_per_image):
        it = vcr.item(rng, p)
        if it is not None and it["question"] not in asked:
          asked.add(it["question"])
          recs.append(dict(id=f"{p.fname}-v{k}", image_id=p.fname, **it))
    out[f"vcr_{split}"] = recs
  return out
