"""Post-LN BERT encoder layers, stacked and run with nnx.scan (docs/official.md, *Model*)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.layers import Dense, LayerNorm, constrain, dropout, gelu

# The official additive mask bias (not -inf): a padded key gets logit - 10000.
_MASK_BIAS = -10000.0


class SelfAttention(nnx.Module):
  """query / key / value projections (official `attention.self`)."""

  def __init__(self, cfg: UniterConfig, kw: dict, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.query = Dense(h, h, names=("embed", "heads"), rngs=rngs, **kw)
    self.key = Dense(h, h, names=("embed", "heads"), rngs=rngs, **kw)
    self.value = Dense(h, h, names=("embed", "heads"), rngs=rngs, **kw)


class DenseLayerNorm(nnx.Module):
  """dense then residual LayerNorm (official `attention.output` and `output`)."""

  def __init__(self, d_in: int, cfg: UniterConfig, kw: dict, in_name: str, rngs: nnx.Rngs):
    self.dense = Dense(d_in, cfg.hidden_size, names=(in_name, "embed"), rngs=rngs, **kw)
    self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, name="embed",
                               dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                               rngs=rngs)


class Attention(nnx.Module):
  def __init__(self, cfg: UniterConfig, kw: dict, rngs: nnx.Rngs):
    self.self_attn = SelfAttention(cfg, kw, rngs)
    self.output = DenseLayerNorm(cfg.hidden_size, cfg, kw, "heads", rngs)


class Intermediate(nnx.Module):
  def __init__(self, cfg: UniterConfig, kw: dict, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, cfg.intermediate_size, names=("embed", "mlp"),
                       rngs=rngs, **kw)


class Layer(nnx.Module):
  """One BERT layer: x1 = LN(attn(x) + x); out = LN(W2 gelu(W1 x1) + x1)."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              init_std=cfg.initializer_range)
    self.attention = Attention(cfg, kw, rngs)
    self.intermediate = Intermediate(cfg, kw, rngs)
    self.output = DenseLayerNorm(cfg.intermediate_size, cfg, kw, "mlp", rngs)
    self.num_heads = cfg.num_heads
    self.hidden_rate = cfg.hidden_dropout
    self.attn_rate = cfg.attention_dropout
    self.attention_impl = cfg.attention_impl

  def __call__(self, x: jax.Array, key_mask: jax.Array, key: jax.Array | None,
               deterministic: bool) -> jax.Array:
    keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
    b, l, h = x.shape
    sa = self.attention.self_attn

    def heads(y):
      return constrain(y.reshape(b, l, self.num_heads, h // self.num_heads),
                       ("act_batch", "act_length", "act_heads", None))

    q, k, v = heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x))
    ctx = self._attend(q, k, v, key_mask, keys[0], deterministic).reshape(b, l, h)
    out = self.attention.output
    x1 = out.LayerNorm(dropout(out.dense(ctx), self.hidden_rate, keys[1], deterministic) + x)
    x1 = constrain(x1, ("act_batch", "act_length", "act_embed"))
    mid = constrain(gelu(self.intermediate.dense(x1)), ("act_batch", "act_length", "act_mlp"))
    y = dropout(self.output.dense(mid), self.hidden_rate, keys[2], deterministic)
    return constrain(self.output.LayerNorm(y + x1), ("act_batch", "act_length", "act_embed"))

  def _attend(self, q, k, v, key_mask, key, deterministic):
    if deterministic or self.attn_rate == 0.0:
      # Fused path (cuDNN / TPU kernels where available). Masked keys get zero weight,
      # as with the official -10000 bias: exp(-10000) underflows to 0 in float32.
      return jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :],
                                          implementation=self.attention_impl)
    # Attention-probability dropout (official 0.1) needs the explicit softmax.
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    logits = logits + jnp.where(key_mask[:, None, None, :], 0.0, _MASK_BIAS)
    probs = dropout(jax.nn.softmax(logits, axis=-1), self.attn_rate, key, deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class Encoder(nnx.Module):
  """N independently parameterised layers, stacked on a leading 'layers' axis."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.num_layers = cfg.num_layers
    self.remat_policy = cfg.remat_policy
    self.scan_layers = cfg.scan_layers

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs) -> Layer:
      return Layer(cfg, rngs=r)

    self.layer = make(rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array, *, deterministic: bool,
               key: jax.Array | None, return_all: bool = False):
    """Returns the last hidden state, or (last, per-layer stack) when return_all."""
    keys = (jnp.zeros((self.num_layers,), jnp.uint32) if key is None
            else jax.random.split(key, self.num_layers))
    use_key = key is not None

    def body(layer: Layer, h: jax.Array, k: jax.Array):
      out = layer(h, key_mask, k if use_key else None, deterministic)
      return out, (out if return_all else None)

    if self.remat_policy is not None:
      policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
      if policy is None:
        raise ValueError(f"unknown remat_policy {self.remat_policy!r}; use a member of "
                         "jax.checkpoint_policies or None")
      body = nnx.remat(body, policy=policy, static_argnums=())

    if self.scan_layers:
      scanned = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
      x, all_layers = scanned(self.layer, x, keys)
    else:  # A Python loop over the stacked layers (debugging; unrolled compile).
      outs = []
      for i in range(self.num_layers):
        layer = jax.tree.map(lambda p: p[i], self.layer)
        x, o = body(layer, x, keys[i])
        outs.append(o)
      all_layers = jnp.stack(outs) if return_all else None
    return (x, all_layers) if return_all else x
