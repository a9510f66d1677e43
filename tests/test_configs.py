"""Every config variant builds, takes a model override from the command line, and resolves."""

import ast
import os
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from uniter_jax import train
from uniter_jax.models import UniterConfig
from uniter_jax.tasks import pretrain as pretrain_task

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ([(f, v) for f in ("pretrain", "vqa", "ve", "nlvr2", "pretrain_vcr")
             for v in ("default", "tiny", "base", "large")] + [("pretrain", "curriculum")])
DATA = {"vocab_size": 120, "img_dim": 48, "img_label_dim": 13}


def _parse(*argv: str):
  """The config exactly as main.py parses it (locked, with overrides)."""
  fv = flags.FlagValues()
  argv = ["main.py", *argv]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_every_variant_takes_model_overrides(name, variant, monkeypatch):
  monkeypatch.chdir(REPO)
  c = _parse(f"--config=configs/{name}.py:{variant}", "--config.model.num_layers=6",
             "--config.model.attention_dropout=0.0")
  assert c.task == name
  got = train.model_config_from(c, DATA)
  assert isinstance(got, UniterConfig)
  assert got.num_layers == 6 and got.attention_dropout == 0.0
  # Every UniterConfig field is in config.model, so any one can be overridden.
  assert set(c.model.keys()) == set(UniterConfig().to_dict())
  for evaluator in c.evals.values():
    assert evaluator.every_steps >= 0
  if variant in ("base", "large"):
    assert got.vocab_size == 28996 and got.img_dim == 2048 and got.dtype == "bfloat16"
  else:
    assert got.vocab_size == 120 and got.img_dim == 48  # -1: read from the data


def test_pretrain_subtree_holds_the_mix_masking_and_every_ot_option(monkeypatch, tmp_path):
  monkeypatch.chdir(REPO)
  c = _parse("--config=configs/pretrain.py:base", "--config.pretrain.ot.solver=ipot",
             "--config.pretrain.ot.num_iters=20", "--config.pretrain.ot.ipot_beta=0.25",
             "--config.pretrain.mix={'mlm': 3.0, 'itm': 1.0}", "--config.pretrain.mlm_prob=0.2")
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
  s = pretrain_task.settings(c, str(vocab))
  assert dict(s.mix) == {"mlm": 3.0, "itm": 1.0}
  assert s.masking.mlm_prob == 0.2 and s.masking.focus_ids == ()  # official masking
  ot = dict(s.ot_options)
  assert ot["solver"] == "ipot" and ot["num_iters"] == 20 and ot["beta"] == 0.25
  assert ot["eps_anneal"] == (10.0, 0.9)  # the sinkhorn warm-up (unused by ipot)
  with pytest.raises(ValueError, match="unknown objective"):
    pretrain_task.settings(_parse("--config=configs/pretrain.py:base",
                                  "--config.pretrain.mix={'nsp': 1.0}"), str(vocab))


def test_the_library_does_not_import_data_prep():
  # data_prep may import uniter_jax, never the reverse (main.py wires the synthetic world in).
  offenders = []
  for path in (REPO / "uniter_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                    if n.split(".")[0] == "data_prep"]
  assert not offenders, offenders


# Names of documents that live outside the repository, spelled in pieces so that this file
# does not itself cite them.
OUTSIDE_DOCS = tuple("".join(p) for p in (("uniter", "_spec"), ("ot", "_notes"),
                                          ("anchors", "_jax"), ("user", "_asks"),
                                          ("../", "shared")))


def test_no_file_cites_documents_outside_the_repository():
  tracked = os.popen(f"git -C {REPO} ls-files").read().split()
  bad = []
  for rel in tracked:
    if rel.startswith("tests/fixtures/") or not rel.endswith((".py", ".md", ".sh", ".txt")):
      continue
    text = (REPO / rel).read_text(encoding="utf-8", errors="replace")
    for needle in OUTSIDE_DOCS:
      if needle in text:
        bad.append(f"{rel}: {needle}")
  assert not bad, bad
