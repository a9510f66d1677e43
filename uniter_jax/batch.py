"""The batch contract: every field a model, loss, masking function or pipeline exchanges.

One place documents them; the README's batch-contract table mirrors this one. Shapes use B = batch, Lt = text
length (padded bucket), Li = region count (padded bucket), D = img_dim, C = img_label_dim.

Layout: the text block (B, Lt) and the region block (B, Li) are each right-padded; the
model concatenates them into one (B, Lt + Li) sequence with one key mask. The official code
packs each example compactly (text, then its regions, then padding, via `gather_index`);
both layouts give the same outputs at every valid position because attention is
permutation-equivariant once padded keys are masked, text positions are explicit
(0..Lt-1), and regions get no position embedding.
"""

from __future__ import annotations

# name -> (dtype, shape, meaning). "opt" marks fields a batch may leave out.
FIELDS: dict[str, tuple[str, str, str]] = {
    # Inputs every task has.
    "input_ids": ("int32", "(B, Lt)", "[CLS] text [SEP] WordPiece ids, 0-padded"),
    "txt_mask": ("bool", "(B, Lt)", "True at real text tokens"),
    "img_feat": ("float", "(B, Li, D)", "region features, 0-padded (float16/32/bfloat16)"),
    "img_pos": ("float", "(B, Li, 7)", "box feature [x1, y1, x2, y2, w, h, w*h], normalised"),
    "img_mask": ("bool", "(B, Li)", "True at real regions"),
    "txt_type_ids": ("int32", "(B, Lt) opt", "token-type ids of text (default 0)"),
    "img_type_ids": ("int32", "(B, Li) opt", "token-type ids of regions (default 1)"),
    # Raw pretraining inputs that the in-step masking turns into targets.
    "img_soft_labels": ("float", "(B, Li, C) opt", "detector class distribution per region"),
    "img_ids": ("int32", "(B,) opt", "image identity (hash); equal ids count as a match in ITM"),
    # Pretraining targets (made by uniter_jax.masking inside the step, or by interop).
    "img_masked": ("bool", "(B, Li) opt", "regions whose input feature is replaced by the mask embedding"),
    "txt_labels": ("int32", "(B, Lt) opt", "MLM target id, -1 = not a target"),
    "feat_targets": ("float", "(B, Li, D) opt", "MRFR target: original feature of masked regions"),
    "label_targets": ("float", "(B, Li, C) opt", "MRC / MRC-kl target: soft labels of masked regions"),
    "itm_targets": ("int32", "(B,) opt", "1 = text and image match, 0 = negative"),
}

REQUIRED = ("input_ids", "txt_mask", "img_feat", "img_pos", "img_mask")


def check(batch: dict) -> None:
  """Raises a ValueError naming the field when a required field is missing or mis-shaped."""
  missing = [k for k in REQUIRED if k not in batch]
  if missing:
    raise ValueError(f"batch is missing required field(s) {missing}; see uniter_jax/batch.py")
  b, lt = batch["input_ids"].shape
  if batch["txt_mask"].shape != (b, lt):
    raise ValueError(f"txt_mask has shape {batch['txt_mask'].shape}, expected {(b, lt)} like input_ids")
  if batch["img_feat"].ndim != 3 or batch["img_feat"].shape[0] != b:
    raise ValueError(f"img_feat has shape {batch['img_feat'].shape}, expected (B={b}, Li, img_dim)")
  li = batch["img_feat"].shape[1]
  for k, shape in (("img_pos", (b, li, 7)), ("img_mask", (b, li))):
    if batch[k].shape != shape:
      raise ValueError(f"{k} has shape {batch[k].shape}, expected {shape}")
