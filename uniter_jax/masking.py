"""Conditional masking and ITM negatives as pure JAX functions of a PRNG key.

They run inside the jitted train step, so the input pipeline stays task-agnostic and a
resumed run (same step -> same key) replays exactly the same masks. Each pretraining
objective masks one modality only: MLM masks text with every region visible, MRM masks
regions with all text visible, ITM masks nothing (docs/official.md, *Pretraining objectives
and masking*).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from uniter_jax import sharding

Batch = Mapping[str, jax.Array]
# Fields that belong to the image side and travel together when ITM swaps images.
IMAGE_FIELDS = ("img_feat", "img_pos", "img_mask", "img_type_ids", "img_soft_labels", "img_ids")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Probabilities and special ids. Defaults are the official ones for bert-base-cased."""

  mask_id: int = 103
  special_ids: tuple[int, ...] = (0, 100, 101, 102, 103)  # PAD UNK CLS SEP MASK
  random_range: tuple[int, int] = (106, 28996)  # official v_range [id('!'), vocab)
  mlm_prob: float = 0.15
  mrm_prob: float = 0.15
  itm_neg_prob: float = 0.5
  # ITM negatives: "sampled" (UNITER: each caption gets another image with itm_neg_prob);
  # not in UNITER: "paired" = every caption once with its own image and once with another
  # image of its group (the batch doubles); "paired_half" = the same for the first half of
  # each group's rows only, so the ITM batch keeps its size and cost (paired_itm_negatives).
  itm_negatives: str = "sampled"
  # Not in UNITER: ids masked with `focus_prob` instead of mlm_prob (ERNIE-ViL-style masking
  # of attribute/object words). Empty = the official masking.
  focus_ids: tuple[int, ...] = ()
  focus_prob: float = 1.0


def mask_text(key: jax.Array, input_ids: jax.Array, txt_mask: jax.Array, *, mask_id: int,
              special_ids: Sequence[int], random_range: tuple[int, int], prob: float = 0.15,
              focus_ids: Sequence[int] = (), focus_prob: float = 1.0,
              segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """BERT masking of eligible tokens: returns (masked input_ids, txt_labels with -1 = none).

  Each eligible token (real, not a special id such as [CLS]/[SEP]) is selected with `prob`
  (`focus_prob` for ids in `focus_ids`); a selected token becomes [MASK] (80%), a uniform
  id in `random_range` (10%) or stays (10%). A segment with no selection gets its first
  eligible token forced to [MASK]. Segments are the runs of equal `segments` ids (B, Lt) of a
  row, e.g. the token types of VCR's question / answer / rationale, which the official
  2nd-stage pretraining masks one by one; None = the whole row is one segment.
  """
  k_sel, k_kind, k_rand = jax.random.split(key, 3)
  eligible = txt_mask.astype(bool) & ~jnp.isin(input_ids, jnp.asarray(special_ids))
  if focus_ids:
    prob = jnp.where(jnp.isin(input_ids, jnp.asarray(focus_ids)), focus_prob, prob)
  selected = jax.random.bernoulli(k_sel, prob, input_ids.shape) & eligible
  if segments is None:
    first = eligible & (jnp.cumsum(eligible, axis=1) == 1)
    forced = first & ~selected.any(axis=1, keepdims=True)
  else:  # same[b, i, j]: tokens i and j are in one segment (static (B, Lt, Lt), no loop)
    same = segments[:, :, None] == segments[:, None, :]
    before = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)  # j < i
    first = eligible & ~jnp.any(same & before & eligible[:, None, :], axis=2)
    forced = first & ~jnp.any(same & selected[:, None, :], axis=2)
  u = jax.random.uniform(k_kind, input_ids.shape)
  to_mask = (selected & (u < 0.8)) | forced
  to_rand = selected & (u >= 0.8) & (u < 0.9)
  rand_ids = jax.random.randint(k_rand, input_ids.shape, *random_range, dtype=input_ids.dtype)
  new_ids = jnp.where(to_mask, mask_id, jnp.where(to_rand, rand_ids, input_ids))
  labels = jnp.where(selected | forced, input_ids, -1).astype(jnp.int32)
  return new_ids.astype(input_ids.dtype), labels


