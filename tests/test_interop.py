"""Official checkpoint loading / saving, key reporting, batch conversion and the converter."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from flax import nnx

from uniter_jax import interop
from uniter_jax.interop import io
from uniter_jax.interop.checkpoint import CheckpointMismatchError
from uniter_jax.models import UniterConfig
from uniter_jax.tools import convert

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_tiny"
CONFIG = FIXTURE / "config.json"


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
  return dict(np.load(FIXTURE / "state_dict.npz"))


@pytest.fixture(scope="module")
def vqa_state_dict(state_dict) -> dict[str, np.ndarray]:
  return {**state_dict, **np.load(FIXTURE / "vqa_head.npz")}


@pytest.fixture(scope="module")
def model(state_dict):
  return interop.load_official_checkpoint(state_dict, CONFIG)


def _assert_same(a: dict, b: dict) -> None:
  assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))
  for k in b:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --- round trip ------------------------------------------------------------------------


def test_round_trip_exact(model, state_dict):
  out = interop.official_state_dict(model)
  _assert_same(out, state_dict)  # every name, tied duplicates included, bit for bit
  assert list(out) == list(state_dict)  # and in the official state_dict() order


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_save_and_reload(model, state_dict, tmp_path, suffix):
  if suffix == ".pt":
    pytest.importorskip("torch", reason="torch (optional) is needed to write .pt")
  path = tmp_path / f"ckpt{suffix}"
  interop.save_official_checkpoint(model, path)
  _assert_same(io.read_tensors(path), state_dict)
  with pytest.raises(FileExistsError, match="overwrite"):
    interop.save_official_checkpoint(model, path)
  interop.save_official_checkpoint(model, path, overwrite=True)
  again = interop.load_official_checkpoint(path, CONFIG)
  _assert_same(interop.official_state_dict(again), state_dict)


def test_pt_is_a_plain_torch_state_dict(model, tmp_path):
  torch = pytest.importorskip("torch", reason="torch (optional) is needed for .pt")
  path = tmp_path / "m.pt"
  interop.save_official_checkpoint(model, path)
  sd = torch.load(path, weights_only=True)
  assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values())
  # Tied tensors share storage, as in a state dict saved by the official code.
  assert (sd["cls.predictions.decoder.weight"].data_ptr()
          == sd["uniter.embeddings.word_embeddings.weight"].data_ptr())
  assert (sd["feat_regress.weight"].data_ptr()
          == sd["uniter.img_embeddings.img_linear.weight"].data_ptr())


def test_official_pt_fixture_loads_like_npz(state_dict):
  pytest.importorskip("torch", reason="torch (optional) is needed to read .pt")
  m = interop.load_official_checkpoint(FIXTURE / "state_dict.pt", CONFIG)
  _assert_same(interop.official_state_dict(m), state_dict)


def test_vqa_round_trip(vqa_state_dict, tmp_path):
  m, report = interop.load_official_checkpoint(vqa_state_dict, CONFIG, task="vqa",
                                               return_report=True)
  assert m.num_answers == 7
  # The pretraining heads of the checkpoint are on the VQA allow-list and reported.
  assert "itm_output.weight" in report.ignored and "cls.predictions.bias" in report.ignored
  out = interop.official_state_dict(m)
  want = {k: v for k, v in vqa_state_dict.items() if k.startswith(("uniter.", "vqa_output."))}
  _assert_same(out, want)


# --- key handling ----------------------------------------------------------------------


def test_wrappers_old_names_and_ignored(state_dict, tmp_path):
  renamed = {}
  for k, v in state_dict.items():
    if k.endswith("LayerNorm.weight"):
      k = k[:-len("weight")] + "gamma"
    elif k.endswith("LayerNorm.bias"):
      k = k[:-len("bias")] + "beta"
    renamed[k] = v
  renamed["cls.seq_relationship.weight"] = np.zeros((2, 64), np.float32)
  renamed["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
  renamed["uniter.embeddings.position_ids"] = np.arange(64)[None]
  m, report = interop.load_official_checkpoint({"model_state": renamed}, CONFIG,
                                               return_report=True)
  _assert_same(interop.official_state_dict(m), state_dict)
  assert "cls.seq_relationship.weight" in report.ignored
  assert not report.initialized
  # The same wrapper flattened into dotted .npz keys.
  path = tmp_path / "wrapped.npz"
  np.savez(path, **{f"model_state.{k}": v for k, v in state_dict.items()})
  _assert_same(interop.official_state_dict(interop.load_official_checkpoint(path, CONFIG)),
               state_dict)


def test_extra_tensor_is_an_error(state_dict):
  bad = {**state_dict, "uniter.encoder.layer.2.output.dense.bias": np.zeros(64, np.float32)}
  with pytest.raises(CheckpointMismatchError,
                     match=r"uniter\.encoder\.layer\.2\.output\.dense\.bias \(64,\)"):
    interop.load_official_checkpoint(bad, CONFIG)
  # An explicit allow-list accepts it.
  interop.load_official_checkpoint(bad, CONFIG, allow_unexpected=["uniter.encoder.layer.2."])


def test_missing_tensor_is_an_error(state_dict):
  bad = {k: v for k, v in state_dict.items() if k != "uniter.encoder.layer.1.output.dense.weight"}
  with pytest.raises(CheckpointMismatchError,
                     match=r"missing[^\n]*\n  uniter\.encoder\.layer\.1\.output\.dense\.weight"):
    interop.load_official_checkpoint(bad, CONFIG)


def test_misshaped_tensor_is_an_error(state_dict):
  bad = dict(state_dict)
  bad["itm_output.weight"] = np.zeros((3, 64), np.float32)
  with pytest.raises(CheckpointMismatchError,
                     match=r"itm_output\.weight: checkpoint \(3, 64\) vs model \(2, 64\)"):
    interop.load_official_checkpoint(bad, CONFIG)


def test_all_problems_reported_together(state_dict):
  bad = {k: v for k, v in state_dict.items() if k != "uniter.pooler.dense.bias"}
  bad["extra.thing"] = np.zeros(3, np.float32)
  bad["uniter.pooler.dense.weight"] = np.zeros((64, 63), np.float32)
  with pytest.raises(CheckpointMismatchError) as e:
    interop.load_official_checkpoint(bad, CONFIG)
  msg = str(e.value)
  assert "extra.thing (3,)" in msg and "uniter.pooler.dense.bias" in msg
  assert "uniter.pooler.dense.weight: checkpoint (64, 63) vs model (64, 64)" in msg


def test_tied_duplicate_must_match(state_dict):
  bad = dict(state_dict)
  bad["feat_regress.weight"] = bad["feat_regress.weight"] + 1.0
  with pytest.raises(CheckpointMismatchError, match="feat_regress.weight is tied"):
    interop.load_official_checkpoint(bad, CONFIG)
  # The alias alone stands in for its canonical tensor.
  only_alias = {k: v for k, v in state_dict.items()
                if k != "uniter.embeddings.word_embeddings.weight"}
  m = interop.load_official_checkpoint(only_alias, CONFIG)
  _assert_same(interop.official_state_dict(m), state_dict)


def test_bert_init_checkpoint_needs_allow_missing(state_dict):
  """uniter-base-init.pt: converted BERT with its NSP head, no image side, no UNITER heads."""
  init = {k: v for k, v in state_dict.items()
          if k.startswith(("uniter.embeddings.", "uniter.encoder.", "uniter.pooler.",
                           "cls.predictions."))}
  init["cls.seq_relationship.weight"] = np.zeros((2, 64), np.float32)
  with pytest.raises(CheckpointMismatchError) as e:
    interop.load_official_checkpoint(init, CONFIG)
  assert "uniter.img_embeddings.img_linear.weight" in str(e.value)
  assert "region_classifier.net.3.weight" in str(e.value)
  heads = ["uniter.img_embeddings.", "feat_regress.", "region_classifier.", "itm_output."]
  m, report = interop.load_official_checkpoint(init, CONFIG, allow_missing=heads,
                                               return_report=True)
  assert "itm_output.weight" in report.initialized
  assert "feat_regress.weight" not in report.initialized  # a tied alias, not a parameter
  assert "cls.seq_relationship.weight" in report.ignored
  out = interop.official_state_dict(m)
  for k, v in init.items():
    if not k.startswith("cls.seq"):
      np.testing.assert_array_equal(out[k], v)
  # Sizes the checkpoint does not pin keep the config's values.
  assert (m.config.img_dim, m.config.img_label_dim) == (2048, 1601)


def test_table_sizes_follow_the_weights(state_dict):
  """NLVR2's 3-row and VCR's 4-row type table, VCR's +81 vocabulary, img sizes."""
  grown = dict(state_dict)
  types = grown["uniter.embeddings.token_type_embeddings.weight"]
  grown["uniter.embeddings.token_type_embeddings.weight"] = np.concatenate(
      [types, types[[0, 0]]])
  words = np.concatenate([grown["uniter.embeddings.word_embeddings.weight"],
                          np.full((81, 64), 0.01, np.float32)])
  grown["uniter.embeddings.word_embeddings.weight"] = words
  grown["cls.predictions.decoder.weight"] = words
  grown["cls.predictions.bias"] = np.zeros(181, np.float32)
  cfg = UniterConfig.preset("tiny", img_dim=2048, img_label_dim=1601)
  m = interop.load_official_checkpoint(grown, cfg)
  assert (m.config.vocab_size, m.config.type_vocab_size) == (181, 4)
  assert (m.config.img_dim, m.config.img_label_dim) == (32, 11)
  _assert_same(interop.official_state_dict(m), grown)
  # Type ids 2 and 3 (VCR answer / rationale) and the new word ids run.
  batch = interop.from_official_batch(dict(np.load(FIXTURE / "batch_vqa.npz")))
  batch["input_ids"][:, 1] = 180
  batch["txt_type_ids"] = np.full_like(batch["input_ids"], 3)
  assert np.isfinite(np.asarray(m.encode(batch).pooled)).all()


