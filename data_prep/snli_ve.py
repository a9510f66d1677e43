"""SNLI-VE annotations (jsonl) + a BERT WordPiece vocab -> visual entailment text records.

    python -m data_prep.snli_ve --annotations snli_ve_train.jsonl --vocab bert-base-cased-vocab.txt \\
        --out data/ve_train_txt
    python -m data_prep.snli_ve --annotations snli_ve_dev.jsonl --vocab bert-base-cased-vocab.txt \\
        --image-id-template 'flickr30k_{image_id:012d}' --out data/ve_dev_txt   (official UNITER img_db)

Input: the SNLI-VE files snli_ve_{train,dev,test}.jsonl (github necla-ml/SNLI-VE), one JSON
object per line with at least "Flikr30kID" (sic, the official spelling; "Flickr30kID" is accepted
too), e.g. "2248275918.jpg", "sentence2" (the hypothesis), "gold_label" and "pairID".

Output texts (one image each), the fields the synthetic world's ve_* splits carry, so one task
reads both:
  id          pairID (FILE:LINE when a line has none); ids must be unique, a repeat is an error
              naming both lines
  image_id    the Flickr30k id without its extension, through --image-id-template
  input_ids   the tokenised hypothesis (sentence2), no [CLS]/[SEP]
  target      int: contradiction 0, entailment 1, neutral 2 (the official UNITER label ids)
  hypothesis  str: sentence2

Image ids must equal those of the Flickr30k image dataset the texts are used with:
  * data_prep.butd_tsv keeps the TSV's image_id column as is (Flickr30k BUTD TSVs hold the bare
    number, 2248275918): keep the default --image-id-template '{image_id}'.
  * data_prep.npz_dir and data_prep.uniter_db use the feature file name without ".npz". The official
    UNITER flickr30k img_db names images flickr30k_002248275918 (12-digit, zero-padded):
    pass --image-id-template 'flickr30k_{image_id:012d}'. Features you extracted into
    2248275918.npz need the default.
A mismatch shows up when training as the pipeline's counted skip "text_missing_image".

Lines whose gold_label is missing, empty or "-" (no annotator majority) are skipped and counted
in manifest.json under skipped.no_gold_label (first ids in skipped_examples). Any other label, a
line that is not a JSON object, or one without a required key stops the conversion with an error
naming FILE line N. Hypotheses that tokenise to nothing are an error too, or with --skip-bad a
skip counted under skipped.empty_text. Errors from the command line are one line on stderr, exit
status 1.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Iterator

from data_prep import common
from data_prep.captions import format_image_id
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer

LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
NO_GOLD = ("", "-")
_IMAGE_KEYS = ("Flikr30kID", "Flickr30kID")


def read_snli_ve(path: str) -> Iterator[dict]:
  """{where, id, flickr_id, hypothesis, label (str or None)} for each line of an SNLI-VE jsonl file."""
  base = os.path.basename(path)
  for line_no, where, obj in common.iter_jsonl(path):
    key = next((k for k in _IMAGE_KEYS if k in obj), _IMAGE_KEYS[0])
    flickr = common.require(obj, key, where)
    hypothesis = common.require(obj, "sentence2", where)
    pid = obj.get("pairID")
    label = obj.get("gold_label")
    if label is not None and not isinstance(label, str):
      raise fmt.DataError(f"{where}: gold_label is {label!r}, expected one of {sorted(LABELS)}")
    yield {
        "where": where,
        "id": str(pid) if pid not in (None, "") else f"{base}:{line_no}",
        "flickr_id": os.path.splitext(os.path.basename(flickr))[0],
        "hypothesis": hypothesis,
        "label": label,
    }


def convert(paths: list[str], out: str, tok: WordPieceTokenizer, *, image_id_template: str = "{image_id}",
            overwrite: bool = False, skip_bad: bool = False) -> dict:
  """Writes the SNLI-VE texts of `paths` to `out`; returns the manifest."""
  common.check_out(out, overwrite)
  # Parse and check every line first: input mistakes fail fast, before anything is written.
  recs, seen = [], {}
  for path in paths:
    for r in read_snli_ve(path):
      label = r["label"]
      if label is not None and label.strip() not in NO_GOLD and label not in LABELS:
        raise fmt.DataError(
            f"{r['where']}: unknown gold_label {label!r}; expected one of {sorted(LABELS)} "
            "(or '-' / empty for no gold label, which is skipped)"
        )
      common.check_unique(seen, r["id"], r["where"], "pairID")
      r["image_id"] = format_image_id(image_id_template, r["flickr_id"], r["where"])
      recs.append(r)
  if not recs:
    raise fmt.DataError(f"no lines in {paths}: nothing to convert; check the --annotations paths")
  counts = collections.Counter()
  with fmt.DatasetWriter(out, overwrite=overwrite, tokenizer=tok.info(), skip_bad=skip_bad,
                         text_fields={"target": "int", "hypothesis": "str"}, source="data_prep.snli_ve",
                         extra={"source": {"annotations": list(paths), "image_id_template": image_id_template}}) as w:
    for r in recs:
      if r["label"] is None or r["label"].strip() in NO_GOLD:
        common.count_skip(w, "no_gold_label", r["id"])
        continue
      ids = common.encode_text(tok, w, r["hypothesis"], where=r["where"], field="sentence2", name=r["id"])
      if ids is None:
        continue
      w.add_text({"id": r["id"], "image_id": r["image_id"], "input_ids": ids,
                  "target": LABELS[r["label"]], "hypothesis": r["hypothesis"]})
      counts[r["label"]] += 1
    w.extra["snli_ve"] = {"labels": dict(LABELS), "counts": dict(sorted(counts.items()))}
  manifest = fmt.read_manifest(out)
  common.print_summary(manifest, out)
  return manifest


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.snli_ve", __doc__)
  parser.add_argument("--annotations", nargs="+", required=True, help="SNLI-VE jsonl file(s), e.g. snli_ve_train.jsonl")
  common.add_vocab_args(parser)
  parser.add_argument("--image-id-template", default="{image_id}",
                      help="image id format applied to the Flickr30k number (default '{image_id}': 2248275918; "
                      "'flickr30k_{image_id:012d}' for the official UNITER img_db)")
  common.add_output_args(parser, images=False, skip_bad="skip hypotheses that tokenise to nothing (counted)")
  args = parser.parse_args(argv)
  common.check_out(args.out, args.overwrite, inputs=[*args.annotations, args.vocab])
  tok = common.load_tokenizer(args.vocab, args.lowercase)
  return convert(args.annotations, args.out, tok, image_id_template=args.image_id_template,
                 overwrite=args.overwrite, skip_bad=args.skip_bad)


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
