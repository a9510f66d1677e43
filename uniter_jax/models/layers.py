"""Small building blocks with logical axis names on every parameter.

Every parameter carries `sharding_names` (logical axes such as "embed", "mlp", "vocab");
one rules table (uniter_jax.sharding) maps them to mesh axes. Parameters are created
without eager sharding so a model builds anywhere (one device, a notebook); the trainer
creates the state inside a jit with the shardings derived from these names.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uniter_jax import sharding

Names = Sequence[str | None]


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], names: Names,
          dtype: jnp.dtype) -> nnx.Param:
  """An nnx.Param with logical axis names (init is called with a fresh params key)."""
  if len(shape) != len(names):
    raise ValueError(f"shape {tuple(shape)} and logical names {tuple(names)} differ in rank")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), sharding_names=tuple(names),
                   eager_sharding=False)


def normal(stddev: float):
  """PyTorch-style normal init (not truncated), as the official init_weights does."""
  return jax.nn.initializers.normal(stddev)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


class Dense(nnx.Module):
  """y = x @ kernel + bias; kernel is (in, out), i.e. the transposed torch Linear weight."""

  def __init__(self, in_features: int, out_features: int, *, names: Names,
               dtype: jnp.dtype, param_dtype: jnp.dtype, init_std: float,
               rngs: nnx.Rngs):
    self.kernel = param(rngs, normal(init_std), (in_features, out_features), names,
                        param_dtype)
    self.bias = param(rngs, zeros, (out_features,), names[-1:], param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    return x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """Affine LayerNorm computed in float32 (eps 1e-12 in UNITER), output in `dtype`."""

  def __init__(self, features: int, *, eps: float, name: str, dtype: jnp.dtype,
               param_dtype: jnp.dtype, rngs: nnx.Rngs | None = None):
    self.scale = param(rngs, ones, (features,), (name,), param_dtype)
    self.bias = param(rngs, zeros, (features,), (name,), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nnx.Module):
  """A lookup table; `attend` reuses it as an output projection (tied MLM decoder)."""

  def __init__(self, num: int, features: int, *, names: Names, dtype: jnp.dtype,
               param_dtype: jnp.dtype, init_std: float, rngs: nnx.Rngs):
    self.embedding = param(rngs, normal(init_std), (num, features), names, param_dtype)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return x.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as BERT and UNITER use; Flax's default is the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def dropout(x: jax.Array, rate: float, key: jax.Array | None,
            deterministic: bool) -> jax.Array:
  """Inverted dropout from an explicit key (keys come from the step key, so resume replays)."""
  if deterministic or rate == 0.0:
    return x
  if key is None:
    raise ValueError("dropout needs a PRNG key when deterministic=False (pass rngs=...)")
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh."""
  return sharding.constrain(x, names)