def test_config_without_json(state_dict):
  with pytest.raises(ValueError, match="attention heads"):
    interop.load_official_checkpoint(state_dict)
  # The size inference itself (the head count is the only thing that needs a released size).
  cfg = interop.config_from_checkpoint(state_dict, UniterConfig.preset("tiny", vocab_size=7))
  assert cfg.vocab_size == 100


def test_unknown_task_and_vqa_without_head(state_dict):
  with pytest.raises(ValueError, match="unknown task"):
    interop.load_official_checkpoint(state_dict, CONFIG, task="nope")
  with pytest.raises(ValueError, match="num_answers"):
    interop.load_official_checkpoint(state_dict, CONFIG, task="vqa")
  m, report = interop.load_official_checkpoint(
      state_dict, CONFIG, task="vqa", num_answers=3, allow_missing=["vqa_output."],
      return_report=True)
  assert m.num_answers == 3
  assert sorted(report.initialized) == sorted(
      f"vqa_output.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias"))
  assert "vqa_output" in report.table()


def test_load_official_into_existing_model(state_dict, vqa_state_dict):
  m = interop.load_official_checkpoint(vqa_state_dict, CONFIG, task="vqa")
  before = interop.official_state_dict(m)
  missing = interop.load_official_into(m, state_dict)  # uniter-base.pt into a VQA model
  assert sorted(missing) == sorted(n for n in before if n.startswith("vqa_output."))
  _assert_same(interop.official_state_dict(m), before)
  with pytest.raises(CheckpointMismatchError, match="extra.thing"):
    interop.load_official_into(m, {**state_dict, "extra.thing": np.zeros(1, np.float32)})


