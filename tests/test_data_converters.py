"""Converters round-trip small inputs written here in the real source formats (TSV, LMDB, npz, COCO JSON)."""

import base64
import csv
import io
import json
import os
import subprocess
import sys

import lz4.frame
import lmdb
import msgpack
import numpy as np
import pytest

from data_prep import butd_tsv, captions, common, npz_dir, uniter_db
from uniter_jax.data import DataError, iter_image_records, iter_text_records, read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _b64(a, dtype=np.float32):
  return base64.b64encode(np.ascontiguousarray(a, dtype).tobytes()).decode()


def _fake_image(rng, n, d=8, c=4):
  return {
      "features": rng.normal(size=(n, d)).astype(np.float32),
      "boxes": np.sort(rng.uniform(0, 100, size=(n, 4)), axis=1).astype(np.float32)[:, [0, 1, 2, 3]],
      "conf": rng.uniform(0, 1, size=n).astype(np.float32),
      "soft": rng.dirichlet(np.ones(c), size=n).astype(np.float32),
  }


def _by_id(path):
  return {r["image_id"]: r for r in iter_image_records(path)}


def _expected_keep(conf, min_bb, max_bb, th=0.2):
  return min(len(conf), max(min_bb, min(int((conf > th).sum()), max_bb)))


def test_butd_tsv_round_trip_with_box_policy(tmp_path):
  rng = np.random.default_rng(0)
  imgs = {f"{i}": _fake_image(rng, n) for i, n in enumerate([3, 7, 9])}
  w, h = 200.0, 100.0
  # BUTD layout (no confidences) in one file, LXMERT layout (with objects_conf) in another.
  with open(tmp_path / "butd.tsv", "w", newline="") as f:
    out = csv.writer(f, delimiter="\t")
    for iid in ("0", "1"):
      im = imgs[iid]
      out.writerow([iid, int(w), int(h), len(im["conf"]), _b64(im["boxes"]), _b64(im["features"])])
  with open(tmp_path / "lxmert.tsv", "w", newline="") as f:
    out = csv.writer(f, delimiter="\t")
    im = imgs["2"]
    n = len(im["conf"])
    out.writerow(["2", int(h), int(w), _b64(np.zeros(n), np.int64), _b64(im["conf"]), _b64(np.zeros(n), np.int64),
                  _b64(im["conf"]), n, _b64(im["boxes"]), _b64(im["features"])])
  butd_tsv.main(["--tsv", str(tmp_path / "butd.tsv"), str(tmp_path / "lxmert.tsv"), "--out", str(tmp_path / "out"),
                 "--min-bb", "2", "--max-bb", "5", "--extraction", "nms=0.3"])
  got = _by_id(tmp_path / "out")
  m = read_manifest(tmp_path / "out")
  assert m["images"]["box_policy"] == {"kind": "adaptive", "conf_th": 0.2, "min_bb": 2, "max_bb": 5}
  assert m["images"]["extraction"]["nms"] == 0.3
  for iid, im in imgs.items():
    r = got[iid]
    if iid == "2":  # sorted best-first, then the policy
      order = np.argsort(-im["conf"], kind="stable")
      keep = _expected_keep(im["conf"], 2, 5)
      np.testing.assert_allclose(r["conf"], im["conf"][order][:keep])
    else:  # no confidence column: only max_bb cuts, order kept
      order, keep = np.arange(len(im["conf"])), min(len(im["conf"]), 5)
    assert r["num_boxes"] == keep
    np.testing.assert_allclose(r["features"], im["features"][order][:keep], rtol=1e-3, atol=1e-3)
    b = im["boxes"][order][:keep]
    np.testing.assert_allclose(r["img_pos"][:, 0], b[:, 0] / w, rtol=1e-5)
    np.testing.assert_allclose(r["img_pos"][:, 3], b[:, 3] / h, rtol=1e-5)
    np.testing.assert_allclose(r["img_pos"][:, 4], (b[:, 2] - b[:, 0]) / w, rtol=1e-4)
    np.testing.assert_allclose(r["img_pos"][:, 6], r["img_pos"][:, 4] * r["img_pos"][:, 5], rtol=1e-5)
  assert r["image_w"] == 200 and r["image_h"] == 100


