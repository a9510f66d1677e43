"""The RefCOCO converter on small files in the real refer / COCO layouts: text records with the
target region, the gt box and the image size; gt-box image records whose region i is annotation
i (IoU 1 with every text's gt box, as the RE evaluation computes it); counted skips; one-line
errors."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from data_prep import refcoco
from uniter_jax.data import DataError, iter_image_records, iter_text_records, read_manifest
from uniter_jax.evaluators import refer as refer_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "man", "left", "the", "dog", "red", "car"]

# Image 42 (640 x 480) has annotations 7, 3, 9 in this file order; image 43 (100 x 50) has 5.
INSTANCES = {
    "images": [{"id": 42, "width": 640, "height": 480}, {"id": 43, "width": 100, "height": 50}],
    "annotations": [
        {"id": 7, "image_id": 42, "bbox": [10, 20, 100, 200], "category_id": 1},
        {"id": 3, "image_id": 42, "bbox": [300, 40, 50, 60], "category_id": 18},
        {"id": 5, "image_id": 43, "bbox": [0, 0, 50, 25], "category_id": 3},
        {"id": 9, "image_id": 42, "bbox": [0, 0, 640, 480], "category_id": 3},
    ],
}
REFS = [
    {"ref_id": 0, "ann_id": 3, "image_id": 42, "split": "train", "category_id": 18,
     "sentences": [{"sent_id": 100, "sent": "the dog"}, {"sent_id": 101, "sent": "red dog"}]},
    {"ref_id": 1, "ann_id": 9, "image_id": 42, "split": "train",
     "sentences": [{"sent_id": 102, "sent": "the car"}]},
    {"ref_id": 2, "ann_id": 5, "image_id": 43, "split": "val",
     "sentences": [{"sent_id": 103, "sent": "the man left"}]},
    {"ref_id": 3, "ann_id": 999, "image_id": 42, "split": "train",  # not in instances.json
     "sentences": [{"sent_id": 104, "sent": "the man"}]},
]


@pytest.fixture()
def files(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  with open(tmp_path / "refs(unc).p", "wb") as f:
    pickle.dump(REFS, f, protocol=2)  # the refer files are Python 2 pickles
  (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
  feats = tmp_path / "gt"
  feats.mkdir()
  rng = np.random.default_rng(0)
  np.savez(feats / "coco_000000000042.npz", features=rng.random((3, 8), dtype=np.float32))
  np.savez(feats / "coco_000000000043.npz", features=rng.random((1, 8), dtype=np.float32))
  return tmp_path


def _texts(files, split="train", **kw):
  tok = refcoco.common.load_tokenizer(str(files / "vocab.txt"), False)
  out = str(files / f"txt_{split}")
  manifest = refcoco.convert_texts(str(files / "refs(unc).p"), str(files / "instances.json"), split, out,
                                   tok, **kw)
  return manifest, {r["id"]: r for r in iter_text_records(out)}


def test_texts_hold_target_region_box_and_size(files):
  manifest, recs = _texts(files)
  assert sorted(recs) == ["100", "101", "102"]  # ref 3's annotation is missing: counted
  assert manifest["skipped"] == {"missing_annotation": 1}
  r = recs["100"]
  # Annotation 3 is the second of image 42's annotations (7, 3, 9): region 1.
  assert r["target"] == 1 and recs["102"]["target"] == 2
  assert r["image_id"] == "coco_000000000042"
  np.testing.assert_allclose(r["bbox"], [300, 40, 50, 60])
  assert (r["image_w"], r["image_h"]) == (640, 480)
  assert list(r["input_ids"]) == [VOCAB.index("the"), VOCAB.index("dog")]
  assert manifest["re"]["sentences"] == 3


def test_targets_beyond_the_kept_regions_are_counted_and_kept_untrained(files):
  manifest, recs = _texts(files, max_regions=2)
  assert recs["102"]["target"] == -1 and recs["100"]["target"] == 1
  assert manifest["re"]["target_beyond_max_regions"] == 1


def test_gt_images_put_annotation_i_at_region_i(files):
  out = str(files / "img")
  refcoco.convert_images(str(files / "instances.json"), str(files / "gt"), out)
  imgs = {r["image_id"]: r for r in iter_image_records(out)}
  rec = imgs["coco_000000000042"]
  assert rec["num_boxes"] == 3  # every annotation kept, no box policy
  # Rebuilding pixel boxes as the RE evaluation does gives back the annotation boxes.
  boxes = refer_eval.region_boxes(rec["img_pos"], 640, 480)
  np.testing.assert_allclose(boxes, [[10, 20, 100, 200], [300, 40, 50, 60], [0, 0, 640, 480]],
                             atol=1e-3)
  _, recs = _texts(files)
  # The gt box of every text is its target region: IoU 1 under the official convention.
  for r in recs.values():
    assert refer_eval.iou(boxes[r["target"]], r["bbox"]) == pytest.approx(1.0)


def test_feature_rows_must_match_the_annotations(files):
  np.savez(files / "gt" / "coco_000000000042.npz", features=np.zeros((2, 8), np.float32))
  with pytest.raises(DataError, match="has 3 annotations"):
    refcoco.convert_images(str(files / "instances.json"), str(files / "gt"), str(files / "img"))
  assert not (files / "img").exists()


def test_cli_errors_are_one_line(files):
  (files / "bad.p").write_bytes(b"not a pickle")
  r = subprocess.run([sys.executable, "-m", "data_prep.refcoco", "texts", "--refs", str(files / "bad.p"),
                      "--instances", str(files / "instances.json"), "--split", "val",
                      "--vocab", str(files / "vocab.txt"), "--out", str(files / "o")],
                     cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().startswith("error: --refs") and len(r.stderr.strip().splitlines()) == 1
  with pytest.raises(DataError, match="no ref has split 'testB'"):
    _texts(files, split="testB")
  _texts(files, split="val")
  assert read_manifest(str(files / "txt_val"))["texts"]["count"] == 1
