"""NLVR2 parity with the official PyTorch UNITER, every head variant (fixtures/official_small).

For each variant the fixture holds the head's official weights (with the 3-row type table),
a batch in the official collate layout (paired: nlvr2_paired_collate, 2 rows per example;
triplet: nlvr2_triplet_collate, left then right regions typed 1 / 2) and the official
outputs, per-example CE, the train_nlvr2.py loss and per-parameter gradient norms.
Loading through uniter_jax.interop and converting the batch with
from_official_batch(task="nlvr2") must reproduce all of them.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uniter_jax import interop, tasks
from uniter_jax.evaluators import nlvr2 as nlvr2_eval
from uniter_jax.models.nlvr2 import pair_inputs
from test_parity_official import _FAST_COMPILE, assert_close, assert_grad_norms

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_small"
# variant -> (batch, head file, outputs file, output key prefix, grad-norm json, its key)
CASES = {
    "triplet": ("batch_nlvr2_triplet", "nlvr2_triplet_head", "outputs_nlvr2", "triplet",
                "nlvr2_variants.json", "triplet"),
    "paired": ("batch_nlvr2", "nlvr2_paired_head", "outputs_nlvr2", "paired",
               "nlvr2_variants.json", "paired"),
    "paired-attn": ("batch_nlvr2", "nlvr2_head", "outputs_downstream", "nlvr2",
                    "downstream.json", "nlvr2"),
}


def _tensors(variant: str) -> dict:
  head = CASES[variant][1]
  return {**np.load(FIXTURE / "state_dict.npz"), **np.load(FIXTURE / f"{head}.npz")}


@functools.cache
def _official(variant: str) -> dict:
  _, _, outputs, prefix, js, key = CASES[variant]
  out = {k.split(".", 1)[1]: v for k, v in np.load(FIXTURE / f"{outputs}.npz").items()
         if k.startswith(prefix + ".")}
  out["grads"] = json.loads((FIXTURE / js).read_text())["grad_norms"][key]
  return out


def _raw_batch(variant: str) -> dict:
  return dict(np.load(FIXTURE / f"{CASES[variant][0]}.npz"))


@functools.cache
def _run(variant: str) -> dict:
  """Load (variant read off the head), convert, one jitted forward + backward."""
  model = interop.load_official_checkpoint(_tensors(variant), FIXTURE / "config.json",
                                           task="nlvr2")
  batch = jax.tree.map(jnp.asarray, interop.from_official_batch(_raw_batch(variant),
                                                                task="nlvr2"))
  graphdef, state = nnx.split(model)

  def f(state):
    m = nnx.merge(graphdef, state)
    loss = tasks.official_loss("nlvr2", m, batch, variant=variant)
    out, inputs = m.encode(batch)
    return loss, (m(batch), out, inputs)

  fn = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=_FAST_COMPILE)
  (loss, (logits, out, inputs)), grads = fn(state)
  to_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
  return {"model": model, "batch": to_np(batch), "loss": float(loss),
          "logits": np.asarray(logits), "out": to_np(out), "inputs": to_np(inputs),
          "grads": grads}


@pytest.mark.parametrize("variant", list(CASES))
def test_outputs_and_losses(variant):
  r, ref = _run(variant), _official(variant)
  assert r["model"].variant == variant  # read off the checkpoint's head tensors
  assert_close(r["logits"], ref["answer_scores"], f"{variant}.answer_scores")
  assert_close(r["out"].pooled, ref["pooled_output"], f"{variant}.pooled_output")
  valid = _raw_batch(variant)["attn_masks"].astype(bool)
  seq = interop.to_compact(r["out"].txt, r["out"].img, r["inputs"]["txt_mask"],
                           r["inputs"]["img_mask"], valid.shape[1])
  assert_close(seq[valid], ref["sequence_output"][valid], f"{variant}.sequence_output")
  x = r["logits"].astype(np.float64)
  t = r["batch"]["targets"]
  logp = x - x.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  assert_close(-logp[np.arange(len(t)), t], ref["loss"], f"{variant}.loss")
  assert_close(r["loss"], ref["loss_train"], f"{variant}.loss_train (mean CE)")


@pytest.mark.parametrize("variant", list(CASES))
def test_gradient_norms(variant):
  r, ref = _run(variant), _official(variant)["grads"]
  assert_close(r["loss"], ref["loss"], f"{variant} loss")
  assert_grad_norms(r["model"], r["grads"], ref)


@pytest.mark.parametrize("variant", list(CASES))
def test_save_back_to_official_names(variant, tmp_path):
  """Every head writes back exactly the tensors it was loaded from (names, shapes, values)."""
  model = _run(variant)["model"]
  want = _tensors(variant)
  got = interop.official_state_dict(model)
  head = set(np.load(FIXTURE / f"{CASES[variant][1]}.npz"))
  pretrain_heads = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
  assert set(got) == {n for n in want if not n.startswith(pretrain_heads)}
  for name in got:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert head <= set(got)
  path = tmp_path / "nlvr2.npz"
  interop.save_official_checkpoint(model, path)
  again = interop.load_official_checkpoint(path, FIXTURE / "config.json", task="nlvr2")
  assert again.variant == variant


def test_triplet_batch_splits_left_and_right_regions():
  raw = _raw_batch("triplet")
  b = interop.from_official_batch(raw, task="nlvr2")
  assert b["img_feat"].shape[:2] == (4, 2)
  np.testing.assert_array_equal(b["img_mask"][:, 0].sum(1), raw["aux.num_bbs_left"])
  np.testing.assert_array_equal(b["img_mask"][:, 1].sum(1), raw["aux.num_bbs_right"])
  for i, nl in enumerate(raw["aux.num_bbs_left"]):
    nr = raw["aux.num_bbs_right"][i]
    np.testing.assert_array_equal(b["img_feat"][i, 0, :nl], raw["img_feat"][i, :nl])
    np.testing.assert_array_equal(b["img_feat"][i, 1, :nr], raw["img_feat"][i, nl:nl + nr])
  np.testing.assert_array_equal(b["targets"], raw["targets"])
  # Without types the two images cannot be told apart: a clear error, not a guess.
  with pytest.raises(ValueError, match="img_type_ids"):
    interop.from_official_batch({k: v for k, v in raw.items() if k != "img_type_ids"},
                                task="nlvr2")


def test_pair_inputs_layout_and_type_ids():
  """Hand-built pair batch: paired rows alternate left/right; types 1 / 2 (or 1 / 1)."""
  b, lt, li = 2, 3, 2
  feat = np.arange(b * 2 * li, dtype=np.float32).reshape(b, 2, li, 1)
  batch = {"input_ids": np.array([[1, 5, 2], [1, 6, 2]]), "txt_mask": np.ones((b, lt), bool),
           "img_feat": feat, "img_pos": np.zeros((b, 2, li, 7), np.float32),
           "img_mask": np.array([[[1, 0], [1, 1]], [[1, 1], [1, 0]]], bool)}
  paired = pair_inputs(batch, "paired", use_img_type=True)
  np.testing.assert_array_equal(paired["input_ids"], [[1, 5, 2], [1, 5, 2], [1, 6, 2],
                                                      [1, 6, 2]])
  np.testing.assert_array_equal(paired["img_feat"][:, :, 0], [[0, 1], [2, 3], [4, 5], [6, 7]])
  np.testing.assert_array_equal(paired["img_type_ids"], [[1, 1], [2, 2], [1, 1], [2, 2]])
  triplet = pair_inputs(batch, "triplet", use_img_type=True)
  np.testing.assert_array_equal(triplet["img_feat"][:, :, 0], [[0, 1, 2, 3], [4, 5, 6, 7]])
  np.testing.assert_array_equal(triplet["img_mask"], [[1, 0, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(triplet["img_type_ids"], [[1, 1, 2, 2]] * 2)
  same = pair_inputs(batch, "triplet", use_img_type=False)
  np.testing.assert_array_equal(same["img_type_ids"], [[1, 1, 1, 1]] * 2)


def test_pretrained_type_table_grows_as_official_init_type_embedding():
  """A 2-row pretraining table becomes [row 0, row 1, row 1]; the new head starts at init."""
  sd = dict(np.load(FIXTURE / "state_dict.npz"))
  model, report = interop.load_official_checkpoint(
      sd, FIXTURE / "config.json", task="nlvr2", variant="paired-attn",
      allow_missing=["attn1.", "attn2.", "fc.", "attn_pool.", "nlvr2_output."],
      return_report=True)
  table = np.asarray(model.uniter.embeddings.token_type_embeddings.embedding[...])
  src = sd["uniter.embeddings.token_type_embeddings.weight"]
  np.testing.assert_array_equal(table, src[[0, 1, 1]])
  assert model.config.type_vocab_size == 3
  assert "uniter.embeddings.token_type_embeddings.weight" in report.loaded
  assert any(n.startswith("attn1.") for n in report.initialized)
  with pytest.raises(interop.CheckpointMismatchError, match="'triplet'"):
    interop.load_official_checkpoint(_tensors("triplet"), FIXTURE / "config.json",
                                     task="nlvr2", variant="paired")


def test_consistency_against_hand_computed_cases():
  ids = ["dev-1-0-0", "dev-1-1-0", "dev-1-2-0",  # sentence dev-1--0: 3 pairs
         "dev-1-0-1", "dev-1-1-1",               # sentence dev-1--1: 2 pairs
         "dev-2-0-0"]                            # sentence dev-2--0: 1 pair
  assert nlvr2_eval.sentence_key("dev-1-2-0") == "dev-1--0"
  assert nlvr2_eval.consistency(ids, [1, 1, 1, 1, 1, 1]) == 1.0
  assert nlvr2_eval.consistency(ids, [1, 0, 1, 1, 1, 1]) == pytest.approx(2 / 3)
  assert nlvr2_eval.consistency(ids, [1, 1, 1, 0, 1, 0]) == pytest.approx(1 / 3)
  assert nlvr2_eval.consistency(ids, [0, 0, 0, 0, 0, 0]) == 0.0
  # Identifiers of another shape are their own sentence: consistency = accuracy.
  assert nlvr2_eval.consistency(["val-1", "val-2"], [1, 0]) == 0.5
