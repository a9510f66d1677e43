"""Contact sheet: a few scenes with their detected boxes, a caption, a VQA pair and a referring
expression, all read back from the written dataset (so the sheet also checks the files)."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uniter_jax.data import format as fmt
from uniter_jax.tools.draw_re import save_grid

SCALE = 2
_KIND_STYLE = {"object": ((255, 255, 255), 1), "part": ((250, 220, 60), 1),
               "background": ((110, 110, 110), 1)}
_DRAW_ORDER = ("background", "part", "object")  # objects last, so their boxes stay on top
_TARGET = ((230, 20, 20), 3)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType sizing
    return ImageFont.load_default()


def _texts_by_image(path: str) -> dict[str, dict]:
  """The first text record of each image in a text dataset."""
  out: dict[str, dict] = {}
  if os.path.isdir(path):
    for r in fmt.iter_text_records(path):
      out.setdefault(r["image_id"], r)
  return out


def contact_sheet(world_dir: str, out_png: str, num_scenes: int = 6, split: str = "test",
                  columns: int = 3) -> str:
  """Draws num_scenes scenes of `split` into out_png (palette PNG); returns out_png."""
  with open(os.path.join(world_dir, "splits.json")) as f:
    ids = json.load(f)[split]
  with open(os.path.join(world_dir, "scenes.json")) as f:
    scenes = json.load(f)
  txt = os.path.join(world_dir, "txt")
  caps = _texts_by_image(os.path.join(txt, f"retrieval_{split}"))
  qas = _texts_by_image(os.path.join(txt, f"vqa_{split}"))
  refs = _texts_by_image(os.path.join(txt, f"re_{split}"))
  chosen = [i for i in ids if i in qas and i in refs][:num_scenes]
  wanted = set(chosen)
  regions = {r["image_id"]: r for r in fmt.iter_image_records(os.path.join(world_dir, "img_db"))
             if r["image_id"] in wanted}

  font = _font(11)
  tiles = []
  for iid in chosen:
    sc = scenes[iid]
    w, h = sc["width"], sc["height"]
    img = Image.open(os.path.join(world_dir, "images", iid + ".png")).convert("RGB")
    img = img.resize((w * SCALE, h * SCALE), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    reg = regions[iid]
    boxes = reg["img_pos"][:, :4] * np.array([w, h, w, h]) * SCALE
    ref = refs[iid]
    order = sorted(range(len(boxes)), key=lambda k: _DRAW_ORDER.index(sc["regions"][k]["kind"]))
    for k in order:
      colour, width = _KIND_STYLE[sc["regions"][k]["kind"]]
      draw.rectangle([float(v) for v in boxes[k]], outline=colour, width=width)
    t = int(ref["target"])
    draw.rectangle([float(v) for v in boxes[t]], outline=_TARGET[0], width=_TARGET[1])
    lines = [f"{iid}: {len(boxes)} regions, {len(sc['objects'])} objects"]
    lines += textwrap.wrap("caption: " + caps[iid]["text"], 54)
    q = qas[iid]
    lines += textwrap.wrap(f"Q: {q['question']}  A: {q['answer']}  ({q['question_type']})", 54)
    lines += textwrap.wrap(f"RE (red box): {ref['sent']}", 54)
    pad = 4 + 13 * 7
    tile = Image.new("RGB", (img.width, img.height + pad), (255, 255, 255))
    tile.paste(img, (0, 0))
    d = ImageDraw.Draw(tile)
    for j, line in enumerate(lines[:7]):
      d.text((3, img.height + 3 + 13 * j), line, fill=(0, 0, 0), font=font)
    tiles.append(tile)
  if not tiles:
    raise ValueError(f"{world_dir}: no {split} image has both a VQA question and a referring expression")
  return save_grid(tiles, out_png, columns=columns)
