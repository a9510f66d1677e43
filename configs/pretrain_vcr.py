"""Second-stage pretraining on VCR (official pretrain_vcr.py): MLM, MRFR and MRC-kl on
[CLS] Q [SEP] A_gold [SEP] R_gold [SEP] with token types 0 / 2 / 3, MLM masking Q, A and R
each on its own, starting from a UNITER checkpoint (type table grown to 4 rows, word table by
the object-reference tokens; a new MLM head when the word table grows). Its checkpoint then
initialises configs/vcr.py.

Default: the synthetic world's vcr_train split on a 2-core CPU (the world's object tags are
ordinary words, so the word table and MLM head carry over; the type table grows):
  python main.py --config=configs/pretrain_vcr.py --workdir=workdir/pretrain_vcr \\
      --config.init_from=workdir/pretrain/export
  python main.py --config=configs/pretrain_vcr.py --workdir=workdir/pretrain_vcr --mode=export
  python main.py --config=configs/vcr.py --workdir=workdir/vcr_2nd \\
      --config.init_from=workdir/pretrain_vcr/export

The paper's settings (pretrain-vcr-base-4gpu / -large-4gpu: 6144 tokens x 4 GPUs x accumulation
4, lr 3e-5, 45k steps, warmup 4.5k, no clipping; mix 2:1:1 base, 10:1:1 large):
  python main.py --config=configs/pretrain_vcr.py:base --workdir=DIR \\
      --config.init_from=uniter-base.pt --config.data.vocab=VCR_VOCAB \\
      --config.data.text_dirs=data/vcr_train --config.data.image_dirs=data/vcr_img ...
"""

import ml_collections

from configs import common
from configs import pretrain as pretrain_config
from configs import vcr as vcr_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  c = common.base(a.variant)  # the sizes of configs/pretrain.py and configs/vcr.py
  c.task = "pretrain_vcr"
  c.model.type_vocab_size = 4  # question 0, regions 1, answer 2, rationale 3
  c.vcr = vcr_config.get_config(arg).vcr  # max_choice_len: the same sequences as fine-tuning
  c.evals.heldout = ml_collections.ConfigDict(dict(every_steps=500, batches=8))
  # The official masking: uniform MLM (no focus words), MRM 0.15.
  c.pretrain = pretrain_config.pretrain_settings({"mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0})

  if a.variant in ("default", "tiny"):
    c.data.txt_buckets, c.data.max_txt_len = (16,), 14  # as configs/vcr.py
    if a.variant == "default":
      c.total_steps, c.checkpoint_every_steps = 500, 250
      c.optimizer.lr, c.optimizer.warmup_steps = 1e-4, 50
    else:  # tests and smoke runs
      c.optimizer.lr, c.optimizer.warmup_steps = 5e-4, 1
      c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 6, 2, 6
      c.evals.heldout.update(every_steps=6, batches=2)
  else:  # official pretrain-vcr-base-4gpu / pretrain-vcr-large-4gpu
    base = a.variant == "base"
    if not base:
      c.pretrain.mix = ml_collections.ConfigDict({"mlm": 10.0, "mrfr": 1.0, "mrckl": 1.0})
    c.data.token_budget = 6144 * 4
    c.data.txt_buckets = (24, 40, 64)
    c.grad_accum_steps = 4
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_steps = 4500
    c.optimizer.grad_clip = 0.0  # official grad_norm -1: no clipping
    c.total_steps = 45_000
    c.evals.heldout.every_steps = c.checkpoint_every_steps = 2000
  if a.steps:
    c.total_steps = a.steps
  return c
