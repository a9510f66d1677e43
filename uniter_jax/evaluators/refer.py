"""Referring-expression metrics: the official box IoU, predicted boxes, accuracy and chance.

Boxes are [x, y, w, h] in pixels. The IoU follows the official data/re.py computeIoU: the
"+1 pixel" convention (x2 = x + w - 1), no overlap unless ix1 < ix2 and iy1 < iy2 (so boxes
that share only an edge, or overlap by one pixel column, have IoU 0), and union = w1 h1 +
w2 h2 - inter. A prediction is correct when IoU > 0.5.
"""

from __future__ import annotations

import numpy as np

CORRECT_IOU = 0.5


def iou(box1, box2) -> np.ndarray:
  """Official IoU of xywh boxes; broadcasts over leading axes (..., 4) -> (...)."""
  a = np.asarray(box1, np.float64)
  b = np.asarray(box2, np.float64)
  ix1 = np.maximum(a[..., 0], b[..., 0])
  iy1 = np.maximum(a[..., 1], b[..., 1])
  ix2 = np.minimum(a[..., 0] + a[..., 2] - 1, b[..., 0] + b[..., 2] - 1)
  iy2 = np.minimum(a[..., 1] + a[..., 3] - 1, b[..., 1] + b[..., 3] - 1)
  overlap = (ix1 < ix2) & (iy1 < iy2)
  inter = np.where(overlap, (ix2 - ix1 + 1) * (iy2 - iy1 + 1), 0.0)
  union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
  return inter / np.maximum(union, 1e-12)


def region_boxes(img_pos, image_w, image_h) -> np.ndarray:
  """Region boxes in pixels (..., Li, 4) xywh from the 7-d box features (..., Li, 7).

  As the official ReEvalDataset rebuilds them: [x1 W, y1 H, w W, h H] from the normalised
  columns 0, 1, 4, 5 and the image size (image_w / image_h broadcast over the regions).
  """
  pos = np.asarray(img_pos, np.float64)
  w = np.asarray(image_w, np.float64)[..., None]
  h = np.asarray(image_h, np.float64)[..., None]
  return np.stack([pos[..., 0] * w, pos[..., 1] * h, pos[..., 4] * w, pos[..., 5] * h], -1)


def chance(boxes: np.ndarray, mask: np.ndarray, gt_box: np.ndarray) -> float:
  """Expected accuracy of picking a real region uniformly at random, over the expressions.

  boxes (N, Li, 4), mask (N, Li) real regions, gt_box (N, 4): per expression the fraction of
  its regions with IoU > 0.5 (1 / regions when only the target region qualifies), averaged.
  """
  hits = (iou(boxes, np.asarray(gt_box)[:, None]) > CORRECT_IOU) & mask
  return float(np.mean(hits.sum(1) / np.maximum(mask.sum(1), 1)))
