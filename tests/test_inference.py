"""uniter_jax.inference: raw inputs -> batches -> each task's prediction, checked against the
tasks themselves on the tiny synthetic world.

Each downstream task gets a workdir whose checkpoint is a random tiny model, and the real
`--mode=predict` on it (train.train_and_evaluate); the predictor built from that workdir
(vocab and answers found through the run's config.json) must pick what the task wrote for
every test text. The pretraining helpers (ITM, WRA, MLM) are checked the same way against
the pretraining task's `--mode=eval` (the balanced ITM set and the grounding probe). An
export folder that holds its vocab and answers is checked last.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import uniter_jax
from configs import nlvr2 as nlvr2_config
from configs import pretrain as pretrain_config
from configs import re as re_config
from configs import retrieval as itr_config
from configs import vcr as vcr_config
from configs import ve as ve_config
from configs import vqa as vqa_config
from helpers import tiny_config, world_config
from uniter_jax import checkpointing, masking, pytree, sharding, tasks, train
from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import itm as itm_eval
from uniter_jax.evaluators import vqa as vqa_eval
from uniter_jax.inference import Predictor, Processor, Regions, draw_alignment, resources
from uniter_jax.losses import pretrain_loss
from uniter_jax.models import registry
from uniter_jax.tasks import pretrain as pretrain_task


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(world: str, split: str) -> list[dict]:
  return list(fmt.iter_text_records(f"{world}/txt/{split}"))


@pytest.fixture(scope="module")
def images(tiny_world) -> dict[str, Regions]:
  return {r["image_id"]: Regions.from_record(r)
          for r in fmt.iter_image_records(f"{tiny_world}/img_db")}


# One encoder layer: every program here compiles faster, and the helpers see the same model.
SMALL = {"model.num_layers": 1}
# One batch shape per helper (the test splits hold fewer texts): one compile each.
ONE_BATCH = {"batch_buckets": (64,)}


def _random_model(name: str, model_cfg, seed: int, **kwargs):
  """The registered model with random parameters drawn in NumPy: weights N(0, 0.2), biases 0,
  LayerNorm scales around 1. (Initialisers would compile, eagerly one per parameter; any
  random model whose predictions vary with the input will do here.)"""
  model = nnx.eval_shape(lambda: registry.build(name, model_cfg, **kwargs))
  rng = np.random.default_rng(seed)
  shapes = pytree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  params = {k: (rng.normal(0.0, 0.2, v.shape) * (k[-1] != "bias") + (k[-1] == "scale"))
            .astype(v.dtype) for k, v in shapes.items()}
  checkpointing.load_params_into(model, pytree.unflatten(params))
  return model


def _run(config_module, world: str, root, mode: str = "predict", seed: int = 3,
         **overrides) -> tuple[str, dict]:
  """A workdir whose checkpoint holds a random model of the config's task, and the task's
  `--mode` run on it. The checkpoint is the trainer's own state (init_state_fn, run eagerly:
  nothing to compile), so the run restores it as a trained run's. Returns (workdir, result)."""
  cfg = world_config(config_module, world, **SMALL, **overrides)
  spec = train.resolve_data(cfg)
  task = tasks.get(cfg.task)
  model_cfg = train.model_config_from(cfg, train.data_sizes(spec))
  model = _random_model(task.model_class, model_cfg, seed, **task.model_kwargs(cfg, spec))
  workdir = os.path.join(str(root), cfg.task)
  tx, _ = train.make_optimizer(cfg, nnx.state(model, nnx.Param))
  state = step_lib.init_state_fn(lambda: model, tx, cfg.seed)()
  mngr = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointing.save(mngr, 0, state, {}, force=True)
  mngr.close()
  return workdir, train.train_and_evaluate(cfg, workdir, mode=mode)


def _same_tokens(p: Predictor, records: list[dict], field: str) -> None:
  """The helpers get the texts as strings: they must tokenise to the ids the task read."""
  for r in records:
    np.testing.assert_array_equal(p.processor.token_ids(r[field])[1:-1], r["input_ids"])


