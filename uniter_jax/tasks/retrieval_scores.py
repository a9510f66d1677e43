"""All-pairs retrieval scoring: every caption x every image, in blocks, resumable.

A block is (block_txt captions) x (block_img images) = one jitted forward of
block_txt * block_img pair rows, sharded over the mesh's batch axes (the pairs are built
inside the jit from the two sides, so only the blocks cross the host boundary). The score
matrix is written to disk every `save_every_s` seconds with a per-block done mask, so an
interrupted evaluation resumes where it stopped (same model tag and shapes only).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import files, metrics, sharding
from uniter_jax.models import registry

TEXT_FIELDS = ("input_ids", "txt_mask")
IMAGE_FIELDS = ("img_feat", "img_pos", "img_mask")


def pair_rows(txt: Mapping[str, jax.Array], img: Mapping[str, jax.Array]) -> dict:
  """(bt texts, bi images) -> bt * bi pair rows, row t * bi + i = (text t, image i)."""
  bt = txt["input_ids"].shape[0]
  bi = img["img_feat"].shape[0]
  out = {k: jnp.repeat(v, bi, axis=0) for k, v in txt.items()}
  out.update({k: jnp.tile(v, (bt,) + (1,) * (v.ndim - 1)) for k, v in img.items()})
  return {k: sharding.constrain(v, ("act_batch",) + (None,) * (v.ndim - 1))
          for k, v in out.items()}


def graphdef_in(graphdef, model_cfg, dtype: str):
  """The graph of the same model computing in `dtype` (e.g. "bfloat16"); params unchanged."""
  if dtype in ("", model_cfg.dtype):
    return graphdef
  cfg = dataclasses.replace(model_cfg, dtype=dtype)
  abstract = nnx.eval_shape(lambda: registry.build("UniterForImageTextRetrieval", cfg))
  return nnx.split(abstract)[0]


def make_block_scorer(graphdef, rules) -> Callable:
  """jit (params, rest, txt block, img block) -> (bt, bi) float32 rank logits."""

  def score(params, rest, txt, img):
    with sharding.use_rules(rules):
      model = nnx.merge(graphdef, params, rest)
      pairs = pair_rows(txt, img)
      bt, bi = txt["input_ids"].shape[0], img["img_feat"].shape[0]
      return model(pairs, deterministic=True)[:, 0].reshape(bt, bi)

  return jax.jit(score)


def _pad_rows(arrays: Mapping[str, np.ndarray], size: int) -> dict:
  """Rows padded to `size` with copies of row 0 (finite inputs; their scores are dropped)."""
  out = {}
  for k, v in arrays.items():
    extra = size - v.shape[0]
    out[k] = np.concatenate([v, np.repeat(v[:1], extra, 0)]) if extra else v
  return out


@dataclasses.dataclass
class ScoreStore:
  """The partial score matrix on disk: scores (n_txt, n_img), done (n_tb, n_ib), meta."""

  path: str
  meta: dict

  def load(self, shape: tuple[int, int], blocks: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(scores, done, resumed): the saved state when its meta matches, else a fresh one."""
    if self.path and os.path.exists(self.path):
      with np.load(self.path) as z:
        if json.loads(str(z["meta"])) == self.meta:
          return z["scores"].copy(), z["done"].copy(), True
    return np.zeros(shape, np.float32), np.zeros(blocks, bool), False

  def save(self, scores: np.ndarray, done: np.ndarray) -> None:
    if not self.path:
      return
    buf = io.BytesIO()
    np.savez(buf, scores=scores, done=done, meta=json.dumps(self.meta, sort_keys=True))
    files.write_bytes(self.path, buf.getvalue(), overwrite=True)


