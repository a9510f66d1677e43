"""Draws referring-expression predictions: the predicted box (red) and the gt box (green) on
the image, with the expression and the IoU under it; one contact sheet PNG."""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from uniter_jax import files

PRED, GT = (230, 20, 20), (20, 170, 40)
_EXTS = (".png", ".jpg", ".jpeg")


def _image_path(images_dir: str, image_id: str) -> str | None:
  for ext in _EXTS:
    path = os.path.join(images_dir, image_id + ext)
    if os.path.exists(path):
      return path
  return None


def contact_sheet(rows: Sequence[dict], images_dir: str, out_png: str, *, columns: int = 4,
                  scale: int = 2) -> str:
  """rows: {"image_id", "sent", "pred_box", "gt_box" (xywh pixels), "iou", "correct"}.

  Images are read as <images_dir>/<image_id>.png|.jpg|.jpeg; a row whose image is missing is
  an error naming the file, so a drawing never silently leaves expressions out.
  """
  try:
    font = ImageFont.load_default(size=11)
  except TypeError:  # Pillow without FreeType sizing
    font = ImageFont.load_default()
  tiles = []
  for r in rows:
    path = _image_path(images_dir, r["image_id"])
    if path is None:
      raise FileNotFoundError(f"{images_dir}: no image {r['image_id']}.png/.jpg to draw on; set "
                              "config.re.draw_images to the folder of the images")
    img = Image.open(path).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for box, colour in ((r["gt_box"], GT), (r["pred_box"], PRED)):
      x, y, w, h = (float(v) * scale for v in box)
      draw.rectangle([x, y, x + w, y + h], outline=colour, width=3 if colour == PRED else 2)
    verdict = "right" if r["correct"] else "wrong"
    lines = textwrap.wrap(f"{r['sent']}", 40) + [f"IoU {r['iou']:.2f} ({verdict})"]
    tile = Image.new("RGB", (img.width, img.height + 6 + 13 * len(lines)), (255, 255, 255))
    tile.paste(img, (0, 0))
    d = ImageDraw.Draw(tile)
    for j, line in enumerate(lines):
      d.text((3, img.height + 3 + 13 * j), line, fill=(0, 0, 0), font=font)
    tiles.append(tile)
  if not tiles:
    raise ValueError("nothing to draw: no predictions")
  return save_grid(tiles, out_png, columns=columns)


def save_grid(tiles: Sequence[Image.Image], out_png: str, *, columns: int, gap: int = 6) -> str:
  """Pastes tiles row by row on a grey sheet and saves it as a 256-colour PNG (small enough to
  commit); returns out_png."""
  tw = max(t.width for t in tiles)
  th = max(t.height for t in tiles)
  columns = min(columns, len(tiles))
  nrows = (len(tiles) + columns - 1) // columns
  sheet = Image.new("RGB", (columns * tw + (columns + 1) * gap, nrows * th + (nrows + 1) * gap),
                    (200, 200, 200))
  for k, tile in enumerate(tiles):
    r, c = divmod(k, columns)
    sheet.paste(tile, (gap + c * (tw + gap), gap + r * (th + gap)))
  sheet = sheet.quantize(256, method=Image.Quantize.MEDIANCUT)
  # files: whole or not at all, and one writer in a run of several processes.
  files.atomic_write(out_png, lambda f: sheet.save(f, format="PNG", optimize=True),
                     overwrite=True)
  return out_png
