"""Second-stage pretraining on VCR (official pretrain_vcr.py; docs/official.md, *Downstream
heads: VCR*): MLM, MRFR and MRC-kl on the question + gold answer + gold rationale text.

The pretraining task's branches, masking and held-out evaluation, on VCR rows: each question
becomes `[CLS] Q [SEP] A_gold [SEP] R_gold [SEP]` with token types 0 / 2 / 3 inside the step
(uniter_jax.tasks.vcr_inputs.pretrain_batch), and MLM masks each type segment on its own, so
Q, A and R each get at least one target (uniter_jax.masking.mask_text). The official loader
also builds Q+A sequences but its dictionary keeps only the Q+A+R ones; so does this task.
The model is UniterForPretrainingVcr: tables grown from a UNITER checkpoint, a new MLM head
when the word table grows.
"""

from __future__ import annotations

import functools

from uniter_jax.tasks import pretrain, register
from uniter_jax.tasks.vcr import VcrTask
from uniter_jax.tasks.vcr_inputs import pretrain_batch

# VCR fine-tuning's checks of the sequence length and the text fields apply unchanged.
_FINETUNING = VcrTask()


class PretrainVcrTask(pretrain.PretrainTask):
  """UniterForPretrainingVcr on VCR texts (gold choices); eval = held-out per-objective metrics."""

  name = "pretrain_vcr"
  model_class = "UniterForPretrainingVcr"
  synthetic_splits = ("vcr_train", "vcr_val", None)
  step_extra_fields = VcrTask.step_extra_fields

  def check_data(self, config, data) -> None:
    _FINETUNING.check_data(config, data)
    if "itm" in config.pretrain.mix or "itm" in config.pretrain.get("warmup_mix", {}):
      raise ValueError("config.pretrain.mix: the VCR 2nd stage has no ITM (official mix mlm, "
                       "mrfr, mrckl); drop 'itm', e.g. \"--config.pretrain.mix={'mlm': 2.0, "
                       "'mrfr': 1.0, 'mrckl': 1.0}\"")

  def check_pipeline(self, config, data, pipe, split: str) -> None:
    _FINETUNING.check_pipeline(config, data, pipe, split)

  def prepare(self, config):
    return functools.partial(pretrain_batch, max_choice_len=int(config.vcr.max_choice_len))


register(PretrainVcrTask())
