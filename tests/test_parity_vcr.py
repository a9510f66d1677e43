"""VCR parity with the official PyTorch UNITER (fixtures/official_small): the grown word and
type tables, the ReLU head, per-sequence 2-way CE and every gradient norm.

The fixture holds UniterForVisualCommonsenseReasoning after init_type_embedding() (4 rows) and
init_word_embedding(5) (vocab 120 + 5), a vcr_collate batch of 8 (question, choice) rows with
txt_type_ids, the official pooled outputs, logits, and the train_vcr.py loss with gradients.
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
from test_parity_official import _FAST_COMPILE, assert_close, assert_grad_norms

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_small"


def _tensors() -> dict:
  return {**np.load(FIXTURE / "state_dict.npz"), **np.load(FIXTURE / "vcr_head.npz")}


@functools.cache
def _run() -> dict:
  model = interop.load_official_checkpoint(_tensors(), FIXTURE / "config.json", task="vcr")
  batch = jax.tree.map(jnp.asarray, interop.from_official_batch(
      dict(np.load(FIXTURE / "batch_vcr.npz")), task="vcr"))
  graphdef, state = nnx.split(model)

  def f(state):
    m = nnx.merge(graphdef, state)
    return tasks.official_loss("vcr", m, batch), (m(batch), m.encode(batch).pooled)

  fn = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=_FAST_COMPILE)
  (loss, (logits, pooled)), grads = fn(state)
  return {"model": model, "loss": float(loss), "logits": np.asarray(logits),
          "pooled": np.asarray(pooled), "grads": grads}


def _official() -> dict:
  out = {k.split(".", 1)[1]: v for k, v in np.load(FIXTURE / "outputs_downstream.npz").items()
         if k.startswith("vcr.")}
  out["grads"] = json.loads((FIXTURE / "downstream.json").read_text())["grad_norms"]["vcr"]
  return out


def test_outputs_loss_and_gradient_norms():
  r, ref = _run(), _official()
  assert r["model"].config.vocab_size == 125 and r["model"].config.type_vocab_size == 4
  assert_close(r["pooled"], ref["pooled_output"], "vcr.pooled_output")
  assert_close(r["logits"], ref["rank_scores"], "vcr.rank_scores")
  assert_close(r["logits"][:, 1:], ref["scores"], "vcr.scores (class-1 logit)")
  assert_close(r["loss"], ref["loss_train"], "vcr.loss_train (mean CE)")
  assert_grad_norms(r["model"], r["grads"], ref["grads"])


def test_tables_grow_from_a_pretraining_checkpoint_as_the_official_init():
  """uniter-base.pt style: 120 words and 2 types -> 125 words (new rows at init) and 4 types
  with rows 2 and 3 copying row 0; the VCR head starts at init."""
  sd = dict(np.load(FIXTURE / "state_dict.npz"))
  model, report = interop.load_official_checkpoint(
      sd, FIXTURE / "config.json", task="vcr", extra_words=5, allow_missing=["vcr_output."],
      return_report=True)
  words = np.asarray(model.uniter.embeddings.word_embeddings.embedding[...])
  types = np.asarray(model.uniter.embeddings.token_type_embeddings.embedding[...])
  src_w = sd["uniter.embeddings.word_embeddings.weight"]
  src_t = sd["uniter.embeddings.token_type_embeddings.weight"]
  assert words.shape == (125, src_w.shape[1])
  np.testing.assert_array_equal(words[:120], src_w)
  new = words[120:]
  assert np.all(np.isfinite(new)) and 0.005 < new.std() < 0.05  # N(0, 0.02) init, not copies
  np.testing.assert_array_equal(types, src_t[[0, 1, 0, 0]])
  assert any(n.startswith("vcr_output.") for n in report.initialized)


def test_save_back_to_official_names(tmp_path):
  model = _run()["model"]
  want = _tensors()
  got = interop.official_state_dict(model)
  pretrain_heads = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
  assert set(got) == {n for n in want if not n.startswith(pretrain_heads)}
  for name in got:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  with pytest.raises(ValueError, match="unknown task"):
    tasks.official_loss("vcr2", model, {})
