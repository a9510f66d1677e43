"""SNLI-VE and NLVR2 fine-tuning end to end on the tiny synthetic world and the 8-device mesh.

One short run per task (module fixtures) serves every test: training logs the task's loss
and accuracy, eval reports accuracy (per class, consistency, majority baseline), predict
writes every test text once in the official format, init_from a pretraining export / an
orbax workdir grows the type table for NLVR2, and bad input (a label outside the classes,
a pair with a missing image) gets a clear error or a counted skip.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

from configs import nlvr2 as nlvr2_config
from configs import ve as ve_config
from uniter_jax import checkpointing, pytree, train
from uniter_jax.data import format as fmt
from helpers import world_config

CONFIGS = {"ve": ve_config, "nlvr2": nlvr2_config}


def _config(task, world, **overrides):
  return world_config(CONFIGS[task], world, **overrides)


@pytest.fixture(scope="module")
def ve_run(tiny_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ve") / "run")
  return workdir, train.train_and_evaluate(_config("ve", tiny_world), workdir)


@pytest.fixture(scope="module")
def nlvr2_run(tiny_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("nlvr2") / "run")
  return workdir, train.train_and_evaluate(_config("nlvr2", tiny_world), workdir)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(r) for r in f]


def _texts(world, split):
  return list(fmt.iter_text_records(f"{world}/txt/{split}"))


def test_ve_trains_evaluates_and_predicts(ve_run, tiny_world):
  workdir, out = ve_run
  rows = _metrics(workdir)
  assert all(np.isfinite(r["loss"]) for r in rows) and "train_accuracy" in rows[-1]
  ev = out["eval"]
  val = _texts(tiny_world, "ve_val")
  assert ev["ve/examples"] == len(val)
  labels = np.array([r["target"] for r in val])
  assert ev["ve/majority_baseline"] == pytest.approx(np.bincount(labels).max() / len(labels))
  assert {"ve/accuracy", "ve/accuracy_contradiction", "ve/accuracy_entailment",
          "ve/accuracy_neutral"} <= set(ev)
  # Overall accuracy is the class accuracies weighted by the class counts.
  per = [ev[f"ve/accuracy_{n}"] for n in ("contradiction", "entailment", "neutral")]
  assert ev["ve/accuracy"] == pytest.approx(np.dot(per, np.bincount(labels, minlength=3))
                                            / len(labels))
  with open(os.path.join(workdir, "model_config.json")) as f:
    assert json.load(f)["model_class"] == "UniterForVisualEntailment"
  res = train.train_and_evaluate(_config("ve", tiny_world), workdir, mode="predict")
  with open(res["predictions"]) as f:
    preds = json.load(f)
  assert sorted(p["id"] for p in preds) == sorted(r["id"] for r in _texts(tiny_world, "ve_test"))
  assert {p["label"] for p in preds} <= {"contradiction", "entailment", "neutral"}


def test_nlvr2_trains_evaluates_and_writes_the_official_csv(nlvr2_run, tiny_world):
  workdir, out = nlvr2_run
  rows = _metrics(workdir)
  assert all(np.isfinite(r["loss"]) for r in rows) and "loss_nlvr2" in rows[-1]
  ev = out["eval"]
  val = _texts(tiny_world, "nlvr2_val")
  assert ev["nlvr2/examples"] == len(val)
  # Synthetic identifiers name one statement each: consistency equals accuracy there.
  assert ev["nlvr2/consistency"] == pytest.approx(ev["nlvr2/accuracy"])
  with open(os.path.join(workdir, "model_config.json")) as f:
    rec = json.load(f)
  assert rec["model_class"] == "UniterForNlvr2"
  assert rec["model_kwargs"] == {"variant": "paired-attn", "use_img_type": True}
  assert rec["config"]["type_vocab_size"] == 3
  with open(os.path.join(workdir, "config.json")) as f:  # the resolved run config
    saved = json.load(f)
  assert saved["task"] == "nlvr2" and saved["nlvr2"]["variant"] == "paired-attn"
  res = train.train_and_evaluate(_config("nlvr2", tiny_world), workdir, mode="predict")
  with open(res["predictions"]) as f:
    lines = f.read().splitlines()
  test = _texts(tiny_world, "nlvr2_test")
  assert sorted(l.split(",")[0] for l in lines) == sorted(r["identifier"] for r in test)
  assert {l.split(",")[1] for l in lines} <= {"True", "False"}
  assert res["statements"] == len(test)


def test_nlvr2_init_from_pretraining_grows_the_type_table(ve_run, tiny_world, tmp_path):
  """Export (msgpack) and orbax workdir sources: types [row 0, row 1, row 1], backbone as is."""
  from uniter_jax.models import UniterForPretraining
  cfg = _config("nlvr2", tiny_world)
  model_cfg = train.model_config_from(cfg, train.data_sizes(train.resolve_data(cfg)))
  # Pretraining has the official 2 token types; the NLVR2 config asks for 3.
  pre = UniterForPretraining(dataclasses.replace(model_cfg, type_vocab_size=2),
                             rngs=nnx.Rngs(7))
  src = checkpointing.export_msgpack(pre, str(tmp_path / "pre"))
  ve_workdir, _ = ve_run
  for name, init in (("export", src), ("orbax", ve_workdir)):
    wd = str(tmp_path / name)
    train.train_and_evaluate(_config("nlvr2", tiny_world, init_from=init), wd, mode="export")
    got = pytree.flatten(checkpointing.read_msgpack(f"{wd}/export/params.msgpack")["uniter"])
    if name == "export":
      want = pytree.flatten(checkpointing.read_msgpack(src)["uniter"])
    else:
      train.train_and_evaluate(_config("ve", tiny_world, export_overwrite=True), ve_workdir,
                               mode="export")
      want = pytree.flatten(checkpointing.read_msgpack(
          f"{ve_workdir}/export/params.msgpack")["uniter"])
    types = ("embeddings", "token_type_embeddings", "embedding")
    assert want[types].shape[0] == 2 and got[types].shape[0] == 3
    np.testing.assert_array_equal(got[types], want[types][[0, 1, 1]])
    for k, a in want.items():
      if k != types:
        np.testing.assert_array_equal(got[k], a, err_msg=f"{name}: {k}")
  # A checkpoint of another model size is refused by name (orbax alone would restore it).
  small = _config("nlvr2", tiny_world, init_from=ve_workdir,
                  **{"model.hidden_size": 32, "model.num_heads": 2})
  with pytest.raises(train.RunError, match="another model size.*embedding"):
    train.train_and_evaluate(small, str(tmp_path / "small"), mode="export")


def _write_texts(path, texts, world):
  from uniter_jax.data.tokenizer import WordPieceTokenizer
  tok = WordPieceTokenizer(f"{world}/vocab.txt")
  fmt.write_dataset(path, texts=texts, tokenizer=tok.info(), source="test")


def test_bad_labels_and_missing_pair_images(nlvr2_run, ve_run, tiny_world, tmp_path):
  # A VE label outside contradiction / entailment / neutral: a clear error naming it.
  ve_texts = [dict(id=r["id"], image_id=r["image_id"], input_ids=r["input_ids"],
                   target=7 if i == 3 else r["target"], hypothesis=r["hypothesis"])
              for i, r in enumerate(_texts(tiny_world, "ve_val")[:6])]
  _write_texts(str(tmp_path / "ve_bad"), ve_texts, tiny_world)
  ve_workdir, _ = ve_run
  with pytest.raises(fmt.DataError, match="label 7"):
    train.train_and_evaluate(_config("ve", tiny_world, **{
        "data.val_text_dirs": str(tmp_path / "ve_bad")}), ve_workdir, mode="eval")
  # An NLVR2 pair whose right image is missing: counted in eval, an error in predict.
  pairs = _texts(tiny_world, "nlvr2_val")[:8]
  nl_texts = [dict(id=r["id"], image_ids=[r["image_ids"][0],
                                          "no_such_image" if i == 2 else r["image_ids"][1]],
                   input_ids=r["input_ids"], target=r["target"], sentence=r["sentence"],
                   identifier=r["identifier"]) for i, r in enumerate(pairs)]
  _write_texts(str(tmp_path / "nl_missing"), nl_texts, tiny_world)
  workdir, _ = nlvr2_run
  over = {"data.val_text_dirs": str(tmp_path / "nl_missing")}
  res = train.train_and_evaluate(_config("nlvr2", tiny_world, **over), workdir, mode="eval")
  assert res["nlvr2/examples"] == 7 and res["skipped_statements"] == 1
  with pytest.raises(fmt.DataError, match="no_such_image"):
    train.train_and_evaluate(_config("nlvr2", tiny_world, predict_split="val", **over),
                             workdir, mode="predict")
  # One-image texts are not NLVR2 data: said so before anything runs.
  with pytest.raises(fmt.DataError, match="two images"):
    train.train_and_evaluate(_config("nlvr2", tiny_world, **{
        "data.val_text_dirs": f"{tiny_world}/txt/ve_val"}), workdir, mode="eval")
