"""The synthetic world (issue 4): determinism, layout, readability, task semantics, features.

One small world (120 images) is generated per session and read back through the project's
readers; the checks below re-derive answers from the kept scene description rather than trusting
the generator's own bookkeeping.
"""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_prep import synthetic
from data_prep.synthetic import scene as scene_lib
from data_prep.synthetic.tasks import lexicon
from uniter_jax.data import WordPieceTokenizer, iter_image_records, iter_text_records

N_IMAGES = 120
IMG_DIM = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet(*_):
  pass


@pytest.fixture(scope="module")
def world_dir(tiny_world):
  """The session's world (conftest.py: N_IMAGES images, seed 0, IMG_DIM features, 1 worker)."""
  return tiny_world


@pytest.fixture(scope="module")
def data(world_dir):
  """Everything read back from disk: manifest, scenes, splits, image records, text records."""
  with open(os.path.join(world_dir, "manifest.json")) as f:
    manifest = json.load(f)
  with open(os.path.join(world_dir, "scenes.json")) as f:
    scenes = json.load(f)
  with open(os.path.join(world_dir, "splits.json")) as f:
    splits = json.load(f)
  images = {r["image_id"]: r for r in iter_image_records(os.path.join(world_dir, "img_db"), feat_dim=IMG_DIM)}
  texts = {}
  for name in sorted(os.listdir(os.path.join(world_dir, "txt"))):
    texts[name] = list(iter_text_records(os.path.join(world_dir, "txt", name)))
  return dict(manifest=manifest, scenes=scenes, splits=splits, images=images, texts=texts)


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      p = os.path.join(dirpath, n)
      rel = os.path.relpath(p, root)
      # Sub-dataset manifests carry a creation time; everything else must match byte for byte.
      if not (rel.endswith("manifest.json") and rel != "manifest.json"):
        out[rel] = p
  return out


# ---- determinism, layout, CLI -------------------------------------------------------------


def test_same_seed_gives_identical_bytes_in_a_fresh_process(world_dir, tmp_path):
  """The CLI in a new process (other protobuf map order, 2 workers) writes the same bytes."""
  out = tmp_path / "again"
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--num-images",
                  str(N_IMAGES), "--seed", "0", "--img-dim", str(IMG_DIM), "--workers", "2"],
                 check=True, env=env, cwd=REPO, capture_output=True)
  a, b = _files(world_dir), _files(str(out))
  assert sorted(a) == sorted(b)
  assert any(k.endswith(".tfrecord") for k in a)
  differ = [k for k in a if open(a[k], "rb").read() != open(b[k], "rb").read()]
  assert not differ, differ


def test_different_seed_gives_different_data(world_dir, tmp_path):
  out = tmp_path / "seed1"
  synthetic.generate(str(out), num_images=N_IMAGES, seed=1, img_dim=IMG_DIM, workers=1, log=_quiet)
  for rel in ("img_db/images-00000.tfrecord", "txt/pretrain_train/texts-00000.tfrecord",
              "txt/vqa_train/texts-00000.tfrecord", "images/synth_000000.png"):
    assert open(os.path.join(world_dir, rel), "rb").read() != open(os.path.join(out, rel), "rb").read(), rel


def test_refuses_to_overwrite_unless_asked(tmp_path):
  out = tmp_path / "w"
  out.mkdir()
  (out / "keep.txt").write_text("user data")
  with pytest.raises(FileExistsError):
    synthetic.generate(str(out), num_images=20, log=_quiet)
  assert (out / "keep.txt").exists()
  r = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(out), "--num-images", "20"],
                     env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, capture_output=True, text=True)
  assert r.returncode != 0 and "--overwrite" in r.stderr
  # --overwrite replaces only a synthetic world: the user's folder is kept as it was.
  with pytest.raises(FileExistsError, match="is not a complete synthetic world"):
    synthetic.generate(str(out), num_images=20, overwrite=True, workers=1, log=_quiet)
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
  world = tmp_path / "world"
  synthetic.generate(str(world), num_images=20, workers=1, log=_quiet)
  synthetic.generate(str(world), num_images=20, seed=1, overwrite=True, workers=1, log=_quiet)
  assert json.loads((world / "manifest.json").read_text())["seed"] == 1
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left


