"""VQA fine-tuning end to end on the tiny synthetic world and the 8-device mesh.

One short training run (module fixture) serves every test: loss goes down, eval runs,
predict writes one answer per question, init_from a pretraining export / an orbax workdir,
and bad input (missing images, out-of-range answer ids).
"""

import json
import os

import numpy as np
import pytest
from flax import nnx

from configs import vqa as vqa_config
from uniter_jax import checkpointing, pytree, train
from uniter_jax.data import format as fmt
from helpers import world_config


def _config(world, **overrides):
  return world_config(vqa_config, world, **overrides)


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vqa") / "run")
  out = train.train_and_evaluate(_config(tiny_world), workdir)
  return workdir, out


def test_finetune_loss_down_and_eval(run):
  workdir, out = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(r) for r in f]
  losses = [r["loss"] for r in rows]
  assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
  assert "train_score" in rows[-1] and "loss_vqa" in rows[-1]
  ev = out["eval"]
  assert ev["questions"] == 36 and 0.0 <= ev["vqa_score"] <= 1.0
  assert {"vqa_score/count", "vqa_score/exist", "soft_score"} <= set(ev)
  with open(os.path.join(workdir, "model_config.json")) as f:
    assert json.load(f)["model_class"] == "UniterForVqa"


def test_predict_writes_every_question_once(run, tiny_world):
  workdir, _ = run
  res = train.train_and_evaluate(_config(tiny_world), workdir, mode="predict")
  with open(res["predictions"]) as f:
    results = json.load(f)
  want = [r["id"] for r in fmt.iter_text_records(f"{tiny_world}/txt/vqa_test")]
  assert sorted(r["question_id"] for r in results) == sorted(want)
  with open(f"{tiny_world}/txt/vqa_train/ans2label.json") as f:
    vocab = set(json.load(f))
  assert all(isinstance(r["answer"], str) and r["answer"] in vocab for r in results)
  # Same predictions again from --mode=eval's path: the checkpoint is unchanged.
  again = train.train_and_evaluate(_config(tiny_world), workdir, mode="eval")
  assert again["questions"] == 36


def test_init_from_pretraining_export_and_orbax(run, tiny_world, tmp_path):
  from uniter_jax.models import UniterForPretraining
  cfg = _config(tiny_world)
  spec = train.resolve_data(cfg)
  model_cfg = train.model_config_from(cfg, train.data_sizes(spec))
  pre = UniterForPretraining(model_cfg, rngs=nnx.Rngs(7))
  path = checkpointing.export_msgpack(pre, str(tmp_path / "pre"))
  # export mode writes the initialised parameters without training.
  train.train_and_evaluate(_config(tiny_world, init_from=path), str(tmp_path / "a"),
                           mode="export")
  got = checkpointing.read_msgpack(str(tmp_path / "a" / "export" / "params.msgpack"))
  want = checkpointing.read_msgpack(path)
  assert set(got) == {"uniter", "vqa_output"}  # pretraining heads dropped, VQA head fresh
  want = pytree.flatten(want["uniter"])
  assert set(pytree.flatten(got["uniter"])) == set(want)
  for k, a in pytree.flatten(got["uniter"]).items():
    np.testing.assert_array_equal(a, want[k], err_msg=str(k))
  # An orbax workdir (the fine-tuned run) as init_from: every parameter, head included.
  workdir, _ = run
  train.train_and_evaluate(_config(tiny_world, init_from=workdir), str(tmp_path / "b"),
                           mode="export")
  b = checkpointing.read_msgpack(str(tmp_path / "b" / "export" / "params.msgpack"))
  train.train_and_evaluate(_config(tiny_world), workdir, mode="export")
  final = checkpointing.read_msgpack(os.path.join(workdir, "export", "params.msgpack"))
  final = pytree.flatten(final)
  assert set(pytree.flatten(b)) == set(final)
  for k, x in pytree.flatten(b).items():
    np.testing.assert_array_equal(x, final[k], err_msg=str(k))


def test_missing_image_is_counted_in_eval_and_an_error_in_predict(run, tiny_world, tmp_path):
  from data_prep import vqa as prep
  from uniter_jax.data.tokenizer import WordPieceTokenizer
  recs = [r for r in fmt.iter_text_records(f"{tiny_world}/txt/vqa_val")][:10]
  vqa_recs = [{"question_id": 500 + i, "image_id": r["image_id"] if i else "no_such_image",
               "question": r["question"], "answers": list(r["answers"]),
               "top_answer": r["answer"], "answer_type": "", "question_type": r["question_type"]}
              for i, r in enumerate(recs)]
  with open(f"{tiny_world}/txt/vqa_train/ans2label.json") as f:
    a2l = json.load(f)
  out = str(tmp_path / "val_missing")
  prep.convert(vqa_recs, out, WordPieceTokenizer(f"{tiny_world}/vocab.txt"), a2l,
               image_id_template="{image_id}", train=False)
  workdir, _ = run
  cfg = _config(tiny_world, **{"data.val_text_dirs": out})
  res = train.train_and_evaluate(cfg, workdir, mode="eval")
  assert res["questions"] == 9 and res["skipped_questions"] == 1
  cfg = _config(tiny_world, predict_split="val", **{"data.val_text_dirs": out})
  with pytest.raises(fmt.DataError, match="no_such_image"):
    train.train_and_evaluate(cfg, workdir, mode="predict")

  # Answer ids beyond the model's vocabulary: a clear error, not a silent wrong target.
  small = tmp_path / "small_a2l.json"
  small.write_text(json.dumps({a: i for a, i in a2l.items() if i < 5}))
  with pytest.raises(fmt.DataError, match="outside the 5-answer"):
    train.train_and_evaluate(_config(tiny_world, **{"data.ans2label": str(small)}),
                             str(tmp_path / "c"))
  # A 22-answer checkpoint cannot initialise the 5-answer head: refused by name.
  with pytest.raises(train.RunError, match="another model size: vqa_output"):
    train.train_and_evaluate(_config(tiny_world, init_from=workdir,
                                     **{"data.ans2label": str(small)}),
                             str(tmp_path / "d"), mode="eval")