# -- loading onto a mesh ------------------------------------------------------------------------

def assert_sharded_by_fsdp_rules(model, mesh) -> None:
  """Every parameter lies on `mesh` as the FSDP rules say: split over 'fsdp' along its one
  'embed' axis, whole along every other (read off each parameter's logical names here)."""
  split = 0
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = v.get_metadata().get("out_sharding") or (None,) * v.ndim
    want = tuple(n // mesh.shape["fsdp"] if name == "embed" else n
                 for n, name in zip(v.shape, names))
    assert v.value.sharding.mesh == mesh, path
    for shard in v.value.addressable_shards:
      assert shard.data.shape == want, (path, names, shard.data.shape)
    split += want != v.shape
  assert split > 0


def test_load_onto_a_mesh_shards_by_the_rules(tmp_path, mesh):
  """uniter_jax.load(export, mesh=): each parameter placed by its logical names, the same
  values (outputs on a mesh: test_answer_equals_vqa_predict, through an orbax workdir)."""
  model = _random_model("UniterForVqa", tiny_config(), 5, num_answers=7)
  checkpointing.export_msgpack(model, str(tmp_path / "export"))
  loaded = uniter_jax.load(tmp_path / "export", mesh=mesh)
  assert_sharded_by_fsdp_rules(loaded, mesh)
  want = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for (path, a), (_, b) in zip(want, nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
                               strict=True):
    np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(path))
  with pytest.raises(ValueError, match="pass mesh= too"):
    uniter_jax.load(tmp_path / "export", rules=())


# -- the processor -----------------------------------------------------------------------------

def _test_rows(config_module, world: str, split: str):
  """The eval pipeline's first test batch, the records of its real rows and a Processor."""
  cfg = world_config(config_module, world)
  spec = train.resolve_data(cfg)
  model_cfg = train.model_config_from(cfg, train.data_sizes(spec))
  pipe = train.make_pipeline(cfg, spec.test_text_dirs, spec.image_dirs, None,
                             sharding.FSDP_RULES, model_cfg=model_cfg, seed=0, train=False,
                             drop_remainder=False, num_epochs=1)
  batch = next(iter(pipe))
  recs = _texts(world, split)
  rows = [i for i, e in enumerate(batch["example_index"]) if e >= 0]
  p = Processor(resources.find_vocab(None, cfg), **resources.processor_settings(cfg))
  return batch, [recs[batch["example_index"][i]] for i in rows], rows, p


def test_processor_batches_equal_the_pipeline_batches(tiny_world, images):
  """Texts and image records through the Processor give the eval pipeline's batch rows."""
  batch, chosen, rows, p = _test_rows(vqa_config, tiny_world, "vqa_test")
  mine = p.batch([r["question"] for r in chosen], [images[r["image_id"]] for r in chosen])
  assert mine["input_ids"].shape[0] == p.batch_size(len(rows))
  for k in ("input_ids", "txt_mask", "img_feat", "img_pos", "img_mask"):
    np.testing.assert_array_equal(mine[k][: len(rows)], batch[k][rows], err_msg=k)
  assert not mine["txt_mask"][len(rows):].any() and not mine["img_mask"][len(rows):].any()
  # Long texts keep max_txt_len words, images the first img_buckets[-1] regions (here 16).
  long = p.text_batch(["red " * 100, "a"])
  assert long["input_ids"].shape == (2, 40) and long["txt_mask"].sum(1).tolist() == [40, 3]
  many = Regions(np.ones((20, 64), np.float32), np.ones((20, 7), np.float32))
  assert p.image_batch([many])["img_mask"].sum() == 16


