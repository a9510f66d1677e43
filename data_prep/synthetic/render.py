"""Draws a scene as an RGB picture (PIL) and measures how much of each object stays visible."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from data_prep.synthetic import scene as scene_lib

# Shapes are drawn at this multiple of the output size and box-filtered down: anti-aliased
# edges look like a photo of a flat object rather than a bitmap.
_SUPERSAMPLE = 2


def _background(sc: scene_lib.Scene) -> np.ndarray:
  """Grey backdrop with a lighting gradient and a blotchy low-frequency texture.

  The texture is smooth (noise on an 8x coarser grid, upsampled bilinearly) rather than
  per-pixel: it varies the pixels the featurizer sees while keeping the PNGs ~4x smaller.
  """
  rng = np.random.default_rng(sc.bg_seed)
  h, w = sc.height, sc.width
  yy = np.linspace(-1, 1, h)[:, None, None]
  xx = np.linspace(-1, 1, w)[None, :, None]
  gx, gy = rng.uniform(-12, 12, 2)
  coarse = rng.normal(0, 6.0, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
  texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))[..., None]
  img = np.asarray(sc.bg_rgb, np.float32)[None, None] + gx * xx + gy * yy + texture
  return np.clip(img, 0, 255).astype(np.uint8)


def _draw_obj(draw: ImageDraw.ImageDraw, o: scene_lib.Obj, scale: float, fill, outline=None) -> None:
  poly = scene_lib.shape_polygon(o.shape, o.cx * scale, o.cy * scale, o.radius * scale, o.angle)
  width = max(1, int(round(scale))) if outline is not None else 0
  draw.polygon(poly, fill=fill, outline=outline, width=width)


def render(sc: scene_lib.Scene) -> np.ndarray:
  """The picture as (height, width, 3) uint8; objects are drawn back to front."""
  s = _SUPERSAMPLE
  bg = Image.fromarray(_background(sc)).resize((sc.width * s, sc.height * s), Image.NEAREST)
  draw = ImageDraw.Draw(bg)
  for o in sc.objects:
    dark = tuple(int(v * 0.6) for v in o.rgb)  # a darker rim gives the featurizer real edges
    _draw_obj(draw, o, s, fill=o.rgb, outline=dark)
  return np.asarray(bg.reduce(s))


def visibility(sc: scene_lib.Scene) -> list[float]:
  """Fraction of each object's own pixels that no later (front) object covers."""
  ids = Image.new("L", (sc.width, sc.height), 0)
  d = ImageDraw.Draw(ids)
  own = []
  for k, o in enumerate(sc.objects):
    _draw_obj(d, o, 1.0, fill=k + 1)
    m = Image.new("1", (sc.width, sc.height), 0)
    _draw_obj(ImageDraw.Draw(m), o, 1.0, fill=1)
    own.append(max(1, int(np.asarray(m).sum())))
  idmap = np.asarray(ids)
  counts = np.bincount(idmap.ravel(), minlength=len(sc.objects) + 1)
  return [float(counts[k + 1]) / own[k] for k in range(len(sc.objects))]


def make_scene(rng: np.random.Generator) -> tuple[scene_lib.Scene, np.ndarray]:
  """Samples a scene, drops objects hidden beyond MIN_VISIBLE, and renders it."""
  sc = scene_lib.sample_scene(rng)
  while True:
    vis = visibility(sc)
    bad = [k for k, v in enumerate(vis) if v < scene_lib.MIN_VISIBLE]
    if not bad:
      break
    del sc.objects[bad[0]]
  for o, v in zip(sc.objects, vis):
    o.visible = v
  return sc, render(sc)