def test_sizes_and_splits(data, world_dir):
  m, splits, images, texts = data["manifest"], data["splits"], data["images"], data["texts"]
  assert m["generator_version"] == synthetic.GENERATOR_VERSION and m["seed"] == 0
  assert {k: len(v) for k, v in splits.items()} == m["splits"] == {"train": 96, "val": 12, "test": 12}
  all_ids = splits["train"] + splits["val"] + splits["test"]
  assert len(set(all_ids)) == N_IMAGES == len(images)
  assert sorted(os.listdir(os.path.join(world_dir, "images"))) == sorted(i + ".png" for i in all_ids)
  split_of = {i: s for s, ids in splits.items() for i in ids}
  expected = {f"{t}_{s}" for t in ("retrieval", "vqa", "nlvr2", "ve", "re", "vcr") for s in splits}
  assert set(texts) == expected | {"pretrain_train", "pretrain_val"}
  for name, recs in texts.items():
    task, split = name.split("_")
    assert recs, name
    assert m["tasks"][task]["datasets"][name]["count"] == len(recs)
    for r in recs:
      assert all(split_of[i] == split for i in r["image_ids"]), (name, r["id"])
  # Five captions per image; few VQA questions on train next to many captions.
  assert len(texts["pretrain_train"]) == 5 * 96 and len(texts["retrieval_test"]) == 5 * 12
  assert len(texts["vqa_train"]) <= 96 < len(texts["pretrain_train"]) / 4
  assert len(texts["vqa_val"]) == 3 * 12
  for task in ("vqa", "nlvr2", "ve", "re", "vcr"):
    for s in ("val", "test"):
      assert "chance" in json.dumps(m["tasks"][task]["splits"][s]), (task, s)


def test_preview_sheet(world_dir, tmp_path):
  from PIL import Image

  from data_prep.synthetic.__main__ import main

  out = tmp_path / "sheet.png"
  assert main(["--preview", world_dir, "--out", str(out), "--num-scenes", "4"]) == 0
  img = Image.open(out)
  assert img.width > 600 and img.height > 300 and os.path.getsize(out) < 300_000


def test_ensure_dataset_reuses_regenerates_and_refuses(world_dir, tmp_path):
  stamp = os.path.getmtime(os.path.join(world_dir, "manifest.json"))
  kw = dict(num_images=N_IMAGES, seed=0, img_dim=IMG_DIM)
  assert synthetic.ensure_dataset(world_dir, log=_quiet, **kw) == world_dir
  assert os.path.getmtime(os.path.join(world_dir, "manifest.json")) == stamp  # reused, not rebuilt
  with pytest.raises(ValueError, match="config"):
    synthetic.ensure_dataset(world_dir, log=_quiet, num_images=N_IMAGES, seed=5, img_dim=IMG_DIM)
  # A killed run leaves only a hidden temporary folder; the next call cleans it and generates.
  new = tmp_path / "fresh"
  dead = tmp_path / f".fresh.tmp-{socket.gethostname()}-999999999-abcdef"
  dead.mkdir()
  (dead / "images").mkdir()
  assert synthetic.ensure_dataset(str(new), workers=1, log=_quiet, num_images=20) == str(new)
  assert not dead.exists() and synthetic.read_world_manifest(str(new))["complete"]
  # A folder that is not a complete world is never used or deleted.
  half = tmp_path / "half"
  (half / "images").mkdir(parents=True)
  with pytest.raises(FileExistsError):
    synthetic.ensure_dataset(str(half), log=_quiet, num_images=20)
  assert (half / "images").exists()


# ---- records ------------------------------------------------------------------------------


