"""Referring expression comprehension: UniterForReferringExpressionComprehension scores each
region; the official "cls" loss (softmax CE over regions, summed over the batch) as
train_re.py (docs/official.md, *Downstream heads: referring expressions*).

Default: the synthetic world's RE split on a 2-core CPU in a few minutes; prints box accuracy
(IoU > 0.5) on the held-out val split beside the chance of picking a region at random.
  python main.py --config=configs/re.py --workdir=workdir/re_scratch
  python main.py --config=configs/re.py --workdir=workdir/re_pre \\
      --config.init_from=workdir/pretrain/export   # or an orbax workdir, or uniter-base.pt
  python main.py --config=configs/re.py --workdir=workdir/re_pre --mode=predict \\
      --config.re.draw=8
      (writes WORKDIR/predictions/test/re_predictions.json: per expression the predicted and
      gt boxes, score and IoU; draw=N also draws N of them on the synthetic images)

The paper's settings (refcoco-base-1gpu, refcoco+-base-1gpu, refcocog-base-1gpu), data from
data_prep.refcoco (train on ground-truth-box features, validate on detected boxes):
  python main.py --config=configs/re.py:refcoco-base --workdir=DIR \\
      --config.init_from=uniter-base.pt --config.data.vocab=vocab.txt \\
      --config.data.text_dirs=data/refcoco_train --config.data.image_dirs=data/refcoco_gt_img \\
      --config.data.val_text_dirs=data/refcoco_val --config.data.val_image_dirs=data/refcoco_det_img \\
      --config.re.eval_splits=testA:data/refcoco_testA,testB:data/refcoco_testB,val_gt:data/refcoco_val:data/refcoco_gt_img
  (RefCOCOg: :refcocog-base with val and test; RefCOCO+: :refcoco+-base, mlp=2)
Evaluating a fine-tuned official checkpoint (its head decides mlp):
  --mode=eval --config.init_from=re_model.pt
"""

import ml_collections

from configs import common

# Official variant -> (lr, updates, warmup, mlp) from config/train-refcoco*-base-1gpu.json.
OFFICIAL = {
    "refcoco-base": (1e-4, 24000, 1500, 1),
    "refcoco+-base": (6e-5, 10000, 1000, 2),
    "refcocog-base": (1e-4, 24000, 1500, 1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  official = a.variant in OFFICIAL
  if not official and a.variant not in ("default", "tiny"):
    raise ValueError(f"configs/re.py: unknown variant {a.variant!r}; use default, tiny or "
                     f"one of {sorted(OFFICIAL)}")
  # The sizes of configs/pretrain.py of the same variant, so its checkpoints initialise this.
  c = common.base("base" if official else a.variant)
  c.task = "re"
  c.re = ml_collections.ConfigDict(dict(
      mlp=1,            # 1: Linear(H, 1); 2: Linear, GELU, LayerNorm, Linear
      loss="cls",       # "cls" (official default) or "rank"
      margin=0.2,       # rank loss
      hard_ratio=0.3,   # rank loss: share of hardest-other-region negatives
      eval_splits="",   # more held-out splits: NAME:TEXT_DIR[:IMAGE_DIR],...
      draw=0,           # --mode=predict: draw this many expressions (predicted / gt box)
      draw_images="",   # folder of <image_id>.png|.jpg (default: the synthetic world's images)
  ))
  c.optimizer.grad_clip = 2.0
  c.evals.re = ml_collections.ConfigDict(dict(every_steps=250))  # box accuracy on val

  if not official:  # the synthetic world's RE split; tests
    common.finetune_schedule(c, a.variant, "re")
    if a.variant == "default":
      # Measured on the synthetic world (README): at 1e-4 no init leaves the first-region
      # baseline in 500 updates; at 3e-4 both learn and the pretrained init leads.
      c.optimizer.lr = 3e-4
  else:  # official: 128 expressions per batch on one GPU, summed loss, seed 24
    lr, steps, warmup, mlp = OFFICIAL[a.variant]
    c.seed = 24
    c.data.batch_size, c.data.token_budget = 128, 0
    c.data.img_buckets = (36, 64, 100)  # gt features keep every annotation (num_bb 100)
    c.optimizer.lr, c.optimizer.warmup_steps, c.total_steps = lr, warmup, steps
    c.re.mlp = mlp
    c.evals.re.every_steps = c.checkpoint_every_steps = 1000
  if a.steps:
    c.total_steps = a.steps
  return c
