"""VCR: the in-step (question, choice) sequences against the official vcr_collate layout and a
hand-built QA->R case, and fine-tuning end to end on the tiny synthetic world (8-device mesh):
the three accuracies on val, and the leaderboard CSV with every test question once."""

import csv
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from configs import vcr as vcr_config
from uniter_jax import train
from uniter_jax.data import format as fmt
from uniter_jax.tasks.vcr_inputs import ANSWER, QUESTION, RATIONALE, choice_batch
from helpers import world_config

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_small"
build = jax.jit(choice_batch, static_argnames=("kind", "max_choice_len"))


def _question_rows(questions, answers, rationales=None, qa_target=None, lt=12):
  """Our pipeline layout: [CLS]=1 Q [SEP]=2 per question, choices as flat lists + lengths."""
  b = len(questions)
  ids = np.zeros((b, lt), np.int32)
  for i, q in enumerate(questions):
    ids[i, :len(q) + 2] = [1, *q, 2]
  flat = lambda cs: [t for c in cs for t in c]  # noqa: E731
  width = max(len(flat(a)) for a in answers)
  batch = {"input_ids": ids, "txt_mask": ids > 0,
           "input_ids_as": np.array([flat(a) + [-1] * (width - len(flat(a))) for a in answers]),
           "lens_as": np.array([[len(c) for c in a] for a in answers])}
  if rationales is not None:
    width = max(len(flat(r)) for r in rationales)
    batch["input_ids_rs"] = np.array([flat(r) + [-1] * (width - len(flat(r))) for r in rationales])
    batch["lens_rs"] = np.array([[len(c) for c in r] for r in rationales])
    batch["qa_target"] = np.array(qa_target)
  return batch


def test_qa_sequences_equal_the_official_collate():
  """batch_vcr.npz: 2 questions x 4 answers from the official VcrDataset + vcr_collate."""
  raw = np.load(FIXTURE / "batch_vcr.npz")
  lens = raw["aux.txt_lens"]
  questions, answers = [], []
  for q in range(2):
    rows = raw["input_ids"][4 * q:4 * q + 4]
    sep = int(np.nonzero(rows[0] == 2)[0][0])  # the [SEP] closing the question
    questions.append(rows[0, 1:sep].tolist())
    answers.append([rows[c, sep + 1:lens[4 * q + c] - 1].tolist() for c in range(4)])
  out = jax.tree.map(np.asarray, build(_question_rows(questions, answers), kind="qa",
                                       max_choice_len=12))
  for r in range(8):
    n = lens[r]
    np.testing.assert_array_equal(out["input_ids"][r, :n], raw["input_ids"][r, :n])
    np.testing.assert_array_equal(out["txt_type_ids"][r, :n], raw["txt_type_ids"][r, :n])
    assert out["txt_mask"][r].sum() == n


def test_qar_sequences_by_hand():
  batch = _question_rows([[5, 6]], [[[7], [8, 8], [9], [10]]], [[[11], [12], [13, 13], [14]]],
                         qa_target=[1])
  out = jax.tree.map(np.asarray, build(batch, kind="qar", max_choice_len=3))
  q, a, r = QUESTION, ANSWER, RATIONALE
  # [CLS] 5 6 [SEP] | 8 8 [SEP] (gold answer 1) | R_c [SEP]
  want_ids = [[1, 5, 6, 2, 8, 8, 2, 11, 2], [1, 5, 6, 2, 8, 8, 2, 12, 2],
              [1, 5, 6, 2, 8, 8, 2, 13, 13, 2], [1, 5, 6, 2, 8, 8, 2, 14, 2]]
  for c, ids in enumerate(want_ids):
    n = len(ids)
    assert out["txt_mask"][c].sum() == n
    np.testing.assert_array_equal(out["input_ids"][c, :n], ids)
    np.testing.assert_array_equal(out["txt_type_ids"][c, :n],
                                  [q, q, q, a, a, a, r] + [r] * (n - 7))
  # Conditioned on another answer (the test mode's 16 sequences).
  other = jax.tree.map(np.asarray, build(batch, kind="qar", max_choice_len=3,
                                         answer=np.array([2])))
  np.testing.assert_array_equal(other["input_ids"][0, :8], [1, 5, 6, 2, 9, 2, 11, 2])


def _config(world, **overrides):
  return world_config(vcr_config, world, **overrides)


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vcr") / "run")
  return workdir, train.train_and_evaluate(_config(tiny_world), workdir)


def test_trains_evaluates_and_writes_the_leaderboard_csv(run, tiny_world):
  workdir, out = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(r) for r in f]
  assert all(np.isfinite(r["loss"]) for r in rows) and {"train_qa_accuracy", "train_qar_accuracy"} <= set(rows[-1])
  ev = out["eval"]
  val = list(fmt.iter_text_records(f"{tiny_world}/txt/vcr_val"))
  assert ev["vcr/questions"] == len(val)
  # Q->AR is right only where both are: at most the smaller of the two.
  assert ev["vcr/q_ar_accuracy"] <= min(ev["vcr/qa_accuracy"], ev["vcr/qar_accuracy"]) + 1e-9
  n = len(val[0]["answers"])  # choices per question: chance is a uniform pick among them
  assert [ev[f"vcr/{k}_chance"] for k in ("qa", "qar", "q_ar")] == [1 / n, 1 / n, 1 / n ** 2]
  res = train.train_and_evaluate(_config(tiny_world), workdir, mode="predict")
  with open(res["predictions"]) as f:
    table = list(csv.reader(f))
  assert table[0][:2] == ["annot_id", "answer_0"]
  assert table[0][-1] == "rationale_conditioned_on_a3_3" and len(table[0]) == 21
  test = [r["id"] for r in fmt.iter_text_records(f"{tiny_world}/txt/vcr_test")]
  assert sorted(r[0] for r in table[1:]) == sorted(test)
  assert all(np.isfinite([float(v) for v in r[1:]]).all() for r in table[1:])


def test_sequences_longer_than_the_position_table_are_refused(tiny_world, tmp_path):
  cfg = _config(tiny_world, **{"vcr.max_choice_len": 40})
  with pytest.raises(ValueError, match="config.vcr.max_choice_len"):
    train.train_and_evaluate(cfg, str(tmp_path / "long"))
