"""Dataset format: tokenizer, writer (atomic, validating), readers and their bad-input errors."""

import json
import os

import numpy as np
import pytest

from uniter_jax.data import BoxPolicy, DataError, WordPieceTokenizer, iter_image_records, iter_text_records
from uniter_jax.data import read_manifest, write_dataset
from uniter_jax.data.boxes import img_pos_from_norm_bb

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "runn", "##ing", ",", "the",
         "The", "caf", "##é", "cafe", "!", "力", "a", "##b"]


@pytest.fixture
def vocab(tmp_path):
  p = tmp_path / "vocab.txt"
  p.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
  return p


def test_wordpiece_cased(vocab):
  tok = WordPieceTokenizer(vocab)
  v = tok.vocab
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.tokenize("unaffable  running,\tThe!") == ["un", "##aff", "##able", "runn", "##ing", ",", "The", "!"]
  assert tok.encode("The the") == [v["The"], v["the"]]
  assert tok.tokenize("café") == ["caf", "##é"]  # cased: accents kept
  assert tok.tokenize("unknownword xyz") == ["[UNK]", "[UNK]"]  # no full match -> one [UNK] per word
  assert tok.tokenize("a力ab") == ["a", "力", "a", "##b"]  # CJK characters split off
  assert tok.tokenize("[MASK] ab") == ["[MASK]", "a", "##b"]  # special tokens stay whole
  assert tok.tokenize("a\x00b\u200b") == ["a", "##b"]  # control / format characters dropped
  assert tok.decode(tok.encode("unaffable")) == "unaffable"
  assert len(tok.ids_to_tokens) == len(VOCAB) and tok.ids_to_tokens[5] == "un"


def test_wordpiece_lowercase_and_hash(vocab, tmp_path):
  tok = WordPieceTokenizer(vocab, lowercase=True)
  assert tok.tokenize("THE Café") == ["the", "cafe"]
  crlf = tmp_path / "crlf.txt"
  crlf.write_bytes("\r\n".join(VOCAB).encode())
  assert WordPieceTokenizer(crlf).vocab_hash == tok.vocab_hash  # line endings do not change the hash
  other = tmp_path / "other.txt"
  other.write_text("\n".join(VOCAB[:-1] + ["##c"]))
  assert WordPieceTokenizer(other).vocab_hash != tok.vocab_hash
  bad = tmp_path / "bad.txt"
  bad.write_text("a\nb\n")
  with pytest.raises(ValueError, match=r"lacks special token.*\[PAD\]"):
    WordPieceTokenizer(bad)


def _img(i, n=4, d=6, **kw):
  rng = np.random.default_rng(i)
  rec = {"image_id": f"im{i}", "features": rng.normal(size=(n, d)), "norm_bb": rng.uniform(size=(n, 6)),
         "conf": np.linspace(0.9, 0.1, n)}
  rec.update(kw)
  return rec