def test_regions_from_pixels_and_normalised_boxes(images):
  im = next(iter(images.values()))
  x1, y1, x2, y2 = (im.img_pos[:, :4] * np.array([im.image_w, im.image_h] * 2)).T
  pixels = Regions.from_pixels(im.features, np.stack([x1, y1, x2, y2], 1), im.image_w,
                               im.image_h)
  np.testing.assert_allclose(pixels.img_pos, im.img_pos, atol=1e-6)
  for boxes in (im.img_pos[:, :4], im.img_pos[:, :6], im.img_pos):
    np.testing.assert_allclose(Regions.from_normalized(im.features, boxes).img_pos, im.img_pos,
                               atol=1e-6)
  np.testing.assert_allclose(pixels.boxes()[:, 2], (x2 - x1), atol=1e-3)  # xywh pixels
  with pytest.raises(ValueError, match=r"\(n, 4\), \(n, 6\) or \(n, 7\)"):
    Regions.from_normalized(im.features, im.img_pos[:, :5])
  with pytest.raises(ValueError, match="box features must be"):
    Regions(im.features, im.img_pos[:2])


# -- downstream tasks against --mode=predict ---------------------------------------------------

def test_answer_equals_vqa_predict(tiny_world, images, tmp_path, mesh):
  workdir, res = _run(vqa_config, tiny_world, tmp_path)
  # The answers: the run's ans2label.json, found through WORKDIR/config.json.
  p = uniter_jax.predictor(workdir, processor_settings=ONE_BATCH)
  recs = _texts(tiny_world, "vqa_test")
  _same_tokens(p, recs, "question")
  with open(res["predictions"]) as f:
    written = {q["question_id"]: q["answer"] for q in json.load(f)}
  got = p.answer([r["question"] for r in recs], [images[r["image_id"]] for r in recs], top_k=3)
  qids = vqa_eval.question_ids([r["id"] for r in recs], {})
  assert {q: a[0][0] for q, a in zip(qids, got)} == written
  assert len(set(written.values())) > 1  # the random model's answers depend on the input
  for top in got:
    scores = [s for _, s in top]
    assert len(top) == 3 and scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
  one = p.answer(recs[0]["question"], images[recs[0]["image_id"]])  # one pair, batch of 1
  assert one[0][0] == got[0][0][0] and one[0][1] == pytest.approx(got[0][0][1], abs=1e-5)
  # The same model over the 8 devices (uniter_jax.load(mesh=)): the orbax checkpoint restored
  # into the rules' shardings, each batch split over the data axes; the same answers.
  on_mesh = uniter_jax.predictor(workdir, processor_settings=ONE_BATCH,
                                 mesh={"data": 4, "fsdp": 2})
  assert_sharded_by_fsdp_rules(on_mesh.model, mesh)
  got_mesh = on_mesh.answer([r["question"] for r in recs], [images[r["image_id"]] for r in recs],
                            top_k=3)
  assert [[a for a, _ in t] for t in got_mesh] == [[a for a, _ in t] for t in got]
  np.testing.assert_allclose([[s for _, s in t] for t in got_mesh],
                             [[s for _, s in t] for t in got], atol=1e-5)


# A classifier head like VQA's (test_answer_equals_vqa_predict, the default variant):
# left to -m slow for the suite's 10 minutes.
@pytest.mark.slow
def test_entails_equals_ve_predict(tiny_world, images, tmp_path):
  workdir, res = _run(ve_config, tiny_world, tmp_path)
  p = uniter_jax.predictor(workdir, processor_settings=ONE_BATCH)
  recs = _texts(tiny_world, "ve_test")
  _same_tokens(p, recs, "hypothesis")
  with open(res["predictions"]) as f:
    written = {r["id"]: r["label"] for r in json.load(f)}
  got = p.entails([images[r["image_id"]] for r in recs], [r["hypothesis"] for r in recs])
  assert {r["id"]: g["label"] for r, g in zip(recs, got)} == written
  assert len(set(written.values())) > 1
  assert set(got[0]["scores"]) == {"contradiction", "entailment", "neutral"}


