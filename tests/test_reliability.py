"""docs/reliability.md, row by row: a bad input or a user's mistake gets one clear message, and
nothing the user had is lost (files that existed before are compared byte for byte after).

The trainer's rows are in test_vqa_finetune.py (they reuse its trained run) and
test_trainer.py (SIGTERM's exit status)."""

import base64
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import COMPILE_FLAGS
from data_prep import butd_tsv, captions, common, npz_dir, vqa
from uniter_jax import checkpointing, interop
from uniter_jax.data import DataError, read_manifest, write_dataset
from uniter_jax.data import format as fmt
from uniter_jax.data.pipeline import InputPipeline, PipelineConfig
from uniter_jax.tools import convert

REPO = pathlib.Path(__file__).resolve().parent.parent
OFFICIAL = REPO / "tests" / "fixtures" / "official_tiny"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "."]


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
  """Every file under root (relative path -> bytes)."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(main, argv: list[str], capsys) -> tuple[int, str]:
  """A converter's command line in-process: (exit status, stderr)."""
  status = common.run_cli(main, [str(a) for a in argv])
  return status, capsys.readouterr().err


def _one_error_line(err: str, *needles: str) -> None:
  lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in err, err
  for n in needles:
    assert n in lines[0], (n, lines[0])


def _npz_dir(root: pathlib.Path) -> pathlib.Path:
  """A folder of two per-image .npz files (features, norm_bb, conf)."""
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  for i in range(2):
    np.savez(root / f"im{i}.npz", features=rng.normal(size=(3, 4)).astype(np.float32),
             norm_bb=rng.uniform(0, 1, (3, 6)).astype(np.float32), conf=np.ones(3, np.float32))
  return root


