"""Region box helpers: the 7-d box feature and the official box-count policy.

Both are described in docs/official.md (*Model* for the box feature, *Box features and box
policy* for the policy).

Pure NumPy; shared by the converters, the writer and the readers.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def norm_bb_from_xyxy(boxes: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
  """Pixel boxes (n, 4) [x1, y1, x2, y2] -> norm_bb (n, 6) [x1/W, y1/H, x2/W, y2/H, w/W, h/H]."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  w, h = float(image_w), float(image_h)
  if w <= 0 or h <= 0:
    raise ValueError(f"image size must be positive, got w={image_w}, h={image_h}")
  x1, y1, x2, y2 = boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h
  return np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], axis=1).astype(np.float32)


def img_pos_from_norm_bb(norm_bb: np.ndarray) -> np.ndarray:
  """norm_bb (n, 6) -> the 7-d box feature [x1, y1, x2, y2, w, h, w*h] the model embeds.

  The official dataset appends the area `w * h` (columns 4 and 5) to the stored 6 columns.
  """
  norm_bb = np.asarray(norm_bb, np.float32).reshape(-1, 6)
  return np.concatenate([norm_bb, norm_bb[:, 4:5] * norm_bb[:, 5:6]], axis=1)


@dataclasses.dataclass(frozen=True)
class BoxPolicy:
  """How many boxes of an image to keep (official defaults: conf_th 0.2, 10 to 100 boxes).

  Boxes are assumed sorted by confidence, best first (the official extractor writes them so;
  the TSV converter sorts). With `num_bb` set, a fixed count is kept instead (the official
  `conf_th = -1` mode, used for ground-truth boxes).
  """

  conf_th: float = 0.2
  min_bb: int = 10
  max_bb: int = 100
  num_bb: int | None = None

  def count(self, conf: np.ndarray | None, n: int) -> int:
    """Number of leading boxes to keep out of n, given their confidences (or None)."""
    if self.num_bb is not None:
      return min(n, self.num_bb)
    if conf is None:
      # No confidences: keep as many as allowed; the threshold cannot apply.
      return min(n, self.max_bb)
    above = int(np.sum(np.asarray(conf) > self.conf_th))
    return min(n, max(self.min_bb, min(above, self.max_bb)))

  def to_json(self) -> dict:
    if self.num_bb is not None:
      return {"kind": "fixed", "num_bb": self.num_bb}
    return {"kind": "adaptive", "conf_th": self.conf_th, "min_bb": self.min_bb, "max_bb": self.max_bb}