# A classifier head like VQA's (test_answer_equals_vqa_predict, the default variant):
# left to -m slow for the suite's 10 minutes.
@pytest.mark.slow
def test_nlvr2_equals_predict(tiny_world, images, tmp_path):
  # Triplet: a random paired-attn head says True to everything here (its features after ReLU
  # and pooling share one sign); the helper is the same for every variant.
  workdir, res = _run(nlvr2_config, tiny_world, tmp_path, **{"nlvr2.variant": "triplet"})
  p = uniter_jax.predictor(workdir, processor_settings=ONE_BATCH)
  recs = _texts(tiny_world, "nlvr2_test")
  _same_tokens(p, recs, "sentence")
  with open(res["predictions"]) as f:
    written = dict(line.split(",") for line in f.read().splitlines())
  got = p.nlvr2([r["sentence"] for r in recs], [images[r["image_ids"][0]] for r in recs],
                [images[r["image_ids"][1]] for r in recs])
  assert {r["identifier"]: str(g["label"]) for r, g in zip(recs, got)} == written
  assert set(written.values()) == {"True", "False"}
  assert all((g["p_true"] > 0.5) == g["label"] for g in got)


def test_ground_equals_re_predict(tiny_world, images, tmp_path):
  workdir, res = _run(re_config, tiny_world, tmp_path)
  p = uniter_jax.predictor(workdir, processor_settings=ONE_BATCH)
  recs = _texts(tiny_world, "re_test")
  _same_tokens(p, recs, "sent")
  with open(res["predictions"]) as f:
    written = {r["id"]: r for r in json.load(f)}
  got = p.ground([r["sent"] for r in recs], [images[r["image_id"]] for r in recs])
  assert len({w["region"] for w in written.values()}) > 1
  for r, g in zip(recs, got):
    w = written[r["id"]]
    assert g["region"] == w["region"], r["id"]
    assert g["score"] == pytest.approx(w["score"], abs=1e-4)
    np.testing.assert_allclose(g["box"], w["pred_box"], atol=0.01)  # pixels, xywh
    assert len(g["scores"]) == images[r["image_id"]].num_regions
    assert g["probabilities"].sum() == pytest.approx(1.0)


def test_retrieve_equals_itr_predict(tiny_world, images, tmp_path):
  workdir, res = _run(itr_config, tiny_world, tmp_path)
  p = uniter_jax.predictor(workdir)  # blocks of up to 32 pairs
  recs = _texts(tiny_world, "retrieval_test")
  _same_tokens(p, recs, "text")
  with open(res["predictions"]) as f:
    written = json.load(f)
  gallery = [images[i] for i in sorted({r["image_id"] for r in recs})]
  got = p.retrieve([r["text"] for r in recs], gallery, k=10)
  for r, top in zip(recs, got):
    assert [gallery[j].image_id for j, _ in top] == written["text_to_image"][r["id"]]
    np.testing.assert_allclose([s for _, s in top], written["scores_text_to_image"][r["id"]],
                               atol=1e-4)


def test_vcr_batches_equal_the_pipeline_batches(tiny_world, images):
  """The VCR helper's rows (Processor.vcr_batch; the task's scorer builds the sequences from
  them) equal the eval pipeline's for the same questions, answers and rationales as strings."""
  batch, chosen, rows, p = _test_rows(vcr_config, tiny_world, "vcr_test")
  mine = p.vcr_batch([r["question"] for r in chosen], [r["answers"] for r in chosen],
                     [r["rationales"] for r in chosen], [images[r["image_id"]] for r in chosen])
  for k in ("input_ids", "txt_mask", "img_feat", "img_pos", "img_mask", "lens_as", "lens_rs"):
    np.testing.assert_array_equal(mine[k][: len(rows)], batch[k][rows], err_msg=k)
  for k in ("as", "rs"):  # the choices' ids one after another (each side padded its own way)
    for a, b, n in zip(mine[f"input_ids_{k}"], batch[f"input_ids_{k}"][rows],
                       batch[f"lens_{k}"][rows].sum(1)):
      np.testing.assert_array_equal(a[:n], b[:n])
  assert (mine["qa_target"] == -1).all() and not mine["lens_as"][len(rows):].any()
  with pytest.raises(ValueError, match="4 answers and 4 rationales"):
    p.vcr_batch(["q"], [chosen[0]["answers"][:3]], [chosen[0]["rationales"]],
                [images[chosen[0]["image_id"]]])


