"""Words and phrases the grammars share, and the WordPiece vocabulary they need.

Every word a grammar emits is either a whole vocab token or a deliberate stem + suffix split
(plurals `circle ##s`, `cross ##es`; superlatives `left ##most`), so MLM sees real WordPieces.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.synthetic import detector, scene as scene_lib

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: batches are 0-padded
PUNCT = (".", "?", ",", ":")
SUFFIXES = ("##s", "##es", "##most")
# word -> (stem, suffix piece): the only words the vocab splits on purpose.
PLURALS = {s: s + ("es" if s.endswith(("s", "x", "ch", "sh")) else "s") for s in scene_lib.SHAPES}
PLURALS.update({"object": "objects", "shape": "shapes", "image": "images"})
SUPERLATIVE = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
# VCR-style region tags: tag k names region k of the image (VCR's person_0 ... tokens).
TAGS = tuple(f"obj{k}" for k in range(detector.MAX_REGIONS))
MATERIALS = ("wood", "metal", "paper", "plastic", "glass", "stone")
STATES = ("heavy", "warm", "cold", "new", "old", "wet", "soft", "hard", "expensive")

# Function words of all grammars (checked by the tests against generated text).
FUNCTION_WORDS = """
a an the there is are in of to and or but not no yes it its picture image left right top bottom
middle above below side at on than more fewer larger smaller same as both exactly least total
how many what which colour shape object what's made someone holding does contain contains has
have only one single each other every with show shows size small large these this that
also of contain being near far from
""".split()


def article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def noun(shape: str | None, n: int = 1) -> str:
  base = shape or "object"
  return base if n == 1 else PLURALS[base]


def desc(colour: str | None = None, shape: str | None = None, size: str | None = None) -> str:
  """'large red circle' with any part left out ('red object', 'circle')."""
  return " ".join(w for w in (size, colour, noun(shape)) if w)


def a_desc(**kw) -> str:
  d = desc(**kw)
  return f"{article(d)} {d}"


def number(n: int) -> str:
  return NUMBER_WORDS[n]


def vocab_tokens() -> list[str]:
  """The vocab.txt lines: specials, punctuation, suffix pieces, then whole words (sorted)."""
  words = set(FUNCTION_WORDS) | set(scene_lib.SHAPES) | set(scene_lib.COLOUR_NAMES)
  words |= set(scene_lib.SIZES) | set(NUMBER_WORDS) | set(TAGS) | set(MATERIALS) | set(STATES)
  words |= {"object", "shape", "image"} | set(SUPERLATIVE)
  digits = {str(k) for k in range(10)}
  return list(SPECIALS) + list(PUNCT) + list(SUFFIXES) + sorted(words | digits)


def expected_pieces(word: str) -> list[str]:
  """How the vocab should split a grammar word (for the tests)."""
  for stem, plural in PLURALS.items():
    if word == plural:
      return [stem, "##" + plural[len(stem):]]
  for stem, sup in SUPERLATIVE.items():
    if word == sup:
      return [stem, "##most"]
  return [word]


@dataclasses.dataclass
class Picture:
  """What every grammar gets for one image: its name, kept scene and detector output."""

  fname: str
  scene: scene_lib.Scene
  regions: detector.Regions

  @property
  def objects(self) -> list[scene_lib.Obj]:
    return self.scene.objects


def choice(rng: np.random.Generator, seq):
  """rng.choice that keeps Python types (strings, tuples, objects)."""
  return seq[int(rng.integers(len(seq)))]


def unique_descs(pic: Picture, k: int) -> list[dict]:
  """The shortest-first list of descriptions (colour/shape/size subsets) that pick out object k."""
  o = pic.objects[k]
  options = [dict(shape=o.shape), dict(colour=o.colour), dict(colour=o.colour, shape=o.shape),
             dict(size=o.size, shape=o.shape), dict(size=o.size, colour=o.colour),
             dict(size=o.size, colour=o.colour, shape=o.shape)]
  return [d for d in options if scene_lib.count(pic.scene, **d) == 1]
