"""Referring-expression parity with the official PyTorch UNITER (fixtures/official_small).

Two heads on the same re_collate batch: mlp=1 with the "cls" loss (downstream.json,
outputs_downstream.npz re.*) and mlp=2 with "cls" and "rank" (re_variants.json,
outputs_re.npz). Loading through uniter_jax.interop and converting the batch with
from_official_batch(task="re") must reproduce the region scores at every real region, the
per-expression losses, the summed train_re.py loss and every parameter's gradient norm. The
rank loss is checked with the negatives the official sampler drew (its draw is random);
our sampler's rules are checked on their own below.
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
from uniter_jax.models.refer import PAD_SCORE, sample_negatives
from test_parity_official import _FAST_COMPILE, assert_close, assert_grad_norms

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official_small"
# case -> (head file, outputs file, output key prefix, grad-norm json, its key, loss, rows)
CASES = {
    "mlp1": ("re_head", "outputs_downstream", "re", "downstream.json", "re", "cls", None),
    "mlp2": ("re_mlp2_head", "outputs_re", "mlp2", "re_variants.json", "mlp2", "cls", None),
    # The official sampler cannot serve row 0 (one region): the rank case uses rows 1..6.
    "mlp2_rank": ("re_mlp2_head", "outputs_re", "mlp2_rank", "re_variants.json", "mlp2_rank",
                  "rank", slice(1, 7)),
}


def _tensors(case: str) -> dict:
  return {**np.load(FIXTURE / "state_dict.npz"), **np.load(FIXTURE / f"{CASES[case][0]}.npz")}


def _official(case: str) -> dict:
  _, outputs, prefix, js, key, _, _ = CASES[case]
  out = {k.split(".", 1)[1]: v for k, v in np.load(FIXTURE / f"{outputs}.npz").items()
         if k.startswith(prefix + ".")}
  out["grads"] = json.loads((FIXTURE / js).read_text())["grad_norms"][key]
  return out


def _batch(case: str) -> dict:
  b = interop.from_official_batch(dict(np.load(FIXTURE / "batch_re.npz")), task="re")
  rows = CASES[case][6]
  return b if rows is None else {k: v[rows] for k, v in b.items()}


@functools.cache
def _run(case: str) -> dict:
  """Load (mlp read off the head), convert, one jitted forward + backward."""
  model = interop.load_official_checkpoint(_tensors(case), FIXTURE / "config.json", task="re")
  batch = jax.tree.map(jnp.asarray, _batch(case))
  loss_name = CASES[case][5]
  negatives = (jnp.asarray(_official(case)["neg_ix"], jnp.int32) if loss_name == "rank"
               else None)
  graphdef, state = nnx.split(model)

  def f(state):
    m = nnx.merge(graphdef, state)
    loss = tasks.official_loss("re", m, batch, loss=loss_name, negatives=negatives)
    return loss, m(batch)

  fn = jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=_FAST_COMPILE)
  (loss, scores), grads = fn(state)
  return {"model": model, "batch": jax.tree.map(np.asarray, batch), "loss": float(loss),
          "scores": np.asarray(scores), "grads": grads}


@pytest.mark.parametrize("case", list(CASES))
def test_scores_and_losses(case):
  r, ref = _run(case), _official(case)
  assert r["model"].mlp == (1 if case == "mlp1" else 2)  # read off the checkpoint's head
  mask = r["batch"]["img_mask"]
  if "scores" in ref:
    width = ref["scores"].shape[1]
    real = mask[:, :width]
    assert_close(r["scores"][:, :width][real], ref["scores"][real], f"{case}.scores")
    # Padded regions score the official fill value.
    assert np.all(r["scores"][~mask] == PAD_SCORE)
  s, t = r["scores"].astype(np.float64), r["batch"]["targets"]
  if CASES[case][5] == "cls":  # per-expression CE, computed here in NumPy
    logp = s - s.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert_close(-logp[np.arange(len(t)), t], ref["loss"], f"{case}.loss")
  else:  # per-expression hinge on sigmoid scores against the official negatives
    sig = 0.5 * (1 + np.tanh(s / 2))  # sigmoid without overflow at the -1e4 fill
    n = ref["neg_ix"]
    hinge = np.maximum(0, 0.2 + sig[np.arange(len(t)), n] - sig[np.arange(len(t)), t])
    assert_close(hinge, ref["loss"], f"{case}.loss")
  assert_close(r["loss"], ref["loss_train"], f"{case}.loss_train (summed)")


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_norms(case):
  r, ref = _run(case), _official(case)["grads"]
  assert_close(r["loss"], ref["loss"], f"{case} loss")
  assert_grad_norms(r["model"], r["grads"], ref)


@pytest.mark.parametrize("case", ["mlp1", "mlp2"])
def test_save_back_to_official_names(case, tmp_path):
  """The head writes back exactly the tensors it was loaded from; mlp is kept on reload."""
  model = _run(case)["model"]
  want = _tensors(case)
  got = interop.official_state_dict(model)
  pretrain_heads = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
  assert set(got) == {n for n in want if not n.startswith(pretrain_heads)}
  for name in got:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  path = tmp_path / "re.npz"
  interop.save_official_checkpoint(model, path)
  assert interop.load_official_checkpoint(path, FIXTURE / "config.json", task="re").mlp == model.mlp
  with pytest.raises(interop.CheckpointMismatchError, match="mlp=1"):
    interop.load_official_checkpoint(_tensors("mlp1"), FIXTURE / "config.json", task="re",
                                     mlp=2)


def test_negative_sampler_follows_the_official_rules():
  """Never the target, never a padded region; the hard pick is the best other region."""
  rng = np.random.default_rng(0)
  b, li = 64, 9
  counts = rng.integers(1, li + 1, size=b)
  mask = np.arange(li)[None] < counts[:, None]
  targets = rng.integers(0, counts)
  scores = np.where(mask, rng.normal(size=(b, li)), PAD_SCORE).astype(np.float32)
  others = mask & (np.arange(li)[None] != targets[:, None])
  best_other = np.argmax(np.where(others, scores, -np.inf), axis=1)
  draw = jax.jit(sample_negatives, static_argnames="hard_ratio")
  picks, hard_hits = [], 0
  for seed in range(40):
    neg, has = map(np.asarray, draw(jax.random.key(seed), scores, targets, mask,
                                    hard_ratio=0.3))
    np.testing.assert_array_equal(has, counts > 1)
    assert np.all(others[np.arange(b), neg][has]), "a negative is the target or padding"
    picks.append(neg)
    hard_hits += int(np.sum((neg == best_other)[has]))
  # Every allowed region is drawn at some point (the easy branch is uniform over them) ...
  seen = np.zeros((b, li), bool)
  for neg in picks:
    seen[np.arange(b), neg] = True
  assert np.all(seen[counts > 1] == others[counts > 1])
  # ... and the best other region comes up about hard_ratio + (1 - hard_ratio) / (n - 1).
  n = counts[counts > 1] - 1
  expected = 40 * np.sum(0.3 + 0.7 / n)
  assert abs(hard_hits - expected) < 0.15 * expected
  # hard_ratio=1: always the best other region.
  neg, has = map(np.asarray, draw(jax.random.key(1), scores, targets, mask, hard_ratio=1.0))
  np.testing.assert_array_equal(neg[has], best_other[has])
