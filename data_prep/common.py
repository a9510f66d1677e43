"""Command-line pieces shared by the converters: output, box policy, bad-input and provenance flags."""

from __future__ import annotations

import argparse
import json
import sys

from uniter_jax.data.boxes import BoxPolicy


def add_output_args(parser: argparse.ArgumentParser) -> None:
  """--out, --overwrite, --skip-bad, --shard-mb, --extraction."""
  g = parser.add_argument_group("output")
  g.add_argument("--out", required=True, help="output dataset folder (must not exist unless --overwrite)")
  g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  g.add_argument(
      "--skip-bad", action="store_true",
      help="skip bad records (zero boxes, NaN/inf features, empty texts) instead of failing; "
      "they are counted in manifest.json under 'skipped'",
  )
  g.add_argument("--shard-mb", type=float, default=256.0, help="target image shard size in MB (default 256)")
  g.add_argument(
      "--extraction", action="append", default=[], metavar="KEY=VALUE",
      help="how the features were made, recorded in the manifest (repeatable), e.g. "
      "--extraction detector=butd_r101_vg --extraction nms=0.3",
  )


def add_box_args(parser: argparse.ArgumentParser) -> None:
  """The official box policy flags (docs/official.md, *Box features and box policy*)."""
  g = parser.add_argument_group("box policy (official defaults: conf_th 0.2, 10 to 100 boxes)")
  g.add_argument("--conf-th", type=float, default=None, help="keep boxes with confidence above this (default 0.2)")
  g.add_argument("--min-bb", type=int, default=None, help="keep at least this many boxes (default 10)")
  g.add_argument("--max-bb", type=int, default=None, help="keep at most this many boxes (default 100)")
  g.add_argument("--num-bb", type=int, default=None, help="keep a fixed number of boxes instead (e.g. 36 or 100)")
  g.add_argument("--keep-all-boxes", action="store_true", help="keep every stored box")


def box_policy(args: argparse.Namespace, default: BoxPolicy | None = None) -> BoxPolicy | None:
  """The policy the flags ask for; unset flags fall back to `default` (or the official values)."""
  if args.keep_all_boxes:
    return None
  base = default or BoxPolicy()
  if args.num_bb is not None:
    return BoxPolicy(num_bb=args.num_bb)
  if any(v is not None for v in (args.conf_th, args.min_bb, args.max_bb)) or base.num_bb is None:
    return BoxPolicy(
        conf_th=base.conf_th if args.conf_th is None else args.conf_th,
        min_bb=base.min_bb if args.min_bb is None else args.min_bb,
        max_bb=base.max_bb if args.max_bb is None else args.max_bb,
    )
  return base


def extraction(args: argparse.Namespace, base: dict | None = None) -> dict:
  """The --extraction KEY=VALUE pairs over `base` (values parsed as JSON when they can be)."""
  out = dict(base or {})
  for item in args.extraction:
    if "=" not in item:
      raise SystemExit(f"--extraction {item!r}: expected KEY=VALUE")
    k, v = item.split("=", 1)
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      out[k] = v
  return out


def strip_npz(name: str) -> str:
  """Official image file names -> our image ids ('coco_val2014_000000000042.npz' -> '..._000000000042')."""
  return name[:-4] if name.endswith(".npz") else name


def print_summary(manifest: dict, out: str) -> None:
  """One-line counts plus counted skips, on stderr."""
  parts = [f"{k}: {manifest[k]['count']}" for k in ("images", "texts") if k in manifest]
  print(f"wrote {out} ({', '.join(parts)})", file=sys.stderr)
  if manifest.get("skipped"):
    print(f"skipped: {manifest['skipped']} (examples: {manifest.get('skipped_examples')})", file=sys.stderr)
