"""Referring expressions end to end on the tiny synthetic world and the 8-device mesh, and the
box arithmetic the accuracy rests on (the official +1-pixel IoU on hand cases).

One short fine-tuning run (module fixture) serves the task tests: it logs the summed loss,
evaluates box accuracy beside its two references on val and on an extra named split, and
--mode=predict writes every test expression once with boxes and IoUs that NumPy recomputes
here from the image records.
"""

import json
import os

import numpy as np
import pytest

from configs import re as re_config
from uniter_jax import train
from uniter_jax.data import format as fmt
from uniter_jax.evaluators import refer as refer_eval
from uniter_jax.tasks import refer as refer_task
from helpers import world_config


def _config(world, **overrides):
  return world_config(re_config, world, **overrides)


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("re") / "run")
  cfg = _config(tiny_world, **{"re.eval_splits": f"again:{tiny_world}/txt/re_val"})
  return workdir, train.train_and_evaluate(cfg, workdir)


def texts_width(world, preds) -> int:
  """The narrowest image among the predictions' (pixels)."""
  return min(r["image_w"] for r in _texts(world, "re_test") if r["id"] in {p["id"] for p in preds})


def _texts(world, split):
  return list(fmt.iter_text_records(f"{world}/txt/{split}"))


def test_iou_follows_the_official_plus_one_convention():
  # Identical boxes: 1. A box inside another: area ratio.
  assert refer_eval.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
  assert refer_eval.iou([0, 0, 10, 10], [0, 0, 5, 10]) == pytest.approx(50 / 100)
  # Overlap of columns 5..9 (x2 = x + w - 1 = 9), rows 0..9: inter 5 x 10 = 50.
  assert refer_eval.iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
  # Touching boxes ([0..9] and [10..19]) and a one-column overlap (ix1 == ix2) score 0.
  assert refer_eval.iou([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0
  assert refer_eval.iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
  # Two columns (8, 9) overlap: inter 2 x 10 (the +1 pixel counts), union 200 - 20.
  assert refer_eval.iou([0, 0, 10, 10], [8, 0, 10, 10]) == pytest.approx(20 / 180)
  # Broadcasting: one gt box against several.
  np.testing.assert_allclose(refer_eval.iou([[0, 0, 10, 10], [10, 0, 10, 10]], [0, 0, 10, 10]),
                             [1.0, 0.0])


def test_region_boxes_and_chance_by_hand():
  pos = np.array([[[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]]])
  boxes = refer_eval.region_boxes(pos, [200], [100])
  np.testing.assert_allclose(boxes, [[[20, 20, 80, 40], [0, 0, 200, 100]]])
  # Two expressions: one region of two matches the first, none of one the second.
  mask = np.array([[True, True], [True, False]])
  gt = np.array([[20, 20, 80, 40], [150, 80, 10, 10]])
  assert refer_eval.chance(np.concatenate([boxes, boxes]), mask, gt) == pytest.approx(0.25)


def test_eval_splits_are_parsed_and_bad_entries_named():
  assert refer_task.parse_splits("testA:a/b,testB:c:d") == [("testA", ["a/b"], []),
                                                            ("testB", ["c"], ["d"])]
  with pytest.raises(ValueError, match="NAME:TEXT_DIR"):
    refer_task.parse_splits("testA")


def test_trains_evaluates_with_references_and_extra_splits(run, tiny_world):
  workdir, out = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(r) for r in f]
  assert all(np.isfinite(r["loss"]) for r in rows) and "train_region_accuracy" in rows[-1]
  ev = out["eval"]
  n = len(_texts(tiny_world, "re_val"))
  assert ev["re/expressions"] == n and ev["re/again/expressions"] == n
  for k in ("accuracy", "chance", "first_region_baseline", "region_accuracy"):
    assert 0.0 <= ev[f"re/{k}"] <= 1.0
    assert ev[f"re/again/{k}"] == pytest.approx(ev[f"re/{k}"])  # the same split twice
  with open(os.path.join(workdir, "model_config.json")) as f:
    rec = json.load(f)
  assert rec["model_class"] == "UniterForReferringExpressionComprehension"
  assert rec["model_kwargs"] == {"mlp": 1}


def test_predict_writes_every_expression_with_boxes_numpy_agrees_with_and_draws(run, tiny_world):
  workdir, _ = run
  # Two region buckets: expressions of both lengths meet in one prediction list.
  res = train.train_and_evaluate(_config(tiny_world, **{"re.draw": 4, "data.img_buckets": (8, 16)}),
                                 workdir, mode="predict")
  with open(res["predictions"]) as f:
    preds = json.load(f)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(res["drawing"]) as sheet:  # 4 tiles of the 2x-scaled images side by side
    assert sheet.width > 4 * 2 * texts_width(tiny_world, preds[:4])
  texts = {r["id"]: r for r in _texts(tiny_world, "re_test")}
  assert sorted(p["id"] for p in preds) == sorted(texts)
  images = {r["image_id"]: r for r in fmt.iter_image_records(f"{tiny_world}/img_db")}
  correct = []
  for p in preds:
    t = texts[p["id"]]
    assert p["image_id"] == t["image_id"] and p["sent"] == t["sent"]
    img = images[t["image_id"]]
    assert 0 <= p["region"] < len(img["img_pos"])
    # The predicted box: the chosen region's normalised box times the image size.
    x1, y1, _, _, w, h = img["img_pos"][p["region"]][:6]
    want = [x1 * t["image_w"], y1 * t["image_h"], w * t["image_w"], h * t["image_h"]]
    np.testing.assert_allclose(p["pred_box"], want, atol=0.01)
    np.testing.assert_allclose(p["gt_box"], t["bbox"], atol=0.01)
    assert p["iou"] == pytest.approx(float(refer_eval.iou(want, t["bbox"])), abs=1e-3)
    correct.append(p["correct"])
  assert res["re/accuracy"] == pytest.approx(np.mean(correct))


def test_rank_objective_with_the_mlp2_head_learns_a_batch():
  """The rank loss (negatives drawn inside the jitted step) on the 2-layer head: a few
  gradient steps on one batch (one image with a single region, which has no negative) lower it."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from uniter_jax.models import UniterForReferringExpressionComprehension  # pylint: disable=import-outside-toplevel
  from helpers import random_batch, tiny_config  # pylint: disable=import-outside-toplevel
  cfg = re_config.get_config("tiny")
  cfg.re.loss, cfg.re.mlp = "rank", 2
  branch = refer_task.ReTask().objective(cfg, None).losses[0]
  model = UniterForReferringExpressionComprehension(tiny_config(), mlp=2, rngs=nnx.Rngs(0))
  batch = random_batch(3, b=8, cfg=tiny_config(), num_bbs=[1, 2, 3, 4, 5, 6, 6, 6])
  batch["target"] = np.zeros((8,), np.int32)  # region 0 of each image
  graphdef, params = nnx.split(model)
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      return branch(nnx.merge(graphdef, p), batch, key, True)[0]
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  losses = []
  for i in range(12):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


def test_texts_without_boxes_are_refused_by_name(run, tiny_world):
  """An eval split whose texts lack bbox / image size: one clear error naming the fields."""
  cfg = _config(tiny_world, **{"data.val_text_dirs": f"{tiny_world}/txt/vqa_val"})
  with pytest.raises(fmt.DataError, match=r"lack \['bbox', 'image_w', 'image_h'\]"):
    train.train_and_evaluate(cfg, run[0], mode="eval")


def test_targets_outside_the_kept_regions_are_counted_not_trained(tiny_world, tmp_path):
  """Texts whose target is -1 or beyond the regions the pipeline keeps: counted in the data
  report (they add no loss); when no text is usable the run stops with a clear error."""
  from uniter_jax.data.pipeline import InputPipeline, PipelineConfig  # pylint: disable=import-outside-toplevel
  recs = _texts(tiny_world, "re_train")[:12]
  for i, r in enumerate(recs):
    r["target"] = [-1, 99, r["target"]][i % 3]  # 8 of 12 outside (img_buckets 16 regions)
  src = fmt.read_manifest(f"{tiny_world}/txt/re_train")["texts"]
  fields, tok = src["fields"], src["tokenizer"]
  fmt.write_dataset(tmp_path / "txt", texts=recs, text_fields=fields, tokenizer=tok)
  cfg = PipelineConfig(txt_buckets=(40,), img_buckets=(16,), batch_size=8, max_txt_len=38)
  pipe = InputPipeline([str(tmp_path / "txt")], [f"{tiny_world}/img_db"], config=cfg)
  task = refer_task.ReTask()
  task.check_pipeline(None, None, pipe, "bad_train")
  assert pipe.stats["re_target_not_among_regions"] == 8
  assert "re_target_not_among_regions: 8" in pipe.report()
  for r in recs:
    r["target"] = -1
  fmt.write_dataset(tmp_path / "none", texts=recs, text_fields=fields, tokenizer=tok)
  pipe = InputPipeline([str(tmp_path / "none")], [f"{tiny_world}/img_db"], config=cfg)
  with pytest.raises(fmt.DataError, match="no text's target is one of its image's regions"):
    task.check_pipeline(None, None, pipe, "bad_train")
