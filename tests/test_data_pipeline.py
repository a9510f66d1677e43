"""The tf.data input pipeline on an 8-device mesh: shapes, shardings, join, epochs, determinism, resume."""

import json
import os

import jax
import numpy as np
import pytest

from uniter_jax import batch as batch_contract
from uniter_jax.data import DataError, write_dataset
from uniter_jax.data.pipeline import InputPipeline, PipelineConfig
from uniter_jax.data.plan import image_hash

D = 16  # feature dim
C = 5  # soft-label classes
N_IMG = 40
N_TXT = 300
TOK = {"kind": "test", "cls_id": 1, "sep_id": 2, "mask_id": 3, "pad_id": 0, "unk_id": 4, "vocab_size": 200,
       "vocab_hash": "a" * 64}


def _image(i, rng):
  """Image i: feature column 0 = i, column 1 = box number, so a test can see which image a row came from."""
  n = int(rng.integers(3, 30))
  f = rng.normal(size=(n, D)).astype(np.float32)
  f[:, 0], f[:, 1] = i, np.arange(n)
  return {
      "image_id": f"img{i}", "features": f, "norm_bb": rng.uniform(size=(n, 6)),
      "conf": np.linspace(1, 0.5, n), "soft_labels": rng.dirichlet(np.ones(C), size=n),
  }


def _text(j, rng):
  """Text j about image j % N_IMG; token ids = 10 + (j % 50) repeated, so a row names its text."""
  return {
      "id": f"t{j}", "image_id": f"img{j % N_IMG}",
      "input_ids": [10 + j % 50] * int(rng.integers(1, 40)),
      "target": j, "score": j / 10, "labels": [j, j + 1][: 1 + j % 2],
  }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  rng = np.random.default_rng(0)
  imgs = [_image(i, rng) for i in range(N_IMG)]
  txts = [_text(j, rng) for j in range(N_TXT)]
  write_dataset(root / "img", images=imgs, shard_mb=0.004)  # about 4 images per shard
  write_dataset(root / "txt", texts=txts, tokenizer=TOK)
  return {"root": root, "images": {r["image_id"]: r for r in imgs}, "texts": txts}


@pytest.fixture(scope="module")
def mesh8():
  assert jax.device_count() == 8
  return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _cfg(**kw):
  base = dict(txt_buckets=(16, 48), img_buckets=(16, 32), batch_size=16, max_txt_len=30, num_epochs=1,
              window_shards=2, seed=3)
  base.update(kw)
  return PipelineConfig(**base)


def _pipe(data, mesh=None, state=None, **kw):
  return InputPipeline([str(data["root"] / "txt")], [str(data["root"] / "img")], mesh=mesh, config=_cfg(**kw),
                       state=state)