def test_load_a_workdir_equals_its_export(run, tiny_world):
  import uniter_jax  # pylint: disable=import-outside-toplevel
  from helpers import to_jnp  # pylint: disable=import-outside-toplevel
  workdir, _ = run
  train.train_and_evaluate(_config(tiny_world, export_overwrite=True), workdir, mode="export")
  from_orbax = uniter_jax.load(workdir)  # the latest orbax checkpoint, model from the record
  from_export = uniter_jax.load(os.path.join(workdir, "export"))
  assert type(from_orbax).__name__ == type(from_export).__name__ == "UniterForVqa"
  batch = next(iter(train.make_pipeline(
      _config(tiny_world), [f"{tiny_world}/txt/vqa_val"], [f"{tiny_world}/img_db"], None,
      (), model_cfg=from_export.config, seed=0, train=False)))
  batch = to_jnp({k: np.asarray(v) for k, v in batch.items()
                  if k in ("input_ids", "txt_mask", "img_feat", "img_pos", "img_mask")})
  a = pytree.flatten(nnx.to_pure_dict(nnx.state(from_orbax, nnx.Param)))
  b = pytree.flatten(nnx.to_pure_dict(nnx.state(from_export, nnx.Param)))
  assert set(a) == set(b)
  for k in a:  # the same parameters, bit for bit
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
  # Outputs agree to float32 rounding (orbax gives jax.Arrays, msgpack NumPy arrays). Jitted:
  # op-by-op dispatch of two forward passes costs more than compiling one.
  forward = nnx.jit(lambda model, batch: model(batch))
  np.testing.assert_allclose(np.asarray(forward(from_orbax, batch)),
                             np.asarray(forward(from_export, batch)), rtol=1e-5, atol=1e-6)


def test_a_workdir_of_another_model_is_refused_before_anything_is_written(run, tiny_world,
                                                                          tmp_path):
  from configs import pretrain as pretrain_config  # pylint: disable=import-outside-toplevel
  workdir, _ = run
  record = os.path.join(workdir, "model_config.json")
  before = open(record, "rb").read()
  other = pretrain_config.get_config("tiny")
  other.data.synthetic = tiny_world
  with pytest.raises(train.RunError, match="model class UniterForVqa -> UniterForPretraining"):
    train.train_and_evaluate(other, workdir)
  wider = _config(tiny_world)
  wider.model.num_layers = 3
  with pytest.raises(train.RunError, match="num_layers 2 -> 3"):
    train.train_and_evaluate(wider, workdir, mode="eval")
  assert open(record, "rb").read() == before
  # eval / predict / export of a workdir with no checkpoint and no init_from: refused.
  for mode in ("eval", "predict", "export"):
    with pytest.raises(train.RunError, match="no checkpoint"):
      train.train_and_evaluate(_config(tiny_world), str(tmp_path / "empty"), mode=mode)


def test_init_from_and_vocab_mistakes_are_named(run, tiny_world, tmp_path, capsys):
  workdir, _ = run
  # The workdir's checkpoint wins over config.init_from, and the terminal says so.
  train.train_and_evaluate(_config(tiny_world, init_from="elsewhere.msgpack",
                                   export_overwrite=True), workdir, mode="export")
  assert "(config.init_from=elsewhere.msgpack is not used" in capsys.readouterr().out
  # init_from that does not exist: refused before anything is written.
  with pytest.raises(train.RunError, match="init_from=.*missing: no such file or folder"):
    train.train_and_evaluate(_config(tiny_world, init_from=str(tmp_path / "missing")),
                             str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()
  # init_from that is not a checkpoint: one message naming it and what is expected.
  bad = tmp_path / "notes.msgpack"
  bad.write_text("my notes, not a checkpoint")
  with pytest.raises(train.RunError, match=f"init_from={bad}: .*expected a params.msgpack"):
    train.train_and_evaluate(_config(tiny_world, init_from=str(bad)), str(tmp_path / "b"),
                             mode="export")
  # Texts tokenised with another vocab than the run's (same size, so same model shapes).
  tokens = open(f"{tiny_world}/vocab.txt", encoding="utf-8").read().splitlines()
  (tmp_path / "vocab.txt").write_text("\n".join(tokens[:-1] + [tokens[-1] + "x"]) + "\n")
  with pytest.raises(fmt.DataError, match="vqa_val: texts were tokenised with vocab .*, the "
                                          "model's vocab is"):
    train.train_and_evaluate(_config(tiny_world, **{"data.vocab": str(tmp_path / "vocab.txt")}),
                             workdir, mode="eval")
