"""Two-stage retrieval: a cheap pre-rank of every pair, the cross-encoder on a shortlist.

All-pairs scoring runs the whole transformer once per (caption, image) pair: n_txt * n_img
joint forwards (Flickr30k test 5M, COCO 5k 125M). The two-stage option runs it on far fewer:

1. Pre-rank: every caption alone and every image alone through the same model (one
   single-modality forward each, the other block fully masked), mean-pooled over the valid
   positions of the final hidden states ("encoder") or of the encoder input ("embeddings"),
   centred by the mean over the split and L2-normalised; the cosine of the two is the cheap
   score of every pair (one (n_txt, H) x (H, n_img) product).
2. Shortlist: for each caption its top M images (text -> image) and for each image its top M
   captions (image -> text); the union of those pairs.
3. Re-rank: the cross-encoder scores the shortlisted pairs, in fixed-size jitted chunks.

The returned matrix ranks every shortlisted pair by its cross-encoder score, above every other
pair, which keeps its pre-rank order; so the usual recall code applies and a true match the
pre-rank left out of the shortlist counts as a miss at any K <= M. M >= n_img and n_txt
shortlists every pair and gives the all-pairs ranking.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import sharding
from uniter_jax.tasks import retrieval_scores as scoring

POOLS = ("encoder", "embeddings")


def make_side_encoder(graphdef, rules, side: str, pool: str = "encoder") -> Callable:
  """jit (params, rest, one side's rows) -> (n, H) float32 mean-pooled states of that side
  run alone (side "text": input_ids, txt_mask; "image": img_feat, img_pos, img_mask)."""
  if side not in ("text", "image") or pool not in POOLS:
    raise ValueError(f"side must be text or image, pool one of {POOLS}; got {side!r}, {pool!r}")

  def encode(params, rest, rows):
    with sharding.use_rules(rules):
      model = nnx.merge(graphdef, params, rest)
      cfg = model.config
      n = next(iter(rows.values())).shape[0]
      if side == "text":  # one masked region: no key of the image block is visible
        batch = {**rows, "img_feat": jnp.zeros((n, 1, cfg.img_dim), jnp.float32),
                 "img_pos": jnp.zeros((n, 1, 7), jnp.float32),
                 "img_mask": jnp.zeros((n, 1), bool)}
        mask = rows["txt_mask"].astype(bool)
      else:  # one masked text slot
        batch = {**rows, "input_ids": jnp.zeros((n, 1), jnp.int32),
                 "txt_mask": jnp.zeros((n, 1), bool)}
        mask = rows["img_mask"].astype(bool)
      batch = {k: sharding.constrain(v, ("act_batch",) + (None,) * (v.ndim - 1))
               for k, v in batch.items()}
      out = model.encode(batch, deterministic=True, return_embeddings=pool == "embeddings")
      lt = batch["input_ids"].shape[1]
      if pool == "embeddings":
        h = out.embeddings[:, :lt] if side == "text" else out.embeddings[:, lt:]
      else:
        h = out.txt if side == "text" else out.img
      w = mask[..., None].astype(jnp.float32)
      return jnp.sum(h.astype(jnp.float32) * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)

  return jax.jit(encode)


def encode_side(fn: Callable, params, rest, rows: Mapping[str, np.ndarray], chunk: int
                ) -> np.ndarray:
  """(n, H) pooled states of all rows, `chunk` rows per call (the last one padded)."""
  n = len(next(iter(rows.values())))
  n_chunks = -(-n // chunk)
  padded = scoring._pad_rows(rows, n_chunks * chunk)
  out = [np.asarray(fn(params, rest, {k: v[c * chunk:(c + 1) * chunk] for k, v in
                                      padded.items()})) for c in range(n_chunks)]
  return np.concatenate(out)[:n]


def cheap_scores(txt_emb: np.ndarray, img_emb: np.ndarray) -> np.ndarray:
  """(n_txt, n_img) cosine of the centred embeddings, in [-1, 1]. Centring removes the
  component every row of a side shares (position / type embeddings, LayerNorm biases),
  which would otherwise dominate the cosine."""
  def unit(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return (unit(txt_emb) @ unit(img_emb).T).astype(np.float32)


def shortlist(cheap: np.ndarray, m: int) -> np.ndarray:
  """(n_txt, n_img) bool: each row's top m columns OR each column's top m rows (ties by
  index, as the recall code)."""
  n_txt, n_img = cheap.shape
  keep = np.zeros(cheap.shape, bool)
  rows = np.argsort(-cheap, axis=1, kind="stable")[:, :min(m, n_img)]
  np.put_along_axis(keep, rows, True, axis=1)
  cols = np.argsort(-cheap, axis=0, kind="stable")[:min(m, n_txt)]
  np.put_along_axis(keep, cols, True, axis=0)
  return keep


def score_pairs(fn: Callable, params, rest, texts: Mapping[str, np.ndarray],
                images: Mapping[str, np.ndarray], t_idx: np.ndarray, i_idx: np.ndarray,
                chunk: int, *, store: scoring.ScoreStore | None = None,
                save_every_s: float = 60.0, say: Callable[..., None] | None = None,
                max_blocks: int = 0) -> np.ndarray | None:
  """Cross-encoder scores (P,) of pairs (texts[t_idx[p]], images[i_idx[p]]), `chunk` pairs
  per jitted call (fn: make_pair_scorer's; one compile, the last chunk padded). Saving,
  resuming, progress and max_blocks (in chunks) as in `scoring.fill_resumable`."""
  p = len(t_idx)
  n_chunks = max(1, -(-p // chunk))
  pad = n_chunks * chunk - p
  t_idx = np.concatenate([t_idx, np.zeros(pad, t_idx.dtype)]).astype(np.int64)
  i_idx = np.concatenate([i_idx, np.zeros(pad, i_idx.dtype)]).astype(np.int64)

  def score_chunk(idx: tuple[int, ...], out: np.ndarray) -> None:
    s = slice(idx[0] * chunk, (idx[0] + 1) * chunk)
    out[s] = np.asarray(fn(params, rest, {k: v[t_idx[s]] for k, v in texts.items()},
                           {k: v[i_idx[s]] for k, v in images.items()}))

  out = scoring.fill_resumable(store, (n_chunks * chunk,), (n_chunks,), score_chunk,
                               pairs_per_block=chunk, what="retrieval re-rank",
                               save_every_s=save_every_s, say=say, max_blocks=max_blocks)
  return None if out is None else out[:p]


def make_pair_scorer(graphdef, rules) -> Callable:
  """jit (params, rest, text rows, image rows) -> (P,) rank logits of row-aligned pairs."""

  def score(params, rest, txt, img):
    with sharding.use_rules(rules):
      rows = {k: sharding.constrain(v, ("act_batch",) + (None,) * (v.ndim - 1))
              for k, v in {**txt, **img}.items()}
      return nnx.merge(graphdef, params, rest)(rows, deterministic=True)[:, 0]

  return jax.jit(score)


def combine(cheap: np.ndarray, keep: np.ndarray, rerank: np.ndarray) -> np.ndarray:
  """One matrix for the recall code: shortlisted pairs by cross-encoder score, every other
  pair below all of them in cheap-score order (cheap in [-1, 1])."""
  lo = float(rerank.min()) if rerank.size else 0.0
  out = (lo - 3.0 + cheap).astype(np.float32)
  out[keep] = rerank
  return out


def two_stage_scores(pair_fn: Callable, txt_fn: Callable, img_fn: Callable, params, rest,
                     texts: Mapping[str, np.ndarray], images: Mapping[str, np.ndarray], *,
                     m: int, chunk: int, say: Callable[..., None] | None = None,
                     store: scoring.ScoreStore | None = None, save_every_s: float = 60.0,
                     max_blocks: int = 0) -> tuple[np.ndarray | None, dict]:
  """(n_txt, n_img) ranking matrix and {"pairs_scored", "pairs_all", "rerank_m"}.

  The re-rank scores go through `store` (resumable, as the all-pairs blocks); the pre-rank is
  recomputed on a resume (one forward per caption and per image, deterministic, so the same
  shortlist). With max_blocks > 0 and chunks left, the matrix is None."""
  txt_emb = encode_side(txt_fn, params, rest, texts, chunk)
  img_emb = encode_side(img_fn, params, rest, images, chunk)
  cheap = cheap_scores(txt_emb, img_emb)
  keep = shortlist(cheap, m)
  t_idx, i_idx = np.nonzero(keep)
  if say:
    say("retrieval two-stage: re-ranking %d of %d pairs (top %d per query)", len(t_idx),
        keep.size, m)
  scores = score_pairs(pair_fn, params, rest, texts, images, t_idx, i_idx, chunk, store=store,
                       save_every_s=save_every_s, say=say, max_blocks=max_blocks)
  info = {"pairs_scored": int(len(t_idx)), "pairs_all": int(keep.size), "rerank_m": int(m)}
  return (None if scores is None else combine(cheap, keep, scores)), info