def _captions(root: pathlib.Path, *captions_: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(annotations JSONL, vocab.txt) under root."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  lines = [json.dumps({"image_id": f"im{i}", "caption": c}) for i, c in enumerate(captions_)]
  (root / "caps.jsonl").write_text("\n".join(lines) + "\n")
  return root / "caps.jsonl", root / "vocab.txt"


# -- Nothing lost ---------------------------------------------------------------------------


def test_overwrite_replaces_only_a_dataset_folder_we_wrote(tmp_path, capsys):
  caps, vocab = _captions(tmp_path / "in", "a dog runs .")
  args = ["--annotations", caps, "--vocab", vocab, "--overwrite", "--out"]
  mine = tmp_path / "mine"  # someone's folder, not a dataset
  mine.mkdir()
  (mine / "notes.txt").write_text("my notes")
  status, err = _cli(captions.main, args + [mine], capsys)
  assert status == 1
  _one_error_line(err, str(mine), "not a dataset made by data_prep", "--overwrite replaces only")
  assert _snapshot(mine) == {"notes.txt": b"my notes"}
  # Our dataset with a file its manifest does not list: also kept.
  ds = tmp_path / "ds"
  assert _cli(captions.main, args + [ds], capsys)[0] == 0
  (ds / "extra.csv").write_text("x")
  before = _snapshot(ds)
  status, err = _cli(captions.main, args + [ds], capsys)
  assert status == 1
  _one_error_line(err, "does not list (extra.csv)")
  assert _snapshot(ds) == before
  # Our dataset as it was written: replaced, and no temporary folder is left.
  (ds / "extra.csv").unlink()
  assert _cli(captions.main, args + [ds], capsys)[0] == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in", "mine"]


def test_out_that_is_inside_or_holds_an_input_is_refused(tmp_path, capsys):
  feats = _npz_dir(tmp_path / "feats")
  before = _snapshot(tmp_path)
  for out, how in ((feats, "is the input"), (feats / "ds", "is inside the input"),
                   (tmp_path, "holds the input")):
    status, err = _cli(npz_dir.main, ["--dir", feats, "--out", out, "--overwrite"], capsys)
    assert status == 1
    _one_error_line(err, f"--out {out} {how} {feats}")
  assert _snapshot(tmp_path) == before  # nothing written, nothing removed


def test_vqa_answer_vocabulary_is_published_with_the_dataset(tmp_path, capsys):
  qs = {"questions": [{"question_id": 1, "image_id": 7, "question": "a dog ."}]}
  ans = {"annotations": [{"question_id": 1, "image_id": 7, "multiple_choice_answer": "dog",
                          "answer_type": "other", "question_type": "what",
                          "answers": [{"answer": "dog"}] * 10}]}
  (tmp_path / "q.json").write_text(json.dumps(qs))
  (tmp_path / "a.json").write_text(json.dumps(ans))
  (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  args = ["--questions", tmp_path / "q.json", "--annotations", tmp_path / "a.json", "--vocab",
          tmp_path / "vocab.txt", "--min-answer-count", "1", "--out", tmp_path / "vqa"]
  for extra in ([], ["--overwrite"]):  # a dataset we wrote, ans2label.json included, is ours
    status, err = _cli(vqa.main, args + extra, capsys)
    assert status == 0, err
  assert read_manifest(tmp_path / "vqa")["files"] == ["ans2label.json"]
  assert json.loads((tmp_path / "vqa" / "ans2label.json").read_text()) == {"dog": 0}


def test_export_is_one_unit_and_replaces_only_an_export(tmp_path):
  # The official fixture's model: loading it costs less than initialising a fresh one.
  model = interop.load_official_checkpoint(OFFICIAL / "state_dict.npz", OFFICIAL / "config.json")
  out = tmp_path / "export"
  checkpointing.export_msgpack(model, str(out))
  with pytest.raises(FileExistsError, match="export_overwrite"):
    checkpointing.export_msgpack(model, str(out))
  checkpointing.export_msgpack(model, str(out), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left
  assert sorted(os.listdir(out)) == ["model_config.json", "params.msgpack"]
  (out / "notes.txt").write_text("mine")
  home = tmp_path / "home"
  home.mkdir()
  (home / "thesis.tex").write_text("years of work")
  for folder, why in ((out, "holds files an export does not write"), (home, "does not write")):
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match=why):
      checkpointing.export_msgpack(model, str(folder), overwrite=True)
    assert _snapshot(folder) == before
  (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: filled
  checkpointing.export_msgpack(model, str(tmp_path / "empty"))
  assert sorted(os.listdir(tmp_path / "empty")) == ["model_config.json", "params.msgpack"]


def test_convert_never_writes_over_its_input_or_a_foreign_config(tmp_path, capsys):
  src = tmp_path / "official.npz"
  np.savez(src, **dict(np.load(OFFICIAL / "state_dict.npz")))
  official_cfg = tmp_path / "model_config.json"  # the official config JSON, under our name
  shutil.copy(OFFICIAL / "config.json", official_cfg)
  before = _snapshot(tmp_path)
  base = ["--from-official", src, "--model-config", official_cfg, "--overwrite", "--out"]
  assert convert.main([str(a) for a in base + [src]]) == 1
  _one_error_line(capsys.readouterr().err, f"--out {src} is the input")
  assert convert.main([str(a) for a in base + [tmp_path / "params.msgpack"]]) == 1
  _one_error_line(capsys.readouterr().err, "--out's model_config.json", "is the input")
  other = tmp_path / "other"  # an official config under our name beside the output
  other.mkdir()
  shutil.copy(OFFICIAL / "config.json", other / "model_config.json")
  assert convert.main([str(a) for a in base + [other / "params.msgpack"]]) == 1
  _one_error_line(capsys.readouterr().err, "not a model_config.json written by uniter_jax")
  assert _snapshot(tmp_path) == {**before, "other/model_config.json": before["model_config.json"]}


class _PickledStateDict(dict):
  """A state dict saved as a class of its own: torch.load(weights_only=True) refuses it."""


def test_a_pt_that_needs_pickle_names_the_flag_that_reads_it(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  src = tmp_path / "official.pt"
  state = dict(np.load(OFFICIAL / "state_dict.npz"))
  torch.save(_PickledStateDict({k: torch.from_numpy(v) for k, v in state.items()}), src)
  base = ["--from-official", src, "--model-config", OFFICIAL / "config.json", "--out",
          tmp_path / "out" / "params.msgpack"]
  assert convert.main([str(a) for a in base]) == 1
  _one_error_line(capsys.readouterr().err, "weights_only=True", "--trust-pickle")
  assert not (tmp_path / "out").exists()
  # The flag the message names exists and reads it (the file is ours, so trusted).
  assert convert.main([str(a) for a in base + ["--trust-pickle"]]) == 0
  assert (tmp_path / "out" / "params.msgpack").exists()


def test_sigterm_during_a_conversion_leaves_no_temporary_folder(tmp_path):
  def convert_until_terminated(argv):
    del argv
    with fmt.DatasetWriter(tmp_path / "out") as w:
      w.add_image(_img(0))
      os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler or `kill` would

  with pytest.raises(SystemExit) as stop:
    common.run_cli(convert_until_terminated, [])
  assert stop.value.code == 143
  assert os.listdir(tmp_path) == []  # neither the dataset nor its temporary folder


def test_a_killed_conversion_s_temporary_folder_is_removed_by_the_next_one(tmp_path, capsys):
  caps, vocab = _captions(tmp_path / "in", "a dog runs .")
  prefix = f".out.tmp-{socket.gethostname()}-"
  dead = tmp_path / f"{prefix}999999999-abcdefgh"  # left by a process that SIGKILL ended
  live = tmp_path / f"{prefix}{os.getpid()}-abcdefgh"  # a running conversion's: kept
  for d in (dead, live):
    (d / "shard").mkdir(parents=True)
  status, err = _cli(captions.main, ["--annotations", caps, "--vocab", vocab, "--out",
                                     tmp_path / "out"], capsys)
  assert status == 0, err
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "out", live.name])


# -- Nothing silently wrong -----------------------------------------------------------------


def _img(i: int, **over) -> dict:
  rng = np.random.default_rng(i)
  rec = {"image_id": f"im{i}", "features": rng.normal(size=(4, 6)).astype(np.float32),
         "norm_bb": rng.uniform(0, 1, (4, 6)).astype(np.float32),
         "conf": np.ones(4, np.float32), "soft_labels": np.full((4, 3), 1 / 3, np.float32)}
  rec.update(over)
  return rec


@pytest.mark.parametrize("field,value", [("soft_labels", np.full((4, 3), np.nan)),
                                         ("conf", np.array([1.0, np.inf, 1.0, 1.0])),
                                         ("norm_bb", np.full((4, 6), np.nan))])
def test_non_finite_values_are_an_error_or_a_counted_skip(tmp_path, field, value):
  bad = _img(1, **{field: value})
  with pytest.raises(DataError, match=f"'im1'.*NaN or inf in .*{field.replace('norm_bb', 'img_pos')}"):
    write_dataset(tmp_path / "a", [_img(0), bad])
  assert not (tmp_path / "a").exists()
  m = write_dataset(tmp_path / "b", [_img(0), bad], skip_bad=True)
  assert m["skipped"] == {"non_finite": 1} and m["images"]["count"] == 1


def test_non_finite_checkpoint_weights_are_not_converted(tmp_path, capsys):
  tensors = dict(np.load(OFFICIAL / "state_dict.npz"))
  name = "uniter.pooler.dense.bias"
  tensors[name] = tensors[name].copy()
  tensors[name][3] = np.nan
  np.savez(tmp_path / "damaged.npz", **tensors)
  assert convert.main(["--from-official", str(tmp_path / "damaged.npz"), "--model-config",
                       str(OFFICIAL / "config.json"), "--out", str(tmp_path / "p.msgpack")]) == 1
  _one_error_line(capsys.readouterr().err, "damaged.npz: NaN or inf in 1 parameter(s) "
                  "(uniter/pooler/dense/bias)", "nothing was written")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.npz"]


def test_image_size_0_in_a_tsv_is_named(tmp_path, capsys):
  b64 = lambda a: base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()
  (tmp_path / "x.tsv").write_text("\t".join(["img7", "0", "100", "1", b64([1, 2, 3, 4]),
                                              b64([0.5] * 4)]) + "\n")
  status, err = _cli(butd_tsv.main, ["--tsv", tmp_path / "x.tsv", "--out", tmp_path / "out"], capsys)
  assert status == 1
  _one_error_line(err, "x.tsv line 1 (image 'img7'): image_w 0 / image_h 100; both must be > 0")


def test_unknown_words_are_counted_in_the_manifest_and_the_summary(tmp_path, capsys):
  caps, vocab = _captions(tmp_path, "a dog runs .", "a zebra runs .", "a zebra and a gnu")
  status, err = _cli(captions.main, ["--annotations", caps, "--vocab", vocab, "--out",
                                     tmp_path / "out"], capsys)
  assert status == 0, err
  texts = read_manifest(tmp_path / "out")["texts"]
  assert (texts["unk_tokens"], texts["texts_with_unk"], texts["count"]) == (4, 2, 3)
  assert "[UNK]: 4 tokens in 2 of 3 texts" in err


def _pretrain_pipeline(world: str, img_db: pathlib.Path) -> InputPipeline:
  """The tiny world's pretraining texts over the image folder `img_db`, in file order."""
  return InputPipeline([f"{world}/txt/pretrain_train"], [str(img_db)],
                       config=PipelineConfig(batch_size=8, txt_buckets=(40,), img_buckets=(16,),
                                             max_txt_len=38, shuffle=False))


def test_corrupt_image_shard_in_the_pipeline_names_the_file(tiny_world, tmp_path):
  shutil.copytree(f"{tiny_world}/img_db", tmp_path / "img_db")
  shard = tmp_path / "img_db" / "images-00000.tfrecord"
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 0xFF  # same size: only the TFRecord checksum can tell
  shard.write_bytes(bytes(raw))
  pipe = _pretrain_pipeline(tiny_world, tmp_path / "img_db")
  with pytest.raises(DataError, match=rf"shard {shard} is corrupt .* at record \d+ "
                                      r"\(corrupted record at \d+\)"):
    for _ in pipe:
      pass


def test_image_shard_of_other_feature_size_in_the_pipeline_names_the_file(tiny_world, tmp_path):
  # A shard from another extractor (wider features), intact and with the manifest's byte count
  # patched to match: only the records' own feature size can tell.
  src = pathlib.Path(tiny_world) / "img_db"
  records = list(fmt.iter_image_records(src))
  wider = [dict(r, features=np.pad(r["features"], ((0, 0), (0, 8)))) for r in records]
  write_dataset(tmp_path / "wider", images=wider)
  shutil.copytree(src, tmp_path / "img_db")
  manifest = read_manifest(tmp_path / "img_db")
  first = manifest["images"]["shards"][0]["file"]
  shard = tmp_path / "img_db" / first
  shutil.copyfile(tmp_path / "wider" / read_manifest(tmp_path / "wider")["images"]["shards"][0]["file"],
                  shard)
  manifest["images"]["shards"][0]["bytes"] = shard.stat().st_size
  (tmp_path / "img_db" / "manifest.json").write_text(json.dumps(manifest))
  dim = manifest["images"]["feat_dim"]
  pipe = _pretrain_pipeline(tiny_world, tmp_path / "img_db")
  with pytest.raises(DataError, match=rf"shard {shard} record \d+: {dim + 8}-d features, the "
                                      rf"manifest says {dim}-d"):
    for _ in pipe:
      pass


# -- One message, no traceback --------------------------------------------------------------


def test_truncated_npz_is_one_line_naming_the_file(tmp_path, capsys):
  src = _npz_dir(tmp_path / "npz")
  raw = (src / "im1.npz").read_bytes()
  (src / "im1.npz").write_bytes(raw[: len(raw) // 2])  # a copy cut short
  status, err = _cli(npz_dir.main, ["--dir", src, "--out", tmp_path / "out"], capsys)
  assert status == 1
  _one_error_line(err, f"{src / 'im1.npz'}: unreadable npz")
  assert not (tmp_path / "out").exists()


def test_null_caption_and_non_utf8_input_name_the_file_and_line(tmp_path, capsys):
  _, vocab = _captions(tmp_path)
  (tmp_path / "null.jsonl").write_text('{"image_id": "x", "caption": "a dog"}\n'
                                       '{"image_id": "y", "caption": null}\n')
  (tmp_path / "latin1.jsonl").write_bytes('{"image_id": "x", "caption": "a caf\u00e9"}\n'.encode("latin-1"))
  for name, needle in (("null.jsonl", "null.jsonl line 2: 'caption' is None, expected a str"),
                       ("latin1.jsonl", "latin1.jsonl line 1: byte 0xe9 at column 36 is not UTF-8")):
    status, err = _cli(captions.main, ["--annotations", tmp_path / name, "--vocab", vocab,
                                       "--out", tmp_path / "out"], capsys)
    assert status == 1
    _one_error_line(err, needle)
  assert not (tmp_path / "out").exists()


def test_every_config_key_a_message_or_document_names_exists():
  # Hints name what the user should type: a --config.KEY that no config has is a wrong hint.
  import importlib  # pylint: disable=import-outside-toplevel
  sources = [*REPO.glob("uniter_jax/**/*.py"), *REPO.glob("data_prep/**/*.py"), REPO / "main.py",
             *REPO.glob("configs/*.py"), REPO / "README.md", *REPO.glob("docs/*.md")]
  named = {k for p in sources for k in re.findall(r"--config\.([\w.]*\w)", p.read_text())}
  configs = [importlib.import_module(f"configs.{p.stem}").get_config("tiny")
             for p in REPO.glob("configs/*.py") if p.stem not in ("__init__", "common")]

  def exists(key: str) -> bool:
    for c in configs:
      node = c
      try:
        for part in key.split("."):
          node = node[part]
        return True
      except (KeyError, TypeError):
        continue
    return False

  misspelt = {"total_stepz"}  # the documents' example of a mistake
  assert named and not sorted(k for k in named - misspelt if not exists(k))


def test_main_user_mistakes_and_divergence_are_one_line(tiny_world, tmp_path):
  # (A misspelt config key: test_trainer.py's end-to-end command.) The commands run at once.
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=COMPILE_FLAGS)
  base = [sys.executable, "main.py"]
  nan = tmp_path / "nan"
  cases = [([f"--workdir={tmp_path / 'w'}", "--config=configs/vqa.py:tinny"], 2,
            "--config=configs/vqa.py:tinny", "unknown variant 'tinny'", "tiny"),
           ([f"--workdir={tmp_path / 'w'}", "--config=configs/pretrain.py:tiny",
             "--config.data.synthetic=", f"--config.data.text_dirs={tmp_path / 'nope'}",
             f"--config.data.image_dirs={tiny_world}/img_db"], 2,
            f"config.data.text_dirs: {tmp_path / 'nope'}: no such folder"),
           # Diverged (lr 1e30 blows the parameters up at the first update): not a bug in our
           # code, so one line naming the step, the objective, the last good checkpoint and a
           # fix, and exit status 3. MLM + MRFR: two branches, quick to compile.
           ([f"--workdir={nan}", "--config=configs/pretrain.py:tiny",
             f"--config.data.synthetic={tiny_world}", "--config.total_steps=20",
             "--config.checkpoint_every_steps=1", "--config.evals.heldout.every_steps=0",
             "--config.evals.itm.every_steps=0", "--config.optimizer.lr=1e30",
             "--config.optimizer.warmup_steps=1",
             "--config.pretrain.mix={'mlm': 1.0, 'mrfr': 1.0}"], 3,
            "non-finite loss", "--config.optimizer.lr")]
  procs = [subprocess.Popen(base + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for args, *_ in cases]
  errs = []
  for proc, (args, status, *needles) in zip(procs, cases):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status, (args, err[-2000:])
    _one_error_line(err, *needles)
    errs.append(err)
  assert not (tmp_path / "w").exists()  # refused before anything was written
  found = re.search(r"at step (\d+) \(objective (mlm|mrfr)\); the last good "
                   r"checkpoint is step (\d+) in ", errs[-1])
  assert found, errs[-1]
  # A non-finite state is never saved: the newest checkpoint is the one the message names.
  mngr = checkpointing.make_manager(str(nan / "checkpoints"), async_save=False)
  assert mngr.latest_step() == int(found.group(3)) < int(found.group(1))
