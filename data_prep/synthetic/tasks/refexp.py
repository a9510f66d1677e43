"""Referring expressions: a phrase that picks out exactly one object, the index of the detected
region that covers it (IoU > 0.5 with the true box, by the detector's construction) and the
true box in pixels (xywh, as RefCOCO's `bbox`)."""

from __future__ import annotations

import numpy as np

from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import lexicon as lx

_REL = {"to the left of": scene_lib.left_of, "above": scene_lib.above,
        "to the right of": lambda a, b: scene_lib.left_of(b, a),
        "below": lambda a, b: scene_lib.above(b, a)}


def _superlatives(pic, k):
  """'leftmost circle' style phrases: o is clearly the most extreme among the objects of its kind."""
  o = pic.objects[k]
  out = []
  for group in (dict(shape=o.shape), dict(colour=o.colour)):
    others = [p for p in pic.objects if p is not o and scene_lib.matches(p, **group)]
    if not others:
      continue
    checks = {"left": lambda p: scene_lib.left_of(o, p), "right": lambda p: scene_lib.left_of(p, o),
              "top": lambda p: scene_lib.above(o, p), "bottom": lambda p: scene_lib.above(p, o)}
    for word, fn in checks.items():
      if all(fn(p) for p in others):
        out.append(f"the {lx.SUPERLATIVE[word]} {lx.desc(**group)}")
  return out


def _relational(pic, k):
  """'the circle to the left of the red star': the relation singles o out among its kind."""
  o = pic.objects[k]
  out = []
  for j, anchor in enumerate(pic.objects):
    if j == k:
      continue
    adescs = lx.unique_descs(pic, j)
    if not adescs:
      continue
    for rel, fn in _REL.items():
      if not fn(o, anchor):
        continue
      group = dict(shape=o.shape)
      rivals = [p for p in pic.objects if p is not o and p is not anchor and scene_lib.matches(p, **group)]
      if all(fn(p, anchor) is False for p in rivals):
        out.append(f"the {lx.desc(**group)} {rel} the {lx.desc(**adescs[0])}")
  return out


def expressions(pic: lx.Picture, k: int) -> list[str]:
  """Every phrase the grammar knows that refers to object k and to nothing else."""
  out = [f"the {lx.desc(**d)}" for d in lx.unique_descs(pic, k)]
  return out + _superlatives(pic, k) + _relational(pic, k)


def refs(rng: np.random.Generator, pic: lx.Picture, n: int) -> list[dict]:
  """Up to n expressions for distinct objects: {sent, obj, target, bbox, kind}."""
  regions = pic.regions.object_region()
  order = rng.permutation(len(pic.objects))
  out = []
  for k in order:
    if len(out) == n:
      break
    exprs = expressions(pic, int(k))
    if not exprs:
      continue
    # Prefer the harder (relational / superlative) phrases half of the time.
    hard = [e for e in exprs if " of " in e or "most" in e or " above " in e or " below " in e]
    sent = lx.choice(rng, hard if hard and rng.random() < 0.5 else exprs)
    o = pic.objects[int(k)]
    x1, y1, x2, y2 = o.box
    out.append(dict(sent=sent, obj=int(k), target=int(regions[int(k)]),
                    bbox=[round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]))
  return out