def test_image_records_are_valid(data):
  m = data["manifest"]
  for iid, r in data["images"].items():
    sc = data["scenes"][iid]
    n = r["num_boxes"]
    assert 10 <= n <= 14 and len(sc["regions"]) == n
    assert r["features"].shape == (n, IMG_DIM) and np.isfinite(r["features"]).all()
    assert (r["features"] >= 0).all()  # ReLU features, like BUTD's pooled activations
    pos = r["img_pos"]
    assert ((pos >= 0) & (pos <= 1)).all()
    np.testing.assert_allclose(pos[:, 4], pos[:, 2] - pos[:, 0], atol=1e-6)
    np.testing.assert_allclose(pos[:, 5], pos[:, 3] - pos[:, 1], atol=1e-6)
    np.testing.assert_allclose(pos[:, 6], pos[:, 4] * pos[:, 5], atol=1e-6)
    boxes = np.array([g["box"] for g in sc["regions"]])
    w, h = r["image_w"], r["image_h"]
    np.testing.assert_allclose(pos[:, :4] * [w, h, w, h], boxes, atol=2e-3)
    assert (np.diff(r["conf"]) <= 0).all()  # best box first, as the official DBs assume
    soft = r["soft_labels"].astype(np.float32)
    assert soft.shape == (n, m["label_dim"]) and m["label_dim"] == 1 + 6 * 7
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=0.02)
    for k, g in enumerate(sc["regions"]):
      # Objects are confidently foreground; background boxes are mostly background.
      assert (soft[k, 0] < 0.7) if g["kind"] == "object" else (g["kind"] == "part" or soft[k, 0] > 0.8)


def test_text_records_tokenise_with_the_written_vocab(data, world_dir):
  tok = WordPieceTokenizer(os.path.join(world_dir, "vocab.txt"))
  assert tok.pad_id == 0  # batches are 0-padded (uniter_jax/batch.py)
  raw_key = {"pretrain": "text", "retrieval": "text", "vqa": "question", "nlvr2": "sentence",
             "ve": "hypothesis", "re": "sent", "vcr": "question"}
  seen_words = set()
  for name, recs in data["texts"].items():
    key = raw_key[name.split("_")[0]]
    for r in recs:
      text = r[key]
      assert r["input_ids"].tolist() == tok.encode(text), (name, text)
      assert tok.unk_id not in r["input_ids"]
      assert tok.decode(r["input_ids"]) == text
      seen_words.update(text.split())
      if name.startswith("vcr"):
        for field, lens in (("answers", "lens_as"), ("rationales", "lens_rs")):
          flat = [i for s in r[field] for i in tok.encode(s)]
          assert r["input_ids_" + field[0] + "s"].tolist() == flat
          assert r[lens].tolist() == [len(tok.encode(s)) for s in r[field]]
          seen_words.update(w for s in r[field] for w in s.split())
  # Every grammar word is a whole token or split on purpose (plurals, superlatives).
  for w in seen_words:
    assert tok.tokenize(w) == lexicon.expected_pieces(w), w
  assert any(len(lexicon.expected_pieces(w)) == 2 for w in seen_words)


# ---- task semantics -----------------------------------------------------------------------


def _iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_refexp_target_region_overlaps_its_object(data):
  n = 0
  for name in ("re_train", "re_val", "re_test"):
    for r in data["texts"][name]:
      img = data["images"][r["image_id"]]
      w, h = img["image_w"], img["image_h"]
      box = img["img_pos"][r["target"], :4] * [w, h, w, h]
      x, y, bw, bh = r["bbox"]
      assert _iou(box, (x, y, x + bw, y + bh)) > 0.5, r
      obj = data["scenes"][r["image_id"]]["objects"][r["obj"]]
      np.testing.assert_allclose([x, y, x + bw, y + bh], obj["box"], atol=0.01)
      # The phrase names the object's own attributes and fits no other object.
      words = set(r["sent"].split())
      objs = data["scenes"][r["image_id"]]["objects"]
      head = r["sent"].split(" to the ")[0].split(" above ")[0].split(" below ")[0].split()
      vocab = set(scene_lib.COLOUR_NAMES) | set(scene_lib.SHAPES) | set(scene_lib.SIZES)
      attrs = [w for w in head if w in vocab]
      assert all(a in (obj["colour"], obj["shape"], obj["size"]) for a in attrs), r["sent"]
      if not ({"to", "above", "below"} & words) and not any(w.endswith("most") for w in words):
        fits = [o for o in objs if all(a in (o["colour"], o["shape"], o["size"]) for a in attrs)]
        assert len(fits) == 1, r["sent"]
      n += 1
  assert n > 150


