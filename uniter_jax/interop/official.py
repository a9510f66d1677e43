"""Official UNITER (PyTorch) parameter names and batch layout <-> ours.

Name mapping (uniter_spec.md section 7): torch Linear `weight` (out, in) is our `kernel`
(in, out); LayerNorm `weight` is `scale`; Embedding `weight` is `embedding`. Encoder layers
`encoder.layer.{l}.*` are stacked on a leading axis of `encoder.layer.*`; `attention.self`
is `attention.self_attn`. In the nn.Sequential heads, `net.0` is `dense`, `net.2` is
`LayerNorm` and `net.3` is `classifier`. The tied tensors `cls.predictions.decoder.weight`
and `feat_regress.weight` are the word embedding and img_linear weight: stored once here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# Official aliases of tied tensors -> the canonical tensor they equal.
TIED = {
    "cls.predictions.decoder.weight": "uniter.embeddings.word_embeddings.weight",
    "feat_regress.weight": "uniter.img_embeddings.img_linear.weight",
}
# Official tensors that UNITER never uses in forward.
IGNORED_PREFIXES = ("cls.seq_relationship.",)

_SEQUENTIAL = {
    "feat_regress": {"0": "dense", "2": "LayerNorm"},
    "region_classifier": {"0": "dense", "2": "LayerNorm", "3": "classifier"},
}
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings",
               "mask_embedding")


def official_to_path(name: str) -> tuple[tuple[str, ...], int | None, bool]:
  """Official tensor name -> (our parameter path, layer index or None, transpose?)."""
  name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # old BERT names
  parts = name.split(".")
  layer = None
  if parts[:3] == ["uniter", "encoder", "layer"]:
    layer = int(parts[3])
    parts = parts[:3] + parts[4:]
  parts = ["self_attn" if p == "self" else p for p in parts]
  if parts[0] in _SEQUENTIAL and len(parts) == 4 and parts[1] == "net":
    parts = [parts[0], _SEQUENTIAL[parts[0]][parts[2]], parts[3]]
  leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
  transpose = False
  if leaf == "weight":
    if owner in _EMBEDDINGS:
      parts[-1] = "embedding"
    elif "LayerNorm" in owner or owner.endswith("layer_norm") or owner == "LayerNorm":
      parts[-1] = "scale"
    elif parts[0] in _SEQUENTIAL and owner == "LayerNorm":
      parts[-1] = "scale"
    else:
      parts[-1], transpose = "kernel", True
  return tuple(parts), layer, transpose


def path_to_official(path: tuple[str, ...], layer: int | None = None) -> str:
  """Inverse of official_to_path for one (unstacked) parameter."""
  parts = list(path)
  leaf, owner = parts[-1], parts[-2]
  parts[-1] = {"embedding": "weight", "scale": "weight", "kernel": "weight"}.get(leaf, leaf)
  if parts[0] in _SEQUENTIAL and len(parts) == 3:
    inv = {v: k for k, v in _SEQUENTIAL[parts[0]].items()}
    parts = [parts[0], "net", inv[owner], parts[-1]]
  parts = ["self" if p == "self_attn" else p for p in parts]
  if parts[:3] == ["uniter", "encoder", "layer"]:
    parts = parts[:3] + [str(layer)] + parts[3:]
  return ".".join(parts)


def state_dict_to_pure(state_dict: Mapping[str, Any], num_layers: int
                       ) -> tuple[dict, list[str]]:
  """Official state dict -> a nested pure dict of our parameters, plus the names skipped."""
  pure: dict = {}
  stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  skipped = []
  for name, value in state_dict.items():
    if name in TIED or name.startswith(IGNORED_PREFIXES):
      skipped.append(name)
      continue
    arr = np.asarray(value, dtype=np.float32)
    path, layer, transpose = official_to_path(name)
    if transpose:
      arr = arr.T
    if layer is None:
      _set(pure, path, arr)
    else:
      stacked.setdefault(path, {})[layer] = arr
  for path, by_layer in stacked.items():
    missing = [i for i in range(num_layers) if i not in by_layer]
    if missing or len(by_layer) != num_layers:
      raise ValueError(f"encoder tensor {path_to_official(path, 0)}: layers {sorted(by_layer)} "
                       f"found, the model has {num_layers}")
    _set(pure, path, np.stack([by_layer[i] for i in range(num_layers)]))
  return pure, skipped


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def from_official_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A batch in the official collate layout (compact, `gather_index`) -> our batch fields.

  Text lengths come from `gather_index` (the first position that points into the region
  block) and region counts from `attn_masks`, so no auxiliary field is needed. Targets
  given for the masked positions only (`feat_targets`, `label_targets`) are scattered to
  dense (B, Li, ...) arrays in row-major order of `img_masks`, as the collate built them.
  """
  ids = np.asarray(batch["input_ids"])
  b, lt = ids.shape
  img_feat = np.asarray(batch["img_feat"], np.float32)
  li = img_feat.shape[1]
  attn = np.asarray(batch["attn_masks"]).astype(bool)
  gather = np.asarray(batch["gather_index"])
  total = attn.sum(1)
  in_img = (gather >= lt) & attn
  txt_len = np.where(in_img.any(1), in_img.argmax(1), total)
  num_bb = total - txt_len
  out = {
      "input_ids": ids.astype(np.int32),
      "txt_mask": np.arange(lt)[None] < txt_len[:, None],
      "img_feat": img_feat,
      "img_pos": np.asarray(batch["img_pos_feat"], np.float32),
      "img_mask": np.arange(li)[None] < num_bb[:, None],
  }
  for ours, theirs in (("txt_type_ids", "txt_type_ids"), ("img_type_ids", "img_type_ids")):
    if theirs in batch:
      out[ours] = np.asarray(batch[theirs], np.int32)
  if "txt_labels" in batch:
    out["txt_labels"] = np.asarray(batch["txt_labels"], np.int32)
  if "img_masks" in batch:
    masked = np.asarray(batch["img_masks"]).astype(bool)
    out["img_masked"] = masked
    for key in ("feat_targets", "label_targets"):
      if key in batch:
        rows = np.asarray(batch[key], np.float32)
        dense = np.zeros((b, li, rows.shape[-1]), np.float32)
        dense[masked] = rows
        out[key] = dense
  if "targets" in batch:
    t = np.asarray(batch["targets"])
    out["itm_targets" if t.ndim == 1 else "targets"] = (
        t.astype(np.int32) if t.ndim == 1 else t.astype(np.float32))
  return out
