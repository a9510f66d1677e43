"""VQA v2 questions + annotations (and optionally Visual Genome QA) -> VQA text records.

    python -m data_prep.vqa --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --vocab bert-base-cased-vocab.txt \\
        --image-id-template 'coco_train2014_{image_id:012d}' --min-answer-count 9 --out data/vqa_train
    python -m data_prep.vqa --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --ans2label data/vqa_train/ans2label.json \\
        --vocab ... --image-id-template 'coco_val2014_{image_id:012d}' --eval --out data/vqa_val
    python -m data_prep.vqa --questions v2_OpenEnded_mscoco_test2015_questions.json --vocab ... \\
        --ans2label data/vqa_train/ans2label.json --image-id-template 'coco_test2015_{image_id:012d}' \\
        --out data/vqa_test                      (no annotations: questions only, for --mode=predict)
    python -m data_prep.vqa --vg-qa question_answers.json --ans2label ... --vocab ... \\
        --image-id-template 'vg_{image_id}' --out data/vqa_vg

Answers are normalised as the official VQA evaluation does (punctuation, number words -> digits,
articles dropped, contractions; uniter_jax.evaluators.vqa.normalize_answer). The answer vocabulary
is --ans2label, or built from these annotations: every answer that is the most common human
answer (multiple_choice_answer) of at least --min-answer-count questions, most frequent first.
Each in-vocabulary answer's soft score is its official VQA accuracy against the 10 human answers
(1, 2, 3, >= 4 humans -> 0.3, 0.6, 0.9, 1.0). Answers outside the vocabulary are dropped and
counted; a training question left without any answer is dropped and counted (--eval keeps it,
with no target, so the evaluation covers every question). Counts go to manifest.json under
'vqa' and to stderr. ans2label.json is written into the output folder.

Record fields: question (str), question_id (int), answers (the human answers, normalised),
labels (answer ids), scores (soft scores), answer_type and question_type (when annotated).
"""

from __future__ import annotations

import collections
import json
import sys
from collections.abc import Iterator

from data_prep import common
from data_prep.captions import format_image_id
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer
from uniter_jax.evaluators.vqa import normalize_answer, question_accuracy

ANS2LABEL = "ans2label.json"


def _load_json(path: str, key: str | None = None):
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except UnicodeDecodeError:
    raise common.not_utf8(path) from None
  except (OSError, json.JSONDecodeError) as e:
    raise fmt.DataError(f"{path}: cannot read JSON ({e})") from None
  if key is not None:
    if not isinstance(data, dict) or key not in data:
      raise fmt.DataError(f"{path}: expected a JSON object with {key!r}")
    return data[key]
  return data


def read_vqa(questions: str, annotations: str | None) -> Iterator[dict]:
  """Joined VQA v2 questions and annotations: {question_id, image_id, question, answers, ...}."""
  anns = {}
  if annotations:
    for a in _load_json(annotations, "annotations"):
      anns[a["question_id"]] = a
  for q in _load_json(questions, "questions"):
    for k in ("question_id", "image_id", "question"):
      if k not in q:
        raise fmt.DataError(f"{questions}: a question lacks {k!r}: {q}")
    rec = {"question_id": int(q["question_id"]), "image_id": q["image_id"],
           "question": q["question"]}
    if annotations:
      a = anns.get(q["question_id"])
      if a is None:
        raise fmt.DataError(f"{annotations}: no annotation for question {q['question_id']}")
      rec["answers"] = [normalize_answer(x["answer"]) for x in a["answers"]]
      rec["top_answer"] = normalize_answer(a.get("multiple_choice_answer")
                                           or collections.Counter(rec["answers"]).most_common(1)[0][0])
      rec["answer_type"] = a.get("answer_type", "")
      rec["question_type"] = a.get("question_type", "")
    yield rec


def read_vg_qa(path: str) -> Iterator[dict]:
  """Visual Genome question_answers.json: one answer per question (score 1 when in vocab)."""
  for entry in _load_json(path):
    for qa in entry.get("qas", []):
      ans = normalize_answer(qa["answer"])
      yield {"question_id": int(qa["qa_id"]), "image_id": qa.get("image_id", entry.get("id")),
             "question": qa["question"], "answers": [ans], "top_answer": ans,
             "answer_type": "", "question_type": ""}


def build_ans2label(recs: list[dict], min_count: int) -> dict[str, int]:
  """Answers that are the top answer of >= min_count questions, most frequent first."""
  counts = collections.Counter(r["top_answer"] for r in recs if r.get("top_answer"))
  keep = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
  return {a: i for i, a in enumerate(keep)}


