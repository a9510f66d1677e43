"""SNLI-VE fine-tuning: UniterForVisualEntailment on [CLS] hypothesis [SEP] + the premise
image's regions, 3-way BCE as the official train_ve.py (docs/official.md, *Downstream heads*).

Default: the synthetic world's VE split on a 2-core CPU in a few minutes; prints accuracy
(overall, per class, and the majority-class baseline) on the held-out val split.
  python main.py --config=configs/ve.py --workdir=workdir/ve_scratch
  python main.py --config=configs/ve.py --workdir=workdir/ve_pre \\
      --config.init_from=workdir/pretrain/export   # or an orbax workdir, or uniter-base.pt
  python main.py --config=configs/ve.py --workdir=workdir/ve_pre --mode=predict
      (writes WORKDIR/predictions/test/results.json; --config.predict_split=val for val)

The paper's settings (ve-base-2gpu / ve-large-4gpu), data from data_prep.snli_ve:
  python main.py --config=configs/ve.py:base --workdir=DIR --config.init_from=uniter-base.pt \\
      --config.data.text_dirs=data/ve_train --config.data.image_dirs=data/flickr30k_img \\
      --config.data.val_text_dirs=data/ve_dev --config.data.test_text_dirs=data/ve_test \\
      --config.data.vocab=vocab.txt
Evaluating a fine-tuned official checkpoint: --mode=eval --config.init_from=ve_model.pt.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  # The sizes of configs/pretrain.py of the same variant, so its checkpoints initialise this.
  c = common.base(a.variant)
  c.task = "ve"
  c.optimizer.grad_clip = 2.0
  c.evals.ve = ml_collections.ConfigDict(dict(every_steps=250))  # accuracy on val

  if a.variant in ("default", "tiny"):  # the synthetic world's VE split; tests
    common.finetune_schedule(c, a.variant, "ve")
  else:  # official ve-base-2gpu / ve-large-4gpu: token budget per GPU x GPUs, no lr_mul
    base = a.variant == "base"
    c.data.token_budget = 4096 * (2 if base else 4)
    c.grad_accum_steps = 4 if base else 2
    c.optimizer.lr = 8e-5 if base else 3e-5
    c.optimizer.warmup_steps = 400
    c.total_steps = 4000
    c.evals.ve.every_steps = c.checkpoint_every_steps = 500
  if a.steps:
    c.total_steps = a.steps
  return c