def test_butd_tsv_bad_lines_are_named(tmp_path):
  (tmp_path / "bad.tsv").write_text("1\t2\t3\n")
  with pytest.raises(DataError, match=r"bad.tsv line 1: 3 columns.*--fields"):
    butd_tsv.main(["--tsv", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  # Zero boxes: an error by default, a counted skip with --skip-bad.
  rng = np.random.default_rng(1)
  im = _fake_image(rng, 3)
  with open(tmp_path / "z.tsv", "w", newline="") as f:
    out = csv.writer(f, delimiter="\t")
    out.writerow(["a", 10, 10, 0, "", ""])
    out.writerow(["b", 10, 10, 3, _b64(im["boxes"]), _b64(im["features"])])
  with pytest.raises(DataError, match="'a'.*zero boxes.*--skip-bad"):
    butd_tsv.main(["--tsv", str(tmp_path / "z.tsv"), "--out", str(tmp_path / "out")])
  m = butd_tsv.main(["--tsv", str(tmp_path / "z.tsv"), "--out", str(tmp_path / "out"), "--skip-bad"])
  assert m["skipped"] == {"zero_boxes": 1} and m["images"]["count"] == 1


def _msgpack_numpy(a):
  """The msgpack-numpy encoding of an array (as the official DBs store them)."""
  return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}


def _write_img_db(path, imgs, compressed):
  env = lmdb.open(str(path), map_size=1 << 26)
  with env.begin(write=True) as txn:
    for name, im in imgs.items():
      arrays = {"features": im["features"].astype(np.float16), "norm_bb": im["norm_bb"].astype(np.float16),
                "conf": im["conf"].astype(np.float16), "soft_labels": im["soft"].astype(np.float16)}
      if compressed:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        value = buf.getvalue()
      else:
        value = msgpack.packb({k: _msgpack_numpy(v) for k, v in arrays.items()}, use_bin_type=True)
      txn.put(name.encode(), value)
    txn.put(b"__keys__", json.dumps(list(imgs)).encode())
  env.close()


@pytest.mark.parametrize("db_name,compressed", [("all_compressed", True), ("feat_th0.2_max6_min3", False)])
def test_uniter_db_round_trip(tmp_path, db_name, compressed):
  rng = np.random.default_rng(2)
  imgs = {}
  for i, n in enumerate([4, 8, 12]):
    im = _fake_image(rng, n)
    im["conf"] = np.sort(im["conf"])[::-1].copy()  # the official DBs are best-first
    im["norm_bb"] = rng.uniform(size=(n, 6)).astype(np.float32)
    imgs[f"coco_val2014_{i:012d}.npz"] = im
  os.makedirs(tmp_path / "img_db")
  _write_img_db(tmp_path / "img_db" / db_name, imgs, compressed)
  # txt_db: lz4 msgpack records, meta.json, txt2img.json; a VQA-style nested target.
  txt = tmp_path / "txt_db"
  env = lmdb.open(str(txt), map_size=1 << 24)
  recs = {}
  with env.begin(write=True) as txn:
    for j in range(6):
      rec = {"input_ids": [5 + j, 6, 7][: 1 + j % 3], "img_fname": f"coco_val2014_{j % 3:012d}.npz",
             "target": {"labels": [j % 4], "scores": [1.0 if j % 2 else 0.3]}, "question": f"q{j}?"}
      recs[str(j)] = rec
      txn.put(str(j).encode(), lz4.frame.compress(msgpack.packb(rec, use_bin_type=True)))
  env.close()
  (txt / "meta.json").write_text(json.dumps({"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100,
                                             "v_range": [106, 28996], "bert": "bert-base-cased"}))
  (txt / "txt2img.json").write_text(json.dumps({k: r["img_fname"] for k, r in recs.items()}))
  out = tmp_path / "out"
  uniter_db.main(["--img-db", str(tmp_path / "img_db"), "--txt-db", str(txt), "--out", str(out)])
  m = read_manifest(out)
  policy = uniter_db.policy_from_name(db_name) or uniter_db.BoxPolicy()
  assert m["images"]["box_policy"] == policy.to_json()
  got = _by_id(out)
  for name, im in imgs.items():
    r = got[name[:-4]]
    keep = policy.count(im["conf"].astype(np.float16), len(im["conf"]))
    assert r["num_boxes"] == keep
    np.testing.assert_array_equal(r["features"], im["features"][:keep].astype(np.float16))
    np.testing.assert_allclose(r["norm_bb"], im["norm_bb"][:keep].astype(np.float16), rtol=1e-6)
    np.testing.assert_array_equal(r["soft_labels"], im["soft"][:keep].astype(np.float16))
  texts = {t["id"]: t for t in iter_text_records(out)}
  assert m["texts"]["tokenizer"]["cls_id"] == 101 and m["texts"]["fields"]["target.scores"] == "float_list"
  for k, rec in recs.items():
    t = texts[k]
    assert t["image_id"] == rec["img_fname"][:-4]
    assert t["input_ids"].tolist() == rec["input_ids"]
    assert t["target.labels"].tolist() == rec["target"]["labels"]
    np.testing.assert_allclose(t["target.scores"], rec["target"]["scores"])
    assert t["question"] == rec["question"]


def test_npz_dir_round_trip(tmp_path):
  rng = np.random.default_rng(3)
  os.makedirs(tmp_path / "npz")
  imgs = {}
  for i, n in enumerate([5, 15]):
    im = _fake_image(rng, n)
    im["conf"] = np.sort(im["conf"])[::-1].copy()
    im["norm_bb"] = rng.uniform(size=(n, 6)).astype(np.float32)
    imgs[f"nlvr2_dev-{i}-img0"] = im
    np.savez(tmp_path / "npz" / f"nlvr2_dev-{i}-img0.npz", features=im["features"], norm_bb=im["norm_bb"],
             conf=im["conf"], soft_labels=im["soft"])
  npz_dir.main(["--dir", str(tmp_path / "npz"), "--out", str(tmp_path / "out"), "--num-bb", "10"])
  got = _by_id(tmp_path / "out")
  for iid, im in imgs.items():
    keep = min(10, len(im["conf"]))
    np.testing.assert_allclose(got[iid]["features"], im["features"][:keep], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[iid]["conf"], im["conf"][:keep])
    assert got[iid]["soft_labels"].shape == (keep, 4)
  with pytest.raises(FileExistsError, match="--overwrite"):
    npz_dir.main(["--dir", str(tmp_path / "npz"), "--out", str(tmp_path / "out")])
  npz_dir.main(["--dir", str(tmp_path / "npz"), "--out", str(tmp_path / "out"), "--overwrite", "--keep-all-boxes"])
  assert _by_id(tmp_path / "out")["nlvr2_dev-1-img0"]["num_boxes"] == 15


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the", "grass", ".", "##s", "run",
         "A", "Dog", "cat"]


