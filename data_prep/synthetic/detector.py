"""A simulated object detector: jittered object boxes, part and background boxes, soft labels.

Soft labels are calibrated by construction: the detector "perceives" each object's hue and
shape through Gaussian noise (more noise for occluded objects, loose boxes and part boxes) and
reports the exact Bayes posterior over classes given that noisy perception. Neighbouring hues
(red/orange, blue/purple, ...) and similar shapes (square/diamond, star/cross, ...) are therefore
confused more often than distant ones, and the reported probability of the top class matches how
often that class is right.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.synthetic import scene as scene_lib

MIN_REGIONS = 10  # the official DBs keep 10 to 100 boxes; 10 to 14 keeps CPU training cheap
MAX_REGIONS = 14
MIN_OBJ_IOU = 0.6  # every object's own detection overlaps its true box at least this much
PART_PROB = 0.4  # chance that an object also gets a part box (IoU with the object < 0.5)

# 2-d "shape perception" space: close points are shapes a detector mixes up.
_SHAPE_SPACE = {
    "square": (0.0, 0.0),
    "diamond": (0.9, 0.0),
    "circle": (0.45, 0.85),
    "triangle": (1.5, -0.85),
    "star": (1.95, 0.55),
    "cross": (2.7, 0.2),
}
_HUE_SIGMA = 13.0  # degrees of hue noise for a fully visible, tightly boxed object
_SHAPE_SIGMA = 0.33


@dataclasses.dataclass
class Regions:
  """Detected regions of one image, sorted by confidence (highest first), like a BUTD dump."""

  boxes: np.ndarray  # (N, 4) float pixel [x1, y1, x2, y2]
  conf: np.ndarray  # (N,) objectness confidence
  soft_labels: np.ndarray  # (N, C) class distribution, background at index 0
  kind: list[str]  # "object" | "part" | "background"
  obj: list[int]  # index into scene.objects, or -1 for background boxes

  def object_region(self) -> dict[int, int]:
    """Object index -> the region that detects it (the one kind == 'object')."""
    return {o: r for r, (k, o) in enumerate(zip(self.kind, self.obj)) if k == "object"}


def box_features(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
  """The official 7-d box feature [x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H)]."""
  b = np.asarray(boxes, np.float64)
  x1, y1, x2, y2 = b[:, 0] / width, b[:, 1] / height, b[:, 2] / width, b[:, 3] / height
  w, h = x2 - x1, y2 - y1
  return np.stack([x1, y1, x2, y2, w, h, w * h], axis=1).astype(np.float32)


def _clip(b, w, h):
  return (max(0.0, b[0]), max(0.0, b[1]), min(float(w), b[2]), min(float(h), b[3]))


def _jitter(rng, box, w, h):
  """A detection of `box`: edges moved by ~6% of the size; IoU >= MIN_OBJ_IOU guaranteed."""
  bw, bh = box[2] - box[0], box[3] - box[1]
  for scale in (0.07, 0.07, 0.07, 0.04, 0.02, 0.0):
    d = rng.normal(0, scale, 4) * np.array([bw, bh, bw, bh])
    cand = _clip((box[0] + d[0], box[1] + d[1], box[2] + d[2], box[3] + d[3]), w, h)
    if cand[2] - cand[0] > 2 and cand[3] - cand[1] > 2 and scene_lib.iou(cand, box) >= MIN_OBJ_IOU:
      return cand
  return _clip(box, w, h)


def _part(rng, box):
  """A sub-box (a half or a quarter of the object), so IoU with the object is below 0.5."""
  x1, y1, x2, y2 = box
  mx, my = (x1 + x2) / 2, (y1 + y2) / 2
  halves = [(x1, y1, mx, y2), (mx, y1, x2, y2), (x1, y1, x2, my), (x1, my, x2, y2),
            (x1, y1, mx, my), (mx, my, x2, y2)]
  b = halves[int(rng.integers(len(halves)))]
  # Shrink slightly so IoU stays strictly below 0.5 even for exact halves.
  cx, cy, hw, hh = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) * 0.45, (b[3] - b[1]) * 0.45
  return (cx - hw, cy - hh, cx + hw, cy + hh)


def _background_box(rng, sc: scene_lib.Scene):
  for _ in range(50):
    bw, bh = rng.uniform(12, 60, 2)
    x1, y1 = rng.uniform(0, sc.width - bw), rng.uniform(0, sc.height - bh)
    b = (x1, y1, x1 + bw, y1 + bh)
    if all(scene_lib.iou(b, o.box) < 0.3 for o in sc.objects):
      return b
  return b


def _perceive(rng, o: scene_lib.Obj, quality: float) -> np.ndarray:
  """Bayes posterior over shape x colour given a noisy look at `o` (quality in (0, 1])."""
  hue_sigma = _HUE_SIGMA / quality
  true_hue = scene_lib.COLOURS[o.colour][1]
  seen_hue = true_hue + rng.normal(0, hue_sigma)
  hues = np.array([scene_lib.COLOURS[c][1] for c in scene_lib.COLOUR_NAMES])
  dh = (seen_hue - hues + 180.0) % 360.0 - 180.0
  p_col = np.exp(-0.5 * (dh / hue_sigma) ** 2)
  shape_sigma = _SHAPE_SIGMA / quality
  pts = np.array([_SHAPE_SPACE[s] for s in scene_lib.SHAPES])
  seen = pts[scene_lib.SHAPES.index(o.shape)] + rng.normal(0, shape_sigma, 2)
  p_shape = np.exp(-0.5 * np.sum((seen - pts) ** 2, axis=1) / shape_sigma**2)
  joint = np.outer(p_shape / p_shape.sum(), p_col / p_col.sum())  # rows: shapes, cols: colours
  return joint.ravel()


def detect(rng: np.random.Generator, sc: scene_lib.Scene) -> Regions:
  """Runs the simulated detector on a scene."""
  c = scene_lib.num_classes()
  rows = []  # (box, conf, soft, kind, obj)
  for k, o in enumerate(sc.objects):
    box = _jitter(rng, o.box, sc.width, sc.height)
    fit = scene_lib.iou(box, o.box)
    quality = max(0.3, o.visible * (0.5 + 0.5 * fit))
    conf = float(np.clip(0.35 + 0.6 * quality + rng.normal(0, 0.04), 0.3, 0.995))
    rows.append((box, conf, _perceive(rng, o, quality), "object", k))
    if rng.random() < PART_PROB:
      pconf = float(rng.uniform(0.15, 0.45))
      rows.append((_part(rng, box), pconf, _perceive(rng, o, 0.45), "part", k))
  n_total = int(rng.integers(MIN_REGIONS, MAX_REGIONS + 1))
  uniform = np.full(c - 1, 1.0 / (c - 1))
  # At most 6 objects + 6 parts = 12 <= MAX_REGIONS, so padding with background never drops an object.
  while len(rows) < n_total:
    rows.append((_background_box(rng, sc), float(rng.uniform(0.01, 0.15)), uniform, "background", -1))
  rows.sort(key=lambda r: -r[1])
  boxes = np.array([r[0] for r in rows], np.float32)
  conf = np.array([r[1] for r in rows], np.float32)
  soft = np.zeros((len(rows), c), np.float32)
  for i, r in enumerate(rows):
    # Objectness splits mass between background and the perceived classes.
    soft[i, 0] = 1.0 - r[1]
    soft[i, 1:] = r[1] * r[2]
  return Regions(boxes, conf, soft, [r[3] for r in rows], [r[4] for r in rows])
