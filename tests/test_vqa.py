"""VQA: head and loss vs NumPy, the VQA metric and answer normalisation, data_prep.vqa.

The official VQA fixture (head weights, logits and loss of the official code) is reproduced in
tests/test_parity_official.py (`vqa` cases); it is not repeated here. Fine-tuning end to end is
in tests/test_vqa_finetune.py.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import random_batch, tiny_config, to_jnp
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import vqa as ev
from uniter_jax.models.vqa import UniterForVqa, vqa_loss
from uniter_jax.tasks.vqa import soft_targets


def _np_head(p, pooled):
  h = pooled @ p["dense"]["kernel"] + p["dense"]["bias"]
  h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / np.sqrt(2.0)))
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / np.sqrt(var + 1e-12) * p["LayerNorm"]["scale"] + p["LayerNorm"]["bias"]
  return h @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def test_head_targets_and_loss_match_numpy():
  cfg = tiny_config()
  model = UniterForVqa(cfg, 7, rngs=nnx.Rngs(0))
  # Non-trivial LayerNorm and biases so a dropped term shows.
  rng = np.random.default_rng(0)
  head = nnx.state(model.vqa_output, nnx.Param)
  head = nnx.to_pure_dict(head)
  for mod in head.values():
    for k in mod:
      mod[k] = np.asarray(mod[k]) + rng.normal(0, 0.1, np.shape(mod[k])).astype(np.float32)
  nnx.replace_by_pure_dict(st := nnx.state(model.vqa_output, nnx.Param), head)
  nnx.update(model.vqa_output, st)
  batch = to_jnp(random_batch(0, b=4, cfg=cfg))
  pooled = np.asarray(model.encode(batch).pooled, np.float64)
  logits = np.asarray(model(batch))
  want = _np_head(jax_tree_np(head), pooled)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)

  labels = np.array([[0, 3, -1], [6, -1, -1], [-1, -1, -1], [2, 5, 1]], np.int32)
  scores = np.array([[1.0, 0.3, 0.0], [0.6, 0.0, 0.0], [0.0, 0.0, 0.0], [0.9, 0.3, 1.0]],
                    np.float32)
  dense = np.zeros((4, 7), np.float32)
  for i in range(4):
    for l, s in zip(labels[i], scores[i]):
      if l >= 0:
        dense[i, l] += s
  t = np.asarray(soft_targets(jnp.asarray(labels), jnp.asarray(scores), 7))
  np.testing.assert_allclose(t, dense)
  x = logits.astype(np.float64)
  bce = np.maximum(x, 0) - x * dense + np.log1p(np.exp(-np.abs(x)))
  want_loss = bce.sum(1).mean()  # = mean over all elements x num_answers (official)
  np.testing.assert_allclose(float(vqa_loss(jnp.asarray(logits), jnp.asarray(t))), want_loss,
                             rtol=1e-5)


def jax_tree_np(tree):
  return {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in tree.items()}


@pytest.mark.parametrize("raw,want", [
    ("Two", "2"), ("the red, ball.", "red ball"), ("a dog", "dog"), ("dont", "don't"),
    ("1,000", "1000"), ("3.5", "3.5"), ("yes!", "yes"), ("an apple", "apple"),
    ("none", "0"), ("  ten\n", "10"), ("left-side", "left side"),
    # Contractions as the official evaluator's table has them (read from its source):
    ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"), ("couldntve", "couldntve"),
    ("twas", "'twas"), ("yall'll", "y'all'll"), ("wed've", "we'd've"), ("hed", "he'd"),
    ("im", "im"), ("shes", "shes"), ("lets go", "lets go"), ("its", "its"), ("wed", "wed"),
])
def test_normalize_answer(raw, want):
  assert ev.normalize_answer(raw) == want


def test_question_accuracy_hand_computed():
  # 10 choose 9 average: an answer given by k humans scores 0.3, 0.6, 0.9, 1.0 for k = 1..4.
  for k, want in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
    gts = ["cat"] * k + ["dog"] * (10 - k)
    assert ev.question_accuracy("cat", gts) == pytest.approx(want), k
  # "two" is normalised to the humans' "2" when the humans disagree: 3 of 10 said 2.
  gts = ["2"] * 3 + ["3"] * 7
  assert ev.question_accuracy("two", gts) == pytest.approx(0.9)
  assert ev.question_accuracy("a dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
  assert ev.question_accuracy("yes!", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
  # All humans agree: the official evaluation compares the stripped strings as they are.
  assert ev.question_accuracy("yes", ["yes"] * 10) == 1.0
  assert ev.question_accuracy("yes!", ["yes"] * 10) == 0.0


def test_score_split_per_type_and_soft_fallback():
  label2ans = ["yes", "no", "2"]
  fields = {"answers": [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["no"] * 10],
            "labels": [[0], [2], [1]], "scores": [[1.0], [0.6], [1.0]],
            "answer_type": ["yes/no", "number", "yes/no"]}
  out = ev.score_split({0: 0, 1: 2, 2: 0}, label2ans, fields)
  assert out["vqa_score"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
  assert out["vqa_score/yes/no"] == pytest.approx(0.5)
  assert out["vqa_score/number"] == pytest.approx(0.6)
  assert out["questions"] == 3
  no_raw = {k: v for k, v in fields.items() if k != "answers"}
  assert ev.score_split({1: 2}, label2ans, no_raw)["vqa_score"] == pytest.approx(0.6)
  with pytest.raises(ValueError, match="neither"):
    ev.score_split({0: 0}, label2ans, {"question_type": ["a"]})


def _vqa_json(tmp_path, questions, answers, name="train"):
  qs = [{"question_id": qid, "image_id": img, "question": q} for qid, img, q in questions]
  anns = [{"question_id": qid, "image_id": img, "answer_type": at, "question_type": "how many",
           "multiple_choice_answer": ans[0],
           "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                       for i, a in enumerate(ans)]}
          for (qid, img, _), (at, ans) in zip(questions, answers)]
  qp, ap = tmp_path / f"q_{name}.json", tmp_path / f"a_{name}.json"
  qp.write_text(json.dumps({"questions": qs}))
  ap.write_text(json.dumps({"annotations": anns}))
  return str(qp), str(ap)


def test_data_prep_vqa(tiny_world, tmp_path):
  from data_prep import vqa as prep
  vocab = f"{tiny_world}/vocab.txt"
  questions = [(101, 3, "how many red circles are there ?"),
               (102, 3, "is there a blue square ?"),
               (103, 7, "what colour is the star ?")]
  answers = [("number", ["Two", "2", "2", "two.", "3", "3", "2", "2", "three", "2"]),
             ("yes/no", ["yes"] * 9 + ["no"]),
             ("other", ["magenta"] * 10)]  # not in the vocabulary given below
  qp, ap = _vqa_json(tmp_path, questions, answers)
  a2l = tmp_path / "ans2label.json"
  a2l.write_text(json.dumps({"yes": 0, "no": 1, "2": 2, "3": 3}))
  out = str(tmp_path / "vqa_train")
  m = prep.main(["--questions", qp, "--annotations", ap, "--vocab", vocab, "--ans2label",
                 str(a2l), "--image-id-template", "synth_{image_id:06d}", "--out", out])
  counts = m["vqa"]["counts"]
  assert counts == {"answers_out_of_vocab": 1, "questions_without_vocab_answer": 1,
                    "questions_dropped": 1, "questions_written": 2}
  recs = {r["question_id"]: r for r in fmt.iter_text_records(out)}
  assert sorted(recs) == [101, 102]
  r = recs[101]
  assert r["image_id"] == "synth_000003" and r["id"] == "101"
  assert r["answers"] == ["2", "2", "2", "2", "3", "3", "2", "2", "3", "2"]  # normalised
  assert dict(zip(r["labels"].tolist(), r["scores"].tolist())) == pytest.approx({2: 1.0, 3: 0.9})
  assert dict(zip(recs[102]["labels"].tolist(), recs[102]["scores"].tolist())) \
      == pytest.approx({0: 1.0, 1: 0.3})
  assert json.loads((tmp_path / "vqa_train" / "ans2label.json").read_text())["3"] == 3

  # Eval split keeps the unanswerable question; the vocabulary is built with a min count.
  out_val = str(tmp_path / "vqa_val")
  prep.main(["--questions", qp, "--annotations", ap, "--vocab", vocab, "--min-answer-count", "1",
             "--eval", "--image-id-template", "synth_{image_id:06d}", "--out", out_val])
  built = json.loads((tmp_path / "vqa_val" / "ans2label.json").read_text())
  assert set(built) == {"2", "yes", "magenta"}
  assert len(list(fmt.iter_text_records(out_val))) == 3

  # Test split: questions only; an empty input is an error.
  prep.main(["--questions", qp, "--vocab", vocab, "--ans2label", str(a2l), "--out",
             str(tmp_path / "vqa_test")])
  rec = next(iter(fmt.iter_text_records(str(tmp_path / "vqa_test"))))
  assert set(rec) >= {"question", "question_id"} and "labels" not in rec
  # Visual Genome QA: one answer per question, a target of score 1 when in the vocabulary.
  vg = tmp_path / "question_answers.json"
  vg.write_text(json.dumps([{"id": 3, "qas": [
      {"qa_id": 9001, "image_id": 3, "question": "What color is the star?", "answer": "Yes."},
      {"qa_id": 9002, "image_id": 3, "question": "Where is it?", "answer": "on the table"}]}]))
  m = prep.main(["--vg-qa", str(vg), "--vocab", vocab, "--ans2label", str(a2l),
                 "--image-id-template", "synth_{image_id:06d}", "--out", str(tmp_path / "vg")])
  vg_recs = {r["question_id"]: r for r in fmt.iter_text_records(str(tmp_path / "vg"))}
  assert sorted(vg_recs) == [9001]  # "on table" is outside the vocabulary: dropped, counted
  assert vg_recs[9001]["labels"].tolist() == [0] and vg_recs[9001]["scores"].tolist() == [1.0]
  assert m["vqa"]["counts"]["questions_dropped"] == 1

  empty_q = tmp_path / "empty.json"
  empty_q.write_text(json.dumps({"questions": []}))
  with pytest.raises(fmt.DataError, match="no questions"):
    prep.main(["--questions", str(empty_q), "--vocab", vocab, "--ans2label", str(a2l),
               "--out", str(tmp_path / "vqa_empty")])
