"""Karpathy-split caption JSON (Flickr30k / COCO) + a BERT WordPiece vocab -> retrieval text records.

    python -m data_prep.retrieval --karpathy dataset_flickr30k.json --split test \\
        --vocab bert-base-cased-vocab.txt --image-id-template 'flickr30k_{image_id:012d}' \\
        --out data/itm_flickr_test
    python -m data_prep.retrieval --karpathy dataset_coco.json --split train restval \\
        --vocab bert-base-cased-vocab.txt --image-id-template 'coco_{folder}_{image_id:012d}' \\
        --out data/itm_coco_train

Input: the Karpathy split files (dataset_flickr30k.json, dataset_coco.json): {"images": [{"filename",
"imgid", "split" (train / val / test / restval), "sentences": [{"raw", "tokens", "sentid"}],
"cocoid" (COCO only), "filepath" (COCO only: train2014 / val2014)}]}. Only the images of the
--split(s) asked for are converted; an image with no sentences is counted (skipped.no_sentences).

Output texts (one image each), the fields the synthetic world's retrieval_* splits carry, so one
task reads both:
  id          the sentence's "sentid" (else "<imgid>_<k>"); ids must be unique
  image_id    --image-id-template with {image_id} = cocoid (COCO) or the file name's digits
              (Flickr30k, "1000092795.jpg" -> 1000092795), {folder} = filepath (COCO), {stem} =
              the file name without extension
  input_ids   the tokenised caption ("raw", cased; " ".join(tokens) when "raw" is missing)
  text        str: the caption

Image ids must equal those of the image dataset used with the texts: the official UNITER img_dbs
name images flickr30k_001000092795 and coco_val2014_000000391895 (the templates above);
features you extracted into 1000092795.npz need the default '{stem}'. A mismatch shows up when
training as the pipeline's counted skip "text_missing_image". Errors from the command line are
one line on stderr, exit status 1.
"""

from __future__ import annotations

import collections
import json
import os
import sys

from data_prep import common
from data_prep.captions import format_image_id
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer

SPLITS = ("train", "val", "test", "restval")


def read_karpathy(path: str) -> list[dict]:
  """The "images" list of a Karpathy split file; a DataError names what is wrong."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      data = json.load(f)
  except OSError as e:
    raise fmt.DataError(f"{path}: cannot open ({e.strerror}); check the --karpathy path") from None
  except json.JSONDecodeError as e:
    raise fmt.DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-download "
                        "dataset_flickr30k.json / dataset_coco.json") from None
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise fmt.DataError(f"{path}: expected an object with an 'images' list (the Karpathy split "
                        "layout of dataset_flickr30k.json / dataset_coco.json)")
  return data["images"]


def image_fields(img: dict, where: str) -> dict:
  """{image_id, folder, stem} of one Karpathy image entry, for --image-id-template."""
  filename = common.require(img, "filename", where)
  stem = os.path.splitext(os.path.basename(filename))[0]
  if "cocoid" in img:
    image_id = img["cocoid"]
  else:
    digits = "".join(ch for ch in stem if ch.isdigit())
    image_id = int(digits) if digits else stem
  return {"image_id": image_id, "folder": img.get("filepath", ""), "stem": stem}


def _image_id(template: str, fields: dict, where: str) -> str:
  if "{folder" in template or "{stem" in template:
    try:
      return template.format(**fields)
    except (ValueError, KeyError, IndexError) as e:
      raise fmt.DataError(f"{where}: --image-id-template {template!r} does not fit "
                          f"{fields} ({e})") from None
  return format_image_id(template, fields["image_id"], where)


def convert(path: str, splits: list[str], out: str, tok: WordPieceTokenizer, *,
            image_id_template: str = "{stem}", overwrite: bool = False,
            skip_bad: bool = False) -> dict:
  """Writes the captions of the images in `splits` of Karpathy file `path` to `out`."""
  bad = [s for s in splits if s not in SPLITS]
  if bad:
    raise fmt.DataError(f"--split {bad[0]!r}: choose from {', '.join(SPLITS)}")
  common.check_out(out, overwrite)
  images = read_karpathy(path)
  recs, seen, no_sentences = [], {}, []
  for n, img in enumerate(images):
    where = f"{path} images[{n}]"
    if not isinstance(img, dict):
      raise fmt.DataError(f"{where}: a JSON {type(img).__name__}, expected an object")
    if common.require(img, "split", where) not in splits:
      continue
    image_id = _image_id(image_id_template, image_fields(img, where), where)
    sentences = common.require(img, "sentences", where, list)
    if not sentences:
      no_sentences.append(image_id)
    for k, sent in enumerate(sentences):
      at = f"{where}.sentences[{k}]"
      if not isinstance(sent, dict):
        raise fmt.DataError(f"{at}: expected an object with 'raw' (or 'tokens')")
      text = sent.get("raw")
      if text is None:
        text = " ".join(common.require(sent, "tokens", at, list))
      tid = str(sent.get("sentid", f"{img.get('imgid', n)}_{k}"))
      common.check_unique(seen, tid, at, "sentid")
      recs.append({"where": at, "id": tid, "image_id": image_id, "text": str(text)})
  if not recs:
    found = collections.Counter(i.get("split") for i in images if isinstance(i, dict))
    raise fmt.DataError(f"{path}: no captions in split(s) {splits}; the file has "
                        f"{dict(found)} images per split")
  source = {"karpathy": path, "splits": list(splits), "image_id_template": image_id_template}
  with fmt.DatasetWriter(out, overwrite=overwrite, tokenizer=tok.info(), skip_bad=skip_bad,
                         text_fields={"text": "str"}, source="data_prep.retrieval",
                         extra={"source": source}) as w:
    for name in no_sentences:
      common.count_skip(w, "no_sentences", name)
    for r in recs:
      ids = common.encode_text(tok, w, r["text"], where=r["where"], field="raw", name=r["id"])
      if ids is not None:
        w.add_text({"id": r["id"], "image_id": r["image_id"], "input_ids": ids, "text": r["text"]})
  manifest = fmt.read_manifest(out)
  common.print_summary(manifest, out)
  return manifest


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.retrieval", __doc__)
  parser.add_argument("--karpathy", required=True,
                      help="dataset_flickr30k.json or dataset_coco.json (Karpathy splits)")
  parser.add_argument("--split", nargs="+", required=True, choices=SPLITS,
                      help="split(s) to convert, e.g. test, or train restval for COCO")
  common.add_vocab_args(parser)
  parser.add_argument("--image-id-template", default="{stem}",
                      help="image id format with {image_id}, {folder}, {stem} (default '{stem}'; "
                      "official img_dbs: 'flickr30k_{image_id:012d}', "
                      "'coco_{folder}_{image_id:012d}')")
  common.add_output_args(parser, images=False,
                         skip_bad="skip captions that tokenise to nothing (counted)")
  args = parser.parse_args(argv)
  common.check_inputs("--karpathy", [args.karpathy])
  common.check_out(args.out, args.overwrite, inputs=[args.karpathy, args.vocab])
  tok = common.load_tokenizer(args.vocab, args.lowercase)
  return convert(args.karpathy, args.split, args.out, tok,
                 image_id_template=args.image_id_template, overwrite=args.overwrite,
                 skip_bad=args.skip_bad)


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
