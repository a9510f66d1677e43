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

import json
import os
import shutil

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
from configs import ve as ve_config
from configs import vqa as vqa_config
from helpers import world_config
from uniter_jax import checkpointing, masking, pytree, sharding, tasks, train
from uniter_jax import train_step as step_lib
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import itm as itm_eval
from uniter_jax.evaluators import vqa as vqa_eval
from uniter_jax.inference import Predictor, Processor, Regions, draw_alignment, resources
from uniter_jax.losses import pretrain_loss
from uniter_jax.models import registry
from uniter_jax.tasks import pretrain as pretrain_task


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


# -- the processor -----------------------------------------------------------------------------

def test_processor_batches_equal_the_pipeline_batches(tiny_world, images):
  """Texts and image records through the Processor give the eval pipeline's batch rows."""
  cfg = world_config(vqa_config, tiny_world)
  spec = train.resolve_data(cfg)
  model_cfg = train.model_config_from(cfg, train.data_sizes(spec))
  pipe = train.make_pipeline(cfg, spec.test_text_dirs, spec.image_dirs, None,
                             sharding.FSDP_RULES, model_cfg=model_cfg, seed=0, train=False,
                             drop_remainder=False, num_epochs=1)
  batch = next(iter(pipe))
  recs = _texts(tiny_world, "vqa_test")
  rows = [i for i, e in enumerate(batch["example_index"]) if e >= 0]
  p = Processor(resources.find_vocab(None, cfg), **resources.processor_settings(cfg))
  mine = p.batch([recs[batch["example_index"][i]]["question"] for i in rows],
                 [images[recs[batch["example_index"][i]]["image_id"]] for i in rows])
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

def test_answer_equals_vqa_predict(tiny_world, images, tmp_path):
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


# -- pretraining heads against the pretraining evaluators --------------------------------------

@pytest.fixture(scope="module")
def pretrain_eval(tiny_world, tmp_path_factory):
  """A random pretraining model's `--mode=eval`: the balanced ITM set (16 captions) and the
  grounding probe on one held-out batch."""
  overrides = {"pretrain.mix": {"mlm": 1.0, "itm": 1.0}, "evals.heldout.batches": 1,
               "evals.itm.pairs": 32, "evals.itm.batch_size": 32}
  workdir, res = _run(pretrain_config, tiny_world, tmp_path_factory.mktemp("pre"),
                      mode="eval", **overrides)
  cfg = world_config(pretrain_config, tiny_world, **SMALL, **overrides)
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
