"""VQA fine-tuning end to end on the tiny synthetic world and the 8-device mesh.

One short training run (module fixture) serves every test: loss goes down, eval runs,
predict writes one answer per question, init_from a pretraining export / an orbax workdir,
bad input (missing images, out-of-range answer ids), and its export: self-contained (the
parameters, the model record, the run's vocab, answer list and config, and a model card, all
readable by others, written as one unit; docs/reliability.md), loaded back bit for bit.
tools.convert writes its pair as one unit too.
"""

import contextlib
import io
import json
import os
import pathlib
import re
import socket
import stat

import ml_collections
import numpy as np
import pytest
from flax import nnx

import uniter_jax
from configs import vqa as vqa_config
from helpers import random_batch, to_jnp, world_config
from test_reliability import OFFICIAL, _snapshot
from uniter_jax import checkpointing, exporting, pytree, train
from uniter_jax.data import format as fmt
from uniter_jax.tools import convert


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


# -- The export ---------------------------------------------------------------------------


def _mode(path) -> int:
  """Permission bits of a file or folder."""
  return stat.S_IMODE(os.stat(path).st_mode)


def _card_metrics(card: str) -> tuple[int, dict[str, float]]:
  """(step, {metric: value}) of the card's held-out evaluation section."""
  section = card.split("## Held-out evaluation (step ")[1].split("\n## ")[0]
  step = int(section.split(")")[0])
  rows = re.findall(r"^\| (\S+) \| (\S+) \|$", section, flags=re.M)
  return step, {k: float(v) for k, v in rows if k != "metric"}


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def export(run, tiny_world):
  workdir, _ = run
  said = io.StringIO()
  with contextlib.redirect_stdout(said):  # what the terminal shows (train.say prints)
    out = train.train_and_evaluate(_config(tiny_world, export_overwrite=True), workdir,
                                   mode="export")
  return workdir, os.path.dirname(out["export"]), said.getvalue()