def mask_regions(key: jax.Array, img_mask: jax.Array, prob: float = 0.15) -> jax.Array:
  """Selects each real region with `prob`; an example with none gets one random region."""
  k_sel, k_force = jax.random.split(key)
  valid = img_mask.astype(bool)
  selected = jax.random.bernoulli(k_sel, prob, valid.shape) & valid
  # One random valid region: argmax of uniform noise restricted to valid slots.
  noise = jnp.where(valid, jax.random.uniform(k_force, valid.shape), -1.0)
  pick = jax.nn.one_hot(jnp.argmax(noise, axis=1), valid.shape[1], dtype=bool) & valid
  return selected | (pick & ~selected.any(axis=1, keepdims=True))


def apply_region_masking(key: jax.Array, batch: Batch, prob: float = 0.15) -> dict:
  """MRM inputs and targets: zeroed features, `img_masked`, `feat_targets`, `label_targets`."""
  masked = mask_regions(key, batch["img_mask"], prob)
  feat = batch["img_feat"]
  out = dict(batch)
  out["img_masked"] = masked
  out["feat_targets"] = jnp.where(masked[..., None], feat, 0).astype(feat.dtype)
  out["img_feat"] = jnp.where(masked[..., None], 0, feat).astype(feat.dtype)
  if "img_soft_labels" in batch:
    soft = batch["img_soft_labels"]
    out["label_targets"] = jnp.where(masked[..., None], soft, 0).astype(soft.dtype)
  return out


def sample_itm_negatives(key: jax.Array, batch: Batch, prob: float = 0.5,
                         group_size: int | None = None) -> dict:
  """Gives each example, with `prob`, the image of another example in its group.

  The text is never replaced (official). The other example is drawn uniformly among the
  rest of the group, so an example never gets its own image back; when the drawn image
  has the same `img_ids` as its own, the pair is still a match (target 1).

  Groups are `group_size` consecutive rows. None means one group per device: the batch
  divided by the number of pieces the active mesh and rules split it into (the whole batch
  outside a mesh), so the image swap needs no cross-device traffic whatever the batch size
  (a fixed batch or a token budget).
  """
  b = batch["input_ids"].shape[0]
  g = _itm_group_size(b, group_size)
  k_neg, k_off = jax.random.split(key)
  idx = jnp.arange(b)
  start, local = idx - idx % g, idx % g
  offset = jax.random.randint(k_off, (b,), 1, max(g, 2))
  other = start + (local + offset) % g
  swap = jax.random.bernoulli(k_neg, prob, (b,)) & (g > 1)
  src = jnp.where(swap, other, idx)
  out = dict(batch)
  for name in IMAGE_FIELDS:
    if name in batch:
      out[name] = jnp.take(batch[name], src, axis=0)
  if "img_ids" in batch:
    same = batch["img_ids"][src] == batch["img_ids"]
  else:
    same = src == idx
  out["itm_targets"] = (same | ~swap).astype(jnp.int32)
  return out


def _itm_group_size(b: int, group_size: int | None) -> int:
  """The rows an ITM negative is drawn among (None: the rows one device holds)."""
  if group_size is None:
    shards = sharding.batch_shards()
    group_size = b // shards if b % shards == 0 else b
  if b % group_size:
    raise ValueError(f"batch size {b} is not a multiple of the ITM group size {group_size}")
  return group_size


