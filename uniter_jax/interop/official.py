"""Official UNITER (PyTorch) parameter names and batch layout <-> ours.

Name mapping (docs/official.md, *Parameter names*): torch Linear `weight` (out, in) is our `kernel`
(in, out); LayerNorm `weight` is `scale`; Embedding `weight` is `embedding`. Encoder layers
`encoder.layer.{l}.*` are stacked on a leading axis of `encoder.layer.*`; `attention.self`
is `attention.self_attn`. In the nn.Sequential heads (SEQUENTIAL_HEADS), `net.0` / `.0` is
`dense`, `net.2` / `.2` is `LayerNorm` and `net.3` / `.3` is `classifier`. The tied tensors
`cls.predictions.decoder.weight` and `feat_regress.weight` are the word embedding and
img_linear weight: stored once here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from uniter_jax import pytree

# Official aliases of tied tensors -> the canonical tensor they equal.
TIED = {
    "cls.predictions.decoder.weight": "uniter.embeddings.word_embeddings.weight",
    "feat_regress.weight": "uniter.img_embeddings.img_linear.weight",
}
# Official tensors that no UNITER forward uses: BERT's NSP head and the position-id buffer
# that newer BERT checkpoints carry.
IGNORED_PREFIXES = ("cls.seq_relationship.", "uniter.embeddings.position_ids")

# nn.Sequential heads: official module name -> (container inside it, index -> our name).
# `feat_regress.net.0.weight` is `feat_regress/dense/kernel`; `vqa_output.3.weight` is
# `vqa_output/classifier/kernel`. Task heads add themselves with register_sequential_head.
SEQUENTIAL_HEADS: dict[str, tuple[str, dict[str, str]]] = {
    "feat_regress": ("net", {"0": "dense", "2": "LayerNorm"}),
    "region_classifier": ("net", {"0": "dense", "2": "LayerNorm", "3": "classifier"}),
    "vqa_output": ("", {"0": "dense", "2": "LayerNorm", "3": "classifier"}),
    # NLVR2 paired-attn: `fc.0.*` (Linear(2H, H) -> ReLU -> Dropout) and `attn_pool.fc.0.*`.
    "fc": ("", {"0": "dense"}),
    "attn_pool": ("fc", {"0": "dense"}),
    # RE with mlp=2 (`re_output.{0,2,3}.*`); with mlp=1 `re_output.weight` is a plain Linear.
    "re_output": ("", {"0": "dense", "2": "LayerNorm", "3": "classifier"}),
    "vcr_output": ("", {"0": "dense", "2": "LayerNorm", "3": "classifier"}),
}
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings",
               "mask_embedding")


def register_sequential_head(name: str, indices: Mapping[str, str], container: str = ""
                             ) -> None:
  """Declares an official nn.Sequential head `name[.container].{i}.*` -> `name/indices[i]/*`."""
  SEQUENTIAL_HEADS[name] = (container, dict(indices))


def _is_layer_norm(owner: str) -> bool:
  return owner == "LayerNorm" or owner.endswith("layer_norm")


def official_to_path(name: str) -> tuple[tuple[str, ...], int | None, bool]:
  """Official tensor name -> (our parameter path, layer index or None, transpose?)."""
  name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))  # old BERT
  parts = name.split(".")
  layer = None
  if parts[:3] == ["uniter", "encoder", "layer"] and len(parts) > 3 and parts[3].isdigit():
    layer = int(parts[3])
    parts = parts[:3] + parts[4:]
  parts = ["self_attn" if p == "self" else p for p in parts]
  if parts[0] in SEQUENTIAL_HEADS:
    container, indices = SEQUENTIAL_HEADS[parts[0]]
    rest = parts[1:]
    if container and rest[:1] == [container]:
      rest = rest[1:]
    elif container:
      rest = None
    if rest is not None and len(rest) == 2 and rest[0] in indices:
      parts = [parts[0], indices[rest[0]], rest[1]]
  owner = parts[-2] if len(parts) > 1 else ""
  transpose = False
  if parts[-1] == "weight":
    if owner in _EMBEDDINGS:
      parts[-1] = "embedding"
    elif _is_layer_norm(owner):
      parts[-1] = "scale"
    else:
      parts[-1], transpose = "kernel", True
  return tuple(parts), layer, transpose


def path_to_official(path: tuple[str, ...], layer: int | None = None) -> str:
  """Inverse of official_to_path for one (unstacked) parameter."""
  parts = list(path)
  leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
  parts[-1] = {"embedding": "weight", "scale": "weight", "kernel": "weight"}.get(leaf, leaf)
  if parts[0] in SEQUENTIAL_HEADS and len(parts) == 3:
    container, indices = SEQUENTIAL_HEADS[parts[0]]
    inv = {v: k for k, v in indices.items()}
    if owner in inv:
      parts = [parts[0]] + ([container] if container else []) + [inv[owner], parts[-1]]
  parts = ["self" if p == "self_attn" else p for p in parts]
  if parts[:3] == ["uniter", "encoder", "layer"]:
    if layer is None:
      raise ValueError(f"encoder parameter {'/'.join(path)} needs a layer index")
    parts = parts[:3] + [str(layer)] + parts[3:]
  return ".".join(parts)


def is_stacked(path: tuple[str, ...]) -> bool:
  """True for encoder parameters, which we stack on a leading layer axis."""
  return tuple(path[:3]) == ("uniter", "encoder", "layer")


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


def _np(value: Any, dtype=None) -> np.ndarray:
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu().numpy()
  return np.asarray(value) if dtype is None else np.asarray(value).astype(dtype)


def _check(cond: bool, what: str) -> None:
  if not cond:
    raise ValueError(f"from_official_batch: {what}")


def _itr_broadcast(batch: dict) -> dict:
  """Hard-negative retrieval batches hold one caption (from text) or one image (from image)
  for all rows (train_itm_hard_negatives.py expands it in the model): repeat it per row."""
  rows = _np(batch["attn_masks"]).shape[0]
  out = dict(batch)
  for key in ("input_ids", "img_feat", "img_pos_feat"):
    arr = _np(batch[key])
    if arr.shape[0] == 1 and rows > 1:
      out[key] = np.repeat(arr, rows, axis=0)
  return out


def from_official_batch(batch: Mapping[str, Any], *, task: str | None = None,
                        variant: str | None = None, validate: bool = True
                        ) -> dict[str, np.ndarray]:
  """A batch in the official collate layout (compact, `gather_index`) -> our batch fields.

  Accepts NumPy arrays or CPU torch tensors, nested (`batch["ot_inputs"]["txt_pad"]`) or
  dotted (`batch["ot_inputs.txt_pad"]`, as in an .npz) keys. Text lengths come from
  `gather_index` (the first position that points into the region block) and region counts
  from `attn_masks`. Targets given for the masked positions only (`feat_targets`,
  `label_targets`) are scattered to dense (B, Li, ...) arrays in row-major order of
  `img_masks`, as the collate built them. `targets` becomes `itm_targets` when it is (B,)
  (ITM) and stays `targets` when it is (B, num_answers) (VQA / VE soft scores).

  With `validate` (default) the redundant official fields are checked against the layout
  derived here (gather_index, position_ids, img_mask_tgt, ot_inputs pads), so a batch in
  some other layout fails loudly instead of giving silently wrong outputs.

  task="nlvr2" returns the pair layout every NLVR2 variant reads (uniter_jax.models.nlvr2):
  one text row per example and an image axis of 2 (`img_feat` (n, 2, Li, D), `img_mask`,
  `img_pos`, `img_type_ids`), `targets` (n,) int. A paired batch (nlvr2_paired_collate: 2n
  rows, row 2i left, 2i+1 right) and a triplet batch (one row, the left image's regions
  typed 1 then the right's typed 2) are told apart by the number of targets, or by
  `variant` when the batch has none.

  task="re" (re_collate / re_eval_collate): `targets` (n,) int region indices; `obj_masks`
  (padding True) is checked against the region counts. task="vcr" (vcr_collate): one row per
  (question, choice) with its `txt_type_ids`, `targets` (n,) int (1 = the right choice).

  task="itr" (itm_rank_collate, the hard-negative datasets): one row per pair and
  `sample_size` (int) when the batch has it; a caption or image given once (hard-negative
  layouts) is repeated over the rows.
  """
  batch = pytree.flatten(batch, sep=".", drop_none=True)
  if task == "itr":
    batch = _itr_broadcast(batch)
  ids = _np(batch["input_ids"])
  b, lt = ids.shape
  img_feat = _np(batch["img_feat"], np.float32)
  li = img_feat.shape[1]
  attn = _np(batch["attn_masks"]).astype(bool)
  gather = _np(batch["gather_index"])
  total = attn.sum(1)
  in_img = (gather >= lt) & attn
  txt_len = np.where(in_img.any(1), in_img.argmax(1), total)
  num_bb = total - txt_len
  txt_mask = np.arange(lt)[None] < txt_len[:, None]
  img_mask = np.arange(li)[None] < num_bb[:, None]
  out = {
      "input_ids": ids.astype(np.int32),
      "txt_mask": txt_mask,
      "img_feat": img_feat,
      "img_pos": _np(batch["img_pos_feat"], np.float32),
      "img_mask": img_mask,
  }
  if validate:
    _check(bool(np.all(attn == (np.arange(attn.shape[1])[None] < total[:, None]))),
           "attn_masks must be 1 for each example's text and regions, then 0 (compact layout)")
    _check(bool(np.all(num_bb <= li)) and bool(np.all(txt_len <= lt)),
           f"lengths exceed the padded blocks (Lt={lt}, Li={li})")
    pos = np.arange(attn.shape[1])[None]
    want = np.where(pos < txt_len[:, None], pos, lt + pos - txt_len[:, None])
    _check(bool(np.all(np.where(attn, gather == want, True))),
           "gather_index does not map text then regions compactly "
           "(text i -> i, region j -> Lt + j)")
    if "position_ids" in batch:
      pids = _np(batch["position_ids"])
      _check(bool(np.all(pids == np.arange(pids.shape[-1]))),
             "position_ids must be 0..Lt-1 (text positions are implicit here)")
    if "ot_inputs.txt_pad" in batch:
      tp = _np(batch["ot_inputs.txt_pad"]).astype(bool)
      _check(tp.shape[1] <= lt and bool(np.all(tp == ~txt_mask[:, :tp.shape[1]])),
             "ot_inputs.txt_pad disagrees with the text lengths from gather_index")
    if "ot_inputs.img_pad" in batch:
      ip = _np(batch["ot_inputs.img_pad"]).astype(bool)
      _check(ip.shape[1] <= li and bool(np.all(ip == ~img_mask[:, :ip.shape[1]])),
             "ot_inputs.img_pad disagrees with the region counts from attn_masks")
  for key in ("txt_type_ids", "img_type_ids"):
    if key in batch:
      out[key] = _np(batch[key], np.int32)
  if "txt_labels" in batch:
    labels = _np(batch["txt_labels"], np.int32)
    if labels.shape[1] > lt:  # Labels padded to the joint length: regions are -1 there.
      labels = labels[:, :lt]
    out["txt_labels"] = labels
  if "img_masks" in batch:
    masked = _np(batch["img_masks"]).astype(bool)
    if masked.shape[1] < li:
      masked = np.pad(masked, ((0, 0), (0, li - masked.shape[1])))
    if validate:
      _check(not bool(np.any(masked & ~img_mask)), "img_masks marks padded regions")
      if "img_mask_tgt" in batch:
        tgt = _np(batch["img_mask_tgt"]).astype(bool)
        j = np.arange(tgt.shape[1])[None] - txt_len[:, None]
        want_tgt = (j >= 0) & (j < num_bb[:, None]) & np.take_along_axis(
            masked, np.clip(j, 0, li - 1), axis=1)
        _check(bool(np.all(tgt == want_tgt)),
               "img_mask_tgt disagrees with img_masks placed after each example's text")
    out["img_masked"] = masked
    for key in ("feat_targets", "label_targets"):
      if key in batch:
        rows = _np(batch[key], np.float32)
        _check(rows.shape[0] == masked.sum(),
               f"{key} has {rows.shape[0]} rows but img_masks marks {masked.sum()} regions")
        dense = np.zeros((b, li, rows.shape[-1]), np.float32)
        dense[masked] = rows
        out[key] = dense
  if task == "re":
    return _re_fields(batch, out, validate)
  if task == "vcr":  # vcr_collate: targets (n, 1), 1 = the right choice of that sequence
    if "targets" in batch:
      out["targets"] = _np(batch["targets"]).reshape(-1).astype(np.int32)
    return out
  if "targets" in batch:
    t = _np(batch["targets"])
    if t.ndim == 1:
      out["itm_targets"] = t.astype(np.int32)
    else:
      out["targets"] = t.astype(np.float32)
  if task == "nlvr2":
    return _nlvr2_pairs(out, variant)
  if task == "itr":
    if "sample_size" in batch:  # rows per group, column 0 the positive
      out["sample_size"] = int(_np(batch["sample_size"]))
    return out
  if task not in (None, "pretrain", "vqa", "ve"):
    raise ValueError(f"from_official_batch: unknown task {task!r}")
  return out


def _re_fields(batch: Mapping[str, Any], out: dict[str, np.ndarray], validate: bool
               ) -> dict[str, np.ndarray]:
  """RE (re_collate): `targets` (n, 1) region indices -> (n,) int; `obj_masks` checked."""
  if "obj_masks" in batch and validate:
    pad = _np(batch["obj_masks"]).astype(bool)
    li = out["img_mask"].shape[1]
    _check(pad.shape[1] <= li and bool(np.all(pad == ~out["img_mask"][:, :pad.shape[1]])),
           "obj_masks disagrees with the region counts from attn_masks")
  if "targets" in batch:
    t = _np(batch["targets"]).reshape(-1).astype(np.int32)
    _check(t.shape[0] == out["input_ids"].shape[0], f"RE: {t.shape[0]} targets for "
           f"{out['input_ids'].shape[0]} rows (re_collate gives one per expression)")
    out["targets"] = t
  return out


def _nlvr2_pairs(out: dict[str, np.ndarray], variant: str | None) -> dict[str, np.ndarray]:
  """Official NLVR2 rows (paired: 2n, triplet: n) -> one row per example, image axis of 2."""
  targets = out.pop("itm_targets", None)
  rows = out["input_ids"].shape[0]
  if targets is not None:
    _check(rows in (len(targets), 2 * len(targets)),
           f"NLVR2: {rows} rows for {len(targets)} targets (paired batches have 2 rows per "
           "target, triplet batches 1)")
    paired = rows == 2 * len(targets)
  elif variant is None:
    raise ValueError("from_official_batch(task='nlvr2'): a batch without targets needs "
                     "variant='triplet', 'paired' or 'paired-attn'")
  else:
    paired = variant != "triplet"
  res = {} if targets is None else {"targets": targets.astype(np.int32)}
  image_keys = [k for k in ("img_feat", "img_pos", "img_mask", "img_type_ids") if k in out]
  if paired:
    _check(rows % 2 == 0, f"NLVR2 paired: an odd number of rows ({rows})")
    for k in ("input_ids", "txt_mask", "txt_type_ids"):
      if k in out:
        _check(bool(np.array_equal(out[k][0::2], out[k][1::2])),
               f"NLVR2 paired: rows 2i and 2i+1 must hold the same statement ({k} differs)")
        res[k] = out[k][0::2]
    for k in image_keys:
      res[k] = out[k].reshape((rows // 2, 2) + out[k].shape[1:])
    return res
  _check("img_type_ids" in out, "NLVR2 triplet: img_type_ids (1 = left, 2 = right image) "
         "is needed to split the regions of the two images")
  types, mask = out["img_type_ids"], out["img_mask"]
  left, right = mask & (types == 1), mask & (types == 2)
  nl, nr = left.sum(1), right.sum(1)
  _check(bool(np.all(nl + nr == mask.sum(1))), "NLVR2 triplet: regions typed other than 1/2")
  li = int(max(nl.max(), nr.max(), 1))
  for k in ("input_ids", "txt_mask", "txt_type_ids"):
    if k in out:
      res[k] = out[k]
  for k in image_keys:
    arr = np.zeros((rows, 2, li) + out[k].shape[2:], out[k].dtype)
    for i in range(rows):
      _check(bool(left[i, :nl[i]].all() and right[i, nl[i]:nl[i] + nr[i]].all()),
             f"NLVR2 triplet row {i}: the left image's regions must come first")
      arr[i, 0, :nl[i]] = out[k][i, :nl[i]]
      arr[i, 1, :nr[i]] = out[k][i, nl[i]:nl[i] + nr[i]]
    res[k] = arr
  return res


def to_compact(txt: Any, img: Any, txt_mask: Any, img_mask: Any, length: int | None = None
               ) -> np.ndarray:
  """Our (B, Lt, ...) text block and (B, Li, ...) region block -> the official compact layout.

  Example i's text goes to positions 0..txt_len_i-1 and its regions (those where img_mask
  is True, in order) right after; the rest is zero. `length` defaults to max(txt_len + num_bb). Use it to compare per-position outputs
  (sequence_output, embedding_output, all_encoder_layers) with the official code.
  """
  txt, img = np.asarray(txt), np.asarray(img)
  txt_mask, img_mask = np.asarray(txt_mask, bool), np.asarray(img_mask, bool)
  tl, nb = txt_mask.sum(1), img_mask.sum(1)
  length = int((tl + nb).max()) if length is None else length
  out = np.zeros((txt.shape[0], length) + txt.shape[2:], np.result_type(txt, img))
  for i in range(txt.shape[0]):
    out[i, :tl[i]] = txt[i][txt_mask[i]]
    out[i, tl[i]:tl[i] + nb[i]] = img[i][img_mask[i]]
  return out
