"""Golden parity with the official PyTorch UNITER (every tests/fixtures/official_* folder).

Each fixture folder (official_tiny, official_small, ...) holds a checkpoint, batches in the official collate layout and the official
outputs, losses and per-parameter gradient norms. Loading the checkpoint and converting the
batches with uniter_jax.interop must reproduce all of them: every per-position output,
every head, every training-loop loss (OT with the "ipot" solver) to 1e-5 relative in
float32, and every parameter's gradient norm.
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
from uniter_jax.losses import pretrain_loss
from uniter_jax.models.vqa import vqa_loss

# The tiny fixture runs by default; the larger ones (same checks at 3 layers x 96) are `-m slow`.
FIXTURES = [pytest.param(p, marks=() if p.name == "official_tiny" else pytest.mark.slow)
            for p in sorted(p for p in (pathlib.Path(__file__).parent / "fixtures")
                            .glob("official_*") if (p / "outputs.npz").exists())]
RTOL = 1e-5
TASK_BATCH = {"mlm": "mlm", "mrfr": "mrfr", "mrc": "mrc", "mrckl": "mrc", "itm": "itm",
              "vqa": "vqa", "ve": "ve"}
# VQA-style heads: `{task}_head.npz` on top of state_dict.npz (VE is the VQA head, 3 answers).
ANSWER_TASKS = ("vqa", "ve")


def assert_close(ours, ref, what: str, rtol: float = RTOL) -> None:
  """max |ours - ref| <= rtol * max |ref| (relative to the tensor's scale)."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs official {ref.shape}"
  err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol} x {scale:.3g}"


def assert_grad_norms(model, grads, ref: dict, floor: float = 1e-7) -> None:
  """Per-parameter gradient norms (official names) within 1e-4 of the official ones (a json
  `grad_norms` entry), plus `floor` x the global norm for gradients that are float32 round-off
  only (key biases: their true gradient is zero); no gradient where the official has none."""
  from uniter_jax import interop  # pylint: disable=import-outside-toplevel
  grads = interop.official_state_dict(model, grads, tied={})
  norms = {k: float(np.linalg.norm(v.astype(np.float64))) for k, v in grads.items()}
  floor = floor * ref["global_norm"]
  bad = [f"{n}: ours {norms[n]:.7g} official {w:.7g}" for n, w in ref["param_norms"].items()
         if abs(norms[n] - w) > 1e-4 * w + floor]
  bad += [f"{n}: ours {norms[n]:.3g}, official has no gradient"
          for n in set(norms) - set(ref["param_norms"]) if norms[n] > floor]
  assert not bad, "\n".join(bad)


# Fewer XLA optimisation passes: compiling dominates these tests on CPU and numerics
# stay float32 either way.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module", params=FIXTURES,
                ids=lambda p: p.name.removeprefix("official_"))
def fixture(request) -> pathlib.Path:
  """One official fixture folder; every test below runs once per folder."""
  return request.param


@pytest.fixture(scope="module")
def official(fixture):
  return dict(np.load(fixture / "outputs.npz"))


def _need(fixture: pathlib.Path, task: str) -> None:
  """Skip tasks a fixture folder does not hold (e.g. VE exists only in newer folders)."""
  if not (fixture / f"batch_{TASK_BATCH[task]}.npz").exists():
    pytest.skip(f"{fixture.name} has no {task} batch")


@functools.cache
def _model(fixture: pathlib.Path, task: str) -> nnx.Module:
  if task in ANSWER_TASKS:  # VE loads as its own task: the 3-answer VQA head
    tensors = {**np.load(fixture / "state_dict.npz"), **np.load(fixture / f"{task}_head.npz")}
    return interop.load_official_checkpoint(tensors, fixture / "config.json", task=task)
  return interop.load_official_checkpoint(fixture / "state_dict.npz", fixture / "config.json")


def _batch(fixture: pathlib.Path, name: str) -> tuple[dict, dict]:
  raw = dict(np.load(fixture / f"batch_{name}.npz"))
  return interop.from_official_batch(raw), raw


# Tasks of one model, compiled as one program (together they compile much faster than
# one by one): the pretraining objectives share the pretraining model; each answer task has
# its own head.
PRETRAIN_TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


