"""Image-text retrieval fine-tuning (docs/official.md, *Retrieval*):
UniterForImageTextRetrieval, the sigmoid hinge over [positive, negative image, negative
caption] groups (train_itm.py), and evaluation of every caption against every image (IR / TR recall@1/5/10, r_mean).

Negatives are drawn inside the jitted step, never a true match: a candidate with the
anchor's image id (another caption of the same image included) is excluded. Candidates are
the rows of the global batch and, with config.itr.pool = P > 0, P more rows of a second,
independently shuffled stream over the whole training split (the trainer feeds it as
"pool_<field>" keys, Task.pool_rows), so negatives do not depend on which pairs share a
batch. A row with no valid candidate gets weight 0. With config.itr.hard_negatives = k > 0,
each text and each image anchor mines its k hardest among config.itr.hard_pool random
candidates (eval mode, no gradient) before the training forward.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import itm as itm_eval
from uniter_jax.evaluators import retrieval as ret_eval
from uniter_jax.models.retrieval import hardest, rank_loss
from uniter_jax.tasks import base, classify, register
from uniter_jax.tasks import retrieval_rerank as rerank
from uniter_jax.tasks import retrieval_scores as scoring

TEXT_SIDE = ("input_ids", "txt_mask", "txt_type_ids")
IMAGE_SIDE = ("img_feat", "img_pos", "img_mask", "img_type_ids", "img_ids")
HOW = "convert Karpathy-split captions with data_prep.retrieval: one image per caption"


def draw_negatives(key: jax.Array, img_ids: jax.Array, valid: jax.Array, n_pos: int = 0
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """For each of the first n_pos rows (0: all): (another row's image, another row's caption,
  ok), drawn from all N rows, never a true match.

  Uniform over the rows with a different image id (Gumbel-max over a masked (n_pos, N)
  score, static shapes). `ok` is False where no such row exists (the picks are meaningless).
  """
  n = img_ids.shape[0]
  a = n_pos or n
  allowed = (img_ids[:a, None] != img_ids[None, :]) & valid[None, :] & valid[:a, None]
  k_img, k_txt = jax.random.split(key)

  def pick(k):
    g = jax.random.gumbel(k, (a, n))
    return jnp.argmax(jnp.where(allowed, g, -jnp.inf), axis=1)

  return pick(k_img), pick(k_txt), allowed.any(axis=1)


def random_negative_batch(key: jax.Array, batch: Mapping[str, jax.Array], n_pos: int = 0
                          ) -> tuple[dict, jax.Array]:
  """The first n_pos rows (0: all B) as positives -> 3 rows [(t, i), (t, i_neg), (t_neg, i)]
  each, negatives from all B rows, and (n_pos,) weights."""
  valid = batch["txt_mask"].any(axis=1)
  a = n_pos or valid.shape[0]
  neg_img, neg_txt, ok = draw_negatives(key, batch["img_ids"], valid, a)
  idx = jnp.arange(a)
  txt_src = jnp.stack([idx, idx, neg_txt], axis=1).reshape(-1)
  img_src = jnp.stack([idx, neg_img, idx], axis=1).reshape(-1)
  return _gather(batch, txt_src, img_src), (valid[:a] & ok).astype(jnp.float32)


POOL = base.POOL_PREFIX  # the negative pool's fields in a step batch (Task.pool_rows)


def with_pool(batch: Mapping[str, jax.Array]) -> tuple[dict, int]:
  """(the batch's rows followed by the pool's, number of batch rows).

  Text and region blocks are padded to the wider of the two (static shapes), so any text can
  meet any image. Without pool fields: (the batch, its rows).
  """
  n = batch["img_ids"].shape[0]
  pool = {k[len(POOL):]: v for k, v in batch.items() if k.startswith(POOL)}
  own = {k: v for k, v in batch.items() if not k.startswith(POOL)}
  if not pool:
    return own, n
  out = {}
  for k in own.keys() & pool.keys():
    a, b = own[k], pool[k]
    if a.ndim > 1 and a.shape[1] != b.shape[1]:  # a text or region block of another width
      width = max(a.shape[1], b.shape[1])
      a, b = (jnp.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
              for x in (a, b))
    out[k] = jnp.concatenate([a, b], axis=0)
  return out, n


def _gather(batch: Mapping[str, jax.Array], txt_src: jax.Array, img_src: jax.Array) -> dict:
  """Rows (text txt_src[r], image img_src[r]) of a positives batch."""
  out = {}
  for k, v in batch.items():
    if k in TEXT_SIDE:
      out[k] = jnp.take(v, txt_src, axis=0)
    elif k in IMAGE_SIDE:
      out[k] = jnp.take(v, img_src, axis=0)
  return out


def hard_negative_groups(score_fn, key: jax.Array, batch: Mapping[str, jax.Array], pool: int,
                         k: int, anchors: int = 0) -> list[tuple[dict, jax.Array, jax.Array]]:
  """Hard negatives per anchor (train_itm_hard_negatives.py), inside the step.

  The first `anchors` rows (0: all B) are anchors. For each text anchor: `pool` random
  images of the batch that are not a true match, scored by `score_fn(rows) -> (rows,)`
  (eval mode, no gradient), the k highest kept; the same for each image anchor with
  captions. Returns, per direction ("text" then "image"), (rows of A groups [gt, k hard],
  weights (A, k), picked candidate rows (A, k)).
  """
  b = batch["img_ids"].shape[0]
  a = min(anchors or b, b)
  pool = min(pool, b - 1)
  valid = batch["txt_mask"].any(axis=1)
  allowed = ((batch["img_ids"][:a, None] != batch["img_ids"][None, :]) & valid[None, :]
             & valid[:a, None])
  idx = jnp.arange(a)
  out = []
  for direction, k_dir in zip(("text", "image"), jax.random.split(key)):
    g = jnp.where(allowed, jax.random.gumbel(k_dir, (a, b)), -jnp.inf)
    gv, cand = jax.lax.top_k(g, pool)  # `pool` distinct candidates, uniform without replacement
    anchor = jnp.repeat(idx, pool)
    pair = (anchor, cand.reshape(-1)) if direction == "text" else (cand.reshape(-1), anchor)
    scores = jax.lax.stop_gradient(score_fn(_gather(batch, *pair))).reshape(a, pool)
    top, ok = hardest(scores, k, jnp.isfinite(gv))
    picked = jnp.take_along_axis(cand, top, axis=1)
    group = jnp.concatenate([idx[:, None], picked], axis=1).reshape(-1)
    anchor = jnp.repeat(idx, k + 1)
    pair = (anchor, group) if direction == "text" else (group, anchor)
    out.append((_gather(batch, *pair), (ok & valid[:a, None]).astype(jnp.float32), picked))
  return out


def check_one_image(pipe, split: str) -> None:
  if pipe.planner.images_per_text not in (None, 1):
    raise fmt.DataError(f"{split}: retrieval captions name one image each; these name "
                        f"{pipe.planner.images_per_text} ({HOW})")


def read_split(ctx: base.RunContext, text_dirs, image_dirs, *, strict: bool,
               max_images: int = 0) -> dict:
  """Every caption and every distinct image of a split, as host arrays (max_images > 0:
  the first max_images images, in caption order, and all their captions).

  {"texts": {input_ids, txt_mask}, "images": {img_feat, img_pos, img_mask}, "gt" (n_txt,)
  image column of each caption, "txt_ids", "img_ids" (names), "skipped"}.
  """
  pipe = ctx.pipeline(text_dirs, image_dirs, train=False, drop_remainder=False, num_epochs=1,
                      strict=strict, mesh=None)
  split = ",".join(text_dirs)
  check_one_image(pipe, split)
  rows = itm_eval.stack_rows(list(pipe), scoring.TEXT_FIELDS + scoring.IMAGE_FIELDS
                             + ("img_ids", "example_index"))
  order = np.argsort(rows["example_index"], kind="stable")
  rows = {k: v[order] for k, v in rows.items()}
  hashes, first, gt = np.unique(rows["img_ids"], return_index=True, return_inverse=True)
  if len(hashes) < 2:
    raise fmt.DataError(f"{split}: retrieval needs at least 2 images, found {len(hashes)}")
  p = pipe.planner
  name_of = {loc: iid for iid, loc in p.image_loc.items()}
  # Images in order of their first caption (np.unique sorts by hash).
  by_first = np.argsort(first, kind="stable")
  rank = np.empty_like(by_first)
  rank[by_first] = np.arange(len(by_first))
  gt, first = rank[gt.reshape(-1)], first[by_first]
  keep = gt < max_images if max_images else np.ones(len(gt), bool)
  first = first[:max_images] if max_images else first
  ex = rows["example_index"][keep]
  img_names = [name_of[(int(p.text_shard[ex_j, 0]), int(p.text_row[ex_j, 0]))]
               for ex_j in rows["example_index"][first]]
  return {"texts": {k: rows[k][keep] for k in scoring.TEXT_FIELDS},
          "images": {k: rows[k][first] for k in scoring.IMAGE_FIELDS},
          "gt": gt[keep], "txt_ids": [p.text_ids[i] for i in ex], "img_ids": img_names,
          "skipped": classify.skipped(pipe, "captions")}


class RetrievalTask(base.Task):
  """Caption <-> image ranking with UniterForImageTextRetrieval."""

  name = "itr"
  model_class = "UniterForImageTextRetrieval"
  synthetic_splits = ("retrieval_train", "retrieval_val", "retrieval_test")

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    check_one_image(pipe, split)

  def pool_rows(self, config) -> int:
    """config.itr.pool: rows of the negative pool stream (0: negatives from the batch)."""
    return int(config.itr.get("pool", 0))

  def objective(self, config, data):
    margin = float(config.itr.margin)
    hard = int(config.itr.hard_negatives)

    def hard_branch(model, batch, key, deterministic):
      """Mean text-anchor loss + mean image-anchor loss (train_itm_hard_negatives.py)."""
      batch, n_batch = with_pool(batch)
      k_sel, k_t, k_i = jax.random.split(key, 3)
      score = lambda rows: model(rows, deterministic=True)  # noqa: E731  mining: eval mode
      total, right, n = 0.0, 0.0, 0.0
      for (rows, w, _), k_drop in zip(
          hard_negative_groups(score, k_sel, batch, int(config.itr.hard_pool), hard,
                               int(config.itr.hard_anchors) or n_batch),
          (k_t, k_i)):
        scores = model(rows, deterministic=deterministic, rngs=k_drop)
        total = total + rank_loss(scores, hard + 1, margin, w)
        s = scores.reshape(-1, hard + 1)
        right = right + jnp.sum((s[:, :1] > s[:, 1:]) * w)
        n = n + jnp.sum(w)
      return total, {"accuracy": right / jnp.maximum(n, 1.0)}

    def branch(model, batch, key, deterministic):
      k_neg, k_drop = jax.random.split(key)
      batch, n = with_pool(batch)
      rows, weights = random_negative_batch(k_neg, batch, n)
      scores = model(rows, deterministic=deterministic, rngs=k_drop)
      s = scores.reshape(-1, 3)
      right = jnp.sum((s[:, 0:1] > s[:, 1:]) * weights[:, None]) / jnp.maximum(
          2 * jnp.sum(weights), 1.0)
      return rank_loss(scores, 3, margin, weights), {"accuracy": right}

    return step_lib.Objective(names=(self.name,), losses=(hard_branch if hard else branch,),
                              ratios=(1.0,),
                              aux_names=("accuracy",),
                              logged={self.name: (("train_pos_above_neg", "accuracy"),)})

  # -- evaluation ----------------------------------------------------------------------------
  @staticmethod
  def _scorer(ctx: base.RunContext):
    """The jitted block scorer in config.evals.itr.dtype. Built when the evaluator or
    predictor is made, outside any mesh context (the abstract model needs none)."""
    dtype = ctx.config.evals.itr.dtype
    key = ("itr_scorer", dtype)
    if key not in ctx.cache:
      graphdef = scoring.graphdef_in(ctx.graphdef, ctx.model_cfg, dtype)
      ctx.cache[key] = scoring.make_block_scorer(graphdef, ctx.rules)
    return ctx.cache[key]

  @staticmethod
  def _two_stage_fns(ctx: base.RunContext):
    """(pair scorer, text encoder, image encoder) for config.evals.itr.rerank > 0."""
    s = ctx.config.evals.itr
    key = ("itr_two_stage", s.dtype, s.prerank_pool)
    if key not in ctx.cache:
      graphdef = scoring.graphdef_in(ctx.graphdef, ctx.model_cfg, s.dtype)
      ctx.cache[key] = (rerank.make_pair_scorer(graphdef, ctx.rules),
                        rerank.make_side_encoder(graphdef, ctx.rules, "text", s.prerank_pool),
                        rerank.make_side_encoder(graphdef, ctx.rules, "image", s.prerank_pool))
    return ctx.cache[key]

  @staticmethod
  def _score_matrix(ctx: base.RunContext, fn, state, data: dict, name: str):
    """(ranking matrix or None when max_blocks left blocks, extra metrics)."""
    s = ctx.config.evals.itr
    meta = {"step": int(state["step"]), "n_txt": len(data["gt"]),
            "n_img": len(data["img_ids"]), "block": [s.block_txt, s.block_img],
            "dtype": s.dtype, "trim_text": s.trim_text, "txt": data["txt_ids"][:3],
            "img": data["img_ids"][:3]}
    if s.rerank > 0:
      meta.update(rerank=s.rerank, prerank_pool=s.prerank_pool)
    # One file per split: a later step's evaluation (its meta differs) starts afresh over it,
    # so a long run keeps one matrix per split, not one per evaluation (COCO 5k: ~500 MB).
    store = scoring.ScoreStore(os.path.join(ctx.workdir, "scores", f"{name}.npz"), meta)
    if s.rerank > 0:  # two-stage: pre-rank all pairs, re-rank the top `rerank` per query
      fns = RetrievalTask._two_stage_fns(ctx)
      with jax.set_mesh(ctx.mesh):
        return rerank.two_stage_scores(*fns, state["params"], state["rest"], data["texts"],
                                       data["images"], m=s.rerank,
                                       chunk=s.block_txt * s.block_img, say=ctx.say,
                                       store=store, save_every_s=s.save_every_s,
                                       max_blocks=s.max_blocks)
    with jax.set_mesh(ctx.mesh):
      return scoring.score_all_pairs(
          fn, state["params"], state["rest"], data["texts"], data["images"],
          block_txt=s.block_txt, block_img=s.block_img, store=store, say=ctx.say,
          save_every_s=s.save_every_s, max_blocks=s.max_blocks, trim_text=s.trim_text), {}

  @staticmethod
  def _metrics(scores: np.ndarray | None, data: dict) -> dict:
    """Recall metrics with their chance values; blocks_pending when max_blocks stopped."""
    if scores is None:
      return {"blocks_pending": 1}
    chance = ret_eval.chance_recalls(data["gt"], len(data["img_ids"]))
    return {**ret_eval.recalls(scores, data["gt"]),
            **{f"chance_{k}": v for k, v in chance.items()},
            "images": len(data["img_ids"]), "captions": len(data["gt"]), **data["skipped"]}

  def evaluators(self, ctx: base.RunContext):
    """`itr`: val recalls; all pairs (config.evals.itr.full) or the official fast
    validation (each caption vs its image + the next `fast_size - 1`); rerank > 0 the
    two-stage ranking (tasks/retrieval_rerank.py); max_images > 0 evaluates the first
    max_images val images and their captions only."""
    cache: dict = {}
    fn = self._scorer(ctx)

    def evaluate(state) -> dict:
      if not ctx.data.val_text_dirs:
        return {}
      if "val" not in cache:
        cache["val"] = read_split(ctx, ctx.data.val_text_dirs, ctx.data.val_image_dirs,
                                  strict=False, max_images=ctx.config.evals.itr.max_images)
      data = cache["val"]
      s = ctx.config.evals.itr
      if s.full or s.rerank > 0:
        scores, extra = self._score_matrix(ctx, fn, state, data, "val")
        return {**self._metrics(scores, data), **extra}
      cols = ret_eval.fast_val_columns(data["gt"], len(data["img_ids"]), s.fast_size)
      with jax.set_mesh(ctx.mesh):
        sc = scoring.fast_val_scores(fn, state["params"], state["rest"],
                                     data["texts"], data["images"], cols)
      return ret_eval.fast_val_recalls(sc)

    return {self.name: evaluate}

  def predictor(self, ctx: base.RunContext):
    fn = self._scorer(ctx)

    def predict(state) -> dict:
      split, text_dirs, image_dirs = classify.predict_dirs(ctx)
      data = read_split(ctx, text_dirs, image_dirs, strict=True)
      scores, extra = self._score_matrix(ctx, fn, state, data, split)
      out = {**self._metrics(scores, data), **extra}
      if scores is None:
        return out
      path = os.path.join(ctx.workdir, "predictions", split, "rankings.json")
      ret_eval.write_rankings(path, scores, data["txt_ids"], data["img_ids"], k=10)
      return {"predictions": path, **out}

    return predict


register(RetrievalTask())