def test_bert_named_checkpoint_points_to_load_bert(state_dict):
  bert = {k.replace("uniter.", "bert.", 1): v for k, v in state_dict.items()
          if k.startswith("uniter.")}
  with pytest.raises(CheckpointMismatchError, match="load_bert"):
    interop.load_official_checkpoint(bert, CONFIG)


def test_missing_torch_message(monkeypatch, tmp_path):
  import builtins

  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match="optional dependency"):
    io.read_tensors(FIXTURE / "state_dict.pt")


# --- safetensors without the safetensors package -----------------------------------------


def test_safetensors_reader_and_writer_agree_with_the_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy", reason="safetensors (test-only) is missing")
  import ml_dtypes

  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int64),
            "c": np.ones((2, 1), np.float16), "d": np.array([True, False]),
            "e": np.array([1.5, -2.25], ml_dtypes.bfloat16)}
  ours = tmp_path / "ours.safetensors"
  ours.write_bytes(io.safetensors_bytes(arrays))
  theirs = tmp_path / "theirs.safetensors"
  st.save_file({k: v for k, v in arrays.items() if k != "e"}, str(theirs))
  for k, v in st.load_file(str(ours)).items():
    np.testing.assert_array_equal(v, arrays[k])
  for k, v in io.read_safetensors(theirs).items():
    np.testing.assert_array_equal(v, arrays[k])
  np.testing.assert_array_equal(io.read_safetensors(ours)["e"].astype(np.float32),
                                [1.5, -2.25])


# --- batches ---------------------------------------------------------------------------


def test_from_official_batch_nested_torch_and_dotted_agree():
  raw = dict(np.load(FIXTURE / "batch_itm.npz"))
  flat = interop.from_official_batch(raw)
  nested = {k: v for k, v in raw.items() if not k.startswith("ot_inputs.")}
  nested["ot_inputs"] = {k.split(".", 1)[1]: v for k, v in raw.items()
                         if k.startswith("ot_inputs.")}
  assert flat["itm_targets"].dtype == np.int32 and flat["itm_targets"].shape == (6,)

  def same(other):
    assert set(other) == set(flat)
    for k in flat:
      np.testing.assert_array_equal(other[k], flat[k], err_msg=k)

  same(interop.from_official_batch(nested))
  torch = pytest.importorskip("torch", reason="torch tensors as input need torch")
  same(interop.from_official_batch(
      {k: (torch.from_numpy(np.asarray(v)) if k != "ot_inputs" else
           {kk: torch.from_numpy(np.asarray(vv)) for kk, vv in v.items()})
       for k, v in nested.items()}))


