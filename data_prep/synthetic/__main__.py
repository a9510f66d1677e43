"""CLI: generate a synthetic world, or draw a contact sheet of one.

  python -m data_prep.synthetic --out DIR [--num-images N] [--seed S] [--img-dim D] [--overwrite]
  python -m data_prep.synthetic --preview DIR --out sheet.png [--num-scenes K]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from data_prep.synthetic import world, writer


def main(argv: list[str] | None = None) -> int:
  d = world.Config()
  p = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="world folder to create (or the sheet PNG with --preview)")
  p.add_argument("--num-images", type=int, default=d.num_images, help=f"default {d.num_images}")
  p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
  p.add_argument("--img-dim", type=int, default=d.img_dim, help=f"region feature size, default {d.img_dim}")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
  p.add_argument("--workers", type=int, default=None,
                 help="rendering processes (default: usable cores, at most 4); output is identical")
  p.add_argument("--preview", metavar="DIR", help="draw a contact sheet of the world in DIR into --out")
  p.add_argument("--num-scenes", type=int, default=6, help="scenes on the contact sheet (default 6)")
  args = p.parse_args(argv)

  if args.preview:
    from data_prep.synthetic import preview  # pylint: disable=g-import-not-at-top

    print(preview.contact_sheet(args.preview, args.out, num_scenes=args.num_scenes))
    return 0
  t0 = time.time()
  try:
    m = writer.generate(args.out, overwrite=args.overwrite, num_images=args.num_images,
                        seed=args.seed, img_dim=args.img_dim, workers=args.workers)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out} in {time.time() - t0:.1f} s: splits {json.dumps(m['splits'])}, "
        f"{m['num_regions']['mean']} regions per image, vocab {m['vocab']['size']} tokens")
  return 0


if __name__ == "__main__":
  sys.exit(main())