@functools.cache
def _runs(fixture: pathlib.Path, group: tuple[str, ...]) -> dict:
  """One compiled forward + backward per task of `group`: outputs, heads, losses, gradients.

  The loss is the training-loop scalar (pretrain_loss with the "ipot" OT solver, or the
  VQA BCE); gradients are taken w.r.t. every Param and the region features.
  """
  group = tuple(t for t in group if (fixture / f"batch_{TASK_BATCH[t]}.npz").exists())
  model = _model(fixture, group[0])
  batches = {t: jax.tree.map(jnp.asarray, _batch(fixture, TASK_BATCH[t])[0]) for t in group}
  graphdef, state = nnx.split(model)

  def f(state, img_feat, task):
    m = nnx.merge(graphdef, state)
    b = {**batches[task], "img_feat": img_feat}
    out = m.encode(b, return_all_layers=True, return_embeddings=True)
    if task in ANSWER_TASKS:
      heads = {"answer_scores": m.answer_logits(out.pooled)}
      res = {"loss": tasks.official_loss(task, m, b)}
    else:
      heads = {"mlm": m.mlm_logits(out.txt), "mrfr": m.mrfr_prediction(out.img),
               "mrc": m.mrc_logits(out.img), "itm": m.itm_logits(out.pooled)}
      res = pretrain_loss(m, b, task, solver="ipot")
    return res["loss"], (res, out, heads)

  grad_f = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  fn = jax.jit(lambda state, feats: {t: grad_f(state, feats[t], t) for t in group},
               compiler_options=_FAST_COMPILE)
  results = fn(state, {t: batches[t]["img_feat"] for t in group})
  to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
  return {t: {"batch": to_np(batches[t]), "res": to_np(res), "out": to_np(out),
              "heads": to_np(heads), "g_state": g_state, "g_feat": np.asarray(g_feat),
              "model": model}
          for t, ((_, (res, out, heads)), (g_state, g_feat)) in results.items()}


def _run(fixture: pathlib.Path, task: str) -> dict:
  return _runs(fixture, (task,) if task in ANSWER_TASKS else PRETRAIN_TASKS)[task]


def _compact(out_txt, out_img, batch, length):
  return interop.to_compact(out_txt, out_img, batch["txt_mask"], batch["img_mask"], length)


@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "itm", "vqa", "ve"])
def test_batch_layout_matches_aux(fixture, name):
  _need(fixture, name)
  batch, raw = _batch(fixture, name)
  np.testing.assert_array_equal(batch["txt_mask"].sum(1), raw["aux.txt_lens"])
  np.testing.assert_array_equal(batch["img_mask"].sum(1), raw["aux.num_bbs"])


@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "itm", "vqa", "ve"])
def test_sequence_and_pooled_outputs(fixture, name, official):
  _need(fixture, name)
  r = _run(fixture, name)
  batch, out = r["batch"], r["out"]
  valid = _batch(fixture, name)[1]["attn_masks"].astype(bool)
  length = valid.shape[1]
  seq = _compact(out.txt, out.img, batch, length)
  assert_close(seq[valid], official[f"{name}.sequence_output"][valid], f"{name}.sequence_output")
  if f"{name}.pooled_output" in official:
    assert_close(out.pooled, official[f"{name}.pooled_output"], f"{name}.pooled_output")
  lt = batch["input_ids"].shape[1]
  if f"{name}.embedding_output" in official:
    emb = _compact(out.embeddings[:, :lt], out.embeddings[:, lt:], batch, length)
    assert_close(emb[valid], official[f"{name}.embedding_output"][valid],
                 f"{name}.embedding_output")
  if f"{name}.all_encoder_layers" in official:
    ref = official[f"{name}.all_encoder_layers"]
    assert out.all_layers.shape[0] == ref.shape[0]
    for i in range(ref.shape[0]):
      layer = out.all_layers[i]
      got = _compact(layer[:, :lt], layer[:, lt:], batch, length)
      assert_close(got[valid], ref[i][valid], f"{name}.all_encoder_layers[{i}]")


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_mlm_head_and_loss(fixture, official):
  r = _run(fixture, "mlm")
  labels = r["batch"]["txt_labels"]
  sel = labels != -1
  scores = r["heads"]["mlm"][sel]
  assert_close(scores, official["mlm.prediction_scores"], "mlm.prediction_scores")
  nll = -np.take_along_axis(_log_softmax(scores), labels[sel][:, None], 1)[:, 0]
  assert_close(nll, official["mlm.loss"], "mlm.loss")
  assert_close(r["res"]["loss"], official["mlm.loss_mean"], "mlm.loss_mean")


def test_mrfr_head_and_loss(fixture, official):
  r = _run(fixture, "mrfr")
  sel = r["batch"]["img_masked"]
  pred = r["heads"]["mrfr"][sel]
  assert_close(pred, official["mrfr.prediction_feat"], "mrfr.prediction_feat")
  assert_close((pred - r["batch"]["feat_targets"][sel]) ** 2, official["mrfr.loss"],
               "mrfr.loss")
  assert_close(r["res"]["loss"], official["mrfr.loss_mean"], "mrfr.loss_mean")


