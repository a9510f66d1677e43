"""Bottom-up-attention TSV files -> image shards.

    python -m data_prep.butd_tsv --tsv trainval_36/*.tsv --out data/coco_img

Columns are tab-separated, one image per line, arrays base64-encoded float32 (ids int64):
  BUTD (6 columns):    image_id image_w image_h num_boxes boxes features
  LXMERT (10 columns): img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features
Other layouts: name the columns with --fields (known names: image_id/img_id, image_w/img_w,
image_h/img_h, num_boxes, boxes, features, objects_conf/cls_conf (-> conf), cls_prob (n x C
class distribution -> soft_labels); others are ignored). Boxes are pixel x1 y1 x2 y2, made into
the 7-d box feature. Boxes are sorted best-first by confidence before the box policy applies;
without a confidence column every box gets 1.0 and only --max-bb / --num-bb cut.
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections.abc import Iterator

import numpy as np

from data_prep import common
from uniter_jax.data import format as fmt
from uniter_jax.data.boxes import norm_bb_from_xyxy

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
)
_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h", "cls_conf": "objects_conf"}
_INT_ARRAYS = ("objects_id", "attrs_id")


def _decode(value: str, dtype, where: str, field: str) -> np.ndarray:
  try:
    return np.frombuffer(base64.b64decode(value, validate=False), dtype=dtype)
  except (binascii.Error, ValueError) as e:
    raise fmt.DataError(f"{where}: column {field!r} is not valid base64 {np.dtype(dtype).name} ({e}); is --fields right?") from None


def read_tsv(path: str, fields: tuple[str, ...] | None = None) -> Iterator[dict]:
  """Yields image records (the writer's dict) from one TSV file."""
  csv.field_size_limit(sys.maxsize)
  with open(path, newline="") as f:
    for line_no, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
      where = f"{path} line {line_no}"
      if not row:
        continue
      if line_no == 1 and row[0] in ("image_id", "img_id"):
        fields = fields or tuple(row)  # a header line names the columns
        continue
      names = fields
      if names is None:
        names = {6: BUTD_FIELDS, 10: LXMERT_FIELDS}.get(len(row))
        if names is None:
          raise fmt.DataError(
              f"{where}: {len(row)} columns, neither BUTD (6) nor LXMERT (10); name them with --fields "
              "(comma-separated, e.g. image_id,image_w,image_h,num_boxes,boxes,features,cls_prob)"
          )
      if len(row) != len(names):
        raise fmt.DataError(
            f"{where}: {len(row)} columns but {len(names)} field names ({','.join(names)}); "
            "the line is truncated or --fields is wrong"
        )
      raw = {_ALIASES.get(k, k): v for k, v in zip(names, row)}
      for k in ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"):
        if k not in raw:
          raise fmt.DataError(f"{path}: no {k!r} column (fields: {names}); pass --fields")
      try:
        n = int(raw["num_boxes"])
        w, h = float(raw["image_w"]), float(raw["image_h"])
      except ValueError:
        raise fmt.DataError(f"{where}: num_boxes/image_w/image_h are not numbers; is --fields right?") from None
      image_id = raw["image_id"]
      where = f"{where} (image {image_id!r})"
      if not (w > 0 and h > 0):  # boxes are normalised by the size: 0 would give inf
        raise fmt.DataError(f"{where}: image_w {raw['image_w']} / image_h {raw['image_h']}; both must be > 0 "
                            "(is --fields right?)")
      boxes = _decode(raw["boxes"], np.float32, where, "boxes")
      feats = _decode(raw["features"], np.float32, where, "features")
      if n == 0:
        yield {"image_id": image_id, "features": np.zeros((0, 1), np.float32), "norm_bb": np.zeros((0, 6), np.float32)}
        continue
      if boxes.size != n * 4 or feats.size % n:
        raise fmt.DataError(
            f"{where}: {boxes.size} box values and {feats.size} feature values do not fit num_boxes={n}; "
            "the line is truncated or the arrays are not float32"
        )
      rec = {
          "image_id": image_id,
          "features": feats.reshape(n, -1),
          "norm_bb": norm_bb_from_xyxy(boxes.reshape(n, 4), w, h),
          "image_w": int(w),
          "image_h": int(h),
      }
      conf = None
      if "objects_conf" in raw:
        conf = _decode(raw["objects_conf"], np.float32, where, "objects_conf")
      if "cls_prob" in raw:
        soft = _decode(raw["cls_prob"], np.float32, where, "cls_prob").reshape(n, -1)
        rec["soft_labels"] = soft
        if conf is None:  # best non-background class score, as the BUTD extractor ranks boxes
          conf = soft[:, 1:].max(axis=1) if soft.shape[1] > 1 else soft[:, 0]
      if conf is not None:
        if conf.size != n:
          raise fmt.DataError(f"{where}: {conf.size} confidences for {n} boxes")
        order = np.argsort(-conf, kind="stable")
        rec["conf"] = conf[order]
        for k in ("features", "norm_bb", "soft_labels"):
          if k in rec:
            rec[k] = rec[k][order]
      yield rec


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.butd_tsv", __doc__)
  parser.add_argument("--tsv", nargs="+", required=True, help="TSV file(s)")
  parser.add_argument("--fields", default=None, help="comma-separated column names (default: by column count)")
  common.add_box_args(parser)
  common.add_output_args(parser)
  args = parser.parse_args(argv)
  common.check_inputs("--tsv", args.tsv)
  common.check_out(args.out, args.overwrite, inputs=args.tsv)
  fields = tuple(args.fields.split(",")) if args.fields else None

  def records():
    for path in args.tsv:
      yield from read_tsv(path, fields)

  policy = common.box_policy(args)
  manifest = fmt.write_dataset(
      args.out, images=records(), overwrite=args.overwrite, skip_bad=args.skip_bad, shard_mb=args.shard_mb,
      box_policy=policy, source="data_prep.butd_tsv",
      extraction=common.extraction(args, {"source_format": "butd_tsv", "box_source": "detected"}),
      extra={"source": {"tsv": args.tsv, "fields": args.fields}},
  )
  common.print_summary(manifest, args.out)
  return manifest


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