def _np(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def test_batches_shapes_shardings_join_and_epoch(data, mesh8):
  pipe = _pipe(data, mesh8, drop_remainder=False, feat_dtype="float16")
  shapes = set(pipe.shapes())
  seen = []
  n_batches = 0
  for batch in pipe:
    n_batches += 1
    batch_contract.check(batch)
    b, lt = batch["input_ids"].shape
    li = batch["img_feat"].shape[1]
    assert (b, lt, li) in shapes
    assert batch["img_feat"].shape == (b, li, D) and batch["img_feat"].dtype == np.float16
    assert batch["img_soft_labels"].shape == (b, li, C)
    assert batch["input_ids"].dtype == np.int32 and batch["img_ids"].shape == (b,)
    assert batch["labels"].shape == (b, 2) and batch["target"].dtype == np.int32
    # What a trainer compiles its step for ahead of the data (train.abstract_step_batches).
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == pipe.batch_spec(b, lt, li)
    for v in batch.values():
      assert isinstance(v, jax.Array)
      assert v.sharding.spec[0] == ("data", "fsdp")  # batch dim over both data-parallel axes
      assert len(v.addressable_shards) == 8
    nb = _np(batch)
    for r in range(b):
      j = int(nb["example_index"][r])
      if j < 0:  # eval padding row
        assert not nb["txt_mask"][r].any() and not nb["img_mask"][r].any()
        continue
      seen.append(j)
      t = data["texts"][j]
      img = data["images"][t["image_id"]]
      n_txt = min(len(t["input_ids"]), 30)
      ids = nb["input_ids"][r]
      assert ids[0] == 1 and ids[n_txt + 1] == 2 and (ids[1 : n_txt + 1] == 10 + j % 50).all()
      assert nb["txt_mask"][r].sum() == n_txt + 2 and (ids[n_txt + 2 :] == 0).all()
      n = min(len(img["features"]), 32)
      assert nb["img_mask"][r].sum() == n
      np.testing.assert_allclose(nb["img_feat"][r, :n], img["features"][:n].astype(np.float16))
      assert (nb["img_feat"][r, n:] == 0).all()
      np.testing.assert_array_equal(nb["img_soft_labels"][r, :n], img["soft_labels"][:n].astype(np.float16))
      assert (nb["img_soft_labels"][r, n:] == 0).all() and (nb["img_pos"][r, n:] == 0).all()
      np.testing.assert_allclose(nb["img_pos"][r, :n, :6], img["norm_bb"][:n], rtol=1e-6)
      np.testing.assert_allclose(nb["img_pos"][r, :n, 6], img["norm_bb"][:n, 4] * img["norm_bb"][:n, 5], rtol=1e-5)
      assert nb["img_ids"][r] == image_hash([t["image_id"]])
      assert nb["target"][r] == j and nb["score"][r] == pytest.approx(j / 10)
      assert list(nb["labels"][r]) == (t["labels"] + [-1])[:2]
  # Eval mode: every text exactly once.
  assert sorted(seen) == list(range(N_TXT))
  assert n_batches == pipe.steps_per_epoch
  assert pipe.state()["epoch"] == 1 and pipe.state()["step"] == 0
  assert pipe.stats["text_truncated"] == sum(len(t["input_ids"]) > 30 for t in data["texts"])


def test_train_epoch_drops_only_partial_batches(data):
  pipe = _pipe(data)
  batches = list(pipe.host_batches())
  # The buckets an epoch has batches of (those a trainer compiles its step for at start-up).
  assert {(b["input_ids"].shape[0], b["input_ids"].shape[1], b["img_feat"].shape[1])
          for b in batches} == set(pipe.produced_shapes())
  seen = [int(j) for b in batches for j in b["example_index"]]
  assert len(seen) == len(set(seen)) and min(seen) >= 0  # no duplicates, no padding rows
  assert N_TXT - len(seen) < 16 * len(pipe.shapes())  # at most one partial batch per bucket
  assert len(seen) == 16 * pipe.steps_per_epoch


def test_regions_beyond_the_largest_bucket_are_cut(data):
  """Images with more regions than the largest bucket keep their first ones, in order."""
  pipe = _pipe(data, img_buckets=(8, 16), feat_dtype="float16")
  for b in pipe.host_batches():
    for r, j in enumerate(b["example_index"]):
      img = data["images"][data["texts"][j]["image_id"]]
      n = min(len(img["features"]), 16)
      assert b["img_mask"][r].sum() == n and b["img_feat"].shape[1] >= n
      np.testing.assert_array_equal(b["img_feat"][r, :n], img["features"][:n].astype(np.float16))
      assert (b["img_feat"][r, n:] == 0).all()
  assert pipe.stats["regions_truncated"] == sum(len(data["images"][t["image_id"]]["features"]) > 16
                                                for t in data["texts"])


def test_token_budget_batch_sizes(data, mesh8):
  pipe = _pipe(data, mesh8, batch_size=None, token_budget=2048)
  for b, lt, li in pipe.shapes():
    assert b % 8 == 0 and b * (lt + li) <= 2048 and (b + 8) * (lt + li) > 2048


def test_step_groups_keep_one_bucket_per_update(data):
  """step_group=k (the trainer's grad_accum_steps): steps come in runs of k batches of one
  bucket, so an update's micro-batches share a batch size under a token budget; the runs hold
  the same batches as step_group=1 (each bucket's count cut to a multiple of k)."""
  kw = dict(batch_size=None, token_budget=1024)
  one = [_np(b) for b in _pipe(data, **kw).host_batches()]
  pipe = _pipe(data, step_group=3, **kw)
  three = [_np(b) for b in pipe.host_batches()]
  shape = lambda b: (b["input_ids"].shape, b["img_feat"].shape[1])  # noqa: E731
  assert len({b["input_ids"].shape[0] for b in one}) > 1  # buckets differ in batch size
  assert len(three) == pipe.steps_per_epoch and len(three) % 3 == 0
  for g in range(0, len(three), 3):
    assert len({shape(b) for b in three[g:g + 3]}) == 1, g
  by_shape = lambda bs: {s: sorted(tuple(b["example_index"]) for b in bs if shape(b) == s)  # noqa: E731
                         for s in {shape(b) for b in bs}}
  first, grouped = by_shape(one), by_shape(three)
  for s, batches in grouped.items():
    assert len(batches) == len(first[s]) // 3 * 3
    assert set(batches) <= set(first[s])


def test_deterministic_and_seed_dependent(data):
  a = [b["example_index"] for b in _pipe(data, num_epochs=2).host_batches()]
  b = [b["example_index"] for b in _pipe(data, num_epochs=2).host_batches()]
  c = [b["example_index"] for b in _pipe(data, num_epochs=2, seed=4).host_batches()]
  assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b))
  assert any(x.shape != y.shape or (x != y).any() for x, y in zip(a, c))
  half = len(a) // 2  # the two epochs differ
  assert any(x.shape != y.shape or (x != y).any() for x, y in zip(a[:half], a[half:]))