def test_vqa_soft_scores_follow_the_metric(data, world_dir):
  with open(os.path.join(world_dir, "txt", "vqa_train", "ans2label.json")) as f:
    a2l = json.load(f)
  l2a = {v: k for k, v in a2l.items()}
  for name in ("vqa_train", "vqa_val", "vqa_test"):
    for r in data["texts"][name]:
      votes = collections.Counter(r["answers"])
      assert len(r["answers"]) == 10
      got = dict(zip((l2a[int(i)] for i in r["labels"]), r["scores"].tolist()))
      want = {a: min(c / 3.0, 1.0) for a, c in votes.items()}
      assert got.keys() == want.keys()
      for a in want:
        assert got[a] == pytest.approx(want[a], abs=1e-6)
      assert got[r["answer"]] == 1.0 and votes[r["answer"]] == max(votes.values())


def _objects(data, iid):
  return data["scenes"][iid]["objects"]


def _fits(o, words):
  return all(w in (o["colour"], o["shape"], o["size"], "object") for w in words)


def _rel(a, b, rel):
  """Clear spatial relation from the scene description, as people would judge it (8 px margin)."""
  dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
  if rel in ("to the left of", "to the right of"):
    d = dx if rel == "to the left of" else -dx
  else:
    d = dy if rel == "above" else -dy
  return d > scene_lib.REL_MARGIN


def _singular(word):
  for stem, plural in lexicon.PLURALS.items():
    if word == plural:
      return stem
  return word


def vqa_answer(objs, q):
  """An independent reading of a VQA question against the scene description."""
  if m := re.fullmatch(r"what colour is the (.+) \?", q):
    (o,) = [o for o in objs if _fits(o, m[1].split())]
    return o["colour"]
  if m := re.fullmatch(r"what shape is the (.+) \?", q):
    (o,) = [o for o in objs if _fits(o, m[1].split())]
    return o["shape"]
  if m := re.fullmatch(r"how many (.+) are there \?", q):
    words = [_singular(w) for w in m[1].split()]
    return str(sum(_fits(o, words) for o in objs))
  if m := re.fullmatch(r"is there an? (.+) \?", q):
    return "yes" if any(_fits(o, m[1].split()) for o in objs) else "no"
  if m := re.fullmatch(r"is the (.+?) (to the left of|to the right of|above|below) the (.+) \?", q):
    (a,) = [o for o in objs if _fits(o, m[1].split())]
    (b,) = [o for o in objs if _fits(o, m[3].split())]
    return "yes" if _rel(a, b, m[2]) else "no"
  raise AssertionError(f"unparsed question {q!r}")


def test_answers_agree_with_the_scene_description(data):
  types = collections.Counter()
  for name in ("vqa_train", "vqa_val", "vqa_test"):
    for r in data["texts"][name]:
      assert vqa_answer(_objects(data, r["image_id"]), r["question"]) == r["answer"], r["question"]
      types[r["question_type"]] += 1
  assert set(types) == {"colour", "shape", "count", "exist", "relation"}
  # VCR: the correct answer / rationale name the tagged region's true attributes.
  for name in ("vcr_train", "vcr_val", "vcr_test"):
    for r in data["texts"][name]:
      sc = data["scenes"][r["image_id"]]
      tag = int(r["tag_regions"][0])
      region = sc["regions"][tag]
      assert region["kind"] == "object" and f"obj{tag}" in r["question"]
      o = sc["objects"][region["obj"]]
      assert len(r["answers"]) == len(r["rationales"]) == 4
      assert len(set(r["answers"])) == 4 and len(set(r["rationales"])) == 4
      right = r["answers"][r["qa_target"]]
      if r["kind"] == "colour":
        assert right == f"obj{tag} is {o['colour']} ."
      elif r["kind"] == "shape":
        assert right.split()[-2] == o["shape"]
      else:
        mate = int(right.split()[0][3:])
        assert sc["objects"][sc["regions"][mate]["obj"]]["colour"] == o["colour"]
      assert o["colour"] in r["rationales"][r["qar_target"]].split()
  # VE "exist" and NLVR2 "both" statements agree with the scenes too.
  for r in data["texts"]["ve_train"]:
    if r["template"] == "exist":
      words = r["hypothesis"].split()[3:-1]
      assert any(_fits(o, words) for o in _objects(data, r["image_id"])) == (r["target"] == 1)
  for r in data["texts"]["nlvr2_train"]:
    if r["template"] == "both":
      words = r["sentence"].split()[4:-1]
      truth = all(any(_fits(o, words) for o in _objects(data, i)) for i in r["image_ids"])
      assert truth == bool(r["target"])


