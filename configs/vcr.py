"""VCR fine-tuning: UniterForVcr scores each (question, choice) sequence; every update trains
a question's Q->A and QA->R sequences together, 2-way CE per sequence as train_vcr.py
(docs/official.md, *Downstream heads: VCR*). The word table grows by the data's extra tokens
and the type table to 4 rows when a pretrained checkpoint initialises it.

Default: the synthetic world's VCR split on a 2-core CPU (about 5 CPU-minutes; 15 minutes wall
when measured under load, see below); prints Q->A, QA->R and Q->AR accuracy on the held-out val
split beside chance (0.25 / 0.25 / 0.0625).
  python main.py --config=configs/vcr.py --workdir=workdir/vcr_scratch
  python main.py --config=configs/vcr.py --workdir=workdir/vcr_pre \\
      --config.init_from=workdir/pretrain/export   # or an orbax workdir, or a UNITER .pt
  python main.py --config=configs/vcr.py --workdir=workdir/vcr_pre --mode=predict
      (writes WORKDIR/predictions/test/vcr_results.csv, the leaderboard's 20 logit columns)

The paper's settings (vcr-base-4gpu / vcr-large-4gpu; 4000 tokens x 4 GPUs x accumulation 5):
  python main.py --config=configs/vcr.py:base --workdir=DIR \\
      --config.init_from=uniter-base-vcr_2nd_stage.pt --config.data.vocab=VCR_VOCAB ...
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant="default", steps=0)
  # The sizes of configs/pretrain.py of the same variant, so its checkpoints initialise this.
  c = common.base(a.variant)
  c.task = "vcr"
  c.model.type_vocab_size = 4  # question 0, regions 1, answer 2, rationale 3
  c.vcr = ml_collections.ConfigDict(dict(
      max_choice_len=12,  # tokens per answer / rationale (each sequence holds Q + 1 or 2 choices)
  ))
  c.optimizer.grad_clip = 2.0
  c.evals.vcr = ml_collections.ConfigDict(dict(every_steps=250))  # accuracies on val

  if a.variant in ("default", "tiny"):  # the synthetic world's VCR split; tests
    common.finetune_schedule(c, a.variant, "vcr")
    c.data.txt_buckets, c.data.max_txt_len = (16,), 14  # synthetic questions are short
    if a.variant == "default":
      # Each question is 8 sequences of (question, choice): 150 updates of 16 at lr 3e-4, the
      # README's ablation schedule (500 of 32 took 19 minutes on the quiet machine). Measured
      # end to end under load (1-min load average 0.4 rising to 14 on the 2 cores): 14:50 wall,
      # 5.4 CPU-minutes; 0.8-0.9 updates/s while the machine was still quiet.
      c.data.batch_size, c.optimizer.lr = 16, 3e-4
      c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 150, 25, 150
      c.evals.vcr.every_steps = 150
  else:  # official vcr-base-4gpu / vcr-large-4gpu
    c.data.token_budget = 4000 * 4
    c.data.txt_buckets = (24, 40, 64)
    c.vcr.max_choice_len = 78  # 64 + 2 x 79 = 222 positions, about the official max_txt_len 220
    c.grad_accum_steps = 5
    c.optimizer.lr = 6e-5
    c.optimizer.warmup_steps = 800
    c.total_steps = 8000
    c.evals.vcr.every_steps = c.checkpoint_every_steps = 1000
  if a.steps:
    c.total_steps = a.steps
  return c
