"""The VCR converter on small files in the real VCR layout: object references become the grown
vocabulary's [OBJ_j] tokens (region j), the 4 + 4 choices and labels land in the task's fields,
references beyond the 81 tokens are counted, and gt objects come first in the image records.
The task's sequence builder then reads a converted question back."""

import json

import jax
import numpy as np
import pytest

from data_prep import vcr
from uniter_jax.data import DataError, iter_image_records, iter_text_records
from uniter_jax.tasks.vcr_inputs import choice_batch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "why", "is", "smiling", "?", "he", "happy",
         "sad", "it", "a", "dog", ".", "person", "horse"]


def _line(annot_id, question, labels=(1, 2), objects=("person", "person", "horse")):
  row = {"annot_id": annot_id, "img_fn": "lsmdc_x/clip@1.jpg", "objects": list(objects),
         "question": question,
         "answer_choices": [["he", "is", "happy"], [[1], "is", "sad"], ["it", "is", "a", "dog"],
                            [[0, 2]]],
         "rationale_choices": [["."], [[2]], ["why", "?"], ["sad"]]}
  if labels is not None:
    row["answer_label"], row["rationale_label"] = labels
  return json.dumps(row)


@pytest.fixture()
def files(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  (tmp_path / "val.jsonl").write_text(
      _line("val-0", ["why", "is", [0], "smiling", "?"]) + "\n"
      + _line("val-1", ["why", "is", [90], "?"], labels=None,
              objects=["person"] * 91) + "\n")
  return tmp_path


def _convert(files):
  vocab = vcr.write_grown_vocab(str(files / "vocab.txt"), str(files / "vcr_vocab.txt"))
  tok = vcr.common.load_tokenizer(vocab, False)
  manifest = vcr.convert_texts([str(files / "val.jsonl")], str(files / "txt"), tok)
  return manifest, {r["id"]: r for r in iter_text_records(str(files / "txt"))}, tok


def test_references_become_region_tokens_and_choices_land_in_fields(files):
  manifest, recs, tok = _convert(files)
  obj = len(VOCAB)  # [OBJ_0] follows the BERT lines
  assert tok.vocab["[OBJ_0]"] == obj and tok.vocab_size == len(VOCAB) + 81
  r = recs["val-0"]
  assert list(r["input_ids"]) == [VOCAB.index("why"), VOCAB.index("is"), obj + 0,
                                  VOCAB.index("smiling"), VOCAB.index("?")]
  assert r["image_id"] == "clip@1" and (r["qa_target"], r["qar_target"]) == (1, 2)
  assert list(r["lens_as"]) == [3, 3, 4, 2] and list(r["lens_rs"]) == [1, 1, 2, 1]
  # answer 3 is "[0, 2]": two region tokens
  assert list(r["input_ids_as"][-2:]) == [obj + 0, obj + 2]
  assert sorted(r["tag_regions"]) == [0, 1, 2]
  # An unlabelled line (test set) keeps -1; object 90 has no token: its name, counted.
  u = recs["val-1"]
  assert (u["qa_target"], u["qar_target"]) == (-1, -1)
  assert list(u["input_ids"])[2] == VOCAB.index("person")
  assert manifest["skipped"]["unresolved_references"] == 1
  # The task's in-step builder reads the converted question: [CLS] Q [SEP] A_1 [SEP].
  q = np.array([[2] + list(r["input_ids"]) + [3] + [0] * 3], np.int32)
  width = max(len(r["input_ids_as"]), 1)
  batch = {"input_ids": q, "txt_mask": q > 0,
           "input_ids_as": np.array([list(r["input_ids_as"])], np.int32).reshape(1, width),
           "lens_as": np.array([list(r["lens_as"])], np.int32)}
  out = jax.tree.map(np.asarray, choice_batch(batch, "qa", max_choice_len=4))
  n = int(out["txt_mask"][1].sum())
  assert list(out["input_ids"][1, :n]) == [2] + list(r["input_ids"]) + [3, obj + 1,
                                                                        VOCAB.index("is"),
                                                                        VOCAB.index("sad"), 3]


def test_grown_vocab_is_never_overwritten_with_other_contents(files):
  (files / "other.txt").write_text("mine\n")
  with pytest.raises(FileExistsError, match="other contents"):
    vcr.write_grown_vocab(str(files / "vocab.txt"), str(files / "other.txt"))
  assert (files / "other.txt").read_text() == "mine\n"
  with pytest.raises(DataError, match="reference to object 7"):
    (files / "bad.jsonl").write_text(_line("v", ["why", [7]]) + "\n")
    tok = vcr.common.load_tokenizer(
        vcr.write_grown_vocab(str(files / "vocab.txt"), str(files / "g.txt")), False)
    vcr.convert_texts([str(files / "bad.jsonl")], str(files / "o"), tok)


def test_images_put_the_objects_first(files):
  gt, det = files / "gt", files / "det"
  gt.mkdir()
  det.mkdir()
  bb = lambda n: np.tile(np.array([[0.1, 0.1, 0.5, 0.5, 0.4, 0.4]], np.float32), (n, 1))  # noqa: E731
  np.savez(gt / "clip@1.npz", features=np.ones((3, 4), np.float32), norm_bb=bb(3))
  np.savez(det / "clip@1.npz", features=np.zeros((2, 4), np.float32), norm_bb=bb(2),
           conf=np.array([0.9, 0.4], np.float32))
  vcr.convert_images(str(gt), str(det), str(files / "img"))
  rec = next(iter_image_records(str(files / "img")))
  assert rec["num_boxes"] == 5
  np.testing.assert_array_equal(rec["features"][:, 0], [1, 1, 1, 0, 0])
  np.testing.assert_allclose(rec["conf"], [1, 1, 1, 0.9, 0.4])
