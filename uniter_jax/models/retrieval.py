"""UniterForImageTextRetrieval: a rank score per (caption, image) pair (docs/official.md,
*Retrieval*).

`itm_output` (H -> 2) is kept so pretraining checkpoints map onto it (the forward does not use
it); `rank_output` (H -> 1) scores the pooled output. A checkpoint without `rank_output` (a
pretraining one) starts it from the ITM "match" row (official `init_output()`), declared in
COPIED_UNITS and applied by every loader (registry.copy_units); a fine-tuned checkpoint's
trained `rank_output` is kept (unlike the official inf_itm.py, docs/official.md *Retrieval*).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.layers import Dense
from uniter_jax.models.uniter import UniterModel, UniterOutput

MARGIN = 0.2  # official hinge margin (every train_itm*.json)


class UniterForImageTextRetrieval(nnx.Module):
  """Official `UniterForImageTextRetrieval` (model/itm.py)."""

  # Heads a pretrained checkpoint lacks, taken from another head's output units:
  # rank_output = unit 1 (the "match" logit) of itm_output (official init_output()).
  COPIED_UNITS = {"rank_output": ("itm_output", 1)}

  def __init__(self, config: UniterConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.uniter = UniterModel(config, rngs=rngs)
    kw = dict(dtype=config.compute_dtype, param_dtype=config.params_dtype,
              init_std=config.initializer_range, rngs=rngs)
    self.itm_output = Dense(config.hidden_size, 2, names=("embed", "labels"), **kw)
    self.rank_output = Dense(config.hidden_size, 1, names=("embed", None), **kw)

  def encode(self, batch: Mapping[str, Any], *, deterministic: bool = True,
             rngs: nnx.Rngs | jax.Array | None = None, **kwargs) -> UniterOutput:
    """Runs the backbone; returns txt (B,Lt,H), img (B,Li,H), pooled (B,H)."""
    return self.uniter(batch, deterministic=deterministic, rngs=rngs, **kwargs)

  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Batch -> (B, 1) float32 raw rank logits (the official `rank_scores`)."""
    pooled = self.encode(batch, deterministic=deterministic, rngs=rngs).pooled
    return self.rank_output(pooled).astype(jnp.float32)

  def init_output(self) -> None:
    """rank_output <- row 1 of itm_output, in place (official init_output())."""
    self.rank_output.kernel[...] = self.itm_output.kernel[...][:, 1:2]
    self.rank_output.bias[...] = self.itm_output.bias[...][1:2]


def rank_hinge(scores: jax.Array, sample_size: int, margin: float = MARGIN) -> jax.Array:
  """Per-negative hinge (n_groups, sample_size - 1): max(0, margin + sig(neg) - sig(pos)).

  `scores` (n_groups * sample_size,) or (..., 1) holds groups of `sample_size` consecutive
  rows, column 0 the positive (official model/itm.py).
  """
  s = jax.nn.sigmoid(scores.astype(jnp.float32).reshape(-1, sample_size))
  return jnp.maximum(margin + s[:, 1:] - s[:, :1], 0.0)


def rank_loss(scores: jax.Array, sample_size: int, margin: float = MARGIN,
              weights: jax.Array | None = None) -> jax.Array:
  """The train_itm.py loss: the mean hinge over every (group, negative).

  `weights` (n_groups,) or (n_groups, sample_size - 1) masks padded groups or negatives (the
  mean is then over the real ones).
  """
  h = rank_hinge(scores, sample_size, margin)
  if weights is None:
    return jnp.mean(h)
  w = weights.astype(jnp.float32)
  w = jnp.broadcast_to(w[:, None] if w.ndim == 1 else w, h.shape)
  return jnp.sum(h * w) / jnp.maximum(jnp.sum(w), 1.0)


def hardest(scores: jax.Array, k: int, valid: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """(indices, ok) of the k highest scores per row of (n, m) `scores` (official topk over
  the negatives); `valid` (n, m) excludes entries (ok is False where fewer than k remain)."""
  s = scores.astype(jnp.float32)
  if valid is not None:
    s = jnp.where(valid, s, -jnp.inf)
  vals, idx = jax.lax.top_k(s, k)
  return idx, jnp.isfinite(vals)


def official_hard_negative_loss(model: UniterForImageTextRetrieval,
                                batch: Mapping[str, jax.Array], hard_size: int,
                                margin: float = MARGIN, *, deterministic: bool = True,
                                rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
  """UniterForImageTextRetrievalHardNeg on one anchor's rows (row 0 the gt pair, the rest
  its candidates): score all in eval mode without gradient, keep the gt and the hard_size
  highest-scoring candidates, then the hinge on those (mean; train_itm_hard_negatives.py
  further divides it by train_batch_size)."""
  scores = jax.lax.stop_gradient(model(batch, deterministic=True))[1:, 0]
  idx, _ = hardest(scores[None], hard_size)
  rows = jnp.concatenate([jnp.zeros((1,), jnp.int32), idx[0].astype(jnp.int32) + 1])
  n = scores.shape[0] + 1
  hard = {k: jnp.take(v, rows, axis=0) for k, v in batch.items()
          if hasattr(v, "shape") and v.ndim and v.shape[0] == n}
  return rank_loss(model(hard, deterministic=deterministic, rngs=rngs), hard_size + 1, margin)
