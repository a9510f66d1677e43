"""UniterForPretraining: the backbone `uniter` plus the MLM, MRFR, MRC and ITM heads."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.heads import MlmHead, RegionClassification, RegionFeatureRegression
from uniter_jax.models.layers import Dense
from uniter_jax.models.uniter import UniterModel, UniterOutput


class UniterForPretraining(nnx.Module):
  """Official `UniterForPretraining` with the same parameter structure (see interop)."""

  def __init__(self, config: UniterConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.uniter = UniterModel(config, rngs=rngs)
    self.cls = MlmHead(config, rngs=rngs)
    self.feat_regress = RegionFeatureRegression(config, rngs=rngs)
    self.region_classifier = RegionClassification(config, rngs=rngs)
    self.itm_output = Dense(config.hidden_size, 2, names=("embed", "labels"),
                            dtype=config.compute_dtype, param_dtype=config.params_dtype,
                            init_std=config.initializer_range, rngs=rngs)

  def encode(self, batch: Mapping[str, Any], *, deterministic: bool = True,
             rngs: nnx.Rngs | jax.Array | None = None, **kwargs) -> UniterOutput:
    """Runs the backbone; returns txt (B,Lt,H), img (B,Li,H), pooled (B,H)."""
    return self.uniter(batch, deterministic=deterministic, rngs=rngs, **kwargs)

  __call__ = encode

  def mlm_logits(self, txt: jax.Array) -> jax.Array:
    """(..., H) text states -> (..., vocab) float32 logits (decoder tied to word embeddings)."""
    return self.cls(txt, self.uniter.embeddings.word_embeddings)

  def mrfr_prediction(self, img: jax.Array) -> jax.Array:
    """(..., H) region states -> (..., img_dim) regressed features (tied to img_linear)."""
    return self.feat_regress(img, self.uniter.img_embeddings.img_linear.kernel[...])

  def mrc_logits(self, img: jax.Array) -> jax.Array:
    """(..., H) region states -> (..., img_label_dim) float32 logits."""
    return self.region_classifier(img)

  def itm_logits(self, pooled: jax.Array) -> jax.Array:
    """(B, H) pooled -> (B, 2) float32 logits; class 1 = match."""
    return self.itm_output(pooled).astype(jnp.float32)
