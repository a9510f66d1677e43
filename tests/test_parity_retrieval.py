"""Retrieval parity with the official PyTorch UNITER (fixtures/official_small, `retrieval.*`).

The fixture holds UniterForImageTextRetrieval's head (`retrieval_head.npz`, rank_output random,
not init_output()), an itm_rank_collate batch of 2 groups [positive, negative image, negative
text] and the official rank scores, per-negative hinge, train_itm.py loss and gradient norms.
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

from uniter_jax import checkpointing, interop, tasks
from uniter_jax.models import registry
from uniter_jax.models.retrieval import UniterForImageTextRetrieval, hardest, rank_hinge
from test_parity_official import _FAST_COMPILE, assert_close, assert_grad_norms

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_small"


def _tensors() -> dict:
  return {**np.load(FIXTURE / "state_dict.npz"), **np.load(FIXTURE / "retrieval_head.npz")}


@functools.cache
def _run() -> dict:
  model = interop.load_official_checkpoint(_tensors(), FIXTURE / "config.json", task="itr")
  raw = dict(np.load(FIXTURE / "batch_retrieval.npz"))
  conv = interop.from_official_batch(raw, task="itr")
  size = conv.pop("sample_size")
  batch = {**jax.tree.map(jnp.asarray, conv), "sample_size": size}
  graphdef, state = nnx.split(model)

  def f(state):
    m = nnx.merge(graphdef, state)
    out = m.encode(batch)
    return tasks.official_loss("itr", m, batch), (m(batch), out)

  fn = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=_FAST_COMPILE)
  (loss, (scores, out)), grads = fn(state)
  return {"model": model, "raw": raw, "batch": conv, "size": size, "loss": float(loss),
          "scores": np.asarray(scores), "out": jax.tree.map(np.asarray, out), "grads": grads}


@functools.cache
def _official() -> dict:
  out = {k.split(".", 1)[1]: v for k, v in np.load(FIXTURE / "outputs_downstream.npz").items()
         if k.startswith("retrieval.")}
  out["grads"] = json.loads((FIXTURE / "downstream.json").read_text())["grad_norms"]["retrieval"]
  return out


def test_rank_scores_hinge_and_loss():
  r, ref = _run(), _official()
  assert r["size"] == 3 and r["scores"].shape == (6, 1)
  assert_close(r["scores"], ref["rank_scores"], "retrieval.rank_scores")
  assert_close(r["out"].pooled, ref["pooled_output"], "retrieval.pooled_output")
  valid = r["raw"]["attn_masks"].astype(bool)
  seq = interop.to_compact(r["out"].txt, r["out"].img, r["batch"]["txt_mask"],
                           r["batch"]["img_mask"], valid.shape[1])
  assert_close(seq[valid], ref["sequence_output"][valid], "retrieval.sequence_output")
  # The hinge, from the official scores in NumPy: max(0, 0.2 + sig(neg) - sig(pos)).
  sig = 1 / (1 + np.exp(-ref["rank_scores"].astype(np.float64).reshape(2, 3)))
  want = np.maximum(0.2 + sig[:, 1:] - sig[:, :1], 0)
  assert_close(want, ref["loss"], "numpy hinge vs official")
  assert_close(np.asarray(rank_hinge(jnp.asarray(r["scores"]), 3)), ref["loss"],
               "retrieval.loss")
  assert_close(r["loss"], ref["loss_train"], "retrieval.loss_train (mean)")


def test_gradient_norms():
  r, ref = _run(), _official()["grads"]
  assert_close(r["loss"], ref["loss"], "retrieval loss")
  assert_grad_norms(r["model"], r["grads"], ref)


def test_fine_tuned_head_round_trips_and_task_is_read_off_the_names(tmp_path):
  """A checkpoint with rank_output keeps it (not the ITM row; unlike inf_itm.py)."""
  model = _run()["model"]
  want = _tensors()
  got = interop.official_state_dict(model)
  assert set(got) == {n for n in want
                      if not n.startswith(("cls.", "feat_regress.", "region_classifier."))}
  for name in got:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert not np.allclose(want["rank_output.weight"], want["itm_output.weight"][1:])
  assert interop.checkpoint.task_of(want) == "itr"
  path = tmp_path / "itr.npz"
  interop.save_official_checkpoint(model, path)
  again = interop.load_official_checkpoint(path, FIXTURE / "config.json", task="itr")
  np.testing.assert_array_equal(np.asarray(again.rank_output.kernel[...]),
                                want["rank_output.weight"].T)


def _rank_head(model) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(model.rank_output.kernel[...]), np.asarray(model.rank_output.bias[...])


def test_pretraining_checkpoint_starts_rank_output_from_the_itm_match_row(tmp_path):
  """official init_output(): rank_output = itm_output row 1, on every loading path."""
  sd = dict(np.load(FIXTURE / "state_dict.npz"))
  w, b = sd["itm_output.weight"][1:].T, sd["itm_output.bias"][1:]
  # 1. official checkpoint -> task="itr"; the pretraining-only heads are ignored
  model = interop.load_official_checkpoint(sd, FIXTURE / "config.json", task="itr")
  np.testing.assert_array_equal(_rank_head(model)[0], w)
  np.testing.assert_array_equal(_rank_head(model)[1], b)
  # 2. an existing model filled from an official checkpoint (trainer init_from)
  other = registry.build("UniterForImageTextRetrieval", model.config, seed=3)
  interop.load_official_into(other, sd)
  np.testing.assert_array_equal(_rank_head(other)[0], w)
  # 3. our msgpack export of a pretraining model (load_params_into, strict=False)
  pre = interop.load_official_checkpoint(sd, FIXTURE / "config.json", task="pretrain")
  checkpointing.export_msgpack(pre, str(tmp_path / "pre"))
  other.rank_output.kernel[...] = np.zeros_like(w)
  checkpointing.load_params_into(other, checkpointing.read_msgpack(
      str(tmp_path / "pre" / "params.msgpack")), strict=False)
  np.testing.assert_array_equal(_rank_head(other)[0], w)
  np.testing.assert_array_equal(_rank_head(other)[1], b)
  # 4. the in-place method equals it
  other.rank_output.kernel[...] = np.zeros_like(w)
  other.rank_output.bias[...] = np.zeros_like(b)
  other.init_output()
  np.testing.assert_array_equal(_rank_head(other)[0], w)
  np.testing.assert_array_equal(_rank_head(other)[1], b)
  assert isinstance(other, UniterForImageTextRetrieval)


def test_hard_negative_layout_broadcasts_the_single_caption():
  """Hard-negative 'from text' batches hold the caption once: it is repeated per row."""
  raw = dict(np.load(FIXTURE / "batch_retrieval.npz"))
  rows = [0, 1]  # rows 0 and 1 share the caption (positive, negative image)
  one = {k: (v[rows] if k in ("img_feat", "img_pos_feat", "attn_masks", "gather_index")
             else v[:1] if k == "input_ids" else v) for k, v in raw.items()}
  full = {k: (v[rows] if k in ("input_ids", "img_feat", "img_pos_feat", "attn_masks",
                                "gather_index") else v) for k, v in raw.items()}
  a = interop.from_official_batch(one, task="itr")
  b = interop.from_official_batch(full, task="itr")
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("direction", ["text", "image"])
def test_hard_negative_selection_loss_and_gradients(direction):
  """UniterForImageTextRetrievalHardNeg on one text anchor (1 caption, gt + 7 images) and one
  image anchor (1 image, gt + 7 captions): eval-mode scores, the 3 hardest kept, the hinge
  mean on those and its gradient norms (batch_retrieval_hn_*.npz, outputs_retrieval_hn.npz)."""
  r = _run()
  ref = {k.split(".", 1)[1]: v for k, v in np.load(FIXTURE / "outputs_retrieval_hn.npz").items()
         if k.startswith(direction + ".")}
  grads_ref = json.loads((FIXTURE / "retrieval_hn.json").read_text())["grad_norms"][direction]
  raw = dict(np.load(FIXTURE / f"batch_retrieval_hn_{direction}.npz"))
  batch = {k: jnp.asarray(v) for k, v in interop.from_official_batch(raw, task="itr").items()}
  assert batch["input_ids"].shape[0] == batch["img_feat"].shape[0] == 8
  graphdef, state = nnx.split(r["model"])

  def f(state):
    m = nnx.merge(graphdef, state)
    loss = tasks.official_loss("itr", m, batch, hard_negatives=True, hard_size=3)
    return loss, m(batch)

  fn = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=_FAST_COMPILE)
  (loss, scores), grads = fn(state)
  assert_close(np.asarray(scores), ref["scores"], f"{direction}.scores")
  idx, ok = hardest(jnp.asarray(scores)[None, 1:, 0], 3)
  np.testing.assert_array_equal(np.sort(np.asarray(idx)[0] + 1), ref["selected"])
  assert np.asarray(ok).all()
  assert_close(float(loss), ref["loss_train"], f"{direction}.loss_train")
  assert_close(float(loss), grads_ref["loss"], f"{direction} loss")
  # rank_output.bias: sum of sigmoid'(s_neg) - sigmoid'(s_pos) over near-equal scores (~0.25
  # each, float32 ulp 3e-8): its ~1e-6 norm is mostly cancellation, hence the larger floor.
  assert_grad_norms(r["model"], grads, grads_ref, floor=1e-6)
