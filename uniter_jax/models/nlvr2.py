"""UniterForNlvr2: a statement about a pair of images, in the three official head variants.

See docs/official.md, *Downstream heads: NLVR2*. The input is one batch layout for every
variant (the pipeline's): `input_ids` / `txt_mask` (B, Lt) once per example and the two
images on an image axis, `img_feat` (B, 2, Li, D), `img_pos` (B, 2, Li, 7), `img_mask`
(B, 2, Li), optional `img_type_ids` (B, 2, Li). The variant decides how the backbone sees them:

- "triplet": one sequence per example, [CLS] s [SEP] + left regions + right regions.
- "paired": two sequences per example, [CLS] s [SEP] + one image, adjacent rows (2B); the
  two pooled outputs are concatenated -> Linear(2H, 2).
- "paired-attn" (the official configs' choice): like "paired", then bidirectional cross
  attention between the two sequences' final states (PyTorch-style packed in-projection),
  a shared Linear(2H, H) + ReLU, attention pooling, and Linear(2H, 2).

With use_img_type the right image's regions get token type 2 (the official `--use_img_type`);
the type table has 3 rows, row 2 starting as a copy of the pretrained row 1 (GROWN_TABLES).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.layers import Dense, dropout, param, zeros
from uniter_jax.models.uniter import UniterModel, UniterOutput, as_key

VARIANTS = ("triplet", "paired", "paired-attn")
# The official MultiheadAttention masks padded keys with -inf; the attention pool with -1e4.
_POOL_MASK_BIAS = -1e4
TYPE_TABLE = "uniter/embeddings/token_type_embeddings/embedding"


def pair_inputs(batch: Mapping[str, Any], variant: str, use_img_type: bool) -> dict:
  """The pair batch (image axis of 2) -> the backbone's batch for `variant`.

  triplet: B rows, region block [left Li | right Li] (padding between the two images is
  masked, and regions have no position embedding, so this equals the official compact
  sequence). paired / paired-attn: 2B rows, row 2i = (text i, left image), 2i+1 = (text i,
  right image), as the official nlvr2_paired_collate orders them.
  """
  img_feat = batch["img_feat"]
  if img_feat.ndim != 4 or img_feat.shape[1] != 2:
    raise ValueError(f"NLVR2 needs two images per text: img_feat (B, 2, Li, D), got "
                     f"{tuple(img_feat.shape)}")
  b, _, li = img_feat.shape[:3]
  types = batch.get("img_type_ids")
  if types is None:
    side = jnp.array([1, 2 if use_img_type else 1], jnp.int32)
    types = jnp.broadcast_to(side[None, :, None], (b, 2, li))
  images = {"img_feat": img_feat, "img_pos": batch["img_pos"], "img_mask": batch["img_mask"],
            "img_type_ids": types}
  if variant == "triplet":
    out = {k: v.reshape((b, 2 * li) + v.shape[3:]) for k, v in images.items()}
    out.update(input_ids=batch["input_ids"], txt_mask=batch["txt_mask"])
  else:
    out = {k: v.reshape((2 * b, li) + v.shape[3:]) for k, v in images.items()}
    out.update(input_ids=jnp.repeat(batch["input_ids"], 2, axis=0),
               txt_mask=jnp.repeat(batch["txt_mask"], 2, axis=0))
  if "txt_type_ids" in batch:
    out["txt_type_ids"] = (batch["txt_type_ids"] if variant == "triplet"
                           else jnp.repeat(batch["txt_type_ids"], 2, axis=0))
  return out


class PackedAttention(nnx.Module):
  """PyTorch nn.MultiheadAttention (official model/attention.py), parameters as stored there.

  in_proj_weight (3H, H) = [W_q; W_k; W_v] in the torch (out, in) layout with xavier-uniform
  init, in_proj_bias (3H,) zero, out_proj Linear(H, H). The query is scaled by
  1/sqrt(head_dim), padded keys get -inf, dropout acts on the attention weights.
  """

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.in_proj_weight = param(rngs, jax.nn.initializers.xavier_uniform(), (3 * h, h),
                                (None, "embed"), cfg.params_dtype)
    self.in_proj_bias = param(rngs, zeros, (3 * h,), (None,), cfg.params_dtype)
    self.out_proj = Dense(h, h, names=("heads", "embed"), dtype=cfg.compute_dtype,
                          param_dtype=cfg.params_dtype, init_std=cfg.initializer_range,
                          rngs=rngs)
    self.num_heads = cfg.num_heads
    self.rate = cfg.attention_dropout
    self.dtype = cfg.compute_dtype

  def __call__(self, query: jax.Array, keys: jax.Array, key_mask: jax.Array, *,
               deterministic: bool, key: jax.Array | None) -> jax.Array:
    """query (B, Lq, H) attends to keys (B, Lk, H) where key_mask (B, Lk) is True."""
    b, lq, h = query.shape
    nh, hd = self.num_heads, h // self.num_heads
    w = self.in_proj_weight[...].astype(self.dtype)
    bias = self.in_proj_bias[...].astype(self.dtype)
    q = query.astype(self.dtype) @ w[:h].T + bias[:h]
    k = keys.astype(self.dtype) @ w[h:2 * h].T + bias[h:2 * h]
    v = keys.astype(self.dtype) @ w[2 * h:].T + bias[2 * h:]
    q = (q * (1.0 / math.sqrt(hd))).reshape(b, lq, nh, hd)
    k = k.reshape(b, -1, nh, hd)
    v = v.reshape(b, -1, nh, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    probs = dropout(jax.nn.softmax(logits, axis=-1), self.rate, key, deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, lq, h)
    return self.out_proj(ctx)


class AttentionPool(nnx.Module):
  """Official AttentionPool: weights softmax(ReLU(Linear(H, 1)(x)) - 1e4 at pads), dropped out."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, 1, names=("embed", None), dtype=cfg.compute_dtype,
                       param_dtype=cfg.params_dtype, init_std=cfg.initializer_range,
                       rngs=rngs)
    self.rate = cfg.attention_dropout

  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool,
               key: jax.Array | None) -> jax.Array:
    score = jax.nn.relu(self.dense(x)[..., 0].astype(jnp.float32))
    score = score + jnp.where(mask, 0.0, _POOL_MASK_BIAS)
    weights = dropout(jax.nn.softmax(score, axis=-1), self.rate, key, deterministic)
    return jnp.einsum("bl,blh->bh", weights, x.astype(jnp.float32))


