"""SNLI-VE and NLVR2 converters on small real-format files, and the pipeline joining NLVR2 pairs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import nlvr2, snli_ve
from uniter_jax.data import DataError, iter_text_records, read_manifest, write_dataset
from uniter_jax.data.pipeline import InputPipeline, PipelineConfig
from helpers import vocab_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "a", "dog", "runs", "is", "the", "man", "two", "dogs",
         "sleeping", "left", "image", "has", ".", "There", "are", "in", "Two", "The"]
V = {t: i for i, t in enumerate(VOCAB)}


@pytest.fixture()
def vocab(tmp_path):
  return vocab_file(tmp_path, VOCAB)


def _jsonl(path, rows):
  """Writes one line per row: a dict as JSON, a str verbatim (for broken lines)."""
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _cli(module, args):
  return subprocess.run([sys.executable, "-m", f"data_prep.{module}", *args], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=ROOT))


def _assert_one_line_error(r, *needles):
  assert r.returncode == 1, (r.returncode, r.stderr)
  assert "Traceback" not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  for n in needles:
    assert n in lines[0], (n, lines[0])


def _no_leftovers(tmp_path, out="out"):
  assert not (tmp_path / out).exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def _ve(pid, label, hyp="A dog runs.", image="2248275918.jpg", **extra):
  row = {"Flikr30kID": image, "sentence1": "premise", "sentence2": hyp, "pairID": pid, **extra}
  if label is not ...:
    row["gold_label"] = label
  return row


# ---------------------------------------------------------------------------------------------
# SNLI-VE.


def test_snli_ve_labels_skips_and_records(tmp_path, vocab):
  rows = [
      _ve("p0", "contradiction", "Two dogs are sleeping."),
      _ve("p1", "entailment"),
      _ve("p2", "neutral", "The man is in the image.", image="flickr30k_images/36979.jpg"),
      _ve("p3", "-"),  # no annotator majority
      _ve("p4", ...),  # no gold_label key
      _ve("p5", ""),
      {k: v for k, v in _ve(None, "entailment").items() if k != "pairID"},  # no pairID: FILE:LINE
  ]
  src = _jsonl(tmp_path / "snli_ve_dev.jsonl", rows)
  m = snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", str(tmp_path / "ve")])
  assert m["created_by"] == "data_prep.snli_ve"
  assert m["skipped"] == {"no_gold_label": 3} and m["skipped_examples"] == {"no_gold_label": ["p3", "p4", "p5"]}
  assert m["texts"]["count"] == 4 and m["texts"]["images_per_text"] == 1
  assert m["texts"]["fields"] == {"target": "int", "hypothesis": "str"}  # as the synthetic ve_* splits
  assert m["snli_ve"]["labels"] == {"contradiction": 0, "entailment": 1, "neutral": 2}
  texts = {t["id"]: t for t in iter_text_records(tmp_path / "ve")}
  assert sorted(texts) == ["p0", "p1", "p2", "snli_ve_dev.jsonl:7"]
  assert [texts[k]["target"] for k in ("p0", "p1", "p2")] == [0, 1, 2]
  assert texts["p0"]["image_id"] == "2248275918" and texts["p2"]["image_id"] == "36979"
  assert texts["p0"]["hypothesis"] == "Two dogs are sleeping."
  assert texts["p0"]["input_ids"].tolist() == [V[w] for w in ("Two", "dogs", "are", "sleeping", ".")]
  assert texts["p2"]["input_ids"].tolist() == [V[w] for w in ("The", "man", "is", "in", "the", "image", ".")]
  # The official UNITER flickr30k img_db names: a template, zero-padded like the official prepro.
  snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", str(tmp_path / "ve2"),
                "--image-id-template", "flickr30k_{image_id:012d}"])
  texts = {t["id"]: t for t in iter_text_records(tmp_path / "ve2")}
  assert texts["p0"]["image_id"] == "flickr30k_002248275918" and texts["p2"]["image_id"] == "flickr30k_000000036979"
  with pytest.raises(FileExistsError, match="--overwrite"):
    snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", str(tmp_path / "ve")])


def test_snli_ve_bad_input_is_named(tmp_path, vocab):
  out = str(tmp_path / "out")
  # Unknown label, through the command line: one line naming file, line, label and the allowed ones.
  src = _jsonl(tmp_path / "bad_label.jsonl", [_ve("p0", "entailment"), _ve("p1", "maybe")])
  r = _cli("snli_ve", ["--annotations", src, "--vocab", vocab, "--out", out])
  _assert_one_line_error(r, "bad_label.jsonl line 2", "'maybe'", "['contradiction', 'entailment', 'neutral']")
  _no_leftovers(tmp_path)
  src = _jsonl(tmp_path / "no_key.jsonl", [{k: v for k, v in _ve("p0", "neutral").items() if k != "sentence2"}])
  with pytest.raises(DataError, match=r"no_key.jsonl line 1: no 'sentence2' key"):
    snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", out])
  src = _jsonl(tmp_path / "no_image.jsonl", [{k: v for k, v in _ve("p0", "neutral").items() if k != "Flikr30kID"}])
  with pytest.raises(DataError, match=r"no_image.jsonl line 1: no 'Flikr30kID' key"):
    snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", out])
  src = _jsonl(tmp_path / "not_json.jsonl", [_ve("p0", "neutral"), "{'single': quotes}"])
  with pytest.raises(DataError, match=r"not_json.jsonl line 2: not valid JSON"):
    snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", out])
  src = _jsonl(tmp_path / "dup.jsonl", [_ve("p0", "neutral"), _ve("p1", "neutral"), _ve("p0", "entailment")])
  with pytest.raises(DataError, match=r"dup.jsonl line 3: pairID 'p0' already appeared at .*dup.jsonl line 1"):
    snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", out])
  # A hypothesis that tokenises to nothing: an error naming the line, or a counted skip.
  src = _jsonl(tmp_path / "empty.jsonl", [_ve("p0", "neutral"), _ve("p1", "neutral", hyp="   ")])
  with pytest.raises(DataError, match=r"empty.jsonl line 2: sentence2 .* tokenises to nothing.*--skip-bad"):
    snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", out])
  _no_leftovers(tmp_path)
  m = snli_ve.main(["--annotations", src, "--vocab", vocab, "--out", out, "--skip-bad"])
  assert m["skipped"] == {"empty_text": 1} and m["skipped_examples"] == {"empty_text": ["p1"]}
  r = _cli("snli_ve", ["--annotations", src, "--vocab", vocab, "--out", out])
  _assert_one_line_error(r, "exists", "--overwrite")


# ---------------------------------------------------------------------------------------------
# NLVR2.


def _nl(identifier, label, sentence="There are two dogs.", **extra):
  row = {"identifier": identifier, "sentence": sentence, "left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg",
         "writer": "1", **extra}
  if label is not ...:
    row["label"] = label
  return row


def test_nlvr2_labels_image_ids_and_records(tmp_path, vocab):
  rows = [_nl("dev-850-0-0", "True"), _nl("dev-850-0-1", "False", "The left image has a dog."),
          _nl("train-10171-3-1", "True", directory=7), _nl("test1-0-1-0", ...)]
  src = _jsonl(tmp_path / "dev.json", rows)
  m = nlvr2.main(["--annotations", src, "--vocab", vocab, "--out", str(tmp_path / "nl")])
  assert m["created_by"] == "data_prep.nlvr2"
  assert m["skipped"] == {"no_label": 1} and m["skipped_examples"] == {"no_label": ["test1-0-1-0"]}
  assert m["texts"]["count"] == 3 and m["texts"]["images_per_text"] == 2
  assert m["texts"]["fields"] == {"target": "int", "sentence": "str", "identifier": "str"}  # as nlvr2_* splits
  texts = {t["id"]: t for t in iter_text_records(tmp_path / "nl")}
  t = texts["dev-850-0-0"]
  assert t["image_ids"] == ["nlvr2_dev-850-0-img0", "nlvr2_dev-850-0-img1"]  # [left, right]
  assert t["target"] == 1 and t["identifier"] == "dev-850-0-0" and t["sentence"] == "There are two dogs."
  assert t["input_ids"].tolist() == [V[w] for w in ("There", "are", "two", "dogs", ".")]
  assert texts["dev-850-0-1"]["target"] == 0 and texts["dev-850-0-1"]["image_ids"] == t["image_ids"]
  assert texts["train-10171-3-1"]["image_ids"] == ["nlvr2_train-10171-3-img0", "nlvr2_train-10171-3-img1"]
  assert nlvr2.image_ids("dev-850-0-0") == t["image_ids"]
  # Prediction on an unlabelled set keeps every line, target -1; bare file stems with --image-prefix ''.
  m = nlvr2.main(["--annotations", src, "--vocab", vocab, "--out", str(tmp_path / "pred"), "--allow-unlabelled",
                  "--image-prefix", ""])
  assert m["skipped"] == {} and m["texts"]["count"] == 4
  texts = {t["id"]: t for t in iter_text_records(tmp_path / "pred")}
  assert texts["test1-0-1-0"]["target"] == -1 and texts["dev-850-0-0"]["target"] == 1
  assert texts["test1-0-1-0"]["image_ids"] == ["test1-0-1-img0", "test1-0-1-img1"]
  assert m["nlvr2"]["counts"] == {"False": 1, "True": 2, "unlabelled": 1}


def test_nlvr2_bad_input_is_named(tmp_path, vocab):
  out = str(tmp_path / "out")
  src = _jsonl(tmp_path / "dev.json", [_nl("dev-1-0-0", "True"), _nl("dev-1-0-1", "Maybe")])
  r = _cli("nlvr2", ["--annotations", src, "--vocab", vocab, "--out", out])
  _assert_one_line_error(r, "dev.json line 2", "'Maybe'", "['False', 'True']")
  _no_leftovers(tmp_path)
  src = _jsonl(tmp_path / "dup.json", [_nl("dev-1-0-0", "True"), _nl("dev-1-0-0", "False")])
  with pytest.raises(DataError, match=r"dup.json line 2: identifier 'dev-1-0-0' already appeared at .*dup.json line 1"):
    nlvr2.main(["--annotations", src, "--vocab", vocab, "--out", out])
  src = _jsonl(tmp_path / "nokey.json", [{k: v for k, v in _nl("dev-1-0-0", "True").items() if k != "sentence"}])
  with pytest.raises(DataError, match=r"nokey.json line 1: no 'sentence' key"):
    nlvr2.main(["--annotations", src, "--vocab", vocab, "--out", out])
  src = _jsonl(tmp_path / "badid.json", [_nl("dev8500", "True")])
  with pytest.raises(DataError, match=r"badid.json line 1: identifier 'dev8500' is not of the form"):
    nlvr2.main(["--annotations", src, "--vocab", vocab, "--out", out])
  src = _jsonl(tmp_path / "hidden.json", [_nl("test2-1-0-0", ...), _nl("test2-1-0-1", None)])
  with pytest.raises(DataError, match="no line .* has a label.*--allow-unlabelled"):
    nlvr2.main(["--annotations", src, "--vocab", vocab, "--out", out])
  _no_leftovers(tmp_path)


def test_cli_help():
  for name in ("snli_ve", "nlvr2"):
    r = _cli(name, ["--help"])
    assert r.returncode == 0 and "--out" in r.stdout and "--annotations" in r.stdout


# ---------------------------------------------------------------------------------------------
# The pipeline joins a converted NLVR2 text with its two images; a missing one is a counted skip.

D = 4


def _image(image_id, code, n):
  """Feature column 0 = code, so a batch row shows which image it came from."""
  f = np.zeros((n, D), np.float32)
  f[:, 0], f[:, 1] = code, np.arange(n)
  return {"image_id": image_id, "features": f, "norm_bb": np.full((n, 6), 0.5, np.float32)}


def test_pipeline_joins_nlvr2_pairs_and_counts_missing_images(tmp_path, vocab):
  pairs = [f"dev-{s}-{p}" for s in range(800, 806) for p in range(2)]  # 12 image pairs
  images, code = [], {}
  for i, pair in enumerate(pairs):
    for side in (0, 1):
      iid = f"nlvr2_{pair}-img{side}"
      code[iid] = 10 * i + side + 1
      images.append(_image(iid, code[iid], 2 + (i + side) % 5))
  images.append(_image("nlvr2_dev-900-0-img0", 999, 3))  # the right image of dev-900-0 is missing
  images.append(_image("nlvr2_dev-901-0-img1", 998, 3))  # the left image of dev-901-0 is missing
  write_dataset(tmp_path / "img", images=images, shard_mb=0.001)  # several shards: pairs span shards
  assert len(read_manifest(tmp_path / "img")["images"]["shards"]) > 2
  rows = [_nl(f"{pair}-{k}", "True" if (i + k) % 2 else "False") for i, pair in enumerate(pairs) for k in range(2)]
  rows += [_nl("dev-900-0-0", "True"), _nl("dev-901-0-0", "False")]
  nlvr2.main(["--annotations", _jsonl(tmp_path / "dev.json", rows), "--vocab", vocab, "--out", str(tmp_path / "txt")])
  texts = list(iter_text_records(tmp_path / "txt"))  # example_index order
  cfg = PipelineConfig(txt_buckets=(16,), img_buckets=(8,), batch_size=8, max_txt_len=14, num_epochs=1,
                       drop_remainder=False, seed=1)
  pipe = InputPipeline([str(tmp_path / "txt")], [str(tmp_path / "img")], config=cfg)
  assert pipe.stats["text_missing_image"] == 2
  assert pipe.planner.stat_examples["text_missing_image"] == ["dev-900-0-0 -> nlvr2_dev-900-0-img1",
                                                             "dev-901-0-0 -> nlvr2_dev-901-0-img0"]
  seen = []
  for b in pipe.host_batches():
    assert b["img_feat"].shape == (8, 2, 8, D)  # (batch, image axis [left, right], regions, dim)
    assert b["img_mask"].shape == (8, 2, 8) and b["img_pos"].shape == (8, 2, 8, 7)
    for r, j in enumerate(b["example_index"]):
      if j < 0:
        continue
      t = texts[j]
      seen.append(t["id"])
      assert b["target"][r] == t["target"]
      assert b["input_ids"][r, 1:1 + t["input_ids"].size].tolist() == t["input_ids"].tolist()
      for side, iid in enumerate(t["image_ids"]):  # left then right
        n = int(b["img_mask"][r, side].sum())
        assert n == 2 + (pairs.index(iid[6:-5]) + side) % 5
        np.testing.assert_array_equal(b["img_feat"][r, side, :n, 0], code[iid])
        np.testing.assert_array_equal(b["img_feat"][r, side, :n, 1], np.arange(n))
  assert sorted(seen) == sorted(r["identifier"] for r in rows[:-2])
  with pytest.raises(DataError, match=r"text 'dev-900-0-0' refers to image 'nlvr2_dev-900-0-img1'"):
    InputPipeline([str(tmp_path / "txt")], [str(tmp_path / "img")], config=cfg, strict=True)
