"""Image-text retrieval metrics (official utils/itm_eval.py and train_itm.py validate), NumPy.

The score matrix S is (n_txt, n_img); `gt[i]` is the column of text i's image. Ranks are
0-based; ties are broken by index (the lower column / row first, a stable sort), so a
constant model gets a fixed, reproducible ranking rather than an optimistic one.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from uniter_jax import files

KS = (1, 5, 10)
NAMES = tuple(f"{d}_r{k}" for d in ("ir", "tr") for k in KS) + ("r_mean",)


def ranks_in_rows(scores: np.ndarray) -> np.ndarray:
  """rank[i, j]: the 0-based place of column j in row i, best score first, ties by index."""
  order = np.argsort(-scores, axis=1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(scores.shape[1])[None], axis=1)
  return rank


def image_ranks(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """IR (text -> image): the rank of each text's gt image in its row, (n_txt,)."""
  gt = np.asarray(gt)
  s = np.asarray(scores, np.float64)
  own = s[np.arange(len(gt)), gt]
  before = np.arange(s.shape[1])[None] < gt[:, None]
  return (s > own[:, None]).sum(1) + ((s == own[:, None]) & before).sum(1)


def text_ranks(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """TR (image -> text): per image, the best rank of any of its captions in its column.

  (n_img,); an image without captions gets n_txt (never a hit).
  """
  gt = np.asarray(gt)
  rank = ranks_in_rows(np.asarray(scores, np.float64).T)  # (n_img, n_txt)
  best = np.full(rank.shape[0], rank.shape[1], np.int64)
  np.minimum.at(best, gt, rank[gt, np.arange(len(gt))])
  return best


def recalls(scores: np.ndarray, gt: Sequence[int], ks: Sequence[int] = KS) -> dict:
  """ir_r{k}, tr_r{k} and r_mean (the mean of the six) from a full score matrix.

  TR averages over the images that have at least one caption (the official img2txts keys).
  """
  scores = np.asarray(scores)
  gt = np.asarray(gt, np.int64)
  if scores.ndim != 2 or len(gt) != scores.shape[0]:
    raise ValueError(f"scores {scores.shape} must be (n_txt, n_img) with one gt per text "
                     f"({len(gt)} given)")
  if gt.size and (gt.min() < 0 or gt.max() >= scores.shape[1]):
    raise ValueError(f"gt image index out of range 0..{scores.shape[1] - 1}")
  ir = image_ranks(scores, gt)
  has_text = np.bincount(gt, minlength=scores.shape[1]) > 0
  tr = text_ranks(scores, gt)[has_text]
  out = {}
  for k in ks:
    out[f"ir_r{k}"] = float(np.mean(ir < k))
  for k in ks:
    out[f"tr_r{k}"] = float(np.mean(tr < k))
  out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("ir", "tr") for k in ks]))
  return out


def chance_recalls(gt: Sequence[int], n_img: int, ks: Sequence[int] = KS) -> dict:
  """Expected recalls of a uniformly random ranking (the reference a model must beat).

  IR: k / n_img. TR: per image with c captions among n_txt, 1 - C(n_txt - c, k) / C(n_txt, k)
  (no caption of it in a random top k), averaged over the images with captions.
  """
  counts = np.bincount(np.asarray(gt, np.int64), minlength=n_img)
  counts = counts[counts > 0]
  n_txt = int(counts.sum())
  out = {f"ir_r{k}": min(1.0, k / n_img) for k in ks}
  for k in ks:
    kk = min(k, n_txt)
    # C(n - c, k) / C(n, k) = prod_{m < k} (n - c - m) / (n - m), stable for large n.
    m = np.arange(kk)[None]
    miss = np.prod(np.clip(n_txt - counts[:, None] - m, 0, None) / (n_txt - m), axis=1)
    out[f"tr_r{k}"] = float(np.mean(1.0 - miss))
  out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("ir", "tr") for k in ks]))
  return out


def fast_val_columns(gt: Sequence[int], n_img: int, size: int = 400) -> np.ndarray:
  """Official ItmValDataset candidates: (n_txt, size) columns gt, gt+1, ... wrapping.

  Column 0 is the gt image; `size` is capped at n_img (official: 400 = 1 gt + 399).
  """
  size = min(size, n_img)
  return (np.asarray(gt)[:, None] + np.arange(size)[None]) % n_img


def fast_val_recalls(candidate_scores: np.ndarray, ks: Sequence[int] = KS) -> dict:
  """train_itm.py validate: R@K of column 0 (the gt) among each row's candidates.

  Names `val_ir_r{k}`: text -> image only, against gt + the next 399 images.
  """
  s = np.asarray(candidate_scores, np.float64)
  rank = (s[:, 1:] > s[:, :1]).sum(1)  # ties go to the gt (column 0 is first)
  return {f"val_ir_r{k}": float(np.mean(rank < k)) for k in ks}


def top_k(scores: np.ndarray, k: int = 10, axis: int = 1) -> np.ndarray:
  """Indices of the k best per row (axis 1) or column (axis 0), best first, ties by index."""
  s = np.asarray(scores)
  s = s if axis == 1 else s.T
  return np.argsort(-s, axis=1, kind="stable")[:, :k]


def write_rankings(path: str, scores: np.ndarray, txt_ids: Sequence[str],
                   img_ids: Sequence[str], k: int = 10) -> str:
  """JSON {"text_to_image": {txt id: [top-k image ids]}, "image_to_text": {...}} at path."""
  scores = np.asarray(scores, np.float32)
  t2i, i2t = top_k(scores, k, 1), top_k(scores, k, 0)
  out = {"text_to_image": {t: [img_ids[j] for j in row] for t, row in zip(txt_ids, t2i)},
         "image_to_text": {m: [txt_ids[i] for i in row] for m, row in zip(img_ids, i2t)},
         "scores_text_to_image": {t: [round(float(scores[n, j]), 6) for j in row]
                                  for n, (t, row) in enumerate(zip(txt_ids, t2i))}}
  files.atomic_write(path, lambda f: f.write(json.dumps(out, indent=1).encode()),
                     overwrite=True)
  return path
