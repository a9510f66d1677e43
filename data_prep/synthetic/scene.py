"""The synthetic world: object vocabulary, scene sampling and spatial predicates.

A scene is 2 to 6 flat shapes on a textured background. Each object has a shape, a colour, a
size and a position; objects drawn later sit in front and may hide part of earlier ones. The
scene description kept here is the ground truth every text generator reads, so answers can be
checked against it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

WIDTH = 160
HEIGHT = 128

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Saturated colours so the featurizer can tell them from the grey background. The hue angle
# (degrees) drives the detector's colour confusion: neighbours on the wheel get confused.
COLOURS = {
    "red": ((215, 35, 35), 0.0),
    "orange": ((240, 135, 20), 30.0),
    "yellow": ((230, 210, 25), 55.0),
    "green": ((35, 165, 55), 130.0),
    "blue": ((35, 85, 215), 222.0),
    "purple": ((135, 55, 195), 275.0),
    "pink": ((235, 105, 185), 322.0),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# Half-extent in pixels per size class; the gap keeps "small" and "large" unambiguous.
SIZE_RADIUS = {"small": (8.0, 10.5), "large": (15.0, 19.0)}

MIN_OBJECTS = 2
MAX_OBJECTS = 6
# Spatial relations and yes/no answers only use pairs whose centres differ by more than this
# (pixels), so a person looking at the picture agrees with the generator.
REL_MARGIN = 8.0
# Each object keeps at least this fraction of its pixels visible (occlusion is partial).
MIN_VISIBLE = 0.6


def num_classes() -> int:
  """Detector classes: background (index 0) plus every shape x colour pair."""
  return 1 + len(SHAPES) * len(COLOUR_NAMES)


def class_index(shape: str, colour: str) -> int:
  """Index of a shape x colour class in the detector's label space (0 is background)."""
  return 1 + SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def class_name(index: int) -> str:
  """Human-readable name of a detector class index."""
  if index == 0:
    return "background"
  s, c = divmod(index - 1, len(COLOUR_NAMES))
  return f"{COLOUR_NAMES[c]} {SHAPES[s]}"


@dataclasses.dataclass
class Obj:
  """One object; `box` is the tight pixel box [x1, y1, x2, y2] of the whole (unoccluded) shape."""

  shape: str
  colour: str
  size: str
  cx: float
  cy: float
  radius: float
  angle: float  # rotation in degrees (kept small so a square never turns into a diamond)
  rgb: tuple[int, int, int]
  box: tuple[float, float, float, float]
  visible: float = 1.0  # fraction of the shape's pixels not hidden by objects in front

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["box"] = [round(v, 3) for v in self.box]
    for k in ("cx", "cy", "radius", "angle", "visible"):
      d[k] = round(d[k], 4)
    d["rgb"] = list(self.rgb)
    return d


@dataclasses.dataclass
class Scene:
  """A picture's ground truth: background parameters and objects in drawing order (back to front)."""

  objects: list[Obj]
  bg_rgb: tuple[int, int, int]
  bg_seed: int
  width: int = WIDTH
  height: int = HEIGHT

  def to_json(self) -> dict:
    return {
        "width": self.width,
        "height": self.height,
        "bg_rgb": list(self.bg_rgb),
        "objects": [o.to_json() for o in self.objects],
    }


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
  """Vertices of a shape centred at (cx, cy) with half-extent r; circles get a 32-gon."""
  if shape == "circle":
    pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
  elif shape == "square":
    pts = [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
  elif shape == "diamond":
    pts = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
  elif shape == "triangle":
    pts = [(0.0, -1.0), (1.0, 0.78), (-1.0, 0.78)]
  elif shape == "star":
    pts = []
    for k in range(10):
      rad = 1.0 if k % 2 == 0 else 0.42
      t = -math.pi / 2 + k * math.pi / 5
      pts.append((rad * math.cos(t), rad * math.sin(t)))
  elif shape == "cross":
    a = 0.34
    pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
           (-1, a), (-1, -a), (-a, -a)]
  else:
    raise ValueError(f"unknown shape {shape!r}")
  t = math.radians(angle)
  c, s = math.cos(t), math.sin(t)
  return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _box_of(poly: list[tuple[float, float]]) -> tuple[float, float, float, float]:
  xs = [p[0] for p in poly]
  ys = [p[1] for p in poly]
  return (min(xs), min(ys), max(xs), max(ys))


def box_area(b) -> float:
  return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def box_inter(a, b) -> float:
  return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def iou(a, b) -> float:
  """Intersection over union of two [x1, y1, x2, y2] boxes (continuous coordinates)."""
  inter = box_inter(a, b)
  union = box_area(a) + box_area(b) - inter
  return inter / union if union > 0 else 0.0


def sample_scene(rng: np.random.Generator) -> Scene:
  """Samples a scene; colours come from a small per-image palette so repeats (and counts) occur."""
  n_target = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  palette = list(rng.choice(COLOUR_NAMES, size=int(rng.integers(2, 5)), replace=False))
  shapes = list(rng.choice(SHAPES, size=int(rng.integers(2, 5)), replace=False))
  objects: list[Obj] = []
  for _ in range(n_target):
    for _attempt in range(40):
      shape = str(rng.choice(shapes))
      colour = str(rng.choice(palette))
      size = SIZES[int(rng.random() < 0.45)]
      lo, hi = SIZE_RADIUS[size]
      r = float(rng.uniform(lo, hi))
      cx = float(rng.uniform(r + 2, WIDTH - r - 2))
      cy = float(rng.uniform(r + 2, HEIGHT - r - 2))
      angle = float(rng.uniform(-12, 12))
      box = _box_of(shape_polygon(shape, cx, cy, r, angle))
      if all(_compatible(box, (cx, cy, r), o) for o in objects):
        base = np.array(COLOURS[colour][0], dtype=np.float64)
        rgb = tuple(int(v) for v in np.clip(base + rng.normal(0, 8, 3), 0, 255))
        objects.append(Obj(shape, colour, size, cx, cy, r, angle, rgb, box))
        break
  grey = float(rng.uniform(150, 215))
  tint = rng.normal(0, 5, 3)
  bg = tuple(int(v) for v in np.clip(grey + tint, 0, 255))
  return Scene(objects=objects, bg_rgb=bg, bg_seed=int(rng.integers(2**31)))


def _compatible(box, circ, other: Obj) -> bool:
  """Allows partial overlap (occlusion) but never hides most of either object."""
  inter = box_inter(box, other.box)
  if inter > 0.3 * box_area(box) or inter > 0.3 * box_area(other.box):
    return False
  cx, cy, r = circ
  return math.hypot(cx - other.cx, cy - other.cy) > 0.75 * (r + other.radius)


# ---- predicates the grammars share -------------------------------------------------------


def left_of(a: Obj, b: Obj) -> bool | None:
  """True/False when the horizontal order is clear, None when it is too close to call."""
  d = b.cx - a.cx
  return None if abs(d) <= REL_MARGIN else d > 0


def above(a: Obj, b: Obj) -> bool | None:
  """True/False when the vertical order is clear (image y grows downward), else None."""
  d = b.cy - a.cy
  return None if abs(d) <= REL_MARGIN else d > 0


def matches(o: Obj, colour: str | None = None, shape: str | None = None, size: str | None = None) -> bool:
  """Whether an object fits a (partial) description; None means 'any'."""
  return ((colour is None or o.colour == colour) and (shape is None or o.shape == shape)
          and (size is None or o.size == size))


def count(scene: Scene, **desc) -> int:
  return sum(matches(o, **desc) for o in scene.objects)
