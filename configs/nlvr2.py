"""NLVR2 fine-tuning: UniterForNlvr2 (config.nlvr2.variant: "paired-attn" as the official
configs, "paired" or "triplet"), 2-way cross-entropy as train_nlvr2.py (docs/official.md,
*Downstream heads*). The type table grows to 3 rows (right image = type 2) when a pretrained
checkpoint initialises it, as the official init_type_embedding.

Default: the synthetic world's NLVR2 split on a 2-core CPU in a few minutes; prints accuracy,
consistency and the majority-class baseline on the held-out val split.
  python main.py --config=configs/nlvr2.py --workdir=workdir/nlvr2_scratch
  python main.py --config=configs/nlvr2.py --workdir=workdir/nlvr2_pre \\
      --config.init_from=workdir/pretrain/export   # or an orbax workdir, or uniter-base.pt
  python main.py --config=configs/nlvr2.py --workdir=DIR --config.nlvr2.variant=triplet
  python main.py --config=configs/nlvr2.py --workdir=workdir/nlvr2_pre --mode=predict
      (writes WORKDIR/predictions/test/results.csv, `identifier,True|False` per line)

The paper's settings (nlvr2-base-1gpu / nlvr2-large-2gpu), data from data_prep.nlvr2:
  python main.py --config=configs/nlvr2.py:base --workdir=DIR --config.init_from=uniter-base.pt \\
      --config.data.text_dirs=data/nlvr2_train --config.data.image_dirs=data/nlvr2_img \\
      --config.data.val_text_dirs=data/nlvr2_dev --config.data.test_text_dirs=data/nlvr2_test1 \\
      --config.data.vocab=vocab.txt
Evaluating a fine-tuned official checkpoint (its head decides the variant):
  --mode=eval --config.init_from=nlvr2_model.pt --config.nlvr2.variant=paired-attn
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  # The sizes of configs/pretrain.py of the same variant, so its checkpoints initialise this.
  c = common.base(a.variant)
  c.task = "nlvr2"
  c.model.type_vocab_size = 3  # text 0, left image 1, right image 2
  c.nlvr2 = ml_collections.ConfigDict(dict(variant="paired-attn", use_img_type=True))
  c.optimizer.grad_clip = 2.0
  c.evals.nlvr2 = ml_collections.ConfigDict(dict(every_steps=250))  # accuracy on val

  if a.variant in ("default", "tiny"):  # the synthetic world's NLVR2 split; tests
    common.finetune_schedule(c, a.variant, "nlvr2")
  else:  # official nlvr2-base-1gpu / nlvr2-large-2gpu: token budget per GPU x GPUs
    base = a.variant == "base"
    c.seed = 77 if base else 24
    c.data.token_budget = 10240 if base else 5120 * 2
    c.grad_accum_steps = 1 if base else 2
    c.optimizer.lr = 3e-5 if base else 2e-5
    c.optimizer.warmup_steps = 800 if base else 500
    c.total_steps = 8000 if base else 5000
    c.evals.nlvr2.every_steps = c.checkpoint_every_steps = 500
  if a.steps:
    c.total_steps = a.steps
  return c
