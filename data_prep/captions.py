"""Caption annotations + a BERT WordPiece vocab -> text shards.

    python -m data_prep.captions --annotations captions_train2014.json --vocab bert-base-cased-vocab.txt \\
        --image-id-template 'coco_train2014_{image_id:012d}' --out data/coco_train_txt

Inputs: COCO captions JSON ({"annotations": [{"id", "image_id", "caption"}, ...]}) or JSONL, one
{"image_id", "caption"} object per line (optional "id"; else FILE:LINE). Captions are tokenised
cased by default (UNITER uses bert-base-cased; --lowercase for uncased vocabs) and stored without
[CLS]/[SEP]. --image-id-template maps annotation image ids to the image ids of your feature
dataset (Python format syntax, e.g. 'coco_train2014_{image_id:012d}' for official COCO names).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

from data_prep import common
from uniter_jax.data import format as fmt


def read_annotations(path: str) -> Iterator[dict]:
  """Yields {id, image_id, caption} from a COCO captions JSON or a JSONL file; a caption that is
  not a string, or a byte that is not UTF-8, is a DataError naming the file and the line."""
  try:
    yield from _read_annotations(path)
  except UnicodeDecodeError:
    raise common.not_utf8(path) from None


def _read_annotations(path: str) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    head = f.read(1 << 16).lstrip()
    f.seek(0)
    if head.startswith("{") and '"annotations"' in head[:1 << 16] and not path.endswith(".jsonl"):
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise fmt.DataError(f"{path}: invalid JSON ({e})") from None
      for i, a in enumerate(data["annotations"]):
        if "caption" not in a or "image_id" not in a:
          raise fmt.DataError(f"{path} annotation #{i}: needs 'image_id' and 'caption'")
        caption = common.require(a, "caption", f"{path} annotation #{i}")
        yield {"id": a.get("id", f"{os.path.basename(path)}:{i}"), "image_id": a["image_id"], "caption": caption}
      return
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        a = json.loads(line)
      except json.JSONDecodeError as e:
        raise fmt.DataError(f"{path} line {line_no}: invalid JSON ({e}); one object per line expected") from None
      if "caption" not in a or "image_id" not in a:
        raise fmt.DataError(f"{path} line {line_no}: needs 'image_id' and 'caption' (has {sorted(a)})")
      caption = common.require(a, "caption", f"{path} line {line_no}")
      yield {"id": a.get("id", f"{os.path.basename(path)}:{line_no}"), "image_id": a["image_id"], "caption": caption}


def format_image_id(template: str, image_id, where: str) -> str:
  """Applies --image-id-template (ints stay ints so '{image_id:012d}' works)."""
  if isinstance(image_id, str) and image_id.isdigit() and "d}" in template:
    image_id = int(image_id)
  try:
    return template.format(image_id=image_id)
  except (ValueError, KeyError, IndexError) as e:
    raise fmt.DataError(f"{where}: --image-id-template {template!r} does not fit image_id {image_id!r} ({e})") from None


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.captions", __doc__)
  parser.add_argument("--annotations", nargs="+", required=True, help="COCO captions JSON or JSONL file(s)")
  common.add_vocab_args(parser)
  parser.add_argument("--image-id-template", default="{image_id}", help="image id format (default '{image_id}')")
  parser.add_argument("--keep-text", action="store_true", help="also store the caption string as field 'text'")
  common.add_output_args(parser, images=False, skip_bad="skip captions that tokenise to nothing (counted)")
  args = parser.parse_args(argv)
  common.check_inputs("--annotations", args.annotations)
  common.check_out(args.out, args.overwrite, inputs=[*args.annotations, args.vocab])
  tok = common.load_tokenizer(args.vocab, args.lowercase)

  def records():
    for path in args.annotations:
      for a in read_annotations(path):
        rec = {
            "id": a["id"],
            "image_id": format_image_id(args.image_id_template, a["image_id"], f"{path} caption {a['id']!r}"),
            "input_ids": tok.encode(a["caption"]),
        }
        if args.keep_text:
          rec["text"] = a["caption"]
        yield rec

  manifest = fmt.write_dataset(
      args.out, texts=records(), overwrite=args.overwrite, skip_bad=args.skip_bad, tokenizer=tok.info(),
      source="data_prep.captions",
      extra={"source": {"annotations": args.annotations, "image_id_template": args.image_id_template}},
  )
  common.print_summary(manifest, args.out)
  return manifest


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