def test_export_holds_vocab_answers_config_and_card(export, tiny_world):
  workdir, folder, said = export
  # The terminal says where the export went and what it holds.
  assert (f"exported step 8 to {folder} (MODEL_CARD.md, ans2label.json, config.json, "
          "model_config.json, params.msgpack, vocab.txt)") in said, said
  assert set(os.listdir(folder)) == checkpointing.EXPORT_FILES
  assert _mode(folder) == 0o755
  assert {n: _mode(os.path.join(folder, n)) for n in os.listdir(folder)} == {
      n: 0o644 for n in checkpointing.EXPORT_FILES}
  assert [p for p in os.listdir(workdir) if p.startswith(".export")] == []  # no temp folder
  assert _read(os.path.join(folder, "vocab.txt")) == _read(f"{tiny_world}/vocab.txt")
  want_a2l = json.loads(_read(f"{tiny_world}/txt/vqa_train/ans2label.json"))
  assert json.loads(_read(os.path.join(folder, "ans2label.json"))) == want_a2l
  assert _read(os.path.join(folder, "config.json")) == _read(os.path.join(workdir, "config.json"))

  # The card names the steps trained and exactly the workdir's latest held-out metrics.
  card = _read(os.path.join(folder, "MODEL_CARD.md")).decode()
  with open(os.path.join(workdir, "eval", "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  assert "| steps trained | 8 (" in card and "| class | `UniterForVqa` |" in card
  step, metrics = _card_metrics(card)
  assert step == last["step"] == 8
  assert metrics == {k: v for k, v in last.items() if k != "step"}
  model = uniter_jax.load(folder)
  assert f"{exporting.param_count(nnx.state(model, nnx.Param)):,}" in card

  # read_export_extras returns them for inference (uniter_jax/inference).
  extras = checkpointing.read_export_extras(folder)
  assert extras.vocab == os.path.join(folder, "vocab.txt")
  assert extras.ans2label == want_a2l
  assert extras.labels == tuple(sorted(want_a2l, key=want_a2l.get))
  assert extras.model_card == os.path.join(folder, "MODEL_CARD.md")
  assert checkpointing.read_export_extras(os.path.join(folder, "params.msgpack")) == extras
  # config.json is the run's config: it resolves to the exported model's sizes.
  cfg = ml_collections.ConfigDict(extras.config)
  spec = train.resolve_data(cfg)
  assert train.model_config_from(cfg, train.data_sizes(spec)) == model.config


def test_load_round_trip_gives_identical_outputs(export):
  workdir, folder, _ = export
  from_export, from_workdir = uniter_jax.load(folder), uniter_jax.load(workdir)
  a = pytree.flatten(nnx.to_pure_dict(nnx.state(from_export, nnx.Param)))
  b = pytree.flatten(nnx.to_pure_dict(nnx.state(from_workdir, nnx.Param)))
  assert set(a) == set(b)
  for k in a:  # the checkpoint's parameters, bit for bit
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
  batch = to_jnp(random_batch(0, b=2, cfg=from_export.config, soft_labels=False))
  forward = nnx.jit(lambda model, batch: model(batch))
  # load() puts a workdir's parameters on one device, as the export's, whatever the
  # checkpoint's layout (8 devices here): the same sums, the same outputs.
  assert {len(x.sharding.device_set) for x in b.values()} == {1}
  np.testing.assert_array_equal(np.asarray(forward(from_export, batch)),
                                np.asarray(forward(from_workdir, batch)))


def test_overwrite_replaces_our_export_but_not_a_folder_with_a_foreign_file(export, tiny_world,
                                                                            tmp_path):
  workdir, folder, _ = export

  def again(**overrides):
    return train.train_and_evaluate(_config(tiny_world, **overrides), workdir, mode="export")

  assert checkpointing.not_an_export(folder) is None  # every file an export writes is ours
  with pytest.raises(FileExistsError, match="export_overwrite"):
    again()
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("mine")
  before = _snapshot(pathlib.Path(folder))
  with pytest.raises(FileExistsError, match=r"holds files an export does not write \(notes.txt\)"):
    again(export_overwrite=True)
  assert _snapshot(pathlib.Path(folder)) == before
  os.unlink(os.path.join(folder, "notes.txt"))
  # A folder under an export file's name would be deleted with the export: not ours either.
  vocab = os.path.join(folder, "vocab.txt")
  os.rename(vocab, f"{folder}.vocab")
  os.mkdir(vocab)
  assert "holds vocab.txt, which an export writes as a plain file" in (
      checkpointing.not_an_export(folder))
  os.rmdir(vocab)
  os.rename(f"{folder}.vocab", vocab)
  again(export_overwrite=True)  # our own export, all six files: replaced
  assert set(os.listdir(folder)) == checkpointing.EXPORT_FILES
  # An export of an earlier version (params.msgpack + model_config.json) loads, reads as
  # having no extras, and is replaced by overwrite.
  old = tmp_path / "old"
  model = uniter_jax.load(folder)
  checkpointing.export_msgpack(model, str(old))
  assert sorted(os.listdir(old)) == ["model_config.json", "params.msgpack"]
  assert type(uniter_jax.load(old)) is type(model)
  assert checkpointing.read_export_extras(str(old)) == checkpointing.ExportExtras(
      None, None, None, None, None)
  checkpointing.export_msgpack(model, str(old), overwrite=True,
                               extras={"ans2label.json": b'{"yes": 0}'})
  with pytest.raises(ValueError, match=f"1 labels, but the model .* has {model.num_answers} "):
    checkpointing.read_export_extras(str(old))
  with pytest.raises(ValueError, match="not files an export holds"):
    checkpointing.export_msgpack(model, str(tmp_path / "x"), extras={"notes.txt": b""})
  assert not (tmp_path / "x").exists()


def test_config_json_reproduces_the_run_and_an_untrained_export_says_so(export, tmp_path):
  # The card's recipe: the export's config.json is a config the trainer runs. Exporting with
  # init_from (no training) gives the same parameters, and a card that says 0 steps, no metrics.
  _, folder, _ = export
  cfg = ml_collections.ConfigDict(checkpointing.read_export_extras(folder).config)
  cfg.init_from = folder
  out = train.train_and_evaluate(cfg, str(tmp_path / "w"), mode="export")
  a = pytree.flatten(checkpointing.read_msgpack(out["export"]))
  b = pytree.flatten(checkpointing.read_msgpack(os.path.join(folder, "params.msgpack")))
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  with open(os.path.join(os.path.dirname(out["export"]), "MODEL_CARD.md")) as f:
    card = f.read()
  assert f"| steps trained | 0: the parameters of config.init_from `{folder}` |" in card
  assert "## Held-out evaluation\n\nNone recorded" in card


def test_conversion_writes_its_pair_as_one_unit(tmp_path, capsys):
  out = tmp_path / "ckpt" / "uniter.msgpack"
  out.parent.mkdir()
  # A temporary folder that a SIGKILLed conversion left (its PID is gone): removed by this one.
  dead = out.parent / f".uniter.msgpack.tmp-{socket.gethostname()}-999999999-abcdefgh"
  dead.mkdir()
  (dead / "params.msgpack").write_bytes(b"half")
  args = ["--from-official", str(OFFICIAL / "state_dict.npz"), "--model-config",
          str(OFFICIAL / "config.json"), "--out", str(out)]
  assert convert.main(args) == 0, capsys.readouterr().err
  assert sorted(os.listdir(out.parent)) == ["model_config.json", "uniter.msgpack"]
  assert {_mode(p) for p in out.parent.iterdir()} == {0o644}
  assert convert.main(args + ["--overwrite"]) == 0  # our own pair: replaced
  assert sorted(os.listdir(out.parent)) == ["model_config.json", "uniter.msgpack"]
  # Beside a workdir's (or another params file's) record: refused, even with --overwrite.
  other = tmp_path / "ckpt" / "large.msgpack"
  before = _snapshot(out.parent)
  assert convert.main(args[:-1] + [str(other), "--overwrite"]) == 1
  err = capsys.readouterr().err
  assert "records the model of another params file or of a workdir (large.msgpack" in err
  assert _snapshot(out.parent) == before
  assert convert.main(args[:-1] + [str(out.parent), "--overwrite"]) == 1  # a folder, not a file
  assert f"{out.parent} is a folder; --out names the params file" in capsys.readouterr().err
  assert _snapshot(out.parent) == before and sorted(os.listdir(tmp_path)) == ["ckpt"]
  assert type(uniter_jax.load(out)).__name__ == "UniterForPretraining"
