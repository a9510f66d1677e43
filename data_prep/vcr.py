"""VCR (visualcommonsense.com) annotations -> VCR text records; gt-box + detected features ->
image records whose first regions are the annotated objects.

    python -m data_prep.vcr texts --annotations vcr1annots/train.jsonl \\
        --vocab bert-base-cased-vocab.txt --write-vocab data/vcr_vocab.txt --out data/vcr_train
    python -m data_prep.vcr images --gt vcr_gt_feats/ --det vcr_det_feats/ --out data/vcr_img
    python main.py --config=configs/vcr.py:base --config.data.vocab=data/vcr_vocab.txt ...

Input texts: the VCR jsonl files (train.jsonl, val.jsonl, test.jsonl), one object per line with
annot_id, img_fn, objects (names), question, answer_choices (4), rationale_choices (4) and, except
in test, answer_label / rationale_label. Questions and choices are token lists in which a list of
ints refers to objects: ["Why", "is", [0], "smiling", "?"].

Object references. As the official UNITER (init_word_embedding(81)), object j is one new token
[OBJ_j] after the BERT vocabulary (id = BERT size + j, j < 81). --write-vocab writes that grown
vocabulary (the BERT lines, then [OBJ_0] .. [OBJ_80]); runs use it as config.data.vocab, and the
model's word table grows to its size. Object j is region j: the image records put the annotated
objects' boxes first, in `objects` order (then the detections). A reference to j >= 81 cannot be
a token: it is written as the object's name and counted (re.unresolved_references in the
manifest, with examples).

Output texts (the fields of the synthetic world's vcr_* splits, so one task reads both):
  id = annot_id;  image_id = PREFIX + img_fn's file stem;  input_ids = the question
  input_ids_as / lens_as, input_ids_rs / lens_rs   the 4 answers / rationales, concatenated
  qa_target, qar_target   int (-1: no label, the test set)
  question, answers, rationales   str;  tag_regions   the referenced object indices

Images: FILE.npz in --gt holds `features` (n, D) and `norm_bb` (n, 6) of the n annotated objects
in order; the file of the same name in --det holds the detections (`conf` optional). Errors from
the command line are one line on stderr, exit status 1.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Iterator

import numpy as np

from data_prep import common
from data_prep.npz_dir import read_npz_dir, read_npz_file
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer
from uniter_jax.models.vcr import NUM_REFERENCE_TOKENS  # official init_word_embedding(81)

REF_TOKEN = "[OBJ_{}]"
TEXT_FIELDS = {"input_ids_as": "int_list", "lens_as": "int_list", "input_ids_rs": "int_list",
               "lens_rs": "int_list", "qa_target": "int", "qar_target": "int", "question": "str",
               "answers": "str_list", "rationales": "str_list", "tag_regions": "int_list"}


def write_grown_vocab(base: str, out: str) -> str:
  """The BERT vocab with [OBJ_0] .. [OBJ_80] appended, written to `out` (an identical file may
  exist already; a different one is never overwritten)."""
  with open(base, encoding="utf-8") as f:
    lines = [line.rstrip("\n").rstrip("\r") for line in f]
  text = "\n".join(lines + [REF_TOKEN.format(j) for j in range(NUM_REFERENCE_TOKENS)]) + "\n"
  if os.path.exists(out):
    with open(out, encoding="utf-8") as f:
      if f.read() != text:
        raise FileExistsError(f"--write-vocab {out} exists with other contents; pick another path")
    return out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write(text)
  return out


class _Encoder:
  """Words through WordPiece; object references to [OBJ_j] (or the name, counted)."""

  def __init__(self, tok: WordPieceTokenizer, writer: fmt.DatasetWriter):
    self.tok, self.writer = tok, writer
    self.first_ref = tok.vocab[REF_TOKEN.format(0)]

  def __call__(self, tokens: list, objects: list[str], where: str) -> tuple[list[int], str, set]:
    ids: list[int] = []
    words: list[str] = []
    regions: set[int] = set()
    for t in tokens:
      if not isinstance(t, list):
        ids += self.tok.encode(str(t))
        words.append(str(t))
        continue
      for j in t:
        j = int(j)
        if not 0 <= j < len(objects):
          raise fmt.DataError(f"{where}: reference to object {j}, but the line has "
                              f"{len(objects)} objects")
        regions.add(j)
        words.append(f"{objects[j]}_{j}")
        if j < NUM_REFERENCE_TOKENS:
          ids.append(self.first_ref + j)
        else:
          common.count_skip(self.writer, "unresolved_references", f"{where}: object {j}")
          ids += self.tok.encode(objects[j])
    return ids, " ".join(words), regions


def _label(obj: dict, key: str, where: str) -> int:
  value = obj.get(key)
  if value is None:
    return -1
  if not isinstance(value, int) or not 0 <= value < 4:
    raise fmt.DataError(f"{where}: {key} is {value!r}, expected 0..3")
  return value


def convert_texts(paths: list[str], out: str, tok: WordPieceTokenizer, *, image_prefix: str = "",
                  overwrite: bool = False) -> dict:
  """Writes the VCR questions of `paths` to `out`; returns the manifest."""
  common.check_out(out, overwrite, inputs=list(paths))
  if REF_TOKEN.format(NUM_REFERENCE_TOKENS - 1) not in tok.vocab:
    raise fmt.DataError("the vocabulary has no [OBJ_j] tokens; tokenise with the grown vocab "
                        "(--write-vocab)")
  lines = [(where, obj) for path in paths for _, where, obj in common.iter_jsonl(path)]
  if not lines:
    raise fmt.DataError(f"no lines in {paths}: nothing to convert; check --annotations")
  seen: dict[str, str] = {}
  counts = collections.Counter()
  with fmt.DatasetWriter(out, overwrite=overwrite, tokenizer=tok.info(), text_fields=TEXT_FIELDS,
                         source="data_prep.vcr", extra={"source": {"annotations": list(paths)}}) as w:
    enc = _Encoder(tok, w)
    for where, obj in lines:
      annot_id = str(common.require(obj, "annot_id", where))
      common.check_unique(seen, annot_id, where, "annot_id")
      objects = [str(o) for o in common.require(obj, "objects", where, list)]
      q_ids, question, regions = enc(common.require(obj, "question", where, list), objects, where)
      fields = {}
      for key, name in (("answer_choices", "as"), ("rationale_choices", "rs")):
        choices = common.require(obj, key, where, list)
        if len(choices) != 4:
          raise fmt.DataError(f"{where}: {key} has {len(choices)} choices, expected 4")
        encoded = [enc(c, objects, where) for c in choices]
        fields[f"input_ids_{name}"] = [i for ids, _, _ in encoded for i in ids]
        fields[f"lens_{name}"] = [len(ids) for ids, _, _ in encoded]
        fields["answers" if name == "as" else "rationales"] = [s for _, s, _ in encoded]
        for _, _, r in encoded:
          regions |= r
      stem = os.path.splitext(os.path.basename(str(common.require(obj, "img_fn", where))))[0]
      w.add_text({"id": annot_id, "image_id": image_prefix + stem, "input_ids": q_ids,
                  "qa_target": _label(obj, "answer_label", where),
                  "qar_target": _label(obj, "rationale_label", where),
                  "question": question, "tag_regions": sorted(regions), **fields})
      counts["questions"] += 1
    w.extra["vcr"] = {**dict(counts), "reference_tokens": NUM_REFERENCE_TOKENS,
                      "first_reference_id": enc.first_ref}
  manifest = fmt.read_manifest(out)
  common.print_summary(manifest, out)
  return manifest


def _images(gt: str, det: str | None) -> Iterator[dict]:
  """gt objects first, then the detections of the same image."""
  for rec in read_npz_dir(gt, soft_labels=False):
    rec["conf"] = np.ones((rec["features"].shape[0],), np.float32)
    if det is not None:
      path = os.path.join(det, rec["image_id"] + ".npz")
      if not os.path.exists(path):
        raise fmt.DataError(f"--det {det}: no {rec['image_id']}.npz for the gt file of that name")
      d = read_npz_file(path, soft_labels=False)
      n = len(d["features"])
      conf = np.ones((n,), np.float32) if d["conf"] is None else np.asarray(d["conf"], np.float32)
      rec["features"] = np.concatenate([rec["features"], d["features"]])
      rec["norm_bb"] = np.concatenate([rec["norm_bb"], d["norm_bb"]])
      rec["conf"] = np.concatenate([rec["conf"], conf])
    yield rec


def convert_images(gt: str, det: str | None, out: str, *, overwrite: bool = False,
                   shard_mb: float = 256.0, skip_bad: bool = False) -> dict:
  """Writes gt-first image records to `out` (every box kept: region j = object j)."""
  common.check_out(out, overwrite, inputs=[gt] + ([det] if det else []))
  manifest = fmt.write_dataset(
      out, images=_images(gt, det), overwrite=overwrite, box_policy=None, shard_mb=shard_mb,
      skip_bad=skip_bad,
      source="data_prep.vcr", extraction={"boxes": "VCR objects (gt) first, then detections"},
      extra={"source": {"gt": gt, "det": det}})
  common.print_summary(manifest, out)
  return manifest


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.vcr", __doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("texts", help="VCR jsonl -> text records")
  t.add_argument("--annotations", nargs="+", required=True, help="train.jsonl / val.jsonl / test.jsonl")
  common.add_vocab_args(t)
  t.add_argument("--write-vocab", required=True,
                 help="where to write the grown vocab (BERT + [OBJ_0..80]); use it as config.data.vocab")
  t.add_argument("--image-prefix", default="", help="prefix of the image ids (default none)")
  common.add_output_args(t, images=False, skip_bad=None)
  i = sub.add_parser("images", help="gt-box (+ detection) npz features -> image records")
  i.add_argument("--gt", required=True, help="folder of per-image npz with the annotated objects")
  i.add_argument("--det", default=None, help="folder of per-image npz with the detections")
  common.add_output_args(i, skip_bad="skip images with zero boxes or non-finite values (counted)")
  args = parser.parse_args(argv)
  if args.command == "texts":
    common.check_inputs("--annotations", args.annotations)
    common.check_inputs("--vocab", [args.vocab])
    vocab = write_grown_vocab(args.vocab, args.write_vocab)
    tok = common.load_tokenizer(vocab, args.lowercase)
    return convert_texts(args.annotations, args.out, tok, image_prefix=args.image_prefix,
                         overwrite=args.overwrite)
  common.check_inputs("--gt", [args.gt], folders=True)
  if args.det:
    common.check_inputs("--det", [args.det], folders=True)
  return convert_images(args.gt, args.det, args.out, overwrite=args.overwrite,
                        shard_mb=args.shard_mb, skip_bad=args.skip_bad)


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
