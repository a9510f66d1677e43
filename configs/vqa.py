"""VQA fine-tuning: UniterForVqa on [CLS] question [SEP] + regions, soft-score BCE
(docs/official.md, *Downstream heads: VQA*).

Default: the synthetic world's VQA split on a 2-core CPU in a few minutes; prints the VQA score
on the held-out (val) split at the end.
  python main.py --config=configs/vqa.py --workdir=workdir/vqa_scratch
  python main.py --config=configs/vqa.py --workdir=workdir/vqa_pre \\
      --config.init_from=workdir/pretrain/export/params.msgpack   # or an orbax workdir
  python main.py --config=configs/vqa.py --workdir=workdir/vqa_pre --mode=eval
  python main.py --config=configs/vqa.py --workdir=workdir/vqa_pre --mode=predict
      (writes WORKDIR/predictions/test/results.json; --config.predict_split=val for val)

The paper's settings (vqa-base-4gpu / vqa-large-8gpu), with data from data_prep.vqa:
  python main.py --config=configs/vqa.py:base --workdir=DIR --config.init_from=uniter-base.pt \\
      --config.data.text_dirs=data/vqa_train,data/vqa_trainval,data/vqa_vg \\
      --config.data.image_dirs=data/coco_img,data/vg_img \\
      --config.data.val_text_dirs=data/vqa_devval --config.data.test_text_dirs=data/vqa_test \\
      --config.data.test_image_dirs=data/coco_test2015_img --config.data.vocab=vocab.txt
Evaluating a fine-tuned official checkpoint: --mode=eval --config.init_from=vqa_model.pt.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  # The same model sizes and data settings as configs/pretrain.py of the same variant, so a
  # pretraining checkpoint of that size initialises this model.
  c = common.base(a.variant)
  c.task = "vqa"
  c.data.ans2label = ""  # ans2label.json; default: the first train folder's
  c.optimizer.grad_clip = 2.0
  c.optimizer.lr_mul = ml_collections.ConfigDict({"vqa_output": 10.0})  # official lr_mul
  c.evals.vqa = ml_collections.ConfigDict(dict(every_steps=250))  # VQA score on val

  if a.variant in ("default", "tiny"):  # the synthetic world's VQA split; tests
    common.finetune_schedule(c, a.variant, "vqa", warmup_steps=60)
  else:  # official vqa-base-4gpu / vqa-large-8gpu: token budget per GPU x GPUs
    base = a.variant == "base"
    c.data.token_budget = 5120 * 4 if base else 3072 * 8
    c.grad_accum_steps = 5 if base else 4
    c.optimizer.lr = 8e-5 if base else 5e-5
    c.optimizer.warmup_steps = 600 if base else 500
    c.total_steps = 6000 if base else 5000
    c.evals.vqa.every_steps = c.checkpoint_every_steps = 500
  if a.steps:
    c.total_steps = a.steps
  return c
