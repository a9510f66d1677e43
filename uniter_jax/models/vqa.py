"""UniterForVqa: the backbone plus the official VQA / SNLI-VE answer head.

See docs/official.md, *Downstream heads* (VQA, SNLI-VE) and *Loss reductions*.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.layers import Dense, LayerNorm, gelu
from uniter_jax.models.uniter import UniterModel, UniterOutput

# Official answer-vocabulary size (utils/ans2label.json); SNLI-VE uses the same head with 3.
VQA_NUM_ANSWERS = 3129
VE_NUM_LABELS = 3


class VqaHead(nnx.Module):
  """Official `vqa_output`: Linear(H, 2H) -> GELU -> LayerNorm -> Linear(2H, num_answers).

  Submodules `dense`, `LayerNorm`, `classifier` are the official nn.Sequential indices
  0, 2 and 3 (index 1 is the parameterless activation). VCR's `vcr_output` is the same stack
  with ReLU and 2 outputs (`activation=jax.nn.relu`).
  """

  def __init__(self, cfg: UniterConfig, num_answers: int, *, rngs: nnx.Rngs,
               activation: Callable[[jax.Array], jax.Array] = gelu):
    self.activation = activation
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              init_std=cfg.initializer_range, rngs=rngs)
    h2 = 2 * cfg.hidden_size
    self.dense = Dense(cfg.hidden_size, h2, names=("embed", "mlp"), **kw)
    self.LayerNorm = LayerNorm(h2, eps=cfg.layer_norm_eps, name="mlp",
                               dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    self.classifier = Dense(h2, num_answers, names=("mlp", "labels"), **kw)

  def __call__(self, pooled: jax.Array) -> jax.Array:
    return self.classifier(self.LayerNorm(self.activation(self.dense(pooled)))).astype(
        jnp.float32)


class UniterForVqa(nnx.Module):
  """Official `UniterForVisualQuestionAnswering` (also SNLI-VE with num_answers=3)."""

  def __init__(self, config: UniterConfig, num_answers: int = VQA_NUM_ANSWERS, *,
               rngs: nnx.Rngs):
    self.config = config
    self.num_answers = num_answers
    self.uniter = UniterModel(config, rngs=rngs)
    self.vqa_output = VqaHead(config, num_answers, rngs=rngs)

  def encode(self, batch: Mapping[str, Any], *, deterministic: bool = True,
             rngs: nnx.Rngs | jax.Array | None = None, **kwargs) -> UniterOutput:
    """Runs the backbone; returns txt (B,Lt,H), img (B,Li,H), pooled (B,H)."""
    return self.uniter(batch, deterministic=deterministic, rngs=rngs, **kwargs)

  def answer_logits(self, pooled: jax.Array) -> jax.Array:
    """(B, H) pooled -> (B, num_answers) float32 answer logits."""
    return self.vqa_output(pooled)

  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Batch -> (B, num_answers) answer logits."""
    return self.answer_logits(self.encode(batch, deterministic=deterministic,
                                          rngs=rngs).pooled)


class UniterForVisualEntailment(UniterForVqa):
  """Official `UniterForVisualEntailment`: the VQA model with 3 answers (SNLI-VE labels
  contradiction 0, entailment 1, neutral 2)."""

  def __init__(self, config: UniterConfig, *, rngs: nnx.Rngs):
    super().__init__(config, VE_NUM_LABELS, rngs=rngs)


def vqa_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Official VQA / VE loss: elementwise BCE-with-logits, mean over all x num_answers.

  That is the sum over answers averaged over questions (docs/official.md, *Loss reductions*).
  """
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                           targets.astype(jnp.float32))
  return jnp.mean(bce) * logits.shape[-1]
