"""SNLI-VE-style: image premise, text hypothesis, label contradiction (0) / entailment (1) /
neutral (2), as in the official label ids.

Visible claims (existence, counts, relations) are entailed or contradicted by the picture.
Neutral hypotheses claim an object that is present plus a property no picture shows (material,
weight, temperature), so the image cannot decide them; the same invisible claim about an absent
object is a contradiction. Each image gets one hypothesis per label.
"""

from __future__ import annotations

import numpy as np

from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import lexicon as lx

LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}


def _present(rng, pic):
  o = lx.choice(rng, pic.objects)
  return o.colour, o.shape


def _absent(rng, pic):
  o = lx.choice(rng, pic.objects)
  for _ in range(30):
    colour = o.colour if rng.random() < 0.5 else lx.choice(rng, scene_lib.COLOUR_NAMES)
    shape = o.shape if colour != o.colour else lx.choice(rng, scene_lib.SHAPES)
    if scene_lib.count(pic.scene, colour=colour, shape=shape) == 0:
      return colour, shape
  return None


def _invisible(rng, colour, shape):
  d = lx.a_desc(colour=colour, shape=shape)
  if rng.random() < 0.5:
    return f"there is {d} made of {lx.choice(rng, lx.MATERIALS)} .", "invisible_material"
  return f"there is {d} that is {lx.choice(rng, lx.STATES)} .", "invisible_state"


def _visible(rng, pic, truth: bool):
  """A visible claim with the requested truth value, or None."""
  kind = int(rng.integers(3))
  if kind == 0:
    cs = _present(rng, pic) if truth else _absent(rng, pic)
    if cs is None:
      return None
    return f"there is {lx.a_desc(colour=cs[0], shape=cs[1])} .", "exist"
  if kind == 1:
    o = lx.choice(rng, pic.objects)
    n = scene_lib.count(pic.scene, colour=o.colour)
    k = n if truth else lx.choice(rng, [m for m in (n - 1, n + 1) if m >= 1])
    noun = lx.noun(None, k)
    verb = "is" if k == 1 else "are"
    return f"there {verb} exactly {lx.number(k)} {o.colour} {noun} .", "count"
  objs = pic.objects
  pairs = [(a, b) for a in objs for b in objs if a is not b and scene_lib.left_of(a, b) is not None]
  pairs = [(a, b) for a, b in pairs
           if scene_lib.count(pic.scene, colour=a.colour, shape=a.shape) == 1
           and scene_lib.count(pic.scene, colour=b.colour, shape=b.shape) == 1]
  if not pairs:
    return None
  a, b = lx.choice(rng, pairs)
  rel = "left" if scene_lib.left_of(a, b) == truth else "right"
  da, db = lx.desc(colour=a.colour, shape=a.shape), lx.desc(colour=b.colour, shape=b.shape)
  return f"the {da} is to the {rel} of the {db} .", "relation"


def hypotheses(rng: np.random.Generator, pic: lx.Picture) -> list[dict]:
  """One entailment, one contradiction and one neutral hypothesis (fewer if a draw fails)."""
  out = []
  for _ in range(10):
    h = _visible(rng, pic, True)
    if h:
      out.append(dict(hypothesis=h[0], label=LABELS["entailment"], template=h[1]))
      break
  for _ in range(10):
    if rng.random() < 0.25:  # an invisible property of an absent object is still false
      cs = _absent(rng, pic)
      h = _invisible(rng, *cs) if cs else None
    else:
      h = _visible(rng, pic, False)
    if h:
      out.append(dict(hypothesis=h[0], label=LABELS["contradiction"], template=h[1]))
      break
  h = _invisible(rng, *_present(rng, pic))
  out.append(dict(hypothesis=h[0], label=LABELS["neutral"], template=h[1]))
  return out