def targets(answers: list[str], ans2label: dict[str, int]) -> tuple[list[int], list[float], int]:
  """(answer ids, soft scores, #distinct answers outside the vocabulary) of one question."""
  labels, scores, oov = [], [], 0
  for a in sorted(set(answers)):
    if a not in ans2label:
      oov += 1
      continue
    labels.append(ans2label[a])
    # One answer (Visual Genome QA) is a certain target; the 10-human formula would give it 0.
    scores.append(1.0 if len(answers) == 1 else question_accuracy(a, answers))
  return labels, scores, oov


def convert(recs: list[dict], out: str, tok: WordPieceTokenizer, ans2label: dict[str, int], *,
            image_id_template: str, train: bool, overwrite: bool = False,
            source: dict | None = None, skip_bad: bool = False) -> dict:
  """Writes the records; returns the manifest (counts under manifest['vqa'])."""
  if not recs:
    raise fmt.DataError("no questions in the input: nothing to convert")
  annotated = "answers" in recs[0]
  fields = {"question": "str", "question_id": "int"}
  if annotated:
    fields.update(answers="str_list", labels="int_list", scores="float_list", answer_type="str",
                  question_type="str")
  counts = collections.Counter()
  with fmt.DatasetWriter(out, overwrite=overwrite, tokenizer=tok.info(), text_fields=fields,
                         source="data_prep.vqa", skip_bad=skip_bad) as w:
    for r in recs:
      rec = {"id": str(r["question_id"]), "question": r["question"],
             "question_id": r["question_id"], "input_ids": tok.encode(r["question"]),
             "image_id": format_image_id(image_id_template, r["image_id"],
                                         f"question {r['question_id']}")}
      if annotated:
        labels, scores, oov = targets(r["answers"], ans2label)
        counts["answers_out_of_vocab"] += oov
        if not labels:
          counts["questions_without_vocab_answer"] += 1
          if train:
            counts["questions_dropped"] += 1
            continue
        rec.update(answers=r["answers"], labels=labels, scores=scores,
                   answer_type=r["answer_type"], question_type=r["question_type"])
      w.add_text(rec)
      counts["questions_written"] += 1
    w.extra["vqa"] = {"counts": dict(counts), "num_answers": len(ans2label),
                      "score": "official VQA accuracy of the answer (10 choose 9 average)",
                      **(source or {})}
    w.add_file(ANS2LABEL, json.dumps(ans2label).encode("utf-8"))  # published with the shards
  manifest = fmt.read_manifest(out)
  common.print_summary(manifest, out)
  print(f"vqa: {dict(counts)}", file=sys.stderr)
  return manifest


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.vqa", __doc__)
  parser.add_argument("--questions", nargs="*", default=[], help="VQA v2 questions JSON file(s)")
  parser.add_argument("--annotations", nargs="*", default=[],
                      help="the matching annotations JSON file(s) (none: questions only, e.g. test)")
  parser.add_argument("--vg-qa", nargs="*", default=[], help="Visual Genome question_answers.json")
  common.add_vocab_args(parser)
  parser.add_argument("--image-id-template", default="{image_id}",
                      help="image id format, e.g. 'coco_train2014_{image_id:012d}'")
  parser.add_argument("--ans2label", default="", help="answer vocabulary to use (JSON answer -> id)")
  parser.add_argument("--min-answer-count", type=int, default=9,
                      help="without --ans2label: keep answers that top this many questions")
  parser.add_argument("--eval", action="store_true",
                      help="keep questions without an in-vocabulary answer (val / test splits)")
  common.add_output_args(parser, images=False, skip_bad="skip questions that tokenise to nothing (counted)")
  args = parser.parse_args(argv)
  if args.annotations and len(args.annotations) != len(args.questions):
    parser.error("give one --annotations file per --questions file (or none)")
  common.check_out(args.out, args.overwrite, inputs=[*args.questions, *args.annotations, *args.vg_qa,
                                                     args.vocab,
                                                     *([args.ans2label] if args.ans2label else [])])
  recs = []
  for i, q in enumerate(args.questions):
    recs += read_vqa(q, args.annotations[i] if args.annotations else None)
  for p in args.vg_qa:
    recs += read_vg_qa(p)
  if args.ans2label:
    ans2label = {normalize_answer(a): int(i) for a, i in _load_json(args.ans2label).items()}
  elif recs and "answers" in recs[0]:
    ans2label = build_ans2label(recs, args.min_answer_count)
  else:
    parser.error("questions without annotations need --ans2label (the training vocabulary)")
  tok = common.load_tokenizer(args.vocab, args.lowercase)
  return convert(recs, args.out, tok, ans2label, image_id_template=args.image_id_template,
                 train=not args.eval, overwrite=args.overwrite, skip_bad=args.skip_bad,
                 source={"questions": args.questions, "annotations": args.annotations,
                         "vg_qa": args.vg_qa})


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