def test_labels_are_balanced(data):
  nl = collections.Counter(int(r["target"]) for r in data["texts"]["nlvr2_train"])
  assert set(nl) == {0, 1} and min(nl.values()) / sum(nl.values()) > 0.3
  ve = collections.Counter(int(r["target"]) for r in data["texts"]["ve_train"])
  assert set(ve) == {0, 1, 2} and min(ve.values()) / sum(ve.values()) > 0.25


# ---- features and detector ----------------------------------------------------------------


def _iter_object_regions(data):
  """(image record, region index, scene object) for every region that is an object box."""
  for iid, r in data["images"].items():
    sc = data["scenes"][iid]
    for k, g in enumerate(sc["regions"]):
      if g["kind"] == "object":
        yield r, k, sc["objects"][g["obj"]]


def _object_regions(data):
  x, colour, shape, top, right = [], [], [], [], []
  for r, k, o in _iter_object_regions(data):
    x.append(r["features"][k].astype(np.float32))
    colour.append(scene_lib.COLOUR_NAMES.index(o["colour"]))
    shape.append(scene_lib.SHAPES.index(o["shape"]))
    p = r["soft_labels"][k, 1:].astype(np.float32)
    top.append(p.max() / p.sum())
    right.append(int(np.argmax(p)) + 1 == scene_lib.class_index(o["shape"], o["colour"]))
  return np.stack(x), np.array(colour), np.array(shape), np.array(top), np.array(right)


def probe_accuracy(x, y, k, steps=300, lr=0.5):
  """Softmax regression (numpy, full-batch gradient descent); held-out accuracy on the last 30%."""
  n_train = int(0.7 * len(x))
  mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
  z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], 1)
  w = np.zeros((z.shape[1], k))
  onehot = np.eye(k)[y[:n_train]]
  for _ in range(steps):
    logits = z[:n_train] @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= lr * (z[:n_train].T @ (p - onehot) / n_train + 1e-3 * w)
  return float(((z[n_train:] @ w).argmax(1) == y[n_train:]).mean())


def test_probe_reads_colour_and_shape_but_no_single_dimension_does(data):
  x, colour, shape, _, _ = _object_regions(data)
  assert len(x) > 300
  for y, k, floor in ((colour, 7, 0.85), (shape, 6, 0.75)):
    majority = np.bincount(y).max() / len(y)
    full = probe_accuracy(x, y, k)
    best_single = max(probe_accuracy(x[:, [j]], y, k) for j in range(x.shape[1]))
    assert full > floor and full > majority + 0.5, (full, majority)
    assert best_single < 0.6 and full - best_single > 0.3, (full, best_single)


def test_soft_labels_are_calibrated_and_confuse_similar_classes(data):
  _, colour, shape, top, right = _object_regions(data)
  assert abs(top.mean() - right.mean()) < 0.08, (top.mean(), right.mean())
  assert 0.4 < right.mean() < 0.95  # confusion exists, but the detector is mostly right
  # Wrong colours are hue neighbours (red~orange~yellow, blue~purple~pink), not random ones.
  near = total = 0
  for r, k, o in _iter_object_regions(data):
    p = r["soft_labels"][k, 1:].astype(np.float32).reshape(6, 7).sum(0)
    guess = scene_lib.COLOUR_NAMES[int(np.argmax(p))]
    if guess != o["colour"]:
      total += 1
      hue = lambda c: scene_lib.COLOURS[c][1]
      near += abs((hue(guess) - hue(o["colour"]) + 180) % 360 - 180) < 60
  assert total and near / total > 0.8, (near, total)