class PairFusion(nnx.Module):
  """The official `fc`: Linear(2H, H) -> ReLU -> Dropout, shared by the two sides."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(2 * cfg.hidden_size, cfg.hidden_size, names=("mlp", "embed"),
                       dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                       init_std=cfg.initializer_range, rngs=rngs)
    self.rate = cfg.hidden_dropout

  def __call__(self, x: jax.Array, *, deterministic: bool, key: jax.Array | None):
    return dropout(jax.nn.relu(self.dense(x)), self.rate, key, deterministic)


class UniterForNlvr2(nnx.Module):
  """Official UniterForNlvr2Triplet / UniterForNlvr2Paired / UniterForNlvr2PairedAttn."""

  # Rows of a table a pretrained checkpoint has fewer of: target row -> source row
  # (official init_type_embedding: rows 0, 1 kept, row 2 copies row 1).
  GROWN_TABLES = {TYPE_TABLE: (0, 1, 1)}

  def __init__(self, config: UniterConfig, variant: str = "paired-attn",
               use_img_type: bool = True, *, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f"unknown NLVR2 variant {variant!r}; choose one of {VARIANTS}")
    if config.type_vocab_size < 3:  # the official init_type_embedding, at build time
      config = dataclasses.replace(config, type_vocab_size=3)
    self.config = config
    self.variant = variant
    self.use_img_type = use_img_type
    self.uniter = UniterModel(config, rngs=rngs)
    kw = dict(dtype=config.compute_dtype, param_dtype=config.params_dtype,
              init_std=config.initializer_range, rngs=rngs)
    h = config.hidden_size
    if variant == "paired-attn":
      self.attn1 = PackedAttention(config, rngs=rngs)
      self.attn2 = PackedAttention(config, rngs=rngs)
      self.fc = PairFusion(config, rngs=rngs)
      self.attn_pool = AttentionPool(config, rngs=rngs)
    width = h if variant == "triplet" else 2 * h
    self.nlvr2_output = Dense(width, 2, names=("mlp", "labels"), **kw)

  def encode(self, batch: Mapping[str, Any], *, deterministic: bool = True,
             rngs: nnx.Rngs | jax.Array | None = None) -> tuple[UniterOutput, dict]:
    """The backbone over the variant's rows; returns (output, the backbone batch)."""
    inputs = pair_inputs(batch, self.variant, self.use_img_type)
    return self.uniter(inputs, deterministic=deterministic, rngs=rngs), inputs

  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Pair batch -> (B, 2) float32 logits; class 1 = the statement is true."""
    key = as_key(rngs)
    k_enc, k_head = (None, None) if key is None else tuple(jax.random.split(key))
    out, inputs = self.encode(batch, deterministic=deterministic, rngs=k_enc)
    if self.variant == "triplet":
      return self.nlvr2_output(out.pooled).astype(jnp.float32)
    if self.variant == "paired":
      return self.nlvr2_output(out.pooled.reshape(-1, 2 * out.pooled.shape[-1])
                               ).astype(jnp.float32)
    return self._paired_attn(out, inputs, deterministic, k_head)

  def _paired_attn(self, out: UniterOutput, inputs: dict, deterministic: bool,
                   key: jax.Array | None) -> jax.Array:
    h = jnp.concatenate([out.txt, out.img], axis=1)  # (2B, L, H), pads masked below
    mask = jnp.concatenate([inputs["txt_mask"], inputs["img_mask"]], axis=1).astype(bool)
    n, length, width = h.shape
    h = h.reshape(n // 2, 2, length, width)
    mask = mask.reshape(n // 2, 2, length)
    left, right, lmask, rmask = h[:, 0], h[:, 1], mask[:, 0], mask[:, 1]
    keys = [None] * 6 if key is None else list(jax.random.split(key, 6))
    kw = dict(deterministic=deterministic)
    l2r = self.attn1(left, right, rmask, key=keys[0], **kw)
    r2l = self.attn2(right, left, lmask, key=keys[1], **kw)
    left = self.fc(jnp.concatenate([l2r.astype(left.dtype), left], -1), key=keys[2], **kw)
    right = self.fc(jnp.concatenate([r2l.astype(right.dtype), right], -1), key=keys[3], **kw)
    pooled = jnp.concatenate([self.attn_pool(left, lmask, key=keys[4], **kw),
                              self.attn_pool(right, rmask, key=keys[5], **kw)], -1)
    return self.nlvr2_output(pooled).astype(jnp.float32)


def nlvr2_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Official NLVR2 loss: 2-way cross-entropy, mean over examples (train_nlvr2.py)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets.astype(jnp.int32)))
