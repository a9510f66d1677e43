"""Image-text retrieval fine-tuning (task "itr"): UniterForImageTextRetrieval with random
negatives (per caption-image pair: one negative image and one negative caption, sample
size 3) and the sigmoid hinge, margin 0.2, as train_itm.py (docs/official.md, *Retrieval*).
A pretrained checkpoint's ITM "match" row initialises rank_output (official init_output()).

Default: the synthetic world's retrieval split on a 2-core CPU in a few minutes; evaluates
every val caption against every val image and prints IR / TR recall@1/5/10, r_mean and the
chance values of a random ranking.
  python main.py --config=configs/retrieval.py --workdir=workdir/itr_pre \\
      --config.init_from=workdir/pretrain/export   # or an orbax workdir, or uniter-base.pt
  python main.py --config=configs/retrieval.py --workdir=workdir/itr_pre --mode=predict
      (writes WORKDIR/predictions/test/rankings.json: top-10 images per caption and
      top-10 captions per image)
Zero-shot (the pretrained ITM head, no training):
  python main.py --config=configs/retrieval.py --workdir=workdir/itr_zero --mode=eval \\
      --config.init_from=workdir/pretrain/export

Scoring: config.evals.itr.block_txt x block_img pairs per jitted forward, sharded over the
mesh; the partial matrix is saved to WORKDIR/scores/ and an interrupted evaluation resumes;
dtype="bfloat16" scores in bf16; trim_text=8 blocks the captions by length and cuts their
padding (same scores, less work); full=False runs the official fast validation instead
(each caption vs its image and the next fast_size - 1 images); rerank=M scores all pairs
cheaply and re-ranks each query's top M with the model (README, *Two-stage ranking*).

Official settings (data from data_prep.retrieval; the random-negative flickr recipe):
  python main.py --config=configs/retrieval.py:flickr --workdir=DIR \\
      --config.init_from=uniter-base.pt --config.data.text_dirs=data/itm_flickr_train \\
      --config.data.image_dirs=data/flickr30k_img --config.data.val_text_dirs=data/itm_flickr_val \\
      --config.data.test_text_dirs=data/itm_flickr_test --config.data.vocab=vocab.txt
`flickr_hn` / `coco_hn` / `flickr_hn_large` / `coco_hn_large`: the hard-negative configs
(config.itr.hard_negatives = 31 of hard_pool = 399): the 8 pairs of a batch as text and as
image anchors per update, as the official step, their candidates drawn from the batch and a
400-row pool stream over the whole training split (config.itr.pool; the random-negative
`flickr` recipe uses a 64-row pool).
"""

import ml_collections

from configs import common

# Official train_itm*.json settings (docs/official.md, *Retrieval*):
# size, lr, steps, warmup, eval every.
OFFICIAL = {
    "flickr": ("base", 5e-5, 20000, 2000, 2000),
    "flickr_hn": ("base", 5e-5, 5000, 500, 500),
    "flickr_hn_large": ("large", 5e-5, 5000, 500, 500),
    "coco_hn": ("base", 5e-5, 5000, 500, 500),
    "coco_hn_large": ("large", 3e-5, 5000, 500, 500),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  official = OFFICIAL.get(a.variant)
  c = common.base(official[0] if official else a.variant)
  c.task = "itr"
  # hard_negatives k > 0: for each of the batch's first hard_anchors pairs (0: all) as a text
  # and as an image anchor, the k hardest of hard_pool random candidates of the batch
  # (official: 31 of 399 from the whole data set); 0: random negatives (train_itm.py).
  # pool P > 0: P more candidate rows per update from a second, independently shuffled
  # stream over the whole training split (negatives are then not limited to the batch).
  c.itr = ml_collections.ConfigDict(dict(margin=0.2, hard_negatives=0, hard_pool=399,
                                         hard_anchors=0, pool=0))
  c.optimizer.grad_clip = 2.0
  c.evals.itr = ml_collections.ConfigDict(dict(
      every_steps=250, full=True, fast_size=400, block_txt=16, block_img=16, dtype="",
      save_every_s=60.0, max_blocks=0, max_images=0,
      # rerank M > 0: two-stage scoring (tasks/retrieval_rerank.py): pre-rank every pair by
      # the cosine of single-modality passes (prerank_pool "encoder" or "embeddings"), then
      # the cross-encoder on each caption's top M images and each image's top M captions.
      rerank=0, prerank_pool="encoder",
      # trim_text k > 0: captions blocked by length, each block's text padding cut to a
      # multiple of k (same scores, less work for short captions; a compile per width).
      trim_text=0))

  if a.variant in ("default", "tiny"):  # the synthetic world's retrieval split; tests
    common.finetune_schedule(c, a.variant, "itr")
    c.data.batch_size = 16 if a.variant == "tiny" else 32  # 3 pairs per positive
    if a.variant == "tiny":
      c.evals.itr.block_txt, c.evals.itr.block_img = 8, 8
      c.itr.pool = 16  # the tests' trainer run draws negatives from the pool stream too
    else:  # 100 val images x 500 captions: the size of the test split (50k pairs)
      c.evals.itr.max_images, c.evals.itr.block_img = 100, 32
  elif official:
    _, lr, steps, warmup, every = official
    c.seed = 42
    c.data.batch_size = 40 * 8  # 40 positives per GPU x 8 GPUs (train_itm.py)
    c.grad_accum_steps = 4
    c.optimizer.lr, c.optimizer.warmup_steps, c.total_steps = lr, warmup, steps
    c.evals.itr.every_steps = c.checkpoint_every_steps = every
    c.evals.itr.block_txt, c.evals.itr.block_img = 8, 400  # inf_minibatch_size 400
    c.evals.itr.dtype = "bfloat16"  # the official score matrix is fp16
    c.evals.itr.trim_text = 8  # captions at (about) their own length, as the official eval
    c.evals.itr.save_every_s = 600.0  # a COCO 5k matrix is 500 MB
    c.evals.itr.full = a.variant != "coco_hn_large"  # full_val false there
    c.itr.pool = 64  # negatives from the whole training set (official: any image / caption)
    if "_hn" in a.variant:  # official: 8 micro-steps of one text + one image anchor each
      c.itr.hard_negatives, c.itr.hard_anchors = 31, 0
      # 8 anchors per update, their 399 candidates drawn from the 8 + 400 rows of the batch
      # and the pool stream (official: 399 of the whole training set per anchor).
      c.data.batch_size, c.grad_accum_steps, c.itr.pool = 8, 1, 400
  else:
    raise ValueError(f"configs/retrieval.py: unknown variant {a.variant!r}; use default, "
                     f"tiny or one of {', '.join(OFFICIAL)}")
  if a.steps:
    c.total_steps = a.steps
  return c