# The helper runs the task's own scorer on those rows (test above): the whole comparison with
# --mode=predict compiles the 20-sequence VCR forward twice, left to -m slow.
@pytest.mark.slow
def test_vcr_equals_vcr_predict(tiny_world, images, tmp_path):
  workdir, res = _run(vcr_config, tiny_world, tmp_path)
  # Batches of 8 questions (each 20 sequences: Q->A, QA->R under every answer): one compile.
  p = uniter_jax.predictor(workdir, processor_settings={"batch_buckets": (8,)})
  recs = _texts(tiny_world, "vcr_test")
  _same_tokens(p, recs, "question")
  for r in recs:  # the choices as strings tokenise to the ids the task read
    for k in ("as", "rs"):
      words = [p.processor.tokenizer.encode(c)
               for c in r["answers" if k == "as" else "rationales"]]
      assert [len(w) for w in words] == r[f"lens_{k}"].tolist()
      np.testing.assert_array_equal(np.concatenate(words), r[f"input_ids_{k}"])
  with open(res["predictions"]) as f:
    header, *lines = [line.split(",") for line in f.read().splitlines()]
  assert header[1:5] == [f"answer_{i}" for i in range(4)]
  written = {line[0]: np.asarray(line[1:], np.float64) for line in lines}
  got = p.vcr([r["question"] for r in recs], [r["answers"] for r in recs],
              [r["rationales"] for r in recs], [images[r["image_id"]] for r in recs])
  assert len(got) == len(recs) == len(written)
  for r, g in zip(recs, got):
    w = written[r["id"]]  # 6 decimals
    np.testing.assert_allclose(g["answer_logits"], w[:4], atol=2e-5)
    np.testing.assert_allclose(g["rationale_logits"].reshape(-1), w[4:], atol=2e-5)
    assert g["answer"] == int(np.argmax(w[:4]))
    assert g["rationale"] == int(np.argmax(w[4:].reshape(4, 4)[g["answer"]]))
    assert g["answer_probs"].sum() == pytest.approx(1.0)
  assert len({g["answer"] for g in got}) > 1  # the random model's choices depend on the input
  one = p.vcr(recs[0]["question"], recs[0]["answers"], recs[0]["rationales"],
              images[recs[0]["image_id"]])
  np.testing.assert_allclose(one["rationale_logits"], got[0]["rationale_logits"], atol=1e-5)


# -- pretraining heads against the pretraining evaluators --------------------------------------

@pytest.fixture(scope="module")
def pretrain_run(tiny_world, tmp_path_factory):
  """A random pretraining model's workdir and its `--mode=eval`: the balanced ITM set (16
  captions) and the grounding probe on one held-out batch. (workdir, result, config)."""
  overrides = {"pretrain.mix": {"mlm": 1.0, "itm": 1.0}, "evals.heldout.batches": 1,
               "evals.itm.pairs": 32, "evals.itm.batch_size": 32}
  workdir, res = _run(pretrain_config, tiny_world, tmp_path_factory.mktemp("pre"),
                      mode="eval", **overrides)
  return workdir, res, world_config(pretrain_config, tiny_world, **SMALL, **overrides)


@pytest.fixture(scope="module")
def pretrain_eval(pretrain_run):
  """(the predictor of the pretraining workdir, its eval result, its config)."""
  workdir, res, cfg = pretrain_run
  return uniter_jax.predictor(workdir, processor_settings=ONE_BATCH), res, cfg