@pytest.mark.parametrize("task", ["mrc", "mrckl"])
def test_mrc_heads_and_losses(fixture, task, official):
  r = _run(fixture, task)
  sel = r["batch"]["img_masked"]
  logits = r["heads"]["mrc"][sel]
  assert_close(logits, official["mrc.prediction_soft_label"], "mrc.prediction_soft_label")
  q = r["batch"]["label_targets"][sel].astype(np.float64)
  logp = _log_softmax(logits)
  if task == "mrc":
    label = q[:, 1:].argmax(1) + 1
    assert_close(-logp[np.arange(len(label)), label], official["mrc.loss"], "mrc.loss")
  else:
    kl = np.where(q > 0, q * (np.log(np.where(q > 0, q, 1.0)) - logp), 0.0)
    assert_close(kl, official["mrckl.loss"], "mrckl.loss")
  assert_close(r["res"]["loss"], official[f"{task}.loss_mean"], f"{task}.loss_mean")


def test_itm_head_and_losses(fixture, official):
  r = _run(fixture, "itm")
  res = r["res"]
  scores = r["heads"]["itm"]
  assert_close(scores, official["itm.itm_scores"], "itm.itm_scores")
  t = r["batch"]["itm_targets"]
  assert_close(-_log_softmax(scores)[np.arange(len(t)), t], official["itm.loss"], "itm.loss")
  assert_close(res["itm_loss"], official["itm.loss_mean"], "itm.loss_mean")
  assert_close(res["ot_distance"], official["itm.ot_dist"], "itm.ot_dist")
  assert_close(res["ot_distance"][t == 1], official["itm.ot_pos_dist"], "itm.ot_pos_dist")
  assert_close(res["ot_distance"][t == 0], official["itm.ot_neg_dist"], "itm.ot_neg_dist")
  assert_close(res["ot_loss"], official["itm.ot_loss"], "itm.ot_loss")
  assert_close(res["loss"], official["itm.total_loss"], "itm.total_loss")


@pytest.mark.parametrize("task", ANSWER_TASKS)
def test_vqa_head_and_loss(fixture, task, official):
  _need(fixture, task)
  r = _run(fixture, task)
  assert type(r["model"]).__name__ == {"vqa": "UniterForVqa",
                                       "ve": "UniterForVisualEntailment"}[task]
  logits = r["heads"]["answer_scores"]
  assert_close(logits, official[f"{task}.answer_scores"], f"{task}.answer_scores")
  t = r["batch"]["targets"].astype(np.float64)
  x = logits.astype(np.float64)
  bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
  assert_close(bce, official[f"{task}.loss"], f"{task}.loss")
  assert_close(r["res"]["loss"], official[f"{task}.loss_train"], f"{task}.loss_train")
  # The public loss helper on the same logits.
  assert_close(vqa_loss(jnp.asarray(logits), jnp.asarray(t, jnp.float32)),
               official[f"{task}.loss_train"], "vqa_loss()")


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl", "itm", "vqa", "ve"])
def test_gradient_norms(fixture, task):
  """Per-parameter gradient norms of each task's training-loop loss equal the official ones.

  Official `mask_embedding` differs in form only: it adds row 0 to every unmasked region's
  feature (row 0 is zero), so row 0 collects the feature gradient of those regions, which
  our `where` form leaves on the feature input. We add that term back before comparing.
  """
  _need(fixture, task)
  ref = json.loads((fixture / "grad_norms.json").read_text())[task]
  r = _run(fixture, task)
  assert_close(r["res"]["loss"], ref["loss"], f"{task} loss")
  grads = interop.official_state_dict(r["model"], r["g_state"], tied={})
  me = "uniter.img_embeddings.mask_embedding.weight"
  if me in ref["param_norms"]:
    grads[me] = grads[me].copy()
    grads[me][0] += r["g_feat"].sum((0, 1))
  norms = {k: float(np.linalg.norm(v.astype(np.float64))) for k, v in grads.items()}
  ref_norms = ref["param_norms"]
  assert set(ref_norms) <= set(norms), sorted(set(ref_norms) - set(norms))
  # Tiny floor: key biases have zero true gradient (softmax shift invariance); both sides
  # carry only rounding noise (~1e-12) there.
  floor = 1e-7 * ref["global_norm"]
  bad = []
  for name, want in ref_norms.items():
    if abs(norms[name] - want) > 1e-4 * want + floor:
      bad.append(f"{name}: ours {norms[name]:.7g} official {want:.7g}")
  # Parameters the official loss does not reach get no gradient here either.
  for name in set(norms) - set(ref_norms):
    if norms[name] > floor:
      bad.append(f"{name}: ours {norms[name]:.3g}, official has no gradient")
  assert not bad, "\n".join(bad)
  total = np.sqrt(sum(n ** 2 for n in norms.values()))
  assert_close(total, ref["global_norm"], f"{task} global_norm", rtol=1e-4)
