"""Text and region embeddings (docs/official.md, *Model*)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.layers import Dense, Embed, LayerNorm, dropout, param, zeros


class TextEmbeddings(nnx.Module):
  """LN(word[ids] + position[0..Lt-1] + type[ids]) with dropout (official `embeddings`)."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              init_std=cfg.initializer_range, rngs=rngs)
    self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, names=("vocab", "embed"), **kw)
    self.position_embeddings = Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                     names=(None, "embed"), **kw)
    # Shared with the region side, which uses row 1 (row 2.. for NLVR2's second image).
    self.token_type_embeddings = Embed(cfg.type_vocab_size, cfg.hidden_size,
                                       names=(None, "embed"), **kw)
    self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, name="embed",
                               dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    self.rate = cfg.hidden_dropout
    self.max_positions = cfg.max_position_embeddings

  def __call__(self, input_ids: jax.Array, type_ids: jax.Array | None, *,
               deterministic: bool, key: jax.Array | None) -> jax.Array:
    lt = input_ids.shape[1]
    if lt > self.max_positions:
      raise ValueError(f"text length {lt} exceeds max_position_embeddings "
                       f"{self.max_positions}; truncate the text (max_txt_len)")
    if type_ids is None:
      type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(jnp.arange(lt))[None]
         + self.token_type_embeddings(type_ids))
    return dropout(self.LayerNorm(x), self.rate, key, deterministic)


class ImageEmbeddings(nnx.Module):
  """LN(LN(W v + b) + LN(W_p p + b_p) + type[t]) with dropout (official `img_embeddings`).

  `mask_embedding` lives in feature space (2 x img_dim): a masked region's input feature
  is replaced by row 1; row 0 is never used (the official forward zeroes it in place).
  """

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              init_std=cfg.initializer_range, rngs=rngs)
    ln = dict(eps=cfg.layer_norm_eps, name="embed", dtype=cfg.compute_dtype,
              param_dtype=cfg.params_dtype)
    self.img_linear = Dense(cfg.img_dim, cfg.hidden_size, names=("img_feat", "embed"), **kw)
    self.img_layer_norm = LayerNorm(cfg.hidden_size, **ln)
    self.pos_linear = Dense(7, cfg.hidden_size, names=(None, "embed"), **kw)
    self.pos_layer_norm = LayerNorm(cfg.hidden_size, **ln)
    self.mask_embedding = Embed(2, cfg.img_dim, names=(None, "img_feat"), **kw)
    self.mask_embedding.embedding = param(rngs, zeros, (2, cfg.img_dim), (None, "img_feat"),
                                          cfg.params_dtype)
    self.mask_embedding.embedding[...] = self.mask_embedding.embedding[...].at[1].set(
        cfg.initializer_range * jax.random.normal(rngs.params(), (cfg.img_dim,),
                                                  cfg.params_dtype))
    self.LayerNorm = LayerNorm(cfg.hidden_size, **ln)
    self.rate = cfg.hidden_dropout

  def __call__(self, img_feat: jax.Array, img_pos: jax.Array, type_ids: jax.Array,
               type_table: Embed, img_masked: jax.Array | None, *,
               deterministic: bool, key: jax.Array | None) -> jax.Array:
    feat = img_feat.astype(jnp.float32)
    if img_masked is not None:
      row1 = self.mask_embedding.embedding[1].astype(jnp.float32)
      feat = jnp.where(img_masked[..., None], row1, feat)
    a = self.img_layer_norm(self.img_linear(feat))
    b = self.pos_layer_norm(self.pos_linear(img_pos.astype(jnp.float32)))
    x = a.astype(jnp.float32) + b.astype(jnp.float32) + type_table(type_ids).astype(jnp.float32)
    return dropout(self.LayerNorm(x), self.rate, key, deterministic)
