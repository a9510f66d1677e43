"""The word-region alignment (WRA) plan of one text and image, and its drawing.

The plan is the optimal-transport plan UNITER's WRA objective computes between the final
token states and region states (uniter_jax.losses.ot): plan[i, j] is the mass token i sends
to region j; every row of a real token sums to 1 / (number of tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uniter_jax.data.tokenizer import SPECIAL_TOKENS
from uniter_jax.inference.inputs import Regions

_MIN_SHOWN = 0.02  # boxes with less than 2% of the word's largest share are left out
_BLANK = (256, 256)  # canvas (pixels) when there is neither a picture nor an image size


@dataclasses.dataclass(frozen=True)
class Alignment:
  """tokens ([CLS] .. [SEP]), plan (tokens, regions), its distance sum(cost * plan), and the
  image's regions (for their boxes)."""

  tokens: list[str]
  plan: np.ndarray
  distance: float
  regions: Regions

  def words(self) -> list[int]:
    """Indices of the tokens that are words ([CLS], [SEP] and other specials left out)."""
    return [i for i, t in enumerate(self.tokens) if t not in SPECIAL_TOKENS]

  def best_regions(self) -> np.ndarray:
    """Per token, the region it sends most mass to."""
    return np.argmax(self.plan, axis=1)


def _picture(picture: Any, regions: Regions) -> Image.Image:
  """The image to draw on: a path, a PIL image or an array; else a blank canvas."""
  if picture is None:
    size = (int(regions.image_w), int(regions.image_h)) if regions.has_size else _BLANK
    return Image.new("RGB", size, (255, 255, 255))
  if isinstance(picture, Image.Image):
    return picture.convert("RGB")
  if isinstance(picture, np.ndarray):
    return Image.fromarray(np.asarray(picture, np.uint8)).convert("RGB")
  with Image.open(picture) as img:
    return img.convert("RGB")


def _tile(alignment: Alignment, i: int, picture: Image.Image, boxes: np.ndarray,
          cmap: Any, scale: int, font: Any) -> Image.Image:
  """Token i's tile: each region's box coloured by the share of the token's mass it gets."""
  img = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  row = alignment.plan[i]
  weight = row / max(float(row.max()), 1e-12)
  for j in np.argsort(weight, kind="stable"):  # the strongest box is drawn last, on top
    if weight[j] < _MIN_SHOWN:
      continue
    colour = tuple(int(255 * c) for c in cmap(float(weight[j]))[:3])
    x, y, w, h = (float(v) * scale for v in boxes[j])
    draw.rectangle([x, y, x + w, y + h], outline=colour, width=1 + round(3 * weight[j]))
  best = int(np.argmax(row))
  share = float(row[best] / max(float(row.sum()), 1e-12))
  lines = [f"{alignment.tokens[i]!r} -> region {best} ({share:.0%})"]
  tile = Image.new("RGB", (img.width, img.height + 6 + 13 * len(lines)), (255, 255, 255))
  tile.paste(img, (0, 0))
  d = ImageDraw.Draw(tile)
  for k, line in enumerate(lines):
    d.text((3, img.height + 3 + 13 * k), line, fill=(0, 0, 0), font=font)
  return tile


def draw_alignment(alignment: Alignment, out_png: str, *, picture: Any = None,
                   tokens: Sequence[int] | None = None, columns: int = 4, scale: int = 2,
                   cmap: str = "plasma") -> str:
  """Draws the plan over the image's boxes: one tile per token (default: every word), its
  regions' boxes coloured and thickened by the share of the token's mass each receives
  (matplotlib colormap `cmap`, brightest = most), on one sheet (tools.draw_re.save_grid).

  picture: the image (a path, PIL image or array); boxes are scaled from the image size the
  regions were extracted at to the picture's. Without it, a blank canvas of that size.
  Returns out_png.
  """
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  from uniter_jax.tools import draw_re  # pylint: disable=import-outside-toplevel
  regions = alignment.regions
  canvas = _picture(picture, regions)
  boxes = regions.boxes()[: alignment.plan.shape[1]].astype(np.float64)
  # Pixel boxes are in the extraction's image size; normalised ones in [0, 1].
  src_w, src_h = (regions.image_w, regions.image_h) if regions.has_size else (1.0, 1.0)
  boxes *= np.array([canvas.width / src_w, canvas.height / src_h] * 2)
  chosen = list(alignment.words() if tokens is None else tokens)
  if not chosen:
    raise ValueError("nothing to draw: the alignment has no word tokens")
  font = ImageFont.load_default()
  tiles = [_tile(alignment, i, canvas, boxes, colormaps[cmap], scale, font) for i in chosen]
  return draw_re.save_grid(tiles, out_png, columns=columns)
