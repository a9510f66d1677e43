"""TFDS builder: prepared examples equal the texts joined with their regions by our own readers."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from uniter_jax.data import DataError, iter_image_records, iter_text_records, read_manifest, write_dataset
from uniter_jax.data import tfds_builder


def _plain(x):
  """TFDS gives strings as bytes (arrays of them for lists); our readers give str."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.dtype == object:
    return [_plain(v) for v in x]
  return x


def _check_split(ds, text_dir, images):
  """Every example equals its text record joined with its images' records; counts match the manifest."""
  texts = {t["id"]: t for t in iter_text_records(text_dir)}
  fields = read_manifest(text_dir)["texts"]["fields"]
  seen = set()
  for ex in tfds.as_numpy(ds):
    t = texts[_plain(ex["id"])]
    seen.add(t["id"])
    np.testing.assert_array_equal(ex["input_ids"], t["input_ids"])
    assert ex["input_ids"].dtype == np.int32
    for k in fields:
      got, want = _plain(ex[k]), t[k]
      assert np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want, k
    for key, iid in zip(tfds_builder.image_keys(len(t["image_ids"])), t["image_ids"]):
      got, want = ex[key], images[iid]
      assert _plain(got["image_id"]) == iid
      for k in ("features", "img_pos", "conf", "soft_labels"):
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # bit-exact, float16 kept
  assert seen == set(texts) and len(texts) == read_manifest(text_dir)["texts"]["count"]


@pytest.fixture(scope="module")
def images(tiny_world):
  return {r["image_id"]: r for r in iter_image_records(os.path.join(tiny_world, "img_db"))}


def test_splits_equal_our_readers(tiny_world, images, tmp_path):
  txt = os.path.join(tiny_world, "txt")
  img = os.path.join(tiny_world, "img_db")
  splits = {"train": os.path.join(txt, "vqa_val"), "validation": os.path.join(txt, "re_val")}
  with pytest.raises(DataError, match="task fields"):  # one dataset = one task's fields
    tfds_builder.builder(splits, img, tmp_path, prepare=False)
  splits["validation"] = os.path.join(txt, "vqa_test")
  b = tfds_builder.builder(splits, [img], tmp_path, config_name="vqa")
  for split, text_dir in splits.items():
    assert b.info.splits[split].num_examples == read_manifest(text_dir)["texts"]["count"]
    _check_split(b.as_dataset(split=split), text_dir, images)
  # tfds.load finds the registered builder and reuses the prepared files (nothing is fetched).
  kwargs = {"text_dirs": splits, "image_dirs": [img], "config_name": "vqa"}
  ds = tfds.load("uniter_regions", split="validation", data_dir=tmp_path, builder_kwargs=kwargs)
  _check_split(ds, splits["validation"], images)
  # Other folders under a prepared name are refused, not silently served the old data.
  with pytest.raises(DataError, match="prepared from other folders"):
    tfds_builder.builder({"train": os.path.join(txt, "vqa_train")}, img, tmp_path, config_name="vqa")


def test_two_images_per_text(tiny_world, images, tmp_path):
  nlvr = os.path.join(tiny_world, "txt", "nlvr2_val")
  b = tfds_builder.builder({"test": nlvr}, os.path.join(tiny_world, "img_db"), tmp_path)
  assert {"image_0", "image_1"} <= set(b.info.features) and "image" not in b.info.features
  _check_split(b.as_dataset(split="test"), nlvr, images)


def test_bad_folders_are_data_errors(tiny_world, tmp_path):
  img = os.path.join(tiny_world, "img_db")
  vqa = os.path.join(tiny_world, "txt", "vqa_val")
  with pytest.raises(DataError, match=re.escape(f"{img} holds no texts")):
    tfds_builder.builder({"train": img}, img, tmp_path)
  with pytest.raises(DataError, match=re.escape(f"{vqa} holds no images")):
    tfds_builder.builder({"train": vqa}, vqa, tmp_path)
  missing = str(tmp_path / "nope")
  with pytest.raises(DataError, match=re.escape(f"{missing} is not a dataset folder")):
    tfds_builder.builder({"train": missing}, img, tmp_path)
  # A text whose image no image dir holds: an error naming it, or a counted drop.
  texts = [{"id": "a", "image_id": "synth_000000", "input_ids": [5]}, {"id": "b", "image_id": "gone", "input_ids": [6]}]
  write_dataset(tmp_path / "txt", texts=texts)
  with pytest.raises(DataError, match=r"1 text\(s\) refer to images no image dir holds.*'b', 'gone'"):
    tfds_builder.builder({"train": tmp_path / "txt"}, img, tmp_path / "tfds")
  b = tfds_builder.builder({"train": tmp_path / "txt"}, img, tmp_path / "tfds", skip_missing=True)
  assert [_plain(ex["id"]) for ex in tfds.as_numpy(b.as_dataset(split="train"))] == ["a"]
  with open(os.path.join(b.data_dir, "metadata.json")) as f:
    assert json.load(f)["texts_missing_image"] == {"train": 1}
