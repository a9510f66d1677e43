"""NLVR2-style: a statement about a pair of images (left, right) and whether it is true.

Each template draws its parameters near the scenes' contents and is asked for a target label
first, so labels are balanced per template and the sentence alone does not give the answer.
"""

from __future__ import annotations

import numpy as np

from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import lexicon as lx


def _attr(rng, pics):
  """A colour-shape pair that occurs in one of the images (or, sometimes, in neither)."""
  pic = lx.choice(rng, pics)
  o = lx.choice(rng, pic.objects)
  if rng.random() < 0.5:
    return o.colour, o.shape
  if rng.random() < 0.5:
    return o.colour, lx.choice(rng, scene_lib.SHAPES)
  return lx.choice(rng, scene_lib.COLOUR_NAMES), o.shape


def _more(rng, l, r):
  colour, _ = _attr(rng, (l, r))
  nl, nr = scene_lib.count(l.scene, colour=colour), scene_lib.count(r.scene, colour=colour)
  word = lx.choice(rng, ("more", "fewer"))
  truth = nl > nr if word == "more" else nl < nr
  return f"the left image contains {word} {colour} objects than the right image .", truth


def _both(rng, l, r):
  colour, shape = _attr(rng, (l, r))
  truth = all(scene_lib.count(p.scene, colour=colour, shape=shape) > 0 for p in (l, r))
  return f"both images contain {lx.a_desc(colour=colour, shape=shape)} .", truth


def _only_one(rng, l, r):
  colour, shape = _attr(rng, (l, r))
  side = lx.choice(rng, ("left", "right"))
  here, there = (l, r) if side == "left" else (r, l)
  truth = (scene_lib.count(here.scene, colour=colour, shape=shape) > 0
           and scene_lib.count(there.scene, colour=colour, shape=shape) == 0)
  other = "right" if side == "left" else "left"
  d = lx.a_desc(colour=colour, shape=shape)
  return f"there is {d} in the {side} image but not in the {other} image .", truth


def _total(rng, l, r):
  _, shape = _attr(rng, (l, r))
  n = scene_lib.count(l.scene, shape=shape) + scene_lib.count(r.scene, shape=shape)
  k = max(1, n + int(rng.integers(-1, 2)))
  k = min(k, len(lx.NUMBER_WORDS) - 1)
  return f"there are exactly {lx.number(k)} {lx.noun(shape, 2)} in total .", n == k


def _side_count(rng, l, r):
  side = lx.choice(rng, ("left", "right"))
  pic = l if side == "left" else r
  n = len(pic.objects)
  k = max(2, min(n + int(rng.integers(-1, 2)), scene_lib.MAX_OBJECTS))
  return f"the {side} image contains exactly {lx.number(k)} objects .", n == k


TEMPLATES = {"more": _more, "both": _both, "only_one": _only_one, "total": _total,
             "side_count": _side_count}


def statement(rng: np.random.Generator, left: lx.Picture, right: lx.Picture) -> dict | None:
  """One labelled statement for a pair, or None when no template reaches the drawn label."""
  name = lx.choice(rng, list(TEMPLATES))
  want = bool(rng.random() < 0.5)
  for _ in range(30):
    text, truth = TEMPLATES[name](rng, left, right)
    if truth == want:
      return dict(sentence=text, label=int(truth), template=name)
  return None
