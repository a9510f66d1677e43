"""UniterForPretrainingVcr: second-stage pretraining on VCR (official model/pretrain_vcr.py).

UniterForPretraining after the official init_type_embedding() and init_word_embedding(n): the
type table has 4 rows (question 0, regions 1, answer 2, rationale 3) and the word table the
object-reference tokens after the words, both grown from a UNITER checkpoint as UniterForVcr's
(GROWN_TABLES). init_word_embedding also replaces the MLM head `cls` by a new one tied to the
grown table, built with PyTorch's default init (Linear weight and bias uniform in
+-1/sqrt(H), LayerNorm 1 / 0, output bias 0) and never loaded from the first-stage
checkpoint: FRESH_WHEN_GROWN tells every loader to leave `cls` at its init when the source's
word table has fewer rows than the model's (registry.fresh_heads). ITM is not trained in the
second stage; `itm_output` stays so that official 2nd-stage checkpoints load name for name.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.pretraining import UniterForPretraining
from uniter_jax.models.vcr import NUM_TYPES, TYPE_TABLE, WORD_TABLE, UniterForVcr


def torch_default_dense(dense, key: jax.Array) -> None:
  """Re-draws a Dense as torch.nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in))."""
  k_w, k_b = jax.random.split(key)
  bound = 1.0 / math.sqrt(dense.kernel.shape[0])
  for p, k in ((dense.kernel, k_w), (dense.bias, k_b)):
    p.value = jax.random.uniform(k, p.shape, p.dtype, -bound, bound)


class UniterForPretrainingVcr(UniterForPretraining):
  """Official `UniterForPretrainingForVCR` after init_type_embedding / init_word_embedding."""

  GROWN_TABLES = UniterForVcr.GROWN_TABLES
  # table -> heads left at their init when a source's table has fewer rows (it grew).
  FRESH_WHEN_GROWN = {WORD_TABLE: ("cls",)}

  def __init__(self, config: UniterConfig, extra_words: int = 0, *, rngs: nnx.Rngs):
    """extra_words: grow config.vocab_size by this many (81 to start from uniter-base.pt)."""
    if config.type_vocab_size < NUM_TYPES:
      config = dataclasses.replace(config, type_vocab_size=NUM_TYPES)
    if extra_words:
      config = dataclasses.replace(config, vocab_size=config.vocab_size + int(extra_words))
    super().__init__(config, rngs=rngs)
    # The new BertOnlyMLMHead is made after init_weights ran: PyTorch's default init.
    torch_default_dense(self.cls.predictions.transform.dense, rngs.params())


__all__ = ["UniterForPretrainingVcr"]
