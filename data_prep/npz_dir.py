"""A folder of per-image .npz files (the official extractor's output) -> image shards.

    python -m data_prep.npz_dir --dir features/coco_val2014 --out data/coco_val_img

Each FILE.npz holds `features` (n, D), `norm_bb` (n, 6) [x1, y1, x2, y2, w, h] normalised by
the image size, `conf` (n,) and optionally `soft_labels` (n, C), boxes best-first. The image id
is the file name without ".npz" (e.g. coco_val2014_000000000042), as in the official img_db.
"""

from __future__ import annotations

import glob
import os
import sys
import zipfile
from collections.abc import Iterator

import numpy as np

from data_prep import common
from uniter_jax.data import format as fmt


def read_npz_dir(folder: str, soft_labels: bool = True) -> Iterator[dict]:
  """Yields image records from the .npz files of `folder` (sorted by name)."""
  paths = sorted(glob.glob(os.path.join(folder, "*.npz")))
  if not paths:
    raise fmt.DataError(f"no .npz files in {folder}; pass the folder that holds the per-image feature files")
  for path in paths:
    yield read_npz_file(path, soft_labels)


def read_npz_file(path: str, soft_labels: bool = True) -> dict:
  """The image record of one official .npz feature file (image id = its name without .npz)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      d = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise fmt.DataError(f"{path}: unreadable npz ({e}); re-extract it or delete it") from None
  missing = [k for k in ("features", "norm_bb") if k not in d]
  if missing:
    raise fmt.DataError(f"{path}: lacks {missing} (has {sorted(d)}); expected the official keys features, norm_bb, conf")
  rec = {
      "image_id": common.strip_npz(os.path.basename(path)),
      "features": d["features"],
      "norm_bb": d["norm_bb"],
      "conf": d.get("conf"),
  }
  if soft_labels and "soft_labels" in d:
    rec["soft_labels"] = d["soft_labels"]
  return rec


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.npz_dir", __doc__)
  parser.add_argument("--dir", required=True, help="folder of per-image .npz files")
  parser.add_argument("--no-soft-labels", action="store_true", help="do not store soft_labels")
  common.add_box_args(parser)
  common.add_output_args(parser)
  args = parser.parse_args(argv)
  common.check_inputs("--dir", [args.dir], folders=True)
  common.check_out(args.out, args.overwrite, inputs=[args.dir])
  manifest = fmt.write_dataset(
      args.out, images=read_npz_dir(args.dir, soft_labels=not args.no_soft_labels), overwrite=args.overwrite,
      skip_bad=args.skip_bad, shard_mb=args.shard_mb, box_policy=common.box_policy(args),
      source="data_prep.npz_dir", extraction=common.extraction(args, {"source_format": "npz_dir"}),
      extra={"source": {"dir": args.dir}},
  )
  common.print_summary(manifest, args.out)
  return manifest


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