@pytest.mark.parametrize("k", [3, 20])  # mid-epoch, and in the second epoch
def test_resume_reproduces_next_batches(data, mesh8, k):
  full = [_np(b) for b in _pipe(data, mesh8, num_epochs=2)]
  pipe = _pipe(data, mesh8, num_epochs=2)
  it = iter(pipe)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(pipe.state()))  # as saved with a checkpoint
  del it, pipe
  rest = [_np(b) for b in _pipe(data, mesh8, num_epochs=2, state=state)]
  assert len(rest) == len(full) - k
  for x, y in zip(full[k:], rest):
    assert x.keys() == y.keys()
    for name in x:
      np.testing.assert_array_equal(x[name], y[name])


@pytest.mark.parametrize("drop", [True, False])
def test_two_hosts_agree_on_steps_and_split_the_texts(data, drop):
  hosts = [InputPipeline([str(data["root"] / "txt")], [str(data["root"] / "img")], config=_cfg(drop_remainder=drop),
                         process_index=h, process_count=2) for h in range(2)]
  runs = [list(p.host_batches()) for p in hosts]
  assert len(runs[0]) == len(runs[1]) == hosts[0].steps_per_epoch
  seen = []
  for a, b in zip(*runs):
    assert a["input_ids"].shape == b["input_ids"].shape == (8, a["input_ids"].shape[1])  # half of 16 each
    assert a["img_feat"].shape == b["img_feat"].shape
    seen += [int(j) for j in np.concatenate([a["example_index"], b["example_index"]]) if j >= 0]
  assert len(seen) == len(set(seen))
  if not drop:
    assert sorted(seen) == list(range(N_TXT))


def test_resume_refuses_other_config(data):
  state = _pipe(data).state()
  with pytest.raises(DataError, match="another pipeline configuration"):
    _pipe(data, seed=99, state=state)


def test_missing_image_counted_or_strict(data, tmp_path):
  texts = [dict(t) for t in data["texts"][:40]]
  texts[5]["image_id"] = "no_such_image"
  write_dataset(tmp_path / "txt", texts=texts, tokenizer=TOK)
  args = ([str(tmp_path / "txt")], [str(data["root"] / "img")])
  pipe = InputPipeline(*args, config=_cfg(drop_remainder=False))
  assert pipe.stats["text_missing_image"] == 1 and "t5 -> no_such_image" in pipe.report()
  seen = {int(j) for b in pipe.host_batches() for j in b["example_index"] if j >= 0}
  assert seen == set(range(40)) - {5}
  with pytest.raises(DataError, match="no_such_image"):
    InputPipeline(*args, config=_cfg(strict=True))


def test_model_mismatches_are_named(data):
  with pytest.raises(DataError, match="img_dim is 2048"):
    _pipe(data, img_dim=2048)
  with pytest.raises(DataError, match="outside the model vocab"):
    _pipe(data, vocab_size=20)
  with pytest.raises(DataError, match="re-tokenise"):
    InputPipeline([str(data["root"] / "txt")], [str(data["root"] / "img")], config=_cfg(), vocab_hash="0" * 64)


def test_truncated_shard_is_named(data, tmp_path):
  import shutil

  shutil.copytree(data["root"] / "img", tmp_path / "img")
  shard = tmp_path / "img" / "images-00003.tfrecord"
  raw = shard.read_bytes()
  shard.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(DataError, match="images-00003.tfrecord.*truncated"):
    InputPipeline([str(data["root"] / "txt")], [str(tmp_path / "img")], config=_cfg())


def test_two_images_per_text(tmp_path):
  rng = np.random.default_rng(1)
  imgs = [_image(i, rng) for i in range(12)]
  texts = [{"id": j, "image_id": [f"img{j % 12}", f"img{(j * 5 + 1) % 12}"], "input_ids": [7] * 3, "target": j % 2}
           for j in range(48)]
  write_dataset(tmp_path / "img", images=imgs, shard_mb=0.004)
  write_dataset(tmp_path / "txt", texts=texts, tokenizer=TOK)
  pipe = InputPipeline([str(tmp_path / "txt")], [str(tmp_path / "img")], config=_cfg(drop_remainder=False, batch_size=8))
  seen = []
  for b in pipe.host_batches():
    assert b["img_feat"].shape[1] == 2 and b["img_mask"].shape[1] == 2
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == pipe.batch_spec(
        b["input_ids"].shape[0], b["input_ids"].shape[1], b["img_feat"].shape[2])
    for r, j in enumerate(b["example_index"]):
      if j < 0:
        continue
      seen.append(int(j))
      for s, iid in enumerate(texts[j]["image_id"]):
        n = b["img_mask"][r, s].sum()
        np.testing.assert_array_equal(b["img_feat"][r, s, :n, 0], int(iid[3:]))
  assert sorted(seen) == list(range(48))


def test_pipeline_import_does_not_pull_tensorflow_into_uniter_jax():
  import subprocess
  import sys

  code = "import sys, uniter_jax, uniter_jax.data, uniter_jax.batch; assert 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
