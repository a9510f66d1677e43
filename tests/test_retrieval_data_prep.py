"""data_prep.retrieval on a small hand-made Karpathy-split file (Flickr30k and COCO layouts)."""

import json
import os
import subprocess
import sys

import pytest

from data_prep import retrieval
from data_prep.common import load_tokenizer
from uniter_jax.data import DataError, iter_text_records, read_manifest
from helpers import vocab_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "a", "dog", "runs", "man", "on",
         "the", "beach", "."]
V = {t: i for i, t in enumerate(VOCAB)}


@pytest.fixture()
def vocab(tmp_path):
  return vocab_file(tmp_path, VOCAB)


def _karpathy(tmp_path, images, name="dataset_flickr30k.json"):
  path = tmp_path / name
  path.write_text(json.dumps({"images": images, "dataset": "x"}))
  return str(path)


def _img(filename, split, sents, imgid=0, **extra):
  return {"filename": filename, "imgid": imgid, "split": split, **extra,
          "sentences": [{"raw": s, "tokens": s.lower().split(), "sentid": 10 * imgid + k}
                        for k, s in enumerate(sents)]}


def test_flickr_split_with_official_image_ids(tmp_path, vocab):
  path = _karpathy(tmp_path, [
      _img("1000092795.jpg", "test", ["A dog runs.", "A man on the beach."], imgid=0),
      _img("10002456.jpg", "train", ["A dog."], imgid=1),
      _img("1007129816.jpg", "test", ["The man runs.", "A dog", "a dog"], imgid=2),
  ])
  out = str(tmp_path / "out")
  retrieval.convert(path, ["test"], out, load_tokenizer(vocab, False),
                    image_id_template="flickr30k_{image_id:012d}")
  recs = list(iter_text_records(out))
  assert [r["id"] for r in recs] == ["0", "1", "20", "21", "22"]
  assert [r["image_id"] for r in recs] == ["flickr30k_001000092795"] * 2 + [
      "flickr30k_001007129816"] * 3
  assert list(recs[0]["input_ids"]) == [V["A"], V["dog"], V["runs"], V["."]]  # cased "raw"
  assert recs[1]["text"] == "A man on the beach."
  assert read_manifest(out)["texts"]["count"] == 5


def test_coco_folder_template_and_tokens_fallback(tmp_path, vocab):
  img = _img("COCO_val2014_000000391895.jpg", "restval", ["A man ."], imgid=3,
             cocoid=391895, filepath="val2014")
  del img["sentences"][0]["raw"]  # tokens only: joined with spaces
  img["sentences"][0]["tokens"] = ["a", "man", "."]
  path = _karpathy(tmp_path, [img, _img("x.jpg", "val", ["A dog."], imgid=4, cocoid=7,
                                        filepath="val2014")], "dataset_coco.json")
  out = str(tmp_path / "out")
  retrieval.convert(path, ["train", "restval"], out, load_tokenizer(vocab, False),
                    image_id_template="coco_{folder}_{image_id:012d}")
  (rec,) = iter_text_records(out)
  assert rec["image_id"] == "coco_val2014_000000391895"
  assert list(rec["input_ids"]) == [V["a"], V["man"], V["."]]


def test_bad_input_is_a_clear_error(tmp_path, vocab):
  tok = load_tokenizer(vocab, False)
  out = str(tmp_path / "out")
  with pytest.raises(DataError, match="no captions in split.*'train': 1"):
    retrieval.convert(_karpathy(tmp_path, [_img("1.jpg", "train", ["A dog."])]), ["test"], out,
                      tok)
  with pytest.raises(DataError, match=r"images\[0\]: no 'split' key"):
    retrieval.convert(_karpathy(tmp_path, [{"filename": "1.jpg", "sentences": []}]), ["test"],
                      out, tok)
  dup = [_img("1.jpg", "test", ["A dog."], imgid=0), _img("2.jpg", "test", ["A dog."], imgid=0)]
  with pytest.raises(DataError, match="sentid '0' already appeared"):
    retrieval.convert(_karpathy(tmp_path, dup), ["test"], out, tok)
  assert not os.path.exists(out)
  # From the command line: one 'error:' line naming the file.
  bad = tmp_path / "bad.json"
  bad.write_text('{"images": [')
  r = subprocess.run([sys.executable, "-m", "data_prep.retrieval", "--karpathy", str(bad),
                      "--split", "test", "--vocab", vocab, "--out", out], cwd=ROOT,
                     capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ")
  assert "bad.json: not valid JSON" in lines[0]