def fill_resumable(store: ScoreStore | None, shape: tuple[int, ...], blocks: tuple[int, ...],
                   score_block: Callable[[tuple[int, ...], np.ndarray], None], *,
                   pairs_per_block: int, what: str, save_every_s: float = 60.0,
                   say: Callable[..., None] | None = None, max_blocks: int = 0
                   ) -> np.ndarray | None:
  """Scores of `shape`, one block of the `blocks` grid at a time, resumable.

  score_block(index, scores) writes block `index`'s scores into `scores`. With `store`, the
  scores and a done mask are saved every `save_every_s` seconds and at the end, and blocks
  already done are skipped on the next call. Progress (pairs/s, ETA) goes to `say` about
  every 10% of the blocks; max_blocks > 0 stops after that many blocks and returns None
  when blocks are left (time-sliced evaluation).
  """
  store = store or ScoreStore("", {})
  scores, done, resumed = store.load(shape, blocks)
  todo = [idx for idx in np.ndindex(*blocks) if not done[idx]]
  if say and resumed:
    say("%s: resuming %s, %d of %d blocks left", what, store.path, len(todo), done.size)
  progress = metrics.Progress(len(todo), 0)
  every = max(1, len(todo) // 10)
  last_save = time.time()
  for n, idx in enumerate(todo, 1):
    score_block(idx, scores)
    done[idx] = True
    if n == 1:
      progress.first_step_done(1)  # the rate leaves out compilation
    if say and (n % every == 0 or n == len(todo)):
      rate, eta = progress.rate_eta(n)
      say("%s: block %d/%d, %.0f pairs/s, %s", what, n, len(todo), rate * pairs_per_block, eta)
    if time.time() - last_save > save_every_s:
      store.save(scores, done)
      last_save = time.time()
    if max_blocks and n >= max_blocks and n < len(todo):
      store.save(scores, done)
      return None
  store.save(scores, done)
  return scores


def score_all_pairs(fn: Callable, params, rest, texts: Mapping[str, np.ndarray],
                    images: Mapping[str, np.ndarray], *, block_txt: int, block_img: int,
                    store: ScoreStore | None = None, save_every_s: float = 60.0,
                    say: Callable[..., None] | None = None, max_blocks: int = 0,
                    trim_text: int = 0) -> np.ndarray | None:
  """The (n_txt, n_img) score matrix, block by block (fn: make_block_scorer's).

  Progress, saving, resuming and max_blocks as in `fill_resumable`.
  trim_text > 0 blocks the captions in order of length and cuts each block's text padding
  to its longest caption rounded up to a multiple of trim_text (one compile per width):
  the official evaluation runs each caption at its own length, and short captions padded
  to the longest one's width (Flickr30k: ~20 of 60 + 2 tokens) would cost up to twice the
  work per pair. The scores are the same (padded keys are masked).
  """
  n_txt, n_img = len(texts["input_ids"]), len(images["img_feat"])
  n_tb, n_ib = -(-n_txt // block_txt), -(-n_img // block_img)
  texts = _pad_rows(texts, n_tb * block_txt)
  images = _pad_rows(images, n_ib * block_img)
  order = np.arange(n_tb * block_txt)  # text rows of block a: order[a * bt:(a + 1) * bt]
  lengths = texts["txt_mask"].sum(1)
  if trim_text:
    order[:n_txt] = np.argsort(lengths[:n_txt], kind="stable")

  def score_block(idx: tuple[int, ...], scores: np.ndarray) -> None:
    a, b = idx
    t = order[a * block_txt:(a + 1) * block_txt]
    i = slice(b * block_img, (b + 1) * block_img)
    width = texts["input_ids"].shape[1]
    if trim_text:
      width = min(width, -(-max(int(lengths[t].max()), 1) // trim_text) * trim_text)
    block = np.asarray(fn(params, rest, {k: v[t, :width] for k, v in texts.items()},
                          {k: v[i] for k, v in images.items()}))
    real, cols = t < n_txt, min(block_img, n_img - i.start)
    scores[t[real], i.start:i.start + cols] = block[real, :cols]

  return fill_resumable(store, (n_txt, n_img), (n_tb, n_ib), score_block,
                        pairs_per_block=block_txt * block_img, what="retrieval scores",
                        save_every_s=save_every_s, say=say, max_blocks=max_blocks)


def fast_val_scores(fn: Callable, params, rest, texts: Mapping[str, np.ndarray],
                    images: Mapping[str, np.ndarray], columns: np.ndarray) -> np.ndarray:
  """Scores of text r with images columns[r], (n_txt, k): the official fast validation
  (one caption x its k candidates per call, one compile; evaluators.retrieval.fast_val_columns)."""
  out = np.zeros(columns.shape, np.float32)
  for r in range(columns.shape[0]):
    out[r] = np.asarray(fn(params, rest, {n: v[r:r + 1] for n, v in texts.items()},
                           {n: v[columns[r]] for n, v in images.items()}))[0]
  return out