def test_captions_coco_json_and_jsonl(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  coco = {"images": [{"id": 42}], "annotations": [{"id": 7, "image_id": 42, "caption": "A dog runs on the grass."},
                                                   {"id": 8, "image_id": 42, "caption": "a cat"}]}
  (tmp_path / "caps.json").write_text(json.dumps(coco))
  (tmp_path / "caps.jsonl").write_text(json.dumps({"image_id": "x1", "caption": "Dog runs"}) + "\n")
  captions.main(["--annotations", str(tmp_path / "caps.json"), "--vocab", str(tmp_path / "vocab.txt"),
                 "--image-id-template", "coco_val2014_{image_id:012d}", "--out", str(tmp_path / "coco")])
  v = {t: i for i, t in enumerate(VOCAB)}
  texts = {t["id"]: t for t in iter_text_records(tmp_path / "coco")}
  assert texts["7"]["image_id"] == "coco_val2014_000000000042"
  assert texts["7"]["input_ids"].tolist() == [v[t] for t in ["A", "dog", "runs", "on", "the", "grass", "."]]
  assert texts["8"]["input_ids"].tolist() == [v["a"], v["cat"]]
  tok = read_manifest(tmp_path / "coco")["texts"]["tokenizer"]
  assert (tok["cls_id"], tok["sep_id"], tok["lowercase"]) == (2, 3, False)
  captions.main(["--annotations", str(tmp_path / "caps.jsonl"), "--vocab", str(tmp_path / "vocab.txt"),
                 "--keep-text", "--out", str(tmp_path / "jl")])
  (t,) = iter_text_records(tmp_path / "jl")
  assert t["image_id"] == "x1" and t["text"] == "Dog runs" and t["input_ids"].tolist() == [v["Dog"], v["runs"]]


@pytest.mark.parametrize("name", ["butd_tsv", "uniter_db", "npz_dir", "captions", "vqa"])
def test_cli_help(name):
  out = subprocess.run([sys.executable, "-m", f"data_prep.{name}", "--help"], cwd=ROOT, capture_output=True,
                       text=True, check=True)
  assert "--out" in out.stdout


def test_cli_input_mistake_is_one_error_line(tmp_path):
  # Every converter's __main__ goes through common.run_cli: a missing input is one line, status 1.
  (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  missing = tmp_path / "missing.json"
  r = subprocess.run([sys.executable, "-m", "data_prep.captions", "--annotations", str(missing), "--vocab",
                      str(tmp_path / "vocab.txt"), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 1, (r.returncode, r.stderr)
  assert "Traceback" not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], r.stderr
  assert not (tmp_path / "out").exists()


def test_run_cli_reports_user_errors_and_keeps_bugs(capsys):
  def raising(exc):
    def main(argv):
      raise exc
    return main

  assert common.run_cli(lambda argv: {}) == 0
  assert common.run_cli(raising(FileNotFoundError(2, "No such file or directory", "x.json"))) == 1
  assert capsys.readouterr().err == "error: x.json: No such file or directory\n"
  assert common.run_cli(raising(DataError("x.tsv line 3: bad"))) == 1
  assert capsys.readouterr().err == "error: x.tsv line 3: bad\n"
  with pytest.raises(KeyError):  # not a user's mistake: the traceback stays
    common.run_cli(raising(KeyError("features")))
