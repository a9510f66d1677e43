"""Pretraining heads. Tied weights are read through the owner.

The official heads are described in docs/official.md, *Pretraining objectives and masking*.

The MLM decoder is the word-embedding table (read via `Embed.attend`) plus its own bias;
the MRFR output is the transposed image-linear kernel plus its own bias. No Param is
stored twice, so a gradient reaches the one shared parameter from both uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.layers import Dense, Embed, LayerNorm, gelu, param, zeros


def _kw(cfg: UniterConfig) -> dict:
  return dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              init_std=cfg.initializer_range)


def _ln(cfg: UniterConfig) -> LayerNorm:
  return LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, name="embed",
                   dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)


class Transform(nnx.Module):
  """dense (H->H) + exact GELU + LayerNorm, shared by the MLM, MRFR and MRC heads."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, cfg.hidden_size, names=("embed", "hidden"),
                       rngs=rngs, **_kw(cfg))
    self.LayerNorm = _ln(cfg)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.LayerNorm(gelu(self.dense(h)))


class MlmPredictions(nnx.Module):
  """Official `cls.predictions`: transform, tied decoder, own bias."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.transform = Transform(cfg, rngs=rngs)
    self.bias = param(rngs, zeros, (cfg.vocab_size,), ("vocab",), cfg.params_dtype)

  def __call__(self, h: jax.Array, word_embeddings: Embed) -> jax.Array:
    z = self.transform(h)
    return word_embeddings.attend(z).astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class MlmHead(nnx.Module):
  """Official `cls` (its `seq_relationship` NSP head is not used by UNITER)."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.predictions = MlmPredictions(cfg, rngs=rngs)

  def __call__(self, h: jax.Array, word_embeddings: Embed) -> jax.Array:
    return self.predictions(h, word_embeddings)


class RegionFeatureRegression(nnx.Module):
  """Official `feat_regress`: net.0 -> `dense`, net.2 -> `LayerNorm`; output tied."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, cfg.hidden_size, names=("embed", "hidden"),
                       rngs=rngs, **_kw(cfg))
    self.LayerNorm = _ln(cfg)
    self.bias = param(rngs, zeros, (cfg.img_dim,), ("img_feat",), cfg.params_dtype)

  def __call__(self, h: jax.Array, img_linear_kernel: jax.Array) -> jax.Array:
    z = self.LayerNorm(gelu(self.dense(h)))
    # img_linear maps feature -> hidden with kernel (D, H); its transpose maps back.
    out = z @ img_linear_kernel.astype(z.dtype).T
    return out.astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class RegionClassification(nnx.Module):
  """Official `region_classifier`: net.0 `dense`, net.2 `LayerNorm`, net.3 `classifier`.

  Linear(H, H) -> GELU -> LayerNorm -> Linear(H, num_outputs); num_outputs defaults to the
  detector's label count (MRC). The RE head with mlp=2 is the same stack with one output.
  """

  def __init__(self, cfg: UniterConfig, num_outputs: int | None = None, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, cfg.hidden_size, names=("embed", "hidden"),
                       rngs=rngs, **_kw(cfg))
    self.LayerNorm = _ln(cfg)
    self.classifier = Dense(cfg.hidden_size, num_outputs or cfg.img_label_dim,
                            names=("embed", "labels"), rngs=rngs, **_kw(cfg))

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.classifier(self.LayerNorm(gelu(self.dense(h)))).astype(jnp.float32)
