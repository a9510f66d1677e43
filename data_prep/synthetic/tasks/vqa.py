"""VQA: questions about colour, shape, count, existence and relations, with 10 noisy annotators.

Soft score of an answer = min(#annotators who gave it / 3, 1) (the VQA metric's per-question
formula as commonly implemented); the VQA evaluator uses the same definition. The generator
forces the true answer to be the strict plurality with >= 4 votes, so its score is 1.0 and the
scene description always decides the question.
"""

from __future__ import annotations

import collections

import numpy as np

from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import lexicon as lx

NUM_ANNOTATORS = 10
QTYPES = ("colour", "shape", "count", "exist", "relation")
_QTYPE_P = (0.2, 0.2, 0.25, 0.15, 0.2)
MAX_COUNT = scene_lib.MAX_OBJECTS

# Answer vocabulary: fixed by the grammar, so train and val agree and nothing is out of vocab.
ANSWERS = (("yes", "no") + scene_lib.COLOUR_NAMES + scene_lib.SHAPES
           + tuple(str(k) for k in range(MAX_COUNT + 1)))


def ans2label() -> dict[str, int]:
  return {a: i for i, a in enumerate(ANSWERS)}


def score(n_votes: int) -> float:
  """VQA soft score for an answer given by n_votes of the 10 annotators."""
  return min(n_votes / 3.0, 1.0)


def _hue_neighbours(colour: str) -> list[str]:
  hue = scene_lib.COLOURS[colour][1]
  d = {c: abs((scene_lib.COLOURS[c][1] - hue + 180) % 360 - 180) for c in scene_lib.COLOUR_NAMES}
  return sorted((c for c in d if c != colour), key=d.get)[:2]


_SIMILAR_SHAPES = {"square": ["diamond", "circle"], "diamond": ["square", "triangle"],
                   "circle": ["square", "diamond"], "triangle": ["diamond", "star"],
                   "star": ["cross", "triangle"], "cross": ["star", "square"]}


def _confuser(rng, qtype: str, answer: str) -> str:
  """A plausible wrong answer a careless annotator gives."""
  if answer in ("yes", "no"):
    return "no" if answer == "yes" else "yes"
  if qtype == "colour":
    return lx.choice(rng, _hue_neighbours(answer))
  if qtype == "shape":
    return lx.choice(rng, _SIMILAR_SHAPES[answer])
  k = int(answer)
  return str(lx.choice(rng, [m for m in (k - 1, k + 1) if 0 <= m <= MAX_COUNT]))


def annotate(rng: np.random.Generator, qtype: str, answer: str) -> list[str]:
  """Ten noisy human answers whose plurality (>= 4 votes) is the true answer."""
  p = rng.uniform(0.55, 0.95)
  while True:
    votes = [answer if rng.random() < p else _confuser(rng, qtype, answer) for _ in range(NUM_ANNOTATORS)]
    c = collections.Counter(votes)
    if c[answer] >= 4 and all(v < c[answer] for a, v in c.items() if a != answer):
      return votes


def _q_attribute(rng, pic, attr: str):
  """'what colour / shape is the <unique description without that attribute> ?'"""
  cands = [(k, d) for k in range(len(pic.objects)) for d in lx.unique_descs(pic, k) if attr not in d]
  if not cands:
    return None
  k, d = lx.choice(rng, cands)
  return f"what {attr} is the {lx.desc(**d)} ?", getattr(pic.objects[k], attr)


def _q_colour(rng, pic):
  return _q_attribute(rng, pic, "colour")


def _q_shape(rng, pic):
  return _q_attribute(rng, pic, "shape")


def _q_count(rng, pic):
  sc = pic.scene
  kind = int(rng.integers(4))
  if rng.random() < 0.2:  # ask about something absent so "0" is a real answer
    colour = lx.choice(rng, scene_lib.COLOUR_NAMES)
    shape = lx.choice(rng, scene_lib.SHAPES)
  else:
    o = lx.choice(rng, pic.objects)
    colour, shape = o.colour, o.shape
  if kind == 0:
    return f"how many {colour} objects are there ?", str(scene_lib.count(sc, colour=colour))
  if kind == 1:
    return f"how many {lx.noun(shape, 2)} are there ?", str(scene_lib.count(sc, shape=shape))
  if kind == 2:
    return (f"how many {colour} {lx.noun(shape, 2)} are there ?",
            str(scene_lib.count(sc, colour=colour, shape=shape)))
  return "how many objects are there ?", str(len(pic.objects))


def _q_exist(rng, pic):
  o = lx.choice(rng, pic.objects)
  if rng.random() < 0.5:
    return f"is there {lx.a_desc(colour=o.colour, shape=o.shape)} ?", "yes"
  # A near miss: right colour with another shape, or right shape with another colour.
  for _ in range(20):
    if rng.random() < 0.5:
      colour, shape = o.colour, lx.choice(rng, scene_lib.SHAPES)
    else:
      colour, shape = lx.choice(rng, scene_lib.COLOUR_NAMES), o.shape
    if scene_lib.count(pic.scene, colour=colour, shape=shape) == 0:
      return f"is there {lx.a_desc(colour=colour, shape=shape)} ?", "no"
  return None


_RELS = {"to the left of": scene_lib.left_of, "above": scene_lib.above,
         "to the right of": lambda a, b: scene_lib.left_of(b, a),
         "below": lambda a, b: scene_lib.above(b, a)}


def _q_relation(rng, pic):
  objs = pic.objects
  pairs = []
  for i in range(len(objs)):
    for j in range(len(objs)):
      di, dj = lx.unique_descs(pic, i), lx.unique_descs(pic, j)
      if i != j and di and dj:
        pairs.append((i, j, di, dj))
  if not pairs:
    return None
  want = "yes" if rng.random() < 0.5 else "no"
  for _ in range(10):
    i, j, di, dj = lx.choice(rng, pairs)
    rel = lx.choice(rng, list(_RELS))
    truth = _RELS[rel](objs[i], objs[j])
    if truth is None or ("yes" if truth else "no") != want:
      continue
    a, b = lx.desc(**lx.choice(rng, di)), lx.desc(**lx.choice(rng, dj))
    return f"is the {a} {rel} the {b} ?", want
  return None


_GEN = {"colour": _q_colour, "shape": _q_shape, "count": _q_count, "exist": _q_exist,
        "relation": _q_relation}


def questions(rng: np.random.Generator, pic: lx.Picture, n: int) -> list[dict]:
  """n questions on one image: {question, question_type, answer, answers (10), labels, scores}."""
  a2l = ans2label()
  out, seen = [], set()
  for _ in range(20 * n):
    if len(out) == n:
      break
    qtype = QTYPES[int(rng.choice(len(QTYPES), p=_QTYPE_P))]
    qa = _GEN[qtype](rng, pic)
    if qa is None or qa[0] in seen:
      continue
    q, answer = qa
    seen.add(q)
    votes = annotate(rng, qtype, answer)
    counts = collections.Counter(votes)
    labels = sorted(a2l[a] for a in counts)
    scores = [score(counts[ANSWERS[i]]) for i in labels]
    out.append(dict(question=q, question_type=qtype, answer=answer, answers=votes, labels=labels,
                    scores=scores))
  return out
