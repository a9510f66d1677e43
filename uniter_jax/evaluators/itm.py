"""Image-text matching measured so that chance is 0.5: a fixed, balanced held-out pair set.

Every held-out caption is scored twice: with its own image (label 1) and with another held-out
image whose image id differs (label 0), drawn once with a fixed seed. A constant scorer gets
accuracy 0.5 and AUC 0.5 on this set, whatever it predicts, so a number above that is learning.
(In-batch negatives are not: a swapped image can be the same picture, which makes the labels
unbalanced and a constant model score 0.6 or 0.4.)
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import scipy.stats

PAIR_SEED = 1234  # fixed: the same pairs for every run, seed and checkpoint


def balanced_pairs(img_ids: np.ndarray, num_pairs: int, seed: int = PAIR_SEED
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(text row, image row, label) for num_pairs // 2 captions, each with a match and a mismatch.

  img_ids[r] is the image identity of held-out row r (row r's caption is paired with row r's
  image). Captions are the first rows in order; the mismatched image is a row drawn uniformly
  among the rows whose image id differs. Returns int arrays of length 2 * (num_pairs // 2).
  """
  img_ids = np.asarray(img_ids)
  n = min(len(img_ids), num_pairs // 2)
  if n == 0 or len(np.unique(img_ids)) < 2:
    raise ValueError(f"a balanced ITM set needs held-out captions of at least 2 images; got "
                     f"{len(img_ids)} rows of {len(np.unique(img_ids))} image(s)")
  rng = np.random.default_rng(seed)
  text = np.arange(n)
  other = np.empty(n, np.int64)
  for i in range(n):
    candidates = np.nonzero(img_ids != img_ids[i])[0]
    other[i] = candidates[rng.integers(len(candidates))]
  rows = np.concatenate([text, text])
  images = np.concatenate([text, other])
  labels = np.concatenate([np.ones(n, np.int32), np.zeros(n, np.int32)])
  return rows, images, labels


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney; tied scores count one half)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  pos, neg = scores[labels], scores[~labels]
  if len(pos) == 0 or len(neg) == 0:
    raise ValueError("AUC needs both matched and mismatched pairs")
  ranks = scipy.stats.rankdata(scores)  # ties share their average rank
  u = ranks[labels].sum() - len(pos) * (len(pos) + 1) / 2.0
  return float(u / (len(pos) * len(neg)))


def summarize(p_match: np.ndarray, labels: np.ndarray,
              ot_distance: np.ndarray | None = None) -> dict[str, float]:
  """itm/accuracy (P(match) > 0.5), itm/auc, and the matched / mismatched means."""
  p, y = np.asarray(p_match, np.float64), np.asarray(labels).astype(bool)
  out = {"itm/accuracy": float(np.mean((p > 0.5) == y)), "itm/auc": auc(p, y),
         "itm/p_match_pos": float(p[y].mean()), "itm/p_match_neg": float(p[~y].mean()),
         "itm/pairs": float(len(y))}
  if ot_distance is not None:
    d = np.asarray(ot_distance, np.float64)
    out["itm/ot_pos"], out["itm/ot_neg"] = float(d[y].mean()), float(d[~y].mean())
  return out


def chance_alarm(history: list[float], evals: int, tol: float = 0.02) -> bool:
  """True when the last `evals` AUCs all lie within `tol` of 0.5 (matching not learned)."""
  return evals > 0 and len(history) >= evals and all(abs(a - 0.5) <= tol
                                                     for a in history[-evals:])


def stack_rows(batches: list[Mapping[str, np.ndarray]], keys: tuple[str, ...]
               ) -> dict[str, np.ndarray]:
  """Host batches -> one array per key over every real row (example_index >= 0), right-padded
  on axis 1 to the longest batch."""
  out = {}
  real = [np.asarray(b["example_index"]) >= 0 for b in batches]
  for k in keys:
    parts = [np.asarray(b[k])[r] for b, r in zip(batches, real)]
    if parts[0].ndim >= 2:
      width = max(p.shape[1] for p in parts)
      parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2))
               for p in parts]
    out[k] = np.concatenate(parts)
  return out
