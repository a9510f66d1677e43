"""Referring expression comprehension (docs/official.md, *Downstream heads: referring
expressions*): a score per region, the official "cls" (or "rank") loss summed over the batch,
and box accuracy (IoU > 0.5 with the official +1-pixel convention) per evaluation split.

Text records (data_prep.refcoco, or the synthetic world's re_* splits) carry `target` (the
index of the referred region among the image's regions; training needs it, -1 = unknown),
`bbox` (the referred box, xywh pixels) and `image_w` / `image_h` (for the predicted box, from
the normalised region boxes). Training uses ground-truth-box features in the official recipe;
which image dirs an evaluation split reads decides its box source (gt or detected).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import files
from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import refer as refer_eval
from uniter_jax.models.refer import LOSSES, MLP_CHOICES, re_cls_loss, re_rank_loss, sample_negatives
from uniter_jax.tasks import base, classify, register

HOW = ("convert RefCOCO / RefCOCO+ / RefCOCOg with data_prep.refcoco (text records with "
       "target, bbox, image_w, image_h)")
EVAL_FIELDS = ("bbox", "image_w", "image_h")


def parse_splits(value: str) -> list[tuple[str, list[str], list[str]]]:
  """'testA:TXT[:IMG],testB:TXT' -> [(name, text dirs, image dirs)] (image dirs may be [])."""
  out = []
  for part in base.csv(value):
    bits = part.split(":")
    if len(bits) not in (2, 3) or not bits[0] or not bits[1]:
      raise ValueError(f"config.re.eval_splits entry {part!r}: use NAME:TEXT_DIR or "
                       "NAME:TEXT_DIR:IMAGE_DIR, comma-separated")
    out.append((bits[0], [bits[1]], bits[2:]))
  return out


class ReTask(base.Task):
  """UniterForReferringExpressionComprehension on [CLS] expression [SEP] + the regions."""

  name = "re"
  model_class = "UniterForReferringExpressionComprehension"
  synthetic_splits = ("re_train", "re_val", "re_test")
  step_extra_fields = ("target",)

  # -- data ----------------------------------------------------------------------------------
  def check_data(self, config, data) -> None:
    if config.re.mlp not in MLP_CHOICES:
      raise ValueError(f"config.re.mlp={config.re.mlp!r}: use 1 or 2")
    if config.re.loss not in LOSSES:
      raise ValueError(f"config.re.loss={config.re.loss!r}: use one of {LOSSES}")
    parse_splits(config.re.eval_splits)

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    """Training needs targets; every split needs the fields that place boxes in pixels."""
    fields = pipe.planner.fields
    if pipe.config.shuffle:  # the training pipeline
      if "target" not in fields:
        raise fmt.DataError(f"{split}: texts have no 'target' field (the referred region's "
                            f"index) to train on ({HOW})")
      outside = self.targets_outside(pipe)
      if outside:  # trained on without a loss; counted in the data report
        pipe.planner.stats["re_target_not_among_regions"] = outside
      if outside == int(pipe.planner.valid.sum()):
        raise fmt.DataError(f"{split}: no text's target is one of its image's regions (target "
                            f"-1 or beyond the kept regions); train on ground-truth-box "
                            f"features ({HOW})")
      return
    missing = [f for f in EVAL_FIELDS if f not in fields]
    if missing:
      raise fmt.DataError(f"{split}: texts lack {missing}, needed to score predicted boxes "
                          f"({HOW})")

  @staticmethod
  def targets_outside(pipe) -> int:
    """Valid texts whose target is not one of the regions the pipeline keeps."""
    p = pipe.planner
    t = np.asarray(p.fields["target"])
    kept = np.minimum(p.text_nbb[:, 0], p.img_buckets[-1])
    return int(np.sum(p.valid & ((t < 0) | (t >= kept))))

  # -- model and update ----------------------------------------------------------------------
  def model_kwargs(self, config, data):
    return {"mlp": int(config.re.mlp)}

  def objective(self, config, data):
    kind, margin, hard_ratio = config.re.loss, float(config.re.margin), float(config.re.hard_ratio)

    def branch(model, batch, key, deterministic):
      k_model, k_neg = (None, None) if key is None else tuple(jax.random.split(key))
      scores = model(batch, deterministic=deterministic, rngs=k_model)
      target, mask = batch["target"], batch["img_mask"]
      if kind == "cls":
        loss = re_cls_loss(scores, target, mask)
      else:
        neg, has = sample_negatives(k_neg, scores, target, mask, hard_ratio)
        loss = re_rank_loss(scores, target, neg, mask, margin, has)
      hit = (jnp.argmax(scores, -1) == target).astype(jnp.float32)
      return loss, {"accuracy": jnp.mean(hit)}

    return step_lib.Objective(names=(self.name,), losses=(branch,), ratios=(1.0,),
                              aux_names=("accuracy",),
                              logged={self.name: (("train_region_accuracy", "accuracy"),)})

  # -- evaluation ----------------------------------------------------------------------------
  def _score_fn(self, ctx: base.RunContext) -> Callable:
    if "re_scores" not in ctx.cache:
      graphdef = ctx.graphdef

      def fn(params, rest, batch):
        scores = nnx.merge(graphdef, params, rest)(batch, deterministic=True)
        return {"region": jnp.argmax(scores, -1), "score": jnp.max(scores, -1),
                "img_pos": batch["img_pos"], "img_mask": batch["img_mask"]}

      ctx.cache["re_scores"] = jax.jit(fn)
    return ctx.cache["re_scores"]

  def _split(self, ctx: base.RunContext, state, text_dirs, image_dirs, *, strict: bool):
    """Per expression: the top region, its pixel box, the gt box and their IoU."""
    pipe = classify.eval_pipeline(
        ctx, text_dirs, image_dirs, strict=strict,
        check=lambda pipe, split: self.check_pipeline(ctx.config, ctx.data, pipe, split))
    rows = classify.run_split(ctx, state, pipe, self._score_fn(ctx), what="expression")
    f = pipe.planner.fields
    idx = np.array(sorted(rows), np.int64)
    region = np.array([int(rows[i]["region"]) for i in idx])
    # Rows of different region buckets differ in length: pad to the longest (masked).
    li = max(rows[i]["img_mask"].shape[0] for i in idx) if idx.size else 0
    pos = np.zeros((idx.size, li, 7), np.float32)
    mask = np.zeros((idx.size, li), bool)
    for k, i in enumerate(idx.tolist()):
      n = rows[i]["img_mask"].shape[0]
      pos[k, :n], mask[k, :n] = rows[i]["img_pos"], rows[i]["img_mask"]
    boxes = refer_eval.region_boxes(pos, np.asarray(f["image_w"])[idx],
                                    np.asarray(f["image_h"])[idx])
    gt = np.array([list(f["bbox"][i])[:4] for i in idx], np.float64)
    pred = boxes[np.arange(len(idx)), region]
    result = {"index": idx, "region": region, "score": np.array([float(rows[i]["score"])
                                                                 for i in idx]),
              "pred_box": pred, "gt_box": gt, "iou": refer_eval.iou(pred, gt),
              "boxes": boxes, "mask": mask}
    return result, pipe

  @staticmethod
  def _metrics(r: dict, pipe, prefix: str) -> dict:
    """Box accuracy, the two references beside it (a uniformly random region, always the first
    region), and region accuracy where targets are known."""
    if not r["index"].size:
      return {}
    out = {f"{prefix}/accuracy": float(np.mean(r["iou"] > refer_eval.CORRECT_IOU)),
           f"{prefix}/chance": refer_eval.chance(r["boxes"], r["mask"], r["gt_box"]),
           # A constant predictor: always the first region (the detector's most confident).
           f"{prefix}/first_region_baseline": float(np.mean(
               refer_eval.iou(r["boxes"][:, 0], r["gt_box"]) > refer_eval.CORRECT_IOU)),
           f"{prefix}/expressions": int(r["index"].size)}
    if "target" in pipe.planner.fields:
      t = np.asarray(pipe.planner.fields["target"])[r["index"]]
      known = t >= 0
      if known.any():  # on gt-box features the target region is the answer
        out[f"{prefix}/region_accuracy"] = float(np.mean(r["region"][known] == t[known]))
    out.update(classify.skipped(pipe, "expressions"))
    return out

  def evaluators(self, ctx: base.RunContext):
    """`re`: val (config.data.val_*) and every config.re.eval_splits entry."""
    splits = [("", ctx.data.val_text_dirs, ctx.data.val_image_dirs)] if ctx.data.val_text_dirs else []
    splits += [(n, t, i or ctx.data.val_image_dirs)
               for n, t, i in parse_splits(ctx.config.re.eval_splits)]

    def evaluate(state) -> dict:
      out = {}
      for split, text_dirs, image_dirs in splits:
        r, pipe = self._split(ctx, state, text_dirs, image_dirs, strict=False)
        out.update(self._metrics(r, pipe, f"re/{split}" if split else "re"))
      return out

    return {self.name: evaluate}

  def predictor(self, ctx: base.RunContext):
    def predict(state) -> dict:
      split, text_dirs, image_dirs = classify.predict_dirs(ctx)
      r, pipe = self._split(ctx, state, text_dirs, image_dirs, strict=True)
      p = pipe.planner
      ids, sents = p.text_ids, p.fields.get("sent")
      rows = [{"id": ids[i], "image_id": p.text_image_ids[i][0],
               **({"sent": sents[i]} if sents is not None else {}),
               "region": int(r["region"][k]), "score": float(r["score"][k]),
               "pred_box": [round(float(v), 2) for v in r["pred_box"][k]],
               "gt_box": [round(float(v), 2) for v in r["gt_box"][k]],
               "iou": round(float(r["iou"][k]), 4),
               "correct": bool(r["iou"][k] > refer_eval.CORRECT_IOU)}
              for k, i in enumerate(r["index"].tolist())]
      path = os.path.join(ctx.workdir, "predictions", split, "re_predictions.json")
      files.write_bytes(path, json.dumps(rows, indent=0).encode(), overwrite=True)
      out = {"predictions": path, "expressions": len(rows), **self._metrics(r, pipe, "re")}
      if ctx.config.re.draw:
        out["drawing"] = self._draw(ctx, rows[:int(ctx.config.re.draw)], split)
      return out

    return predict


  @staticmethod
  def _draw(ctx: base.RunContext, rows: list[dict], split: str) -> str:
    """Draws `rows` (predicted box red, gt green) on their images: predictions/SPLIT/re_drawing.png."""
    from uniter_jax.tools import draw_re  # pylint: disable=import-outside-toplevel  (Pillow)
    images = ctx.config.re.draw_images
    if not images and ctx.config.data.synthetic:
      images = os.path.join(os.path.abspath(ctx.config.data.synthetic), "images")
    if not images:
      raise ValueError("config.re.draw needs config.re.draw_images (the folder of the images)")
    rows = [{"sent": r["id"], **r} for r in rows]  # the text id when texts have no `sent`
    return draw_re.contact_sheet(rows, images, os.path.join(ctx.workdir, "predictions", split,
                                                            "re_drawing.png"))


register(ReTask())
