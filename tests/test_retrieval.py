"""Image-text retrieval: recall metrics on hand-computed matrices, in-step negatives, the
resumable all-pairs scorer, and one tiny fine-tuning run on the 8-device mesh (train, eval,
predict, export -> uniter_jax.load) on the synthetic world's retrieval split."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import uniter_jax
from configs import retrieval as itr_config
from data_prep.synthetic import baselines
from uniter_jax import checkpointing, sharding, train
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import retrieval as ev
from uniter_jax.models import UniterForPretraining, registry
from uniter_jax.tasks import retrieval as itr
from uniter_jax.tasks import retrieval_rerank as rerank
from uniter_jax.tasks import retrieval_scores as scoring
from helpers import random_batch, tiny_config, world_config


# -- metrics ---------------------------------------------------------------------------------

def test_recalls_on_a_hand_computed_matrix():
  # 4 captions, 3 images; captions 0, 1 show image 0, caption 2 image 1, caption 3 image 2.
  s = np.array([[0.9, 0.1, 0.0],    # gt 0 ranked 0
                [0.2, 0.5, 0.7],    # gt 0 ranked 2
                [0.3, 0.3, 0.1],    # gt 1 ties with column 0: column 0 first -> rank 1
                [0.8, 0.9, 0.85]])  # gt 2 ranked 1
  gt = [0, 0, 1, 2]
  np.testing.assert_array_equal(ev.image_ranks(s, gt), [0, 2, 1, 1])
  # Column ranks: image 0: [0.9, 0.2, 0.3, 0.8] -> caption 0 first (rank 0).
  # image 1: [0.1, 0.5, 0.3, 0.9] -> caption 2 is third (rank 2).
  # image 2: [0.0, 0.7, 0.1, 0.85] -> caption 3 first (rank 0).
  np.testing.assert_array_equal(ev.text_ranks(s, gt), [0, 2, 0])
  out = ev.recalls(s, gt, ks=(1, 2, 3))
  assert out["ir_r1"] == 0.25 and out["ir_r2"] == 0.75 and out["ir_r3"] == 1.0
  assert out["tr_r1"] == pytest.approx(2 / 3) and out["tr_r2"] == pytest.approx(2 / 3)
  assert out["tr_r3"] == 1.0
  assert out["r_mean"] == pytest.approx((0.25 + 0.75 + 1 + 2 / 3 + 2 / 3 + 1) / 6)
  assert set(ev.recalls(s, gt)) == set(ev.NAMES)


def test_text_retrieval_counts_any_caption_of_the_image_and_ties_by_index():
  # Image 0 has captions 0 and 2; only caption 2 is on top of its column.
  s = np.array([[0.1, 0.5], [0.4, 0.6], [0.9, 0.2], [0.4, 0.6]])
  gt = [0, 1, 0, 1]
  np.testing.assert_array_equal(ev.text_ranks(s, gt), [0, 0])  # image 1: caption 1 ties 3
  # A constant matrix: ties by index, so each text's rank is its gt column.
  const = np.zeros((4, 3))
  np.testing.assert_array_equal(ev.image_ranks(const, [2, 0, 1, 2]), [2, 0, 1, 2])
  np.testing.assert_array_equal(ev.text_ranks(const, [2, 0, 1, 2]), [1, 2, 0])
  with pytest.raises(ValueError, match="out of range"):
    ev.recalls(const, [0, 1, 2, 3])


def test_chance_recalls_match_the_synthetic_baselines():
  gt = np.repeat(np.arange(100), 5)
  want = baselines.retrieval_chance(100, 5)
  got = ev.chance_recalls(gt, 100)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-3), k
  # A random score matrix lands near chance (IR R@10 = 0.1, 500 captions).
  s = np.random.default_rng(0).random((500, 100))
  assert abs(ev.recalls(s, gt)["ir_r10"] - 0.1) < 0.04


def test_fast_validation_columns_wrap_and_rank_the_gt_first_on_ties():
  cols = ev.fast_val_columns([0, 3, 4], n_img=5, size=3)
  np.testing.assert_array_equal(cols, [[0, 1, 2], [3, 4, 0], [4, 0, 1]])
  assert ev.fast_val_columns([1], n_img=2, size=400).shape == (1, 2)
  cand = np.array([[0.5, 0.5, 0.1], [0.1, 0.2, 0.3], [0.3, 0.4, 0.1]])
  out = ev.fast_val_recalls(cand, ks=(1, 2))
  assert out == {"val_ir_r1": pytest.approx(1 / 3), "val_ir_r2": pytest.approx(2 / 3)}


def test_rankings_json_lists_the_top_k(tmp_path):
  s = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
  path = ev.write_rankings(str(tmp_path / "r.json"), s, ["t0", "t1"], ["a", "b", "c"], k=2)
  with open(path) as f:
    got = json.load(f)
  assert got["text_to_image"] == {"t0": ["b", "c"], "t1": ["a", "c"]}
  assert got["image_to_text"] == {"a": ["t1", "t0"], "b": ["t0", "t1"], "c": ["t0", "t1"]}


# -- negatives -------------------------------------------------------------------------------

def test_negatives_are_never_a_true_match():
  # 16 rows, 5 images: several captions per image, so in-batch rows often share the image.
  img_ids = jnp.asarray(np.random.default_rng(1).integers(0, 5, 16), jnp.int32)
  valid = jnp.ones(16, bool).at[15].set(False)
  draw = jax.jit(jax.vmap(lambda k: itr.draw_negatives(k, img_ids, valid)))
  neg_img, neg_txt, ok = map(np.asarray, draw(jax.random.split(jax.random.PRNGKey(0), 200)))
  ids = np.asarray(img_ids)
  assert ok[:, :15].all() and not ok[:, 15].any()
  for neg in (neg_img, neg_txt):
    assert (ids[neg[:, :15]] != ids[None, :15]).all()
    assert (neg[:, :15] != 15).all()  # the padding row is never drawn
    # Every allowed candidate of row 0 is drawn at some point (uniform over the batch).
    allowed = set(np.nonzero((ids != ids[0]) & np.asarray(valid))[0].tolist())
    assert set(neg[:, 0].tolist()) == allowed
  # All rows of one image: no valid negative, weight 0.
  same = itr.draw_negatives(jax.random.PRNGKey(0), jnp.zeros(4, jnp.int32), jnp.ones(4, bool))
  assert not np.asarray(same[2]).any()


def test_pool_rows_join_the_candidates_and_are_never_a_true_match():
  cfg = tiny_config()
  b = random_batch(0, b=4, lt=6, cfg=cfg, soft_labels=False)
  p = random_batch(1, b=8, lt=9, cfg=cfg, soft_labels=False)
  b["img_ids"] = np.array([7, 7, 8, 9], np.int32)
  p["img_ids"] = np.array([7, 8, 9, 7, 8, 9, 10, 7], np.int32)  # other captions of 7, 8, 9
  batch = {k: jnp.asarray(v) for k, v in {**b, **{f"pool_{k}": v for k, v in p.items()}}.items()}
  merged, n = itr.with_pool(batch)
  assert n == 4 and merged["input_ids"].shape == (12, 9)  # text blocks padded to the wider
  np.testing.assert_array_equal(merged["input_ids"][:4, :6], b["input_ids"])
  assert not np.asarray(merged["txt_mask"][:4, 6:]).any()
  np.testing.assert_array_equal(merged["img_feat"][4:], p["img_feat"])
  ids = np.asarray(merged["img_ids"])
  draw = jax.jit(jax.vmap(lambda k: itr.draw_negatives(k, merged["img_ids"],
                                                       merged["txt_mask"].any(1), n)))
  neg_img, neg_txt, ok = map(np.asarray, draw(jax.random.split(jax.random.PRNGKey(0), 300)))
  assert neg_img.shape == (300, 4) and ok.all()
  for neg in (neg_img, neg_txt):
    assert (ids[neg] != ids[None, :4]).all()  # another caption of the image is no negative
    for r in range(4):  # every allowed row, pool rows included, is drawn at some point
      assert set(neg[:, r].tolist()) == set(np.nonzero(ids != ids[r])[0].tolist())
  rows, w = itr.random_negative_batch(jax.random.PRNGKey(1), merged, n)
  assert rows["input_ids"].shape == (12, 9) and w.shape == (4,)


def test_negative_batch_layout():
  cfg = tiny_config()
  b = random_batch(0, b=4, cfg=cfg, soft_labels=False)
  b["img_ids"] = np.array([7, 7, 8, 9], np.int32)
  rows, w = itr.random_negative_batch(jax.random.PRNGKey(3), {k: jnp.asarray(v)
                                                             for k, v in b.items()})
  assert rows["input_ids"].shape[0] == 12 and np.asarray(w).tolist() == [1, 1, 1, 1]
  ids, feat = np.asarray(rows["input_ids"]), np.asarray(rows["img_feat"])
  for i in range(4):
    np.testing.assert_array_equal(ids[3 * i], b["input_ids"][i])      # positive
    np.testing.assert_array_equal(feat[3 * i], b["img_feat"][i])
    np.testing.assert_array_equal(ids[3 * i + 1], b["input_ids"][i])  # negative image
    np.testing.assert_array_equal(feat[3 * i + 2], b["img_feat"][i])  # negative caption
  neg_img_ids = np.asarray(rows["img_ids"])[1::3]
  assert (neg_img_ids != b["img_ids"]).all()


# -- all-pairs scoring -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorer_setup(mesh):
  cfg = tiny_config()
  model = registry.build("UniterForImageTextRetrieval", cfg, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rules = sharding.FSDP_RULES
  t = random_batch(1, b=11, cfg=cfg, soft_labels=False)
  i = random_batch(2, b=7, cfg=cfg, soft_labels=False)
  texts = {k: t[k] for k in scoring.TEXT_FIELDS}
  images = {k: i[k] for k in scoring.IMAGE_FIELDS}
  return model, graphdef, params, rest, rules, texts, images


def test_all_pairs_scores_equal_the_model_and_resume(scorer_setup, mesh, tmp_path):
  model, graphdef, params, rest, rules, texts, images = scorer_setup
  fn = scoring.make_block_scorer(graphdef, rules)
  # The abstract bf16 model is built outside the mesh context (as the task does).
  bf = scoring.make_block_scorer(scoring.graphdef_in(graphdef, model.config, "bfloat16"),
                                 rules)
  lines = []
  say = lambda m, *a: lines.append(m % a)  # noqa: E731
  with jax.set_mesh(mesh):
    full = scoring.score_all_pairs(fn, params, rest, texts, images, block_txt=4,
                                   block_img=4, say=say)
    # Reference: the model on the explicit (text, image) pairs, one row per pair.
    ti, ii = np.meshgrid(np.arange(11), np.arange(7), indexing="ij")
    pairs = {**{k: v[ti.ravel()] for k, v in texts.items()},
             **{k: v[ii.ravel()] for k, v in images.items()}}
    ref = jax.jit(lambda p, r, b: nnx.merge(graphdef, p, r)(b))
    want = np.asarray(ref(params, rest, pairs))[:, 0].reshape(11, 7)
    np.testing.assert_allclose(full, want, atol=1e-5)
    assert any("pairs/s" in m and "ETA" in m for m in lines)
    # Captions blocked by length with their padding cut (widths 8 and 9 here): same scores.
    trimmed = scoring.score_all_pairs(fn, params, rest, texts, images, block_txt=4,
                                      block_img=4, trim_text=8)
    np.testing.assert_allclose(trimmed, full, atol=1e-5)
    # Interrupted after 2 of 6 blocks, then resumed: the same matrix, 4 blocks scored.
    store = scoring.ScoreStore(str(tmp_path / "s.npz"), {"step": 1})
    assert scoring.score_all_pairs(fn, params, rest, texts, images, block_txt=4, block_img=4,
                                   store=store, max_blocks=2) is None
    lines.clear()
    again = scoring.score_all_pairs(fn, params, rest, texts, images, block_txt=4,
                                    block_img=4, store=store, say=say)
    np.testing.assert_array_equal(again, full)
    assert "4 of 6 blocks left" in lines[0]
    # Another model tag starts over rather than mixing two models' scores.
    other = scoring.ScoreStore(str(tmp_path / "s.npz"), {"step": 2})
    assert not other.load((11, 7), (3, 2))[2]
    # bf16 scoring stays close to float32.
    low = scoring.score_all_pairs(bf, params, rest, texts, images, block_txt=4, block_img=4)
    assert np.abs(low - full).max() < 0.05
    # Fast validation: each caption against its candidate columns.
    cols = ev.fast_val_columns(np.arange(11) % 7, 7, 3)
    fast = scoring.fast_val_scores(fn, params, rest, texts, images, cols)
    np.testing.assert_allclose(fast, np.take_along_axis(full, cols, 1), atol=1e-5)


# -- a tiny fine-tuning run ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def itr_run(tiny_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("itr") / "run")
  return workdir, train.train_and_evaluate(world_config(itr_config, tiny_world), workdir)


def test_fine_tunes_evaluates_and_predicts(itr_run, tiny_world):
  workdir, out = itr_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(r) for r in f]
  assert all(np.isfinite(r["loss"]) for r in rows) and "train_pos_above_neg" in rows[-1]
  val = list(fmt.iter_text_records(f"{tiny_world}/txt/retrieval_val"))
  ev_ = out["eval"]
  assert set(ev.NAMES) <= set(ev_) and ev_["captions"] == len(val)
  assert ev_["images"] == len({r["image_id"] for r in val})
  assert ev_["chance_ir_r1"] == pytest.approx(1 / ev_["images"])
  res = train.train_and_evaluate(world_config(itr_config, tiny_world), workdir,
                                 mode="predict")
  with open(res["predictions"]) as f:
    ranked = json.load(f)
  test = list(fmt.iter_text_records(f"{tiny_world}/txt/retrieval_test"))
  assert set(ranked["text_to_image"]) == {r["id"] for r in test}
  images = {r["image_id"] for r in test}
  assert set(ranked["image_to_text"]) == images
  assert all(len(v) == min(10, len(images)) and set(v) <= images
             for v in ranked["text_to_image"].values())
  # The predict metrics are the recalls of the written rankings (R@1 from top-1 lists).
  gt = {r["id"]: r["image_id"] for r in test}
  r1 = np.mean([ranked["text_to_image"][t][0] == gt[t] for t in gt])
  assert res["ir_r1"] == pytest.approx(r1)


def test_export_round_trip_keeps_the_trained_rank_head(itr_run, tiny_world):
  workdir, _ = itr_run
  cfg = world_config(itr_config, tiny_world, export_overwrite=True)
  path = train.train_and_evaluate(cfg, workdir, mode="export")["export"]
  model = uniter_jax.load(os.path.dirname(path))
  assert type(model).__name__ == "UniterForImageTextRetrieval"
  saved = checkpointing.read_msgpack(path)["rank_output"]
  np.testing.assert_array_equal(np.asarray(model.rank_output.kernel[...]), saved["kernel"])
  np.testing.assert_array_equal(np.asarray(model.rank_output.bias[...]), saved["bias"])


def test_init_from_pretraining_starts_rank_output_from_the_itm_row(tiny_world, tmp_path):
  """An orbax workdir of a pretraining model (no rank_output) as config.init_from: rank_output
  = itm_output unit 1, the backbone as stored (official init_output()). The msgpack and
  official sources: tests/test_parity_retrieval.py."""
  cfg = world_config(itr_config, tiny_world)
  model_cfg = train.model_config_from(cfg, train.data_sizes(train.resolve_data(cfg)))
  pre = UniterForPretraining(model_cfg, rngs=nnx.Rngs(7))
  mngr = checkpointing.make_manager(str(tmp_path / "pre_orbax" / "checkpoints"),
                                    async_save=False)
  checkpointing.save(mngr, 1, {"params": nnx.split(pre, nnx.Param, ...)[1]}, {}, force=True)
  mngr.close()
  wd = str(tmp_path / "itr")
  train.train_and_evaluate(world_config(itr_config, tiny_world,
                                        init_from=str(tmp_path / "pre_orbax")), wd, mode="export")
  got = checkpointing.read_msgpack(f"{wd}/export/params.msgpack")
  np.testing.assert_array_equal(got["rank_output"]["kernel"],
                                np.asarray(pre.itm_output.kernel[...])[:, 1:2])
  np.testing.assert_array_equal(got["rank_output"]["bias"],
                                np.asarray(pre.itm_output.bias[...])[1:])
  np.testing.assert_array_equal(got["uniter"]["pooler"]["dense"]["kernel"],
                                np.asarray(pre.uniter.pooler.dense.kernel[...]))


def test_hard_negatives_are_the_top_scored_and_the_loss_matches_numpy(scorer_setup, mesh):
  """Pool = every other pair: the picks are the k best-scored non-matches of the full matrix."""
  model, graphdef, params, rest, rules, texts, images = scorer_setup
  cfg = tiny_config()
  b = random_batch(5, b=8, cfg=cfg, soft_labels=False)
  b["img_ids"] = np.array([0, 1, 2, 2, 3, 4, 5, 6], np.int32)  # rows 2, 3: one image
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  fn = scoring.make_block_scorer(graphdef, rules)
  with jax.set_mesh(mesh):
    s = scoring.score_all_pairs(fn, params, rest, {k: b[k] for k in scoring.TEXT_FIELDS},
                                {k: b[k] for k in scoring.IMAGE_FIELDS}, block_txt=8,
                                block_img=8)
  allowed = b["img_ids"][:, None] != b["img_ids"][None, :]
  k, anchors = 2, 3
  config = itr_config.get_config("tiny")
  config.itr.hard_negatives, config.itr.hard_pool, config.itr.hard_anchors = k, 7, anchors
  loss_fn = itr.RetrievalTask().objective(config, None).losses[0]

  def run(p, r, batch, key):
    m = nnx.merge(graphdef, p, r)
    score = lambda rows: m(rows)[:, 0]  # noqa: E731
    groups = itr.hard_negative_groups(score, key, batch, 7, k, anchors)
    return [g[2] for g in groups], loss_fn(m, batch, key, True)

  picks, (loss, aux) = jax.jit(run)(params, rest, batch, jax.random.PRNGKey(0))
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  want_loss = 0.0
  for direction, picked in zip(("text", "image"), picks):
    mat = s if direction == "text" else s.T  # row i: anchor i's candidates
    hinge = []
    for i in range(anchors):
      cand = np.nonzero(allowed[i])[0]
      best = cand[np.argsort(-mat[i, cand], kind="stable")[:k]]
      assert sorted(np.asarray(picked[i]).tolist()) == sorted(best.tolist()), (direction, i)
      hinge += [max(0.0, 0.2 + sig(mat[i, j]) - sig(mat[i, i])) for j in best]
    want_loss += np.mean(hinge)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4, atol=1e-6)
  assert 0.0 <= float(aux["accuracy"]) <= 1.0


@pytest.mark.parametrize("variant", ["default", "tiny"] + list(itr_config.OFFICIAL))
def test_config_variants(variant):
  c = itr_config.get_config(variant)
  assert c.task == "itr" and c.itr.margin == 0.2 and c.evals.itr.every_steps > 0
  got = train.model_config_from(c, {"vocab_size": 120, "img_dim": 48, "img_label_dim": 13})
  if variant in itr_config.OFFICIAL:
    assert got.hidden_size == (1024 if variant.endswith("large") else 768)
    assert c.itr.hard_negatives == (31 if "_hn" in variant else 0)
    assert c.itr.pool >= (400 if "_hn" in variant else 64)
    assert c.evals.itr.dtype == "bfloat16"
  with pytest.raises(ValueError, match="unknown variant"):
    itr_config.get_config("nope")


def test_two_stage_equals_all_pairs_when_everything_is_shortlisted(scorer_setup, mesh,
                                                                  tmp_path):
  model, graphdef, params, rest, rules, texts, images = scorer_setup
  pair_fn = rerank.make_pair_scorer(graphdef, rules)
  side = {s: rerank.make_side_encoder(graphdef, rules, s) for s in ("text", "image")}
  with jax.set_mesh(mesh):
    # Reference: every pair through the cross-encoder, placed row-major by hand.
    ti, ii = np.meshgrid(np.arange(11), np.arange(7), indexing="ij")
    full = rerank.score_pairs(pair_fn, params, rest, texts, images, ti.ravel(), ii.ravel(),
                              16).reshape(11, 7)
    same, info = rerank.two_stage_scores(pair_fn, side["text"], side["image"], params, rest,
                                         texts, images, m=11, chunk=16)
    np.testing.assert_allclose(same, full, atol=1e-5)
    assert info["pairs_scored"] == info["pairs_all"] == 77
    two, info = rerank.two_stage_scores(pair_fn, side["text"], side["image"], params, rest,
                                        texts, images, m=2, chunk=16)
    emb = {s: rerank.encode_side(side[s], params, rest, d, 16)
           for s, d in (("text", texts), ("image", images))}
  cheap = rerank.cheap_scores(emb["text"], emb["image"])
  keep = rerank.shortlist(cheap, 2)
  # Each caption keeps its 2 best images, each image its 2 best captions, nothing else.
  want = np.zeros_like(keep)
  for t in range(11):
    want[t, np.argsort(-cheap[t], kind="stable")[:2]] = True
  for i in range(7):
    want[np.argsort(-cheap[:, i], kind="stable")[:2], i] = True
  np.testing.assert_array_equal(keep, want)
  assert info["pairs_scored"] == keep.sum() < 77
  # Shortlisted pairs carry the cross-encoder score and rank above every other pair.
  np.testing.assert_allclose(two[keep], full[keep], atol=1e-5)
  assert two[~keep].max() < two[keep].min()
  # The re-rank resumes: stopped after 1 of its chunks, then resumed, the same matrix.
  store = scoring.ScoreStore(str(tmp_path / "two.npz"), {"rerank": 2})
  lines = []
  with jax.set_mesh(mesh):
    kw = dict(m=2, chunk=8, store=store)
    stopped, _ = rerank.two_stage_scores(pair_fn, side["text"], side["image"], params, rest,
                                         texts, images, max_blocks=1, **kw)
    again, _ = rerank.two_stage_scores(pair_fn, side["text"], side["image"], params, rest,
                                       texts, images, say=lambda m, *a: lines.append(m % a),
                                       **kw)
  chunks = -(-int(keep.sum()) // 8)
  assert stopped is None and chunks > 1
  assert any(f"{chunks - 1} of {chunks} blocks left" in m for m in lines), lines
  np.testing.assert_allclose(again, two, atol=1e-5)


@pytest.mark.slow
def test_hard_negative_training_with_a_pool_resumes_exactly(tiny_world, tmp_path):
  """The trainer end to end with hard negatives mined from the batch and the pool stream; a
  run stopped at step 2 and resumed equals an uninterrupted one (the pool's position is saved
  in the checkpoint). Small variants: the hard-negative and pool tests above, itr_run."""
  over = {"itr.hard_negatives": 2, "itr.hard_pool": 7, "itr.pool": 16, "total_steps": 4,
          "log_every_steps": 1, "checkpoint_every_steps": 2, "evals.itr.every_steps": 0}
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(world_config(itr_config, tiny_world, **over), straight)
  train.train_and_evaluate(world_config(itr_config, tiny_world, stop_at_step=2, **over),
                           resumed)
  train.train_and_evaluate(world_config(itr_config, tiny_world, **over), resumed)
  rows = []
  for w in (straight, resumed):
    with open(os.path.join(w, "metrics.jsonl")) as f:
      rows.append({r["step"]: r for r in map(json.loads, f) if "loss" in r})
  assert sorted(rows[0]) == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and 0 <= r["train_pos_above_neg"] <= 1
             for r in rows[0].values())
  for step in (3, 4):  # after the restart: the same batches, pool rows and losses
    assert rows[0][step]["loss"] == rows[1][step]["loss"], step
