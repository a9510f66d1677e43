"""A fixed region featurizer: hand-made descriptors of the pixels in a box, randomly projected.

Stands in for a detector's pooled ROI feature. Nothing here is learned:

1. The box is cropped and resampled to CROP x CROP pixels (bilinear).
2. Raw descriptors (RAW_DIM numbers): a saturation-weighted hue histogram and colour means
   (colour); a 2x2-cell histogram of gradient orientations (edges, like HOG); and moments of
   the foreground mask (saturated pixels): area, centroid, second/third/fourth-order central
   moments, a 4x4 occupancy grid and a perimeter ratio (shape).
3. Each descriptor is standardised with constants measured once on a fixed calibration set
   (CALIB_SCENES scenes from CALIB_SEED, independent of the dataset seed), then mapped to
   `img_dim` by a Gaussian random projection (PROJ_SEED) and a ReLU, so features are
   non-negative and sparse like BUTD's, and no single dimension is a clean colour or shape
   detector: a model has to learn to read them.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

CROP = 24
HUE_BINS = 12
ORI_BINS = 8
CALIB_SEED = 20200917
CALIB_SCENES = 48
PROJ_SEED = 1909  # arXiv 1909.11740
_SAT_FG = 0.3  # grey background has saturation < 0.15; every object colour is > 0.5


def _crops(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """(N, CROP, CROP, 3) float32 in [0, 1]: each box resampled from the picture."""
  pil = Image.fromarray(image)
  out = np.empty((len(boxes), CROP, CROP, 3), np.float32)
  for i, b in enumerate(boxes):
    box = tuple(float(v) for v in b)
    out[i] = np.asarray(pil.resize((CROP, CROP), Image.BILINEAR, box=box), np.float32) / 255.0
  return out


def raw_descriptors(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """(N, RAW_DIM) hand-made descriptors of the pixels inside each [x1, y1, x2, y2] box."""
  x = _crops(image, boxes)
  n = len(x)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  mx, mn = x.max(-1), x.min(-1)
  chroma = mx - mn
  sat = np.where(mx > 1e-6, chroma / np.maximum(mx, 1e-6), 0.0)
  safe = np.maximum(chroma, 1e-6)
  hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
  hue = np.where(chroma > 1e-6, hue / 6.0, 0.0)  # in [0, 1)
  fg = ((sat > _SAT_FG) & (mx > 0.2)).astype(np.float32)
  pix = CROP * CROP

  # Colour: soft (linearly interpolated) circular hue histogram over foreground pixels.
  pos = hue * HUE_BINS - 0.5
  lo = np.floor(pos).astype(int) % HUE_BINS
  frac = pos - np.floor(pos)
  hist = np.zeros((n, HUE_BINS), np.float32)
  w = (fg * sat).reshape(n, -1)
  idx = np.arange(n)[:, None]
  np.add.at(hist, (idx, lo.reshape(n, -1)), (w * (1 - frac.reshape(n, -1))))
  np.add.at(hist, (idx, ((lo + 1) % HUE_BINS).reshape(n, -1)), (w * frac.reshape(n, -1)))
  hist /= pix
  area = fg.reshape(n, -1).sum(1)
  fg_rgb = (x * fg[..., None]).reshape(n, -1, 3).sum(1) / np.maximum(area, 1)[:, None]
  all_rgb = x.reshape(n, -1, 3).mean(1)
  gray = x.mean(-1)
  colour = np.concatenate([hist, fg_rgb, all_rgb, gray.reshape(n, -1).std(1, keepdims=True)], 1)

  # Edges: orientation histogram (unsigned) per 2x2 cell, magnitude weighted.
  gx = np.zeros_like(gray)
  gy = np.zeros_like(gray)
  gx[:, :, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2]
  gy[:, 1:-1, :] = gray[:, 2:, :] - gray[:, :-2, :]
  mag = np.hypot(gx, gy)
  ori = (np.arctan2(gy, gx) % np.pi) / np.pi * ORI_BINS
  obin = np.minimum(ori.astype(int), ORI_BINS - 1)
  half = CROP // 2
  cells = []
  for cy in (slice(0, half), slice(half, CROP)):
    for cx in (slice(0, half), slice(half, CROP)):
      m = mag[:, cy, cx].reshape(n, -1)
      o = obin[:, cy, cx].reshape(n, -1)
      h = np.zeros((n, ORI_BINS), np.float32)
      np.add.at(h, (np.arange(n)[:, None], o), m)
      cells.append(h)
  hog = np.concatenate(cells, 1)
  total = mag.reshape(n, -1).sum(1, keepdims=True)
  hog = np.concatenate([hog / np.maximum(total, 1e-6), total / pix], 1)

  # Shape: moments of the foreground mask in [-1, 1] crop coordinates.
  c = (np.arange(CROP) + 0.5) / CROP * 2 - 1
  yy, xx = np.meshgrid(c, c, indexing="ij")
  m00 = np.maximum(area, 1.0)
  mx_ = (fg * xx).reshape(n, -1).sum(1) / m00
  my_ = (fg * yy).reshape(n, -1).sum(1) / m00
  f = fg.reshape(n, -1)
  dx = xx.reshape(1, -1) - mx_[:, None]
  dy = yy.reshape(1, -1) - my_[:, None]
  px = [np.ones_like(dx), dx, dx * dx, dx * dx * dx, (dx * dx) ** 2]
  py = [np.ones_like(dy), dy, dy * dy, dy * dy * dy, (dy * dy) ** 2]

  def mom(p, q):
    return (f * px[p] * py[q]).sum(1) / m00

  moments = np.stack([area / pix, mx_, my_, mom(2, 0), mom(0, 2), mom(1, 1), mom(3, 0), mom(0, 3),
                      mom(2, 1), mom(1, 2), mom(4, 0) + mom(0, 4), mom(2, 2)], 1)
  grid = fg.reshape(n, 4, CROP // 4, 4, CROP // 4).mean((2, 4)).reshape(n, 16)
  inner = fg[:, 1:-1, 1:-1] * fg[:, :-2, 1:-1] * fg[:, 2:, 1:-1] * fg[:, 1:-1, :-2] * fg[:, 1:-1, 2:]
  perim = area - inner.reshape(n, -1).sum(1)
  compact = (perim / np.sqrt(m00))[:, None]
  return np.concatenate([colour, hog, moments, grid, compact], 1).astype(np.float32)


RAW_DIM = HUE_BINS + 7 + 4 * ORI_BINS + 1 + 12 + 16 + 1


@functools.lru_cache(maxsize=None)
def _calibration() -> tuple[np.ndarray, np.ndarray]:
  """Mean and std of the raw descriptors over a fixed calibration set of detected regions."""
  from data_prep.synthetic import detector, render  # a cycle only at call time

  rng = np.random.default_rng(CALIB_SEED)
  raws = []
  for _ in range(CALIB_SCENES):
    sc, img = render.make_scene(rng)
    raws.append(raw_descriptors(img, detector.detect(rng, sc).boxes))
  raw = np.concatenate(raws).astype(np.float64)
  return raw.mean(0), raw.std(0) + 1e-3


@functools.lru_cache(maxsize=None)
def _projection(img_dim: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(PROJ_SEED)
  w = rng.normal(0, 1 / np.sqrt(RAW_DIM), (RAW_DIM, img_dim))
  b = rng.normal(0, 0.25, img_dim)
  return w, b


def featurize(image: np.ndarray, boxes: np.ndarray, img_dim: int) -> np.ndarray:
  """(N, img_dim) float32 region features of the given boxes in an RGB uint8 picture."""
  mean, std = _calibration()
  z = (raw_descriptors(image, boxes) - mean) / std
  w, b = _projection(img_dim)
  return np.maximum(z @ w + b, 0.0).astype(np.float32)