def paired_itm_negatives(key: jax.Array, batch: Batch, group_size: int | None = None,
                         half: bool = False) -> dict:
  """Each caption twice: with its own image (a match) and with another image of its group.

  Not UNITER's sampling (sample_itm_negatives), and the batch doubles. Within each group the
  other image is the one `offset` rows on (one random offset in [1, g) per step, cyclic), so
  every caption and every image is seen once matched and once mismatched: neither the text
  nor the image alone tells the label, only their agreement does. Another row of the same
  image (equal `img_ids`) is still a match. Rows stay in their group, so no image crosses
  devices; the output interleaves per group: g own pairs, then the group's g swapped pairs.
  half: only the first g/2 rows of each group take part (as groups of g/2), so the output
  has the input's row count and an ITM update costs what a sampled one does.
  """
  b = batch["input_ids"].shape[0]
  g = _itm_group_size(b, group_size)
  if half:
    if g % 2:
      raise ValueError(f"paired_half ITM negatives need an even ITM group size, got {g}")
    batch = {k: v.reshape(b // g, g, *v.shape[1:])[:, : g // 2].reshape(b // 2, *v.shape[1:])
             for k, v in batch.items()}
    b, g = b // 2, g // 2
  idx = jnp.arange(b)
  offset = jax.random.randint(key, (), 1, max(g, 2)) if g > 1 else 0
  other = idx - idx % g + (idx % g + offset) % g

  def doubled(x: jax.Array, swapped: jax.Array) -> jax.Array:
    pair = jnp.stack([x.reshape(b // g, g, *x.shape[1:]),
                      swapped.reshape(b // g, g, *x.shape[1:])], axis=1)
    return pair.reshape(2 * b, *x.shape[1:])

  out = {name: doubled(x, jnp.take(x, other, axis=0) if name in IMAGE_FIELDS else x)
         for name, x in batch.items()}
  same = (batch["img_ids"][other] == batch["img_ids"]) if "img_ids" in batch else other == idx
  out["itm_targets"] = doubled(jnp.ones((b,), jnp.int32), same.astype(jnp.int32))
  return out


def mask_focus_words(batch: Batch, cfg: MaskingConfig) -> dict:
  """Every focus word ([MASK], no 80/10/10) becomes an MLM target; nothing else does.

  An eval probe of grounding: with all colour/shape words of a caption hidden, the text
  alone cannot tell them, so their accuracy measures how well the model reads the regions.
  """
  ids = batch["input_ids"]
  hit = jnp.isin(ids, jnp.asarray(cfg.focus_ids, ids.dtype)) & batch["txt_mask"].astype(bool)
  return {**batch, "input_ids": jnp.where(hit, cfg.mask_id, ids).astype(ids.dtype),
          "txt_labels": jnp.where(hit, ids, -1).astype(jnp.int32)}


def with_other_images(batch: Batch) -> dict:
  """Each example gets the image of the example half a batch away (the control of a probe).

  MLM targets of rows whose new image is their own (equal `img_ids`) are dropped.
  """
  b = batch["input_ids"].shape[0]
  out = {**batch}
  for name in IMAGE_FIELDS:
    if name in batch:
      out[name] = jnp.roll(batch[name], b // 2, axis=0)
  if "img_ids" in batch and "txt_labels" in batch:
    same = out["img_ids"] == batch["img_ids"]
    out["txt_labels"] = jnp.where(same[:, None], -1, batch["txt_labels"])
  return out


def apply_objective(key: jax.Array, batch: Batch, objective: str, cfg: MaskingConfig,
                    itm_group_size: int | None = None) -> dict:
  """Adds a pretraining objective's inputs and targets to a raw image-text batch.

  `objective` is one of mlm, mrfr, mrc, mrckl, itm; one modality is masked at most. ITM
  negatives are drawn within groups of `itm_group_size` rows (None: one group per device).
  """
  if objective == "mlm":
    # Token types as segments: one type (captions) = the whole row; VCR's Q / A / R each.
    ids, labels = mask_text(key, batch["input_ids"], batch["txt_mask"], mask_id=cfg.mask_id,
                            special_ids=cfg.special_ids, random_range=cfg.random_range,
                            prob=cfg.mlm_prob, focus_ids=cfg.focus_ids,
                            focus_prob=cfg.focus_prob, segments=batch.get("txt_type_ids"))
    return {**batch, "input_ids": ids, "txt_labels": labels}
  if objective in ("mrfr", "mrc", "mrckl"):
    if objective != "mrfr" and "img_soft_labels" not in batch:
      raise ValueError(f"objective {objective!r} needs the batch field img_soft_labels (detector "
                       "soft labels); prepare the image data with soft labels")
    return apply_region_masking(key, batch, cfg.mrm_prob)
  if objective == "itm":
    if cfg.itm_negatives in ("paired", "paired_half"):
      return paired_itm_negatives(key, batch, itm_group_size,
                                  half=cfg.itm_negatives == "paired_half")
    if cfg.itm_negatives != "sampled":
      raise ValueError(f"itm_negatives={cfg.itm_negatives!r}: use sampled, paired or paired_half")
    return sample_itm_negatives(key, batch, cfg.itm_neg_prob, itm_group_size)
  raise ValueError(f"unknown pretraining objective {objective!r}")
