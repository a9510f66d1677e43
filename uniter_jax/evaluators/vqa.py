"""VQA evaluation: the official answer normalisation, VQA accuracy and results.json.

Accuracy of a predicted answer on one question with 10 human answers (the official VQA
evaluation): for each of the 10 annotators, min(#other 9 annotators who gave the answer / 3, 1),
averaged over the 10 (so 1, 2, 3, >= 4 matching humans give 0.3, 0.6, 0.9, 1.0). When the
annotators disagree, the prediction is normalised (punctuation, number words, articles,
contractions) and the human answers get the punctuation step, as the official evaluation does.
Without raw answers (a dataset that stores only labels and soft scores) the stored soft score
of the predicted answer is used instead.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from uniter_jax import files

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# Contractions as the official VQA evaluation restores them, built by rule: a word with one
# apostrophe is looked up without it; a word with several is looked up with exactly one of them
# missing (so "couldnt've" and "couldn'tve" map, "couldntve" does not). Forms the official table
# lacks stay unmapped ("im", "ive", "shes", "lets", "shed", "wed", "its", ...): its capitalised
# I-forms never match the lower-cased words it looks up. One official quirk is kept on purpose
# (somebody'd -> somebodyd), so scores stay comparable with the evaluation server.
_ONE_APOSTROPHE = (
    "'twas", "ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't",
    "hadn't", "hasn't", "haven't", "he'd", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'll", "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't", "not've",
    "o'clock", "oughtn't", "shan't", "should've", "shouldn't", "somebody'll", "somebody's",
    "someone'd", "someone'll", "someone's", "something'd", "something'll", "that's", "there'd",
    "there're", "there's", "they'd", "they'll", "they're", "they've", "wasn't", "we've",
    "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
    "where've", "who'd", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "y'all", "you'd", "you'll", "you're", "you've")
_SEVERAL_APOSTROPHES = (
    "'ow's'at", "couldn't've", "hadn't've", "he'd've", "it'd've", "mightn't've", "she'd've",
    "shouldn't've", "somebody'd've", "someone'd've", "something'd've", "there'd've",
    "they'd've", "we'd've", "who'd've", "wouldn't've", "y'all'd've", "y'all'll", "you'd've")


def _contractions() -> dict[str, str]:
  table = {w.replace("'", ""): w for w in _ONE_APOSTROPHE}
  for w in _SEVERAL_APOSTROPHES:
    cuts = [i for i, ch in enumerate(w) if ch == "'"]
    table.update({w[:i] + w[i + 1:]: w for i in cuts})
  table["somebody'd"] = "somebodyd"  # the official table's own (reversed) entry
  return table


_CONTRACTIONS = _contractions()
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern: a period not before a digit


def process_punctuation(text: str) -> str:
  """Drops punctuation next to a space (or everywhere in '1,000'-like text), else spaces it."""
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _DIGIT_COMMA_DIGIT.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
  """Lower-cases, number words -> digits, drops articles, restores contractions."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def _clean(ans: str) -> str:
  return ans.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(ans: str) -> str:
  """The full official normalisation (used for vocabularies and human answers)."""
  return process_digit_article(process_punctuation(_clean(ans)))


def question_accuracy(pred: str, human_answers: Sequence[str]) -> float:
  """Official VQA accuracy of `pred` on one question (see the module docstring)."""
  gts = [_clean(a) for a in human_answers]
  res = _clean(pred)
  if len(set(gts)) > 1:
    gts = [process_punctuation(a) for a in gts]
    res = process_digit_article(process_punctuation(res))
  if not gts:
    return 0.0
  matches = sum(g == res for g in gts)
  # Leaving annotator i out: the others match matches - [gts[i] == res] times.
  accs = [min(1.0, (matches - (g == res)) / 3.0) for g in gts]
  return float(np.mean(accs))


def soft_score(pred_label: int, labels: Iterable[int], scores: Iterable[float]) -> float:
  """The stored soft score of the predicted answer id (0 when it is not among the targets)."""
  return float(dict(zip((int(x) for x in labels), (float(s) for s in scores))).get(
      int(pred_label), 0.0))


def score_split(preds: Mapping[int, int], label2ans: Sequence[str], fields: Mapping[str, list],
                ) -> dict:
  """VQA metrics of predictions {text index: answer id} over a split's task fields.

  Uses the official accuracy on `answers` (raw human answers) when present, else the stored
  soft score; `soft_score` (stored scores, the synthetic manifest's definition) is reported too
  when labels / scores exist. Per answer type (`answer_type`, else `question_type`) when present.
  """
  raw = fields.get("answers")
  types = fields.get("answer_type", fields.get("question_type"))
  has_soft = "labels" in fields and "scores" in fields
  if raw is None and not has_soft:
    raise ValueError("the split has neither raw human answers ('answers') nor labels/scores")
  acc, soft = [], []
  by_type: dict[str, list[float]] = collections.defaultdict(list)
  for i, lab in sorted(preds.items()):
    s = soft_score(lab, fields["labels"][i], fields["scores"][i]) if has_soft else None
    a = question_accuracy(label2ans[lab], raw[i]) if raw is not None else s
    acc.append(a)
    if s is not None:
      soft.append(s)
    if types is not None:
      by_type[str(types[i])].append(a)
  out = {"vqa_score": float(np.mean(acc)) if acc else 0.0, "questions": len(acc)}
  if soft:
    out["soft_score"] = float(np.mean(soft))
  for t, v in sorted(by_type.items()):
    out[f"vqa_score/{t}"] = float(np.mean(v))
  return out


def question_ids(text_ids: Sequence[str], fields: Mapping[str, list]) -> list:
  """The test-server question id of every text: the `question_id` field, else the text id
  (as an int when it is one, as VQA v2 ids are)."""
  if "question_id" in fields:
    return [int(q) for q in fields["question_id"]]
  return [int(t) if t.isdigit() else t for t in text_ids]


def write_results(path: str, qids: Sequence, answers: Sequence[str]) -> str:
  """results.json in the test-server format: [{"question_id": ..., "answer": str}, ...]."""
  if len(set(qids)) != len(qids):
    dup = [q for q, n in collections.Counter(qids).items() if n > 1][:5]
    raise ValueError(f"duplicate question ids in the results: {dup}")
  rows = [{"question_id": q, "answer": str(a)} for q, a in zip(qids, answers)]
  # files: one writer among several processes, and no half-written file for a reader.
  files.write_bytes(path, json.dumps(rows).encode(), overwrite=True)
  return path
