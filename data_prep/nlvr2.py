"""NLVR2 annotations (JSON lines) + a BERT WordPiece vocab -> two-image text records.

    python -m data_prep.nlvr2 --annotations nlvr2/data/train.json --vocab bert-base-cased-vocab.txt \\
        --out data/nlvr2_train_txt
    python -m data_prep.nlvr2 --annotations nlvr2/data/dev.json --vocab bert-base-cased-vocab.txt \\
        --out data/nlvr2_dev_txt
    python -m data_prep.nlvr2 --annotations unlabelled.json --vocab bert-base-cased-vocab.txt \\
        --allow-unlabelled --out data/nlvr2_predict_txt        (no labels: for --mode=predict)

Input: the NLVR2 files train.json, dev.json, test1.json (github lil-lab/nlvr, nlvr2/data/), one
JSON object per line with "identifier" (split-set_id-pair_id-sentence_id, e.g. "dev-850-0-0"),
"sentence" and "label" ("True" / "False"); left_url, right_url, directory and the rest are ignored.

Output texts (two images each), the fields the synthetic world's nlvr2_* splits carry, so one
task reads both:
  id          the identifier; ids must be unique, a repeat is an error naming both lines
  image_ids   [left, right] = [PREFIX + "dev-850-0-img0", PREFIX + "dev-850-0-img1"]
  input_ids   the tokenised sentence, no [CLS]/[SEP]
  target      int: True 1, False 0 (-1: no label, only with --allow-unlabelled)
  sentence    str
  identifier  str (the official evaluation matches predictions by it)

Image ids. NLVR2 names the images of identifier split-set-pair-sentence "split-set-pair-img0.png"
(left) and "split-set-pair-img1.png" (right) (nlvr2/README.md). The official UNITER preprocessing
(prepro.py, process_nlvr2) refers to them as nlvr2_{split-set-pair}-img0.npz / -img1.npz, so the
official nlvr2 img_db converted with data_prep.uniter_db (or the official extractor's .npz files
with data_prep.npz_dir) holds image ids "nlvr2_dev-850-0-img0": the default --image-prefix is
"nlvr2_". Features named by the bare file stem (LXMERT's NLVR2 TSVs through data_prep.butd_tsv, or
npz files named dev-850-0-img0.npz) need --image-prefix ''. A mismatch shows up when training as
the pipeline's counted skip "text_missing_image" (as do pairs whose image could not be
downloaded, which the official preprocessing drops with its missing_nlvr2_imgs.json).

Labels: "True" -> 1, "False" -> 0 (any letter case, or JSON true / false). Any other label, a line
that is not a JSON object, one without "identifier" or "sentence", or an identifier without a "-"
stops the conversion with an error naming FILE line N. Lines without a label (key missing, null
or empty; a held-out test set) are skipped by default and counted in manifest.json under
skipped.no_label, because a training set must not hold texts without a target. To predict on such
a set pass --allow-unlabelled: every line is kept with target -1, so a prediction run covers every
identifier (the official evaluation script wants one prediction per identifier); losses and
accuracies must ignore target -1. Sentences that tokenise to nothing are an error, or with
--skip-bad a skip counted under skipped.empty_text. Errors from the command line are one line on
stderr, exit status 1.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator

from data_prep import common
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer

LABELS = {"False": 0, "True": 1}
UNLABELLED = -1
DEFAULT_IMAGE_PREFIX = "nlvr2_"  # the official UNITER nlvr2 img_db (prepro.py, process_nlvr2)


def image_ids(identifier: str, prefix: str = DEFAULT_IMAGE_PREFIX) -> list[str]:
  """[left, right] image ids of an NLVR2 identifier ('dev-850-0-0' -> [.. 'dev-850-0-img0', .. '-img1'])."""
  pair = identifier.rsplit("-", 1)[0]
  return [f"{prefix}{pair}-img0", f"{prefix}{pair}-img1"]


def parse_label(value, where: str) -> int | None:
  """1 / 0 for True / False, None for no label; anything else is an error naming the line."""
  if value is None or value == "":
    return None
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, str) and value.strip().capitalize() in LABELS:
    return LABELS[value.strip().capitalize()]
  raise fmt.DataError(
      f"{where}: unknown label {value!r}; expected one of {sorted(LABELS)} (or none, for an unlabelled set)")


def read_nlvr2(path: str) -> Iterator[dict]:
  """{where, identifier, sentence, target (int or None)} for each line of an NLVR2 JSON-lines file."""
  for _, where, obj in common.iter_jsonl(path):
    identifier = common.require(obj, "identifier", where)
    if "-" not in identifier.strip("-"):
      raise fmt.DataError(
          f"{where}: identifier {identifier!r} is not of the form split-set_id-pair_id-sentence_id "
          "(e.g. dev-850-0-0); the image names are derived from it"
      )
    yield {"where": where, "identifier": identifier, "sentence": common.require(obj, "sentence", where),
           "target": parse_label(obj.get("label"), where)}


def convert(paths: list[str], out: str, tok: WordPieceTokenizer, *, image_prefix: str = DEFAULT_IMAGE_PREFIX,
            allow_unlabelled: bool = False, overwrite: bool = False, skip_bad: bool = False) -> dict:
  """Writes the NLVR2 texts of `paths` to `out`; returns the manifest."""
  common.check_out(out, overwrite)
  # Parse and check every line first: input mistakes fail fast, before anything is written.
  recs, seen = [], {}
  for path in paths:
    for r in read_nlvr2(path):
      common.check_unique(seen, r["identifier"], r["where"], "identifier")
      recs.append(r)
  if not recs:
    raise fmt.DataError(f"no lines in {paths}: nothing to convert; check the --annotations paths")
  if not allow_unlabelled and all(r["target"] is None for r in recs):
    raise fmt.DataError(
        f"no line of {paths} has a label; to convert an unlabelled set for prediction pass --allow-unlabelled "
        "(texts keep target -1)"
    )
  counts = collections.Counter()
  source = {"annotations": list(paths), "image_prefix": image_prefix, "allow_unlabelled": allow_unlabelled}
  with fmt.DatasetWriter(out, overwrite=overwrite, tokenizer=tok.info(), skip_bad=skip_bad,
                         text_fields={"target": "int", "sentence": "str", "identifier": "str"},
                         source="data_prep.nlvr2", extra={"source": source}) as w:
    for r in recs:
      if r["target"] is None and not allow_unlabelled:
        common.count_skip(w, "no_label", r["identifier"])
        continue
      ids = common.encode_text(tok, w, r["sentence"], where=r["where"], field="sentence", name=r["identifier"])
      if ids is None:
        continue
      target = UNLABELLED if r["target"] is None else r["target"]
      w.add_text({"id": r["identifier"], "image_id": image_ids(r["identifier"], image_prefix), "input_ids": ids,
                  "target": target, "sentence": r["sentence"], "identifier": r["identifier"]})
      counts[{1: "True", 0: "False", UNLABELLED: "unlabelled"}[target]] += 1
    w.extra["nlvr2"] = {"labels": dict(LABELS), "unlabelled_target": UNLABELLED, "counts": dict(sorted(counts.items())),
                        "image_order": ["left (img0)", "right (img1)"]}
  manifest = fmt.read_manifest(out)
  common.print_summary(manifest, out)
  return manifest


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.nlvr2", __doc__)
  parser.add_argument("--annotations", nargs="+", required=True,
                      help="NLVR2 JSON-lines file(s): train.json, dev.json, test1.json")
  common.add_vocab_args(parser)
  parser.add_argument("--image-prefix", default=DEFAULT_IMAGE_PREFIX,
                      help=f"prefix of both image ids (default {DEFAULT_IMAGE_PREFIX!r}, the official UNITER img_db's "
                      "nlvr2_dev-850-0-img0; '' for dev-850-0-img0)")
  parser.add_argument("--allow-unlabelled", action="store_true",
                      help="keep lines without a label, with target -1 (to predict on a test set); "
                      "default: skip them, counted under skipped.no_label")
  common.add_output_args(parser, images=False, skip_bad="skip sentences that tokenise to nothing (counted)")
  args = parser.parse_args(argv)
  common.check_out(args.out, args.overwrite, inputs=[*args.annotations, args.vocab])
  tok = common.load_tokenizer(args.vocab, args.lowercase)
  return convert(args.annotations, args.out, tok, image_prefix=args.image_prefix,
                 allow_unlabelled=args.allow_unlabelled, overwrite=args.overwrite, skip_bad=args.skip_bad)


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