def test_from_official_batch_fields():
  mrc = interop.from_official_batch(dict(np.load(FIXTURE / "batch_mrc.npz")))
  raw = dict(np.load(FIXTURE / "batch_mrc.npz"))
  np.testing.assert_array_equal(mrc["label_targets"][mrc["img_masked"]], raw["label_targets"])
  assert not mrc["label_targets"][~mrc["img_masked"]].any()
  vqa = interop.from_official_batch(dict(np.load(FIXTURE / "batch_vqa.npz")))
  assert vqa["targets"].shape == (6, 7) and "itm_targets" not in vqa


@pytest.mark.parametrize("corrupt,match", [
    ("gather_index", "gather_index"),
    ("ot_inputs.txt_pad", "txt_pad"),
    ("img_mask_tgt", "img_mask_tgt"),
    ("position_ids", "position_ids"),
])
def test_from_official_batch_validates_layout(corrupt, match):
  name = "itm" if corrupt.startswith("ot_") else "mrfr"
  raw = {k: np.array(v) for k, v in np.load(FIXTURE / f"batch_{name}.npz").items()}
  if corrupt == "gather_index":
    raw[corrupt][0, 3] = raw[corrupt][0, 4]
  elif corrupt == "position_ids":
    raw[corrupt] = raw[corrupt] + 1
  else:
    raw[corrupt][0, 1] = ~raw[corrupt][0, 1]
  with pytest.raises(ValueError, match=match):
    interop.from_official_batch(raw)
  interop.from_official_batch(raw, validate=False)


# --- names -----------------------------------------------------------------------------


def test_name_mapping_inverse(model, state_dict):
  for name, (path, layer) in interop.official_names(model).items():
    assert interop.path_to_official(path, layer) == name
    back, back_layer, transpose = interop.official_to_path(name)
    assert (back, back_layer) == (path, layer), name
    assert transpose == (path[-1] == "kernel")
  assert interop.official_to_path("vqa_output.2.weight")[0] == ("vqa_output", "LayerNorm",
                                                                "scale")


# --- converter CLI -----------------------------------------------------------------------


def test_convert_cli_round_trip(tmp_path, state_dict, capsys):
  src = tmp_path / "official.npz"
  np.savez(src, **state_dict)
  out = tmp_path / "params.msgpack"
  args = ["--from-official", str(src), "--model-config", str(CONFIG), "--out", str(out)]
  assert convert.main(args) == 0
  assert "uniter.encoder" in capsys.readouterr().out
  rec = json.loads((tmp_path / "model_config.json").read_text())
  assert rec["model_class"] == "UniterForPretraining"
  assert UniterConfig.from_dict(rec["config"]) == UniterConfig.from_official_json(
      CONFIG, img_dim=32, img_label_dim=11)
  before = out.read_bytes()
  assert convert.main(args) == 1  # never overwrites silently
  assert "exists" in capsys.readouterr().err
  assert convert.main(args + ["--overwrite"]) == 0
  assert out.read_bytes() == before  # deterministic
  back = tmp_path / "back.npz"
  assert convert.main(["--to-official", str(out), "--out", str(back)]) == 0
  _assert_same(io.read_tensors(back), state_dict)
  m = convert.load_msgpack(out)
  _assert_same(interop.official_state_dict(m), state_dict)
  assert not list(tmp_path.glob(".*.tmp"))  # temp files renamed or removed


def test_convert_cli_vqa(tmp_path, vqa_state_dict):
  src = tmp_path / "vqa.npz"
  np.savez(src, **vqa_state_dict)
  out = tmp_path / "vqa.msgpack"
  assert convert.main(["--from-official", str(src), "--model-config", str(CONFIG),
                       "--task", "vqa", "--out", str(out)]) == 0
  m = convert.load_msgpack(out)
  assert isinstance(m, nnx.Module) and m.num_answers == 7
  back = tmp_path / "back.safetensors"
  assert convert.main(["--to-official", str(out), "--out", str(back)]) == 0
  want = {k: v for k, v in vqa_state_dict.items() if k.startswith(("uniter.", "vqa_output."))}
  _assert_same(io.read_tensors(back), want)
