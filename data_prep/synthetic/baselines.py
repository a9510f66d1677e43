"""Chance and text-only baselines per task, so a reader knows what "learning" has to beat.

Text-only baselines see the question/statement but never the picture; their statistics come
from the train split and are scored on val and test.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import vqa


def _majority_by(train: list[dict], key: str, label: str):
  by = collections.defaultdict(collections.Counter)
  overall = collections.Counter()
  for r in train:
    by[r[key]][r[label]] += 1
    overall[r[label]] += 1
  default = overall.most_common(1)[0][0] if overall else None
  return lambda r: by[r[key]].most_common(1)[0][0] if by.get(r[key]) else default


def _round(x: float) -> float:
  return round(float(x), 4)


def vqa_baselines(train, evals) -> dict:
  """VQA score of a uniformly random answer and of the train majority answer per question type."""
  n_ans = len(vqa.ANSWERS)
  predict = _majority_by(train, "question_type", "answer")
  out = {}
  for split, recs in evals.items():
    if not recs:
      continue
    chance = np.mean([sum(r["scores"]) / n_ans for r in recs])
    text = np.mean([dict(zip((vqa.ANSWERS[i] for i in r["labels"]), r["scores"])).get(predict(r), 0.0)
                    for r in recs])
    out[split] = {"chance": _round(chance), "text_only": _round(text)}
  return {"metric": "vqa_score", "text_only_method": "majority answer per question type (train)",
          "splits": out}


def label_baselines(train, evals, n_classes: int, key: str = "template") -> dict:
  """Accuracy of chance and of the train majority label per sentence template."""
  predict = _majority_by(train, key, "target")
  out = {}
  for split, recs in evals.items():
    if recs:
      acc = np.mean([predict(r) == r["target"] for r in recs])
      out[split] = {"chance": _round(1.0 / n_classes), "text_only": _round(acc)}
  return {"metric": "accuracy", "text_only_method": f"majority label per {key} (train)", "splits": out}


def re_baselines(evals, regions_of) -> dict:
  """RE: chance = a random region is right; prior = always the most confident region."""
  out = {}
  for split, recs in evals.items():
    if not recs:
      continue
    chance, first = [], []
    for r in recs:
      x, y, w, h = r["bbox"]
      gt = (x, y, x + w, y + h)
      hits = [scene_lib.iou(b, gt) > 0.5 for b in regions_of(r["image_id"])]
      chance.append(np.mean(hits))
      first.append(hits[0])
    out[split] = {"chance": _round(np.mean(chance)), "text_only": _round(np.mean(first))}
  return {"metric": "accuracy (IoU > 0.5)",
          "text_only_method": "no text: always pick region 0 (highest confidence)", "splits": out}


def vcr_baselines(train, evals) -> dict:
  """VCR: chance, and picking the choice whose text was most often correct in train."""
  def prior(field, target):
    right, seen = collections.Counter(), collections.Counter()
    for r in train:
      for i, t in enumerate(r[field]):
        seen[t] += 1
        right[t] += i == r[target]
    return lambda r: int(np.argmax([right[t] / seen[t] if seen[t] else 0.0 for t in r[field]]))

  pa, pr = prior("answers", "qa_target"), prior("rationales", "qar_target")
  out = {}
  for split, recs in evals.items():
    if not recs:
      continue
    qa = np.array([pa(r) == r["qa_target"] for r in recs])
    qar = np.array([pr(r) == r["qar_target"] for r in recs])
    out[split] = {"chance": {"qa": 0.25, "qar": 0.25, "q_ar": 0.0625},
                  "text_only": {"qa": _round(qa.mean()), "qar": _round(qar.mean()),
                                "q_ar": _round((qa & qar).mean())}}
  return {"metric": "accuracy (Q->A, QA->R, Q->AR)",
          "text_only_method": "choice text most often correct in train", "splits": out}


def retrieval_chance(n_images: int, captions_per_image: int) -> dict:
  """Recall@K of a random ranking for image retrieval (IR) and text retrieval (TR)."""
  n_txt = n_images * captions_per_image
  out = {}
  for k in (1, 5, 10):
    ir = min(1.0, k / n_images)
    kk = min(k, n_txt)
    tr = 1.0 - math.comb(n_txt - captions_per_image, kk) / math.comb(n_txt, kk)
    out[f"ir_r{k}"], out[f"tr_r{k}"] = _round(ir), _round(tr)
  return out
