"""UniterForVcr: VCR as a per-choice binary classifier (official model/vcr.py).

See docs/official.md, *Downstream heads: VCR*. Each (question, choice) is one sequence:
Q->A `[CLS] Q [SEP] A_c [SEP]`, QA->R `[CLS] Q [SEP] A_gt [SEP] R_c [SEP]`, with token types
0 = question, 1 = regions, 2 = answer, 3 = rationale (`txt_type_ids`). `vcr_output` on the
pooled output is Linear(H, 2H) -> ReLU -> LayerNorm -> Linear(2H, 2); the loss is a 2-way
cross-entropy per sequence (mean), and a choice's score is its class-1 logit.

Tables grow from a pretrained UNITER checkpoint as the official init_type_embedding /
init_word_embedding do (GROWN_TABLES): the type table to 4 rows (rows 2 and 3 copy row 0, the
text type), the word table by the object-reference tokens (to the model's vocab_size, e.g.
`extra_words=NUM_REFERENCE_TOKENS` on a BERT-vocabulary config; the new rows keep their
N(0, 0.02) init).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.registry import EXTEND
from uniter_jax.models.uniter import UniterModel, UniterOutput
from uniter_jax.models.vqa import VqaHead

TYPE_TABLE = "uniter/embeddings/token_type_embeddings/embedding"
WORD_TABLE = "uniter/embeddings/word_embeddings/embedding"
NUM_TYPES = 4  # question (and [CLS]), regions, answer, rationale
# Official VCR vocabulary growth: 81 object-reference tokens after BERT-base-cased's 28996 words.
NUM_REFERENCE_TOKENS = 81


class UniterForVcr(nnx.Module):
  """Official `UniterForVisualCommonsenseReasoning` (after init_type/word_embedding)."""

  GROWN_TABLES = {TYPE_TABLE: (0, 1, 0, 0), WORD_TABLE: EXTEND}

  def __init__(self, config: UniterConfig, extra_words: int = 0, *, rngs: nnx.Rngs):
    """extra_words: grow config.vocab_size by this many (81 to start from uniter-base.pt)."""
    if config.type_vocab_size < NUM_TYPES:  # the official init_type_embedding, at build time
      config = dataclasses.replace(config, type_vocab_size=NUM_TYPES)
    if extra_words:  # the official init_word_embedding(81), at build time
      config = dataclasses.replace(config, vocab_size=config.vocab_size + int(extra_words))
    self.config = config
    self.uniter = UniterModel(config, rngs=rngs)
    self.vcr_output = VqaHead(config, 2, rngs=rngs, activation=jax.nn.relu)

  def encode(self, batch: Mapping[str, Any], *, deterministic: bool = True,
             rngs: nnx.Rngs | jax.Array | None = None, **kwargs) -> UniterOutput:
    """Runs the backbone over (question, choice) sequences with their txt_type_ids."""
    return self.uniter(batch, deterministic=deterministic, rngs=rngs, **kwargs)

  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Batch of (question, choice) sequences -> (B, 2) float32 logits; class 1 = right choice."""
    return self.vcr_output(self.encode(batch, deterministic=deterministic, rngs=rngs).pooled)


def vcr_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Official VCR loss: 2-way cross-entropy per (question, choice) sequence, mean."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets.astype(jnp.int32)))
