"""RefCOCO / RefCOCO+ / RefCOCOg (the `refer` annotations) -> RE text records, and
ground-truth-box region features -> image records whose region i is annotation i.

    python -m data_prep.refcoco texts --refs refcoco/refs(unc).p --instances refcoco/instances.json \\
        --split train --vocab bert-base-cased-vocab.txt --out data/refcoco_train
    python -m data_prep.refcoco texts ... --split testA --out data/refcoco_testA
    python -m data_prep.refcoco images --instances refcoco/instances.json \\
        --features gt_feats/ --out data/refcoco_gt_img
    python -m data_prep.npz_dir --dir det_feats/ --keep-all-boxes --out data/refcoco_det_img

Input (github lichengunc/refer): `refs(unc).p` (RefCOCO, RefCOCO+; splits train, val, testA,
testB) or `refs(umd).p` (RefCOCOg; train, val, test), a pickled list of refs {ref_id, ann_id,
image_id, split, sentences: [{sent_id, sent}]}; and `instances.json` (COCO layout: images with
id / width / height, annotations with id / image_id / bbox [x, y, w, h]). The pickle is read with
Python's pickle module: only convert files you trust.

Regions. An image's annotations, in instances.json order, are its ground-truth regions: the
`images` command stores them as region 0, 1, ... (boxes from the annotations, features from
FEATURES/<PREFIX><image id, 12 digits>.npz `features` (n, D), n = the image's annotation count),
and a text's `target` is its referred annotation's index in that list, as the official
`img['ann_ids'].index(ann_id)` (data/re.py). Image ids are PREFIX + the 12-digit COCO id
(default prefix "coco_"); detected-box features converted with data_prep.npz_dir keep their file
names, so name those files (or pass --image-prefix) to match.

Output texts, one per sentence (the fields of the synthetic world's re_* splits):
  id          the sentence id;  image_id: PREFIX + 12-digit COCO id;  input_ids: tokenised sent
  target      int: the annotation's region index (-1 beyond --max-regions, see below)
  bbox        [x, y, w, h] of the referred annotation, pixels (the accuracy's gt box)
  image_w, image_h   the image size (predicted boxes are rebuilt from normalised boxes)
  sent, ref_id, ann_id, category_id

Counted, never silently dropped (manifest.json `skipped` / `re`): refs whose annotation or image is
not in instances.json (skipped.missing_annotation / missing_image), sentences that tokenise to
nothing (an error, or with --skip-bad skipped.empty_text); targets at or beyond --max-regions
(default 100, the official num_bb; the pipeline keeps that many regions) are kept with target -1
and counted under re.target_beyond_max_regions: they still count in box accuracy, not in training.
Errors from the command line are one line on stderr, exit status 1.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator

import numpy as np

from data_prep import common
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer

DEFAULT_IMAGE_PREFIX = "coco_"
SPLITS = ("train", "val", "testA", "testB", "test")
TEXT_FIELDS = {"target": "int", "bbox": "float_list", "image_w": "int", "image_h": "int",
               "sent": "str", "ref_id": "int", "ann_id": "int", "category_id": "int"}


def image_id(coco_id: int, prefix: str = DEFAULT_IMAGE_PREFIX) -> str:
  return f"{prefix}{int(coco_id):012d}"


def read_refs(path: str) -> list[dict]:
  """The refs of a refer pickle; an unreadable file or another layout is a DataError naming it."""
  try:
    with open(path, "rb") as f:
      refs = pickle.load(f, encoding="latin1")  # the refer files are Python 2 pickles
  except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:
    raise fmt.DataError(f"--refs {path}: not a readable refer pickle ({e})") from None
  if not isinstance(refs, list) or (refs and not isinstance(refs[0], dict)):
    raise fmt.DataError(f"--refs {path}: expected a list of refs (dicts), got {type(refs).__name__}")
  for i, r in enumerate(refs):
    missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in r]
    if missing:
      raise fmt.DataError(f"--refs {path}: ref #{i} lacks {missing}; is this a refs(unc).p / refs(umd).p?")
  return refs


class Instances:
  """instances.json: image sizes and each image's annotations in file order."""

  def __init__(self, path: str):
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise fmt.DataError(f"--instances {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
      raise fmt.DataError(f"--instances {path}: expected the COCO layout with 'images' and 'annotations'")
    self.path = path
    self.images = {int(im["id"]): im for im in data["images"]}
    self.anns = {int(a["id"]): a for a in data["annotations"]}
    self.ann_ids: dict[int, list[int]] = collections.defaultdict(list)
    for a in data["annotations"]:
      self.ann_ids[int(a["image_id"])].append(int(a["id"]))

  def region_of(self, ann_id: int) -> int:
    """The annotation's index among its image's annotations (its region index)."""
    a = self.anns[ann_id]
    return self.ann_ids[int(a["image_id"])].index(ann_id)


def convert_texts(refs_path: str, instances_path: str, split: str, out: str, tok: WordPieceTokenizer, *,
                  image_prefix: str = DEFAULT_IMAGE_PREFIX, max_regions: int = 100, overwrite: bool = False,
                  skip_bad: bool = False) -> dict:
  """Writes the sentences of `split` to `out`; returns the manifest."""
  common.check_out(out, overwrite, inputs=[refs_path, instances_path])
  refs = [r for r in read_refs(refs_path) if r["split"] == split]
  if not refs:
    raise fmt.DataError(f"--refs {refs_path}: no ref has split {split!r}; RefCOCO / RefCOCO+ have train, val, "
                        "testA, testB and RefCOCOg (umd) train, val, test")
  inst = Instances(instances_path)
  counts = collections.Counter()
  source = {"refs": refs_path, "instances": instances_path, "split": split, "image_prefix": image_prefix,
            "max_regions": max_regions}
  with fmt.DatasetWriter(out, overwrite=overwrite, tokenizer=tok.info(), skip_bad=skip_bad,
                         text_fields=TEXT_FIELDS, source="data_prep.refcoco",
                         extra={"source": source}) as w:
    for r in refs:
      ann_id, coco_id = int(r["ann_id"]), int(r["image_id"])
      if ann_id not in inst.anns:
        common.count_skip(w, "missing_annotation", f"ref {r['ref_id']} (ann {ann_id})")
        continue
      if coco_id not in inst.images:
        common.count_skip(w, "missing_image", f"ref {r['ref_id']} (image {coco_id})")
        continue
      img, ann = inst.images[coco_id], inst.anns[ann_id]
      target = inst.region_of(ann_id)
      if target >= max_regions:
        counts["target_beyond_max_regions"] += 1
        target = -1
      for s in r["sentences"]:
        sent = s.get("sent") or s.get("raw") or ""
        where = f"{refs_path}: ref {r['ref_id']} sentence {s.get('sent_id')}"
        ids = common.encode_text(tok, w, sent, where=where, field="sent", name=str(s.get("sent_id")))
        if ids is None:
          continue
        w.add_text({"id": str(s["sent_id"]), "image_id": image_id(coco_id, image_prefix), "input_ids": ids,
                    "target": target, "bbox": [float(v) for v in ann["bbox"]],
                    "image_w": int(img["width"]), "image_h": int(img["height"]), "sent": sent,
                    "ref_id": int(r["ref_id"]), "ann_id": ann_id,
                    "category_id": int(ann.get("category_id", -1))})
        counts["sentences"] += 1
    w.extra["re"] = {"split": split, "refs": len(refs), **dict(sorted(counts.items())),
                     "regions": "the image's annotations in instances.json order (target = index)"}
  manifest = fmt.read_manifest(out)
  common.print_summary(manifest, out)
  if counts["target_beyond_max_regions"]:
    print(f"{counts['target_beyond_max_regions']} refs point at annotation >= {max_regions}: kept with target -1",
          file=sys.stderr)
  return manifest


def _gt_image_records(inst: Instances, features: str, prefix: str) -> Iterator[dict]:
  """Image records of the images that have a features file: boxes from the annotations."""
  for coco_id in sorted(inst.ann_ids):
    name = image_id(coco_id, prefix)
    path = os.path.join(features, name + ".npz")
    if not os.path.exists(path):
      continue
    try:
      with np.load(path, allow_pickle=False) as z:
        feats = z["features"]
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
      raise fmt.DataError(f"{path}: no readable 'features' array ({e}); re-extract it") from None
    ann_ids = inst.ann_ids[coco_id]
    if feats.ndim != 2 or feats.shape[0] != len(ann_ids):
      raise fmt.DataError(
          f"{path}: features {feats.shape} but image {coco_id} has {len(ann_ids)} annotations in "
          f"{inst.path}; ground-truth features need one row per annotation, in instances.json order")
    img = inst.images[coco_id]
    wid, hei = float(img["width"]), float(img["height"])
    xywh = np.array([inst.anns[a]["bbox"] for a in ann_ids], np.float64)
    x1, y1, bw, bh = xywh[:, 0] / wid, xywh[:, 1] / hei, xywh[:, 2] / wid, xywh[:, 3] / hei
    norm_bb = np.stack([x1, y1, x1 + bw, y1 + bh, bw, bh], 1).astype(np.float32)
    yield {"image_id": name, "features": feats, "norm_bb": norm_bb,
           "conf": np.ones((len(ann_ids),), np.float32), "image_w": int(wid), "image_h": int(hei)}


def convert_images(instances_path: str, features: str, out: str, *, image_prefix: str = DEFAULT_IMAGE_PREFIX,
                   overwrite: bool = False, shard_mb: float = 256.0, skip_bad: bool = False) -> dict:
  """Writes the ground-truth-box image records of `features` to `out`; returns the manifest."""
  common.check_out(out, overwrite, inputs=[instances_path, features])
  inst = Instances(instances_path)
  # Stream the records (all features of a COCO split do not fit in memory); only the first
  # is read ahead, to refuse a folder with no matching file before anything is written.
  records = _gt_image_records(inst, features, image_prefix)
  first = next(records, None)
  if first is None:
    raise fmt.DataError(f"--features {features}: no file named {image_id(0, image_prefix)[:-12]}<12-digit id>.npz "
                        f"for an image of {instances_path}; check --image-prefix")
  manifest = fmt.write_dataset(
      out, images=itertools.chain([first], records), overwrite=overwrite, box_policy=None,
      shard_mb=shard_mb, skip_bad=skip_bad,
      source="data_prep.refcoco", extraction={"boxes": "ground truth (instances.json annotations)"},
      extra={"source": {"instances": instances_path, "features": features, "image_prefix": image_prefix}})
  common.print_summary(manifest, out)
  return manifest


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.refcoco", __doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("texts", help="refer annotations -> text records of one split")
  t.add_argument("--refs", required=True, help="refs(unc).p or refs(umd).p")
  t.add_argument("--instances", required=True, help="the refer instances.json")
  t.add_argument("--split", required=True, choices=SPLITS)
  t.add_argument("--max-regions", type=int, default=100,
                 help="regions the training pipeline keeps (default 100, the official num_bb)")
  common.add_vocab_args(t)
  t.add_argument("--image-prefix", default=DEFAULT_IMAGE_PREFIX, help="image id prefix (default 'coco_')")
  common.add_output_args(t, images=False, skip_bad="skip sentences that tokenise to nothing (counted)")
  i = sub.add_parser("images", help="ground-truth-box features -> image records (region i = annotation i)")
  i.add_argument("--instances", required=True, help="the refer instances.json")
  i.add_argument("--features", required=True, help="folder of <PREFIX><12-digit id>.npz with 'features' (n, D)")
  i.add_argument("--image-prefix", default=DEFAULT_IMAGE_PREFIX, help="image id prefix (default 'coco_')")
  common.add_output_args(i, skip_bad="skip images with zero boxes or non-finite values (counted)")
  args = parser.parse_args(argv)
  if args.command == "texts":
    common.check_inputs("--refs", [args.refs])
    common.check_inputs("--instances", [args.instances])
    tok = common.load_tokenizer(args.vocab, args.lowercase)
    return convert_texts(args.refs, args.instances, args.split, args.out, tok, image_prefix=args.image_prefix,
                         max_regions=args.max_regions, overwrite=args.overwrite, skip_bad=args.skip_bad)
  common.check_inputs("--instances", [args.instances])
  common.check_inputs("--features", [args.features], folders=True)
  return convert_images(args.instances, args.features, args.out, image_prefix=args.image_prefix,
                        overwrite=args.overwrite, shard_mb=args.shard_mb, skip_bad=args.skip_bad)


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
