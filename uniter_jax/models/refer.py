"""UniterForReferringExpressionComprehension: which region does the expression refer to?

See docs/official.md, *Downstream heads: referring expressions*. The backbone runs over
`[CLS] expression [SEP]` + the image's regions; `re_output` scores every region from its final
hidden state (mlp=1: Linear(H, 1); mlp=2: Linear(H, H) -> GELU -> LayerNorm -> Linear(H, 1),
the official nn.Sequential indices 0, 2, 3). Padded regions score -1e4, as the official
`obj_masks` fill does, so a softmax over the region axis ignores them.

Losses (official model/re.py, train_re.py): "cls" = softmax cross-entropy over the regions
against the target region, summed over the batch; "rank" = a hinge on sigmoid scores with
margin 0.2 against one negative region per expression (the highest-scoring other region with
probability hard_ratio = 0.3, else a uniformly random other region), summed as well.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from uniter_jax.models.config import UniterConfig
from uniter_jax.models.heads import RegionClassification
from uniter_jax.models.layers import Dense
from uniter_jax.models.uniter import UniterModel, UniterOutput

MLP_CHOICES = (1, 2)
LOSSES = ("cls", "rank")
# The official masked_fill value for padded regions (not -inf: a row of padding stays finite).
PAD_SCORE = -1e4


class UniterForReferringExpressionComprehension(nnx.Module):
  """Official `UniterForReferringExpressionComprehension` (re_output on every region)."""

  def __init__(self, config: UniterConfig, mlp: int = 1, *, rngs: nnx.Rngs):
    if mlp not in MLP_CHOICES:
      raise ValueError(f"RE head mlp={mlp!r}: the official head has 1 or 2 layers")
    self.config = config
    self.mlp = mlp
    self.uniter = UniterModel(config, rngs=rngs)
    if mlp == 1:
      self.re_output = Dense(config.hidden_size, 1, names=("embed", "labels"),
                             dtype=config.compute_dtype, param_dtype=config.params_dtype,
                             init_std=config.initializer_range, rngs=rngs)
    else:
      self.re_output = RegionClassification(config, num_outputs=1, rngs=rngs)

  def encode(self, batch: Mapping[str, Any], *, deterministic: bool = True,
             rngs: nnx.Rngs | jax.Array | None = None, **kwargs) -> UniterOutput:
    """Runs the backbone; returns txt (B,Lt,H), img (B,Li,H), pooled (B,H)."""
    return self.uniter(batch, deterministic=deterministic, rngs=rngs, **kwargs)

  def region_scores(self, img_hidden: jax.Array, img_mask: jax.Array) -> jax.Array:
    """(B, Li, H) region states -> (B, Li) float32 scores, PAD_SCORE at padded regions."""
    scores = self.re_output(img_hidden)[..., 0].astype(jnp.float32)
    return jnp.where(img_mask.astype(bool), scores, PAD_SCORE)

  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """Batch -> (B, Li) float32 region scores (the argmax is the predicted region)."""
    out = self.encode(batch, deterministic=deterministic, rngs=rngs)
    return self.region_scores(out.img, batch["img_mask"])


def target_ok(scores: jax.Array, targets: jax.Array, img_mask: jax.Array) -> jax.Array:
  """(B,) True where the target is one of the example's real regions (else: no loss)."""
  li = scores.shape[-1]
  t = jnp.clip(targets, 0, li - 1)
  return (targets >= 0) & (targets < li) & jnp.take_along_axis(
      img_mask.astype(bool), t[:, None], axis=1)[:, 0]


def re_cls_loss(scores: jax.Array, targets: jax.Array, img_mask: jax.Array) -> jax.Array:
  """Official "cls" loss: softmax CE over the regions, summed over the examples.

  Examples whose target is not a real region (a padding row, a target the data could not
  keep) add nothing.
  """
  ok = target_ok(scores, targets, img_mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      scores, jnp.clip(targets, 0, scores.shape[-1] - 1))
  return jnp.sum(jnp.where(ok, ce, 0.0))


def sample_negatives(key: jax.Array, scores: jax.Array, targets: jax.Array,
                     img_mask: jax.Array, hard_ratio: float = 0.3) -> tuple[jax.Array, jax.Array]:
  """One negative region per example, as the official sample_neg_ix draws it.

  With probability hard_ratio the highest-scoring region other than the target, otherwise a
  uniformly random real region other than the target. Returns (negative index (B,), has a
  negative (B,)): an example whose only region is the target has none.
  """
  b, li = scores.shape
  others = img_mask.astype(bool) & (jnp.arange(li)[None] != targets[:, None])
  k_hard, k_pick = jax.random.split(key)
  hard = jnp.argmax(jnp.where(others, jax.lax.stop_gradient(scores), -jnp.inf), axis=-1)
  # argmax of iid uniforms over the allowed regions = a uniform draw among them.
  easy = jnp.argmax(jnp.where(others, jax.random.uniform(k_pick, (b, li)), -1.0), axis=-1)
  use_hard = jax.random.uniform(k_hard, (b,)) < hard_ratio
  return jnp.where(use_hard, hard, easy), others.any(axis=-1)


def re_rank_loss(scores: jax.Array, targets: jax.Array, negatives: jax.Array,
                 img_mask: jax.Array, margin: float = 0.2,
                 has_negative: jax.Array | None = None) -> jax.Array:
  """Official "rank" loss: sum of max(0, margin + sigmoid(s_neg) - sigmoid(s_target))."""
  ok = target_ok(scores, targets, img_mask)
  if has_negative is not None:
    ok &= has_negative
  li = scores.shape[-1]
  pos = jnp.take_along_axis(scores, jnp.clip(targets, 0, li - 1)[:, None], axis=1)[:, 0]
  neg = jnp.take_along_axis(scores, jnp.clip(negatives, 0, li - 1)[:, None], axis=1)[:, 0]
  hinge = jnp.maximum(0.0, margin + jax.nn.sigmoid(neg) - jax.nn.sigmoid(pos))
  return jnp.sum(jnp.where(ok, hinge, 0.0))