def _val_batches(cfg, *, drop_remainder: bool, want: int
                 ) -> tuple[list[dict], list[str], list[str]]:
  """The first held-out batches of the evaluators' pipeline that hold `want` texts, and the
  (text id, image id) of their rows in order."""
  spec = train.resolve_data(cfg)
  model_cfg = train.model_config_from(cfg, train.data_sizes(spec))
  pipe = train.make_pipeline(cfg, spec.val_text_dirs, spec.val_image_dirs, None,
                             sharding.FSDP_RULES, model_cfg=model_cfg, seed=0, train=False,
                             drop_remainder=drop_remainder, num_epochs=1)
  batches, index = [], np.zeros((0,), np.int32)
  for batch in pipe:
    batches.append(batch)
    index = np.concatenate([index, batch["example_index"][batch["example_index"] >= 0]])
    if len(index) >= want:
      break
  p = pipe.planner
  return batches, [p.text_ids[i] for i in index], [p.text_image_ids[i][0] for i in index]


def test_itm_score_and_wra_equal_the_balanced_itm_evaluator(pretrain_eval, tiny_world, images):
  p, res, cfg = pretrain_eval
  _, text_ids, image_ids = _val_batches(cfg, drop_remainder=False,
                                       want=cfg.evals.itm.pairs // 2)
  rows, cols, labels = itm_eval.balanced_pairs(np.asarray(image_ids), cfg.evals.itm.pairs)
  by_id = {r["id"]: r["text"] for r in _texts(tiny_world, "pretrain_val")}
  texts = [by_id[text_ids[i]] for i in rows]
  pics = [images[image_ids[j]] for j in cols]
  prob = p.itm_score(texts, pics)
  assert prob.shape == (len(labels),) and ((prob >= 0) & (prob <= 1)).all()
  y = labels.astype(bool)
  assert res["itm/p_match_pos"] == pytest.approx(prob[y].mean(), abs=1e-5)
  assert res["itm/p_match_neg"] == pytest.approx(prob[~y].mean(), abs=1e-5)
  assert res["itm/auc"] == pytest.approx(itm_eval.auc(prob, labels), abs=1e-6)
  assert p.itm_score(texts[0], pics[0]) == pytest.approx(prob[0], abs=1e-5)
  # WRA: the evaluator's mean OT distances of matched and mismatched pairs.
  plans = p.word_region_alignment(texts, pics)
  dist = np.asarray([a.distance for a in plans])
  assert res["itm/ot_pos"] == pytest.approx(dist[y].mean(), abs=1e-4)
  assert res["itm/ot_neg"] == pytest.approx(dist[~y].mean(), abs=1e-4)
  a = plans[0]
  assert a.plan.shape == (len(a.tokens), pics[0].num_regions)
  assert a.tokens[0] == "[CLS]" and a.tokens[-1] == "[SEP]"
  # Uniform marginals: each token sends 1 / tokens, each region receives 1 / regions.
  np.testing.assert_allclose(a.plan.sum(1), 1 / len(a.tokens), atol=2e-3)
  np.testing.assert_allclose(a.plan.sum(0), 1 / pics[0].num_regions, atol=2e-3)


def test_fill_mask_equals_the_grounding_probe(pretrain_eval, tiny_world, images):
  """The probe hides every colour and shape word of the first held-out batch: fill_mask's top
  guess at each [MASK] scores the probe's accuracy, and its whole distribution the MLM loss
  the project's loss function computes on that probe batch."""
  p, res, cfg = pretrain_eval
  (batch,), text_ids, image_ids = _val_batches(cfg, drop_remainder=True, want=1)
  tok = p.processor.tokenizer
  mask_cfg = pretrain_task.settings(cfg, tok.vocab_path).masking
  focus = list(mask_cfg.focus_ids)
  by_id = {r["id"]: r for r in _texts(tiny_world, "pretrain_val")}
  texts, pics, gold = [], [], []
  for t, i in zip(text_ids, image_ids):
    ids = by_id[t]["input_ids"]
    hidden = np.where(np.isin(ids, focus), tok.mask_id, ids)
    texts.append(tok.decode(hidden))
    np.testing.assert_array_equal(p.processor.token_ids(texts[-1])[1:-1], hidden)
    pics.append(images[i])
    gold.append([tok.ids_to_tokens[w] for w in ids[np.isin(ids, focus)]])
  got = p.fill_mask(texts, pics, top_k=tok.vocab_size)  # every token: the whole distribution
  guesses = [(dict(guess), guess[0][0], g) for masks, golds in zip(got, gold)
             for guess, g in zip(masks, golds)]
  assert len(guesses) == sum(map(len, gold)) > 0
  accuracy = np.mean([top == g for _, top, g in guesses])
  assert res["mlm_focus/accuracy_own_image"] == pytest.approx(accuracy, abs=1e-6)
  probe = masking.mask_focus_words(step_lib.model_fields(batch), mask_cfg)
  graphdef, params = nnx.split(p.model)
  want = jax.jit(lambda params, b: pretrain_loss(nnx.merge(graphdef, params), b, "mlm"))(
      params, probe)
  nll = np.mean([-np.log(probs[g]) for probs, _, g in guesses])
  assert float(want["loss"]) == pytest.approx(nll, rel=1e-4)
  assert float(want["accuracy"]) == pytest.approx(accuracy, abs=1e-6)
  first = got[0][0]
  assert first[0][1] >= first[1][1] > 0 and sum(q for _, q in first) == pytest.approx(1.0)
  with pytest.raises(ValueError, match=r"no \[MASK\]"):
    p.fill_mask("a red circle", pics[0])


def test_draw_alignment_writes_one_tile_per_word(pretrain_eval, tiny_world, images, tmp_path):
  p, _, _ = pretrain_eval
  image_id = next(iter(images))
  a = p.word_region_alignment("the red cross is left of the blue star .", images[image_id])
  assert [a.tokens[i] for i in a.words()][:3] == ["the", "red", "cross"]
  out = draw_alignment(a, str(tmp_path / "wra.png"),
                       picture=f"{tiny_world}/images/{image_id}.png", columns=3)
  with Image.open(out) as sheet:  # 3 columns of 2x-scaled pictures
    assert sheet.width > 3 * 2 * images[image_id].image_w
    assert sheet.height > 3 * 2 * images[image_id].image_h  # 9 words: 3 rows
  blank = draw_alignment(a, str(tmp_path / "blank.png"), tokens=[1])
  assert os.path.getsize(blank) > 0


def _readme_block(heading: str) -> str:
  """The first indented code block after `heading` in README.md, dedented."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    lines = f.read().split(heading, 1)[1].splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("    "))
  end = next((i for i in range(start, len(lines))
              if lines[i].strip() and not lines[i].startswith("    ")), len(lines))
  return textwrap.dedent("\n".join(lines[start:end]))


def test_readme_inference_example_runs_on_an_export(pretrain_run, tiny_world):
  """The README's *Inference* lines as written, on `--mode=export` of the pretraining run (the
  two paths swapped for the fixture's): README and code cannot drift apart."""
  workdir, _, cfg = pretrain_run
  train.train_and_evaluate(cfg, workdir, mode="export")
  code = _readme_block("## Inference: a trained model in a few lines")
  paths = {'"workdir/pretrain/export"': repr(os.path.join(workdir, "export")),
           '"data/synthetic/img_db"': repr(os.path.join(tiny_world, "img_db"))}
  for old, new in paths.items():
    assert old in code, (old, code)
    code = code.replace(old, new)
  scope: dict = {}
  values = []  # each expression statement's value, as a notebook would show it
  for node in ast.parse(code).body:
    if isinstance(node, ast.Expr):
      values.append(eval(compile(ast.Expression(node.value), "README.md", "eval"), scope))
    else:
      exec(compile(ast.Module([node], []), "README.md", "exec"), scope)
  itm, masks = values
  assert isinstance(itm, float) and 0.0 <= itm <= 1.0
  (guesses,) = masks  # one [MASK]: its top 3 (token, probability)
  assert len(guesses) == 3 and all(isinstance(t, str) for t, _ in guesses)
  assert [q for _, q in guesses] == sorted((q for _, q in guesses), reverse=True)


def test_only_process_zero_writes_exports_and_predictions(pretrain_run, tmp_path, monkeypatch):
  """In a run of several processes only process 0 writes (files.is_writer): as process 1,
  --mode=export and a results file leave nothing behind. (2 real processes: test_multihost,
  under -m slow.)"""
  workdir, _, cfg = pretrain_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("export"))
  monkeypatch.setattr(jax, "process_index", lambda *_: 1)
  out = train.train_and_evaluate(cfg, copy, mode="export")
  assert out["export"] == os.path.join(copy, "export", checkpointing.PARAMS)
  assert not [e for e in os.listdir(copy) if "export" in e], os.listdir(copy)
  results = vqa_eval.write_results(str(tmp_path / "results.json"), [1], ["yes"])
  assert not os.path.exists(results)
  monkeypatch.undo()
  vqa_eval.write_results(results, [1], ["yes"])  # process 0 (and a single process) writes
  with open(results) as f:
    assert json.load(f) == [{"question_id": 1, "answer": "yes"}]


