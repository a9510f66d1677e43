"""UniterModel: embeddings + encoder + pooler over a [text block | region block] sequence."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.embeddings import ImageEmbeddings, TextEmbeddings
from uniter_jax.models.encoder import Encoder
from uniter_jax.models.layers import Dense, constrain


@struct.dataclass
class UniterOutput:
  """Encoder outputs split back into the two blocks.

  txt: (B, Lt, H) final hidden states of the text block ([CLS] at 0).
  img: (B, Li, H) final hidden states of the region block.
  pooled: (B, H) tanh(W h_[CLS] + b).
  all_layers: (num_layers, B, Lt + Li, H) when requested, else None.
  embeddings: (B, Lt + Li, H) the encoder input when requested, else None.
  """

  txt: jax.Array
  img: jax.Array
  pooled: jax.Array
  all_layers: jax.Array | None = None
  embeddings: jax.Array | None = None


class Pooler(nnx.Module):
  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, cfg.hidden_size, names=("embed", "hidden"),
                       dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                       init_std=cfg.initializer_range, rngs=rngs)

  def __call__(self, first_token: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(first_token).astype(jnp.float32))


def as_key(rngs: nnx.Rngs | jax.Array | None) -> jax.Array | None:
  """Accepts an nnx.Rngs (its 'dropout' stream), a raw PRNG key, or None."""
  if rngs is None or isinstance(rngs, jax.Array):
    return rngs
  return rngs.dropout()


class UniterModel(nnx.Module):
  """The UNITER backbone (official `uniter`).

  Sequence layout: text block (B, Lt) then region block (B, Li), each right-padded, with
  one joint key mask. The official code instead packs each example compactly (its text,
  then its regions, then padding) through `gather_index`. Both compute the same outputs
  at every valid position: attention is permutation-equivariant once padded keys are
  masked, text positions are explicit (0..Lt-1) and regions get no position embedding,
  so moving the padding between the blocks changes nothing a valid position can see.
  The block layout keeps every shape static with no gathers.
  """

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = TextEmbeddings(cfg, rngs=rngs)
    self.img_embeddings = ImageEmbeddings(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.pooler = Pooler(cfg, rngs=rngs)

  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None, return_all_layers: bool = False,
               return_embeddings: bool = False) -> UniterOutput:
    key = as_key(rngs)
    if not deterministic and key is None:
      raise ValueError("deterministic=False needs rngs (an nnx.Rngs with a 'dropout' "
                       "stream or a PRNG key)")
    k_txt, k_img, k_enc = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
    input_ids = batch["input_ids"]
    img_feat = batch["img_feat"]
    txt_mask = batch["txt_mask"].astype(bool)
    img_mask = batch["img_mask"].astype(bool)
    lt = input_ids.shape[1]
    img_type = batch.get("img_type_ids")
    if img_type is None:
      img_type = jnp.ones(img_feat.shape[:2], jnp.int32)

    txt = self.embeddings(input_ids, batch.get("txt_type_ids"),
                          deterministic=deterministic, key=k_txt)
    img = self.img_embeddings(img_feat, batch["img_pos"], img_type,
                              self.embeddings.token_type_embeddings, batch.get("img_masked"),
                              deterministic=deterministic, key=k_img)
    x = constrain(jnp.concatenate([txt, img], axis=1), ("act_batch", "act_length", "act_embed"))
    key_mask = jnp.concatenate([txt_mask, img_mask], axis=1)
    enc = self.encoder(x, key_mask, deterministic=deterministic, key=k_enc,
                       return_all=return_all_layers)
    h, all_layers = enc if return_all_layers else (enc, None)
    return UniterOutput(txt=h[:, :lt], img=h[:, lt:], pooled=self.pooler(h[:, 0]),
                        all_layers=all_layers, embeddings=x if return_embeddings else None)