def test_round_trip_and_manifest(tmp_path):
  imgs = [_img(i, n=3 + i) for i in range(5)]
  imgs[0]["soft_labels"] = None
  for r in imgs:
    r["soft_labels"] = np.full((len(r["conf"]), 3), 1 / 3)
  texts = [{"id": j, "image_id": f"im{j % 5}", "input_ids": [5, 6, 7][: 1 + j % 3], "answer": "yes",
            "labels": [1, 2], "scores": [1, 0.5], "target": j} for j in range(9)]
  m = write_dataset(tmp_path / "ds", imgs, texts, box_policy=BoxPolicy(min_bb=1, max_bb=5),
                    tokenizer={"cls_id": 2, "sep_id": 3, "vocab_size": 20}, extraction={"detector": "x"},
                    shard_mb=0.0005, texts_per_shard=4)
  assert len(m["images"]["shards"]) > 1 and len(m["texts"]["shards"]) == 3
  assert m["texts"]["fields"] == {"answer": "str", "labels": "int_list", "scores": "float_list", "target": "int"}
  assert m["images"]["extraction"] == {"detector": "x"} and m["schema_version"] == 1
  got = list(iter_image_records(tmp_path / "ds"))
  assert [r["image_id"] for r in got] == [f"im{i}" for i in range(5)]
  for src, r in zip(imgs, got):
    keep = BoxPolicy(min_bb=1, max_bb=5).count(src["conf"], len(src["conf"]))
    assert r["num_boxes"] == keep and r["features"].dtype == np.float16
    np.testing.assert_allclose(r["features"], src["features"][:keep], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(r["img_pos"], img_pos_from_norm_bb(src["norm_bb"][:keep]), rtol=1e-6)
    np.testing.assert_allclose(r["soft_labels"], 1 / 3, rtol=1e-3)
  got_t = list(iter_text_records(tmp_path / "ds"))
  assert [t["id"] for t in got_t] == [str(j) for j in range(9)]
  assert got_t[4]["input_ids"].tolist() == [5, 6] and got_t[4]["answer"] == "yes"
  assert got_t[4]["labels"].tolist() == [1, 2] and got_t[4]["scores"].tolist() == [1.0, 0.5]
  with pytest.raises(DataError, match="6-d.*2048-d were asked"):
    next(iter_image_records(tmp_path / "ds", feat_dim=2048))


def test_atomic_write_and_overwrite(tmp_path):
  def broken():
    yield _img(0)
    raise KeyboardInterrupt  # an interrupted conversion

  with pytest.raises(KeyboardInterrupt):
    write_dataset(tmp_path / "ds", broken())
  assert os.listdir(tmp_path) == []  # neither the dataset nor its temporary folder remains
  write_dataset(tmp_path / "ds", [_img(0)])
  with pytest.raises(FileExistsError, match="--overwrite"):
    write_dataset(tmp_path / "ds", [_img(1)])
  # A failing overwrite keeps the old data.
  with pytest.raises(DataError):
    write_dataset(tmp_path / "ds", [_img(1), _img(2, d=7)], overwrite=True)
  assert [r["image_id"] for r in iter_image_records(tmp_path / "ds")] == ["im0"]
  write_dataset(tmp_path / "ds", [_img(1)], overwrite=True)
  assert [r["image_id"] for r in iter_image_records(tmp_path / "ds")] == ["im1"]
  assert sorted(os.listdir(tmp_path)) == ["ds"]


@pytest.mark.parametrize(
    "rec,reason,match",
    [
        (_img(1, n=0), "zero_boxes", "'im1'.*zero boxes"),
        (_img(1, features=np.full((4, 6), np.nan)), "non_finite", "'im1'.*NaN or inf in features"),
        (_img(1, features=np.full((4, 6), 1e6)), "non_finite", "float16 range"),
    ],
)
def test_bad_images_error_or_counted_skip(tmp_path, rec, reason, match):
  with pytest.raises(DataError, match=match + ".*skip-bad"):
    write_dataset(tmp_path / "a", [_img(0), rec])
  m = write_dataset(tmp_path / "b", [_img(0), rec], skip_bad=True)
  assert m["skipped"] == {reason: 1} and m["skipped_examples"] == {reason: ["im1"]} and m["images"]["count"] == 1


def test_bad_records_are_named(tmp_path):
  with pytest.raises(DataError, match="'im1'.*feature dim 7 differs from 6"):
    write_dataset(tmp_path / "a", [_img(0), _img(1, d=7)])
  with pytest.raises(DataError, match="duplicate image_id"):
    write_dataset(tmp_path / "a", [_img(0), _img(0)])
  tok = {"cls_id": 2, "sep_id": 3, "vocab_size": 10}
  with pytest.raises(DataError, match=r"text '1'.*token id 12 outside the vocab \[0, 10\)"):
    write_dataset(tmp_path / "a", texts=[{"id": 0, "image_id": "a", "input_ids": [5]},
                                         {"id": 1, "image_id": "a", "input_ids": [12]}], tokenizer=tok)
  with pytest.raises(DataError, match="text '1'.*fields differ"):
    write_dataset(tmp_path / "a", texts=[{"id": 0, "image_id": "a", "input_ids": [5], "t": 1},
                                         {"id": 1, "image_id": "a", "input_ids": [5]}])
  with pytest.raises(DataError, match="'t' = 0.5 does not fit its type 'int'"):
    write_dataset(tmp_path / "a", texts=[{"id": 0, "image_id": "a", "input_ids": [5], "t": 1},
                                         {"id": 1, "image_id": "a", "input_ids": [5], "t": 0.5}])
  assert not os.path.exists(tmp_path / "a")


def test_corrupt_and_truncated_shards_are_named(tmp_path):
  write_dataset(tmp_path / "ds", [_img(i) for i in range(3)])
  shard = tmp_path / "ds" / "images-00000.tfrecord"
  raw = bytearray(shard.read_bytes())
  shard.write_bytes(raw[:-10])
  with pytest.raises(DataError, match="images-00000.tfrecord is .* bytes but the manifest says.*truncated"):
    list(iter_image_records(tmp_path / "ds"))
  raw[len(raw) // 2] ^= 0xFF  # same size, flipped byte: the TFRecord CRC catches it
  shard.write_bytes(bytes(raw))
  with pytest.raises(DataError, match="images-00000.tfrecord is corrupt or truncated at record"):
    list(iter_image_records(tmp_path / "ds"))


def test_manifest_checks(tmp_path):
  with pytest.raises(DataError, match="not a dataset folder"):
    read_manifest(tmp_path)
  write_dataset(tmp_path / "ds", [_img(0)])
  mpath = tmp_path / "ds" / "manifest.json"
  m = json.loads(mpath.read_text())
  m["schema_version"] = 99
  mpath.write_text(json.dumps(m))
  with pytest.raises(DataError, match="newer than this code reads"):
    read_manifest(tmp_path / "ds")
