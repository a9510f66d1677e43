"""Captions (pretraining and retrieval): 5 true sentences per image about attributes, counts,
spatial relations, positions and sizes. Most name a colour-shape pair, so masked-word prediction
and image-text matching both need the picture."""

from __future__ import annotations

import numpy as np

from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import lexicon as lx

PER_IMAGE = 5


def _single(rng, pic):
  o = lx.choice(rng, pic.objects)
  d = lx.a_desc(colour=o.colour, shape=o.shape, size=o.size)
  return lx.choice(rng, [f"there is {d} in the picture .", f"the picture shows {d} .", f"{d} ."])


def _inventory(rng, pic):
  objs = list(pic.objects)
  n = len(objs)
  parts = [lx.a_desc(colour=o.colour, shape=o.shape) for o in objs]
  order = rng.permutation(n)
  parts = [parts[i] for i in order]
  listed = " , ".join(parts[:-1]) + " and " + parts[-1]
  return f"there are {lx.number(n)} objects : {listed} ."


def _count(rng, pic):
  sc = pic.scene
  kind = int(rng.integers(3))
  o = lx.choice(rng, pic.objects)
  if kind == 0:
    n = scene_lib.count(sc, colour=o.colour)
    if n == 1:
      return f"exactly one object is {o.colour} ."
    return f"there are {lx.number(n)} {o.colour} objects ."
  if kind == 1:
    n = scene_lib.count(sc, shape=o.shape)
    return f"the picture shows {lx.number(n)} {lx.noun(o.shape, n)} ."
  n = len(pic.objects)
  return f"there are {lx.number(n)} shapes in the picture ." if n > 1 else "there is one shape ."


def _relation(rng, pic):
  objs = pic.objects
  pairs = []
  for a in objs:
    for b in objs:
      if a is b:
        continue
      if scene_lib.left_of(a, b):
        pairs.append((a, "to the left of", b))
      if scene_lib.above(a, b):
        pairs.append((a, "above", b))
  if not pairs:
    return None
  a, rel, b = lx.choice(rng, pairs)
  if rng.random() < 0.5 and rel == "to the left of":
    a, rel, b = b, "to the right of", a
  elif rng.random() < 0.5 and rel == "above":
    a, rel, b = b, "below", a
  da = lx.a_desc(colour=a.colour, shape=a.shape)
  db = lx.a_desc(colour=b.colour, shape=b.shape)
  return f"{da} is {rel} {db} ."


def _position(rng, pic):
  o = lx.choice(rng, pic.objects)
  w, h = pic.scene.width, pic.scene.height
  where = []
  if o.cx < w / 3:
    where.append("on the left side of the picture")
  if o.cx > 2 * w / 3:
    where.append("on the right side of the picture")
  if o.cy < h / 3:
    where.append("at the top of the picture")
  if o.cy > 2 * h / 3:
    where.append("at the bottom of the picture")
  if not where:
    where.append("in the middle of the picture")
  d = lx.a_desc(colour=o.colour, shape=o.shape, size=o.size)
  return f"{d} is {lx.choice(rng, where)} ."


def _size(rng, pic):
  objs = pic.objects
  pairs = [(a, b) for a in objs for b in objs if a.size == "large" and b.size == "small"]
  if not pairs:
    return None
  a, b = lx.choice(rng, pairs)
  da = lx.desc(colour=a.colour, shape=a.shape)
  db = lx.desc(colour=b.colour, shape=b.shape)
  if rng.random() < 0.5:
    return f"the {da} is larger than the {db} ." if _unique(pic, a, b) else None
  return f"the {db} is smaller than the {da} ." if _unique(pic, a, b) else None


def _unique(pic, *objs):
  return all(scene_lib.count(pic.scene, colour=o.colour, shape=o.shape) == 1 for o in objs)


_TEMPLATES = (_single, _inventory, _count, _relation, _position, _size)


def captions(rng: np.random.Generator, pic: lx.Picture, n: int = PER_IMAGE) -> list[str]:
  """n distinct true captions (templates cycle in a random order; misses fall back to _single)."""
  out: list[str] = []
  order = list(rng.permutation(len(_TEMPLATES)))
  tries = 0
  while len(out) < n and tries < 60:
    t = _TEMPLATES[order[tries % len(order)]] if tries < 2 * len(order) else _single
    tries += 1
    c = t(rng, pic)
    if c is not None and c not in out:
      out.append(c)
  while len(out) < n:  # a scene too plain for n distinct sentences: allow repeats
    out.append(_single(rng, pic))
  return out