# -- where vocab and answers come from, and misuse ---------------------------------------------

def test_vocab_and_answers_from_the_export_folder_and_clear_errors(tiny_world, images, tmp_path):
  """An export that holds vocab.txt / ans2label.json needs no run config; without either,
  the predictor says what to pass."""
  cfg = world_config(ve_config, tiny_world)
  spec = train.resolve_data(cfg)
  model_cfg = train.model_config_from(cfg, train.data_sizes(spec))
  model = _random_model("UniterForVqa", model_cfg, 1, num_answers=3)
  export = os.path.dirname(checkpointing.export_msgpack(model, str(tmp_path / "alone")))
  with pytest.raises(FileNotFoundError, match="pass vocab=PATH"):
    uniter_jax.predictor(export)
  p = uniter_jax.predictor(export, vocab=spec.vocab)
  with pytest.raises(ValueError, match="no answer list"):
    p.answer("is there a star ?", next(iter(images.values())))
  with pytest.raises(TypeError, match="needs a UniterForPretraining model"):
    p.itm_score("a star", next(iter(images.values())))
  with pytest.raises(TypeError, match="needs a UniterForVcr model"):
    p.vcr("a star ?", ["yes"] * 4, ["it is"] * 4, next(iter(images.values())))
  shutil.copy(spec.vocab, os.path.join(export, "vocab.txt"))
  with open(os.path.join(export, "ans2label.json"), "w") as f:
    json.dump({"yes": 0, "no": 1, "2": 2}, f)
  p = uniter_jax.predictor(export)
  assert p.answers == ("yes", "no", "2")
  im = next(iter(images.values()))
  assert sorted(a for a, _ in p.answer("is there a star ?", im, top_k=3)) == ["2", "no", "yes"]
  assert uniter_jax.predictor(export, ans2label=["a", "b", "c"]).answers == ("a", "b", "c")
  assert uniter_jax.predictor(export, ans2label={"b": 1, "a": 0, "c": 2}).answers == ("a", "b", "c")
  with pytest.raises(ValueError, match=r"answer ids must be 0\.\.2"):
    uniter_jax.predictor(export, ans2label={"a": 0, "b": 0, "c": 2})
  assert uniter_jax.Predictor is Predictor and uniter_jax.Regions is Regions  # lazy names
  with pytest.raises(ValueError, match="img_dim"):
    p.answer("is there a star ?", Regions(np.zeros((2, 8), np.float32), im.img_pos[:2]))
  with pytest.raises(ValueError, match="equally many"):
    p.answer(["a", "b", "c"], [im, im])
