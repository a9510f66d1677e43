"""VCR-style multiple choice: a question, 4 answers, 4 rationales; text names regions by tags.

Tag `objK` names region K of the image's detected regions (VCR writes person_0 etc. for its
object indices). Q->A needs the tagged region's colour or shape; QA->R asks which rationale
(a full description of the tagged region) is true and fits the correct answer.
"""

from __future__ import annotations

import numpy as np

from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import lexicon as lx


def _four(rng, truth: str, pool) -> tuple[list[str], int]:
  """truth plus 3 other values from pool, shuffled; returns (values, index of truth)."""
  others = [v for v in pool if v != truth]
  picks = [others[i] for i in rng.choice(len(others), 3, replace=False)]
  vals = picks + [truth]
  order = rng.permutation(4)
  vals = [vals[i] for i in order]
  return vals, vals.index(truth)


def _describe(tag, colour, shape):
  return f"{tag} is {lx.a_desc(colour=colour, shape=shape)} ."


def _rationales(rng, tag, o, keep: str) -> tuple[list[str], int]:
  """One true description of the object and 3 false ones that keep the asked attribute."""
  if keep == "colour":
    shapes, idx = _four(rng, o.shape, scene_lib.SHAPES)
    return [_describe(tag, o.colour, s) for s in shapes], idx
  colours, idx = _four(rng, o.colour, scene_lib.COLOUR_NAMES)
  return [_describe(tag, c, o.shape) for c in colours], idx


def item(rng: np.random.Generator, pic: lx.Picture) -> dict | None:
  """One VCR-style question about a random object region, or None if the image has none."""
  regions = pic.regions.object_region()
  if not regions:
    return None
  k = lx.choice(rng, sorted(regions))
  o = pic.objects[k]
  tag = lx.TAGS[regions[k]]
  kind = lx.choice(rng, ("colour", "shape", "same_colour"))
  if kind == "same_colour":
    mates = [j for j, p in enumerate(pic.objects) if j != k and p.colour == o.colour]
    if len(mates) == 1:
      j = mates[0]
      cands = [r for r in range(len(pic.regions.kind)) if r not in (regions[k], regions[j])
               and (pic.regions.obj[r] < 0 or pic.objects[pic.regions.obj[r]].colour != o.colour)]
      # Distractors are other objects first (tags of confident regions), so the correct tag's
      # low index (objects sort before background boxes) does not give the answer away.
      objs = [r for r in cands if pic.regions.kind[r] == "object"]
      rest = [r for r in cands if pic.regions.kind[r] != "object"]
      cands = [objs[i] for i in rng.permutation(len(objs))] + [rest[i] for i in rng.permutation(len(rest))]
      if len(cands) >= 3:
        wrong = cands[:3]
        tags, qa = _four(rng, lx.TAGS[regions[j]], [lx.TAGS[r] for r in wrong] + [lx.TAGS[regions[j]]])
        answers = [f"{t} is ." for t in tags]
        colours, qar = _four(rng, o.colour, scene_lib.COLOUR_NAMES)
        other = lx.TAGS[regions[j]]
        rats = [f"{tag} and {other} are both {c} ." for c in colours]
        return dict(question=f"which object is the same colour as {tag} ?", answers=answers,
                    rationales=rats, qa_target=qa, qar_target=qar, kind=kind, obj=k,
                    tags=[regions[k], regions[j]])
    kind = "colour"
  if kind == "colour":
    vals, qa = _four(rng, o.colour, scene_lib.COLOUR_NAMES)
    answers = [f"{tag} is {c} ." for c in vals]
    question = f"what colour is {tag} ?"
  else:
    vals, qa = _four(rng, o.shape, scene_lib.SHAPES)
    answers = [f"it is {lx.a_desc(shape=s)} ." for s in vals]
    question = f"what shape is {tag} ?"
  rats, qar = _rationales(rng, tag, o, kind)
  return dict(question=question, answers=answers, rationales=rats, qa_target=qa, qar_target=qar,
              kind=kind, obj=k, tags=[regions[k]])
