"""The on-disk dataset format: TFRecord shards of tf.train.Examples plus a JSON manifest.

Full description: docs/data_format.md. Writer API (used by data_prep/ and the synthetic data):

    from uniter_jax.data import format as fmt

    manifest = fmt.write_dataset(
        "out/coco_train",
        images=iter_of_image_records,    # optional
        texts=iter_of_text_records,      # optional
        overwrite=False,                 # refuse an existing folder unless True
        source="data_prep.butd_tsv",     # what made it (free text)
        extraction={"detector": "BUTD R101 VG"},  # how the features were made (free JSON)
        box_policy=BoxPolicy(),          # applied to every image; None keeps all boxes
        tokenizer=tok.info(),            # WordPieceTokenizer.info() or a dict with *_id keys
        skip_bad=False,                  # True: skip bad records, count them in the manifest
    )

or, streaming: `with fmt.DatasetWriter(out, ...) as w: w.add_image(rec); w.add_text(rec)`.
Writing goes to a temporary sibling folder that is renamed into place only when complete, so an
interrupted run leaves no half-written dataset.

Image record (dict):
  image_id: str (unique in the dataset; converters drop a trailing ".npz")
  features: (n, D) float array, stored as float16
  img_pos: (n, 7) float [x1, y1, x2, y2, w, h, w*h] normalised, or norm_bb: (n, 6) (area appended)
  conf: (n,) float detector confidence (optional: 1.0 when absent; boxes best-first)
  soft_labels: (n, C) float, optional (all images or none), stored as float16
  image_w, image_h: int, optional

Text record (dict):
  id: str or int (unique in the dataset)
  image_id: str, or a list of str for tasks with several images per text (NLVR2: 2)
  input_ids: list of int WordPiece ids WITHOUT [CLS]/[SEP] (the pipeline adds them)
  any other key: a task field, typed by its first value (or by `text_fields`): int, float,
    str, list of int, list of float, list of str. Every text must carry the same fields.

Readers: `iter_image_records(path)` and `iter_text_records(path)` yield NumPy dicts;
`read_manifest(path)` returns the manifest. TensorFlow is imported lazily, only by functions
that touch TFRecords, so importing this module stays TensorFlow-free.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from uniter_jax import files
from uniter_jax.data.boxes import BoxPolicy, img_pos_from_norm_bb

FORMAT_NAME = "uniter_jax.regions"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_INDEX = "image_index.json"
FIELD_TYPES = ("int", "float", "str", "int_list", "float_list", "str_list")
_RESERVED_TEXT_KEYS = ("id", "image_id", "image_ids", "input_ids")
# Written beside a dataset by data_prep.vqa before datasets listed their extra files.
_UNLISTED_FILES = ("ans2label.json",)


class DataError(ValueError):
  """Bad input data. The message names the file, the record and the fix."""


def _tf():
  """Imports TensorFlow on first use only (the model side must not pull it in)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # TF only parses and batches records here: its oneDNN kernels would only add a start-up
  # log line (printed whatever the log level) to every converter's output.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  for kind in ("GPU", "TPU"):  # The pipeline runs on CPU; keep TF off any accelerator JAX uses.
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass
  return tf


# ----------------------------------------------------------------------------------------------
# Writing.


def _bytes_feature(tf, values: list[bytes]):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _int_feature(tf, values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _float_feature(tf, values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _infer_field_type(name: str, value: Any) -> str:
  if isinstance(value, (bool, np.bool_)):
    return "int"
  if isinstance(value, (int, np.integer)):
    return "int"
  if isinstance(value, (float, np.floating)):
    return "float"
  if isinstance(value, str):
    return "str"
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    if not value:
      raise DataError(
          f"text field {name!r}: cannot infer a type from an empty list in the first record; "
          "pass text_fields={name: 'int_list' | 'float_list' | 'str_list'} to the writer"
      )
    if all(isinstance(v, str) for v in value):
      return "str_list"
    if any(isinstance(v, (float, np.floating)) for v in value):
      return "float_list"
    return "int_list"
  raise DataError(f"text field {name!r} has unsupported type {type(value).__name__}; use int, float, str or lists of them")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class DatasetWriter:
  """Streams image and text records into shards; `close()` publishes the folder atomically."""

  def __init__(
      self,
      out_dir: str | os.PathLike,
      *,
      overwrite: bool = False,
      source: str = "",
      extraction: dict | None = None,
      box_policy: BoxPolicy | None = None,
      tokenizer: dict | None = None,
      text_fields: dict[str, str] | None = None,
      skip_bad: bool = False,
      shard_mb: float = 256.0,
      texts_per_shard: int = 200_000,
      feat_dim: int | None = None,
      extra: dict | None = None,
  ):
    self.out_dir = os.path.abspath(os.fspath(out_dir))
    files.check_replaceable(self.out_dir, overwrite=overwrite, not_ours=not_our_dataset)
    self.tmp_dir = files.temp_dir_beside(self.out_dir)
    self._tf = _tf()
    self.overwrite = overwrite
    self.source = source
    self.extraction = dict(extraction or {})
    self.box_policy = box_policy
    self.tokenizer = dict(tokenizer) if tokenizer else None
    self.text_fields = dict(text_fields or {})
    for k, v in self.text_fields.items():
      if v not in FIELD_TYPES:
        raise ValueError(f"text field {k!r}: type {v!r} is not one of {FIELD_TYPES}")
    self.skip_bad = skip_bad
    self.shard_bytes = int(shard_mb * 2**20)
    self.texts_per_shard = texts_per_shard
    self.extra = dict(extra or {})
    self.feat_dim = feat_dim
    self.label_dim: int | None = None
    self.has_soft_labels: bool | None = None
    self.images_per_text: int | None = None
    self.skipped: dict[str, int] = {}
    self.skip_examples: dict[str, list[str]] = {}
    self._files: list[str] = []  # add_file's names, listed in the manifest
    self._unk_tokens = 0  # [UNK] ids in the texts (words the vocab cannot spell)
    self._texts_with_unk = 0
    # Per kind: list of finished shards, open writer, its record count and byte size.
    self._shards: dict[str, list[dict]] = {"images": [], "texts": []}
    self._writer: dict[str, Any] = {"images": None, "texts": None}
    self._count: dict[str, int] = {"images": 0, "texts": 0}
    self._bytes: dict[str, int] = {"images": 0, "texts": 0}
    self._image_ids: set[str] = set()
    self._text_ids: set[str] = set()
    self._index: list[dict] = []
    self._nbb: list[int] = []
    self._ntok: list[int] = []
    self._truncated_boxes = 0
    self._closed = False

  # -- context manager: an exception discards the temporary folder.
  def __enter__(self) -> "DatasetWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def abort(self) -> None:
    """Discards everything written so far."""
    for kind in ("images", "texts"):
      if self._writer[kind] is not None:
        self._writer[kind].close()
        self._writer[kind] = None
    shutil.rmtree(self.tmp_dir, ignore_errors=True)
    self._closed = True

  def _bad(self, reason: str, message: str, record_name: str) -> None:
    """Raises, or counts a skip when skip_bad is set."""
    if not self.skip_bad:
      raise DataError(message + " (or pass --skip-bad / skip_bad=True to skip such records; they are counted in the manifest)")
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    ex = self.skip_examples.setdefault(reason, [])
    if len(ex) < 10:
      ex.append(record_name)

  def _write(self, kind: str, example, index_entry: tuple | None = None) -> None:
    # deterministic=True: protobuf map order otherwise varies per process, and one input
    # should give byte-identical shards.
    if isinstance(example, self._tf.train.Example):
      data = example.SerializeToString(deterministic=True)
    else:  # an object with its own SerializeToString (subclass adapters)
      data = example.SerializeToString()
    w = self._writer[kind]
    if w is None:
      name = f"{kind}-{len(self._shards[kind]):05d}.tfrecord"
      w = self._tf.io.TFRecordWriter(os.path.join(self.tmp_dir, name))
      self._writer[kind] = w
      self._shards[kind].append({"file": name, "count": 0})
      if kind == "images":
        self._index.append({"file": name, "image_ids": [], "num_boxes": []})
    w.write(data)
    self._shards[kind][-1]["count"] += 1
    self._count[kind] += 1
    self._bytes[kind] += len(data) + 16  # TFRecord framing: 8 length + 2 x 4 CRC bytes.
    if index_entry is not None:
      self._index[-1]["image_ids"].append(index_entry[0])
      self._index[-1]["num_boxes"].append(index_entry[1])
    full = self._bytes[kind] >= self.shard_bytes if kind == "images" else (
        self._shards[kind][-1]["count"] >= self.texts_per_shard)
    if full:
      self._finish_shard(kind)

  def _finish_shard(self, kind: str) -> None:
    w = self._writer[kind]
    if w is None:
      return
    w.close()
    self._writer[kind] = None
    self._bytes[kind] = 0
    shard = self._shards[kind][-1]
    shard["bytes"] = os.path.getsize(os.path.join(self.tmp_dir, shard["file"]))

  # -- images.
  def add_image(self, rec: dict) -> bool:
    """Validates, applies the box policy and writes one image record; False if skipped."""
    tf = self._tf
    image_id = rec.get("image_id")
    if not isinstance(image_id, str) or not image_id:
      raise DataError(f"image record #{self._count['images']} has image_id {image_id!r}; image ids must be non-empty strings")
    where = f"image {image_id!r} (record #{self._count['images'] + sum(self.skipped.values())})"
    if image_id in self._image_ids:
      raise DataError(f"{where}: duplicate image_id; each image must appear once (deduplicate the input)")
    feats = np.asarray(rec["features"])
    if feats.ndim != 2:
      raise DataError(f"{where}: features have shape {feats.shape}, expected (num_boxes, feat_dim)")
    n, d = feats.shape
    if n == 0:
      self._bad("zero_boxes", f"{where}: has zero boxes", image_id)
      return False
    if self.feat_dim is None:
      self.feat_dim = d
    elif d != self.feat_dim:
      raise DataError(
          f"{where}: feature dim {d} differs from {self.feat_dim} of the earlier images; "
          "all images of a dataset need one feature dim (convert the odd source separately)"
      )
    if "img_pos" in rec and rec["img_pos"] is not None:
      pos = np.asarray(rec["img_pos"], np.float32)
      if pos.shape != (n, 7):
        raise DataError(f"{where}: img_pos has shape {pos.shape}, expected ({n}, 7)")
    elif "norm_bb" in rec and rec["norm_bb"] is not None:
      nb = np.asarray(rec["norm_bb"], np.float32)
      if nb.shape != (n, 6):
        raise DataError(f"{where}: norm_bb has shape {nb.shape}, expected ({n}, 6)")
      pos = img_pos_from_norm_bb(nb)
    else:
      raise DataError(f"{where}: needs img_pos (n, 7) or norm_bb (n, 6)")
    conf = rec.get("conf")
    conf = np.ones((n,), np.float32) if conf is None else np.asarray(conf, np.float32).reshape(-1)
    if conf.shape != (n,):
      raise DataError(f"{where}: conf has shape {conf.shape}, expected ({n},)")
    soft = rec.get("soft_labels")
    if self.has_soft_labels is None:
      self.has_soft_labels = soft is not None
    if (soft is not None) != self.has_soft_labels:
      raise DataError(
          f"{where}: soft_labels {'present' if soft is not None else 'missing'} unlike the earlier images; "
          "either every image has soft_labels or none"
      )
    if soft is not None:
      soft = np.asarray(soft)
      if soft.ndim != 2 or soft.shape[0] != n:
        raise DataError(f"{where}: soft_labels has shape {soft.shape}, expected ({n}, num_classes)")
      if self.label_dim is None:
        self.label_dim = soft.shape[1]
      elif soft.shape[1] != self.label_dim:
        raise DataError(f"{where}: soft_labels have {soft.shape[1]} classes, earlier images {self.label_dim}")

    keep = n if self.box_policy is None else self.box_policy.count(conf, n)
    if keep < n:
      self._truncated_boxes += 1
    feats, pos, conf = feats[:keep], pos[:keep], conf[:keep]
    if soft is not None:
      soft = soft[:keep]
    if keep == 0:
      self._bad("zero_boxes", f"{where}: has zero boxes", image_id)
      return False
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, reported below
      f16 = feats.astype(np.float16)
      soft16 = None if soft is None else np.asarray(soft).astype(np.float16)
    arrays = {"features": f16, "img_pos": pos, "conf": conf, "soft_labels": soft16}
    bad = [k for k, a in arrays.items() if a is not None and not np.isfinite(a).all()]
    if bad:
      what = " and ".join(bad)
      self._bad(
          "non_finite",
          f"{where}: NaN or inf in {what} (also values beyond float16 range, 65504); "
          "re-extract this image or drop it",
          image_id,
      )
      return False

    feat = {
        "image_id": _bytes_feature(tf, [image_id.encode("utf-8")]),
        "num_boxes": _int_feature(tf, [keep]),
        "feat_dim": _int_feature(tf, [d]),
        "features": _bytes_feature(tf, [f16.astype("<f2").tobytes()]),
        "img_pos": _bytes_feature(tf, [pos.astype("<f4").tobytes()]),
        "conf": _bytes_feature(tf, [conf.astype("<f4").tobytes()]),
    }
    if soft is not None:
      feat["soft_labels"] = _bytes_feature(tf, [np.asarray(soft, np.float16).astype("<f2").tobytes()])
    for k in ("image_w", "image_h"):
      if rec.get(k) is not None:
        feat[k] = _int_feature(tf, [rec[k]])
    self._image_ids.add(image_id)
    self._nbb.append(keep)
    self._write("images", tf.train.Example(features=tf.train.Features(feature=feat)), (image_id, keep))
    return True

  # -- texts.
  def add_text(self, rec: dict) -> bool:
    """Validates and writes one text record; False if skipped."""
    tf = self._tf
    tid = rec.get("id")
    if tid is None:
      raise DataError(f"text record #{self._count['texts']} has no 'id'")
    tid = str(tid)
    where = f"text {tid!r}"
    if tid in self._text_ids:
      raise DataError(f"{where}: duplicate text id; text ids must be unique in a dataset")
    img = rec.get("image_ids", rec.get("image_id"))
    image_ids = [img] if isinstance(img, str) else list(img or [])
    if not image_ids or not all(isinstance(x, str) and x for x in image_ids):
      raise DataError(f"{where}: image_id must be a non-empty string or a list of them, got {img!r}")
    if self.images_per_text is None:
      self.images_per_text = len(image_ids)
    elif len(image_ids) != self.images_per_text:
      raise DataError(
          f"{where}: has {len(image_ids)} image ids, earlier texts {self.images_per_text}; "
          "one dataset holds one number of images per text"
      )
    ids = np.asarray(rec.get("input_ids", []))
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      self._bad("empty_text", f"{where}: input_ids must be a non-empty list of ints, got {rec.get('input_ids')!r}", tid)
      return False
    vocab_size = (self.tokenizer or {}).get("vocab_size")
    if ids.min() < 0 or (vocab_size and ids.max() >= vocab_size):
      self._bad(
          "token_out_of_vocab",
          f"{where}: token id {int(ids.max()) if ids.min() >= 0 else int(ids.min())} outside the vocab "
          f"[0, {vocab_size}); tokenise with the vocab recorded for this dataset",
          tid,
      )
      return False
    feat = {
        "id": _bytes_feature(tf, [tid.encode("utf-8")]),
        "image_ids": _bytes_feature(tf, [x.encode("utf-8") for x in image_ids]),
        "input_ids": _int_feature(tf, ids.tolist()),
    }
    extras = {k: v for k, v in rec.items() if k not in _RESERVED_TEXT_KEYS}
    if self._count["texts"] == 0 and not self._text_ids:
      for k, v in extras.items():
        self.text_fields.setdefault(k, _infer_field_type(k, v))
    missing = sorted(set(self.text_fields) - set(extras))
    unknown = sorted(set(extras) - set(self.text_fields))
    if missing or unknown:
      raise DataError(
          f"{where}: fields differ from the first text (missing {missing}, new {unknown}); "
          "every text of a dataset must carry the same task fields"
      )
    for k, v in extras.items():
      feat["x:" + k] = self._encode_field(tf, where, k, self.text_fields[k], v)
    self._text_ids.add(tid)
    self._ntok.append(int(ids.size))
    unk_id = (self.tokenizer or {}).get("unk_id")
    if unk_id is not None:  # words the vocab cannot spell: counted, so a wrong vocab shows
      n_unk = int((ids == unk_id).sum())
      self._unk_tokens += n_unk
      self._texts_with_unk += n_unk > 0
    self._write("texts", tf.train.Example(features=tf.train.Features(feature=feat)))
    return True

  @staticmethod
  def _encode_field(tf, where: str, name: str, ftype: str, v: Any):
    try:
      if ftype == "int":
        if isinstance(v, (float, np.floating)) and not float(v).is_integer():
          raise TypeError
        return _int_feature(tf, [v])
      if ftype == "float":
        return _float_feature(tf, [v])
      if ftype == "str":
        if not isinstance(v, str):
          raise TypeError
        return _bytes_feature(tf, [v.encode("utf-8")])
      v = list(np.asarray(v).tolist()) if isinstance(v, np.ndarray) else list(v)
      if ftype == "int_list":
        if any(isinstance(x, (float, np.floating)) and not float(x).is_integer() for x in v):
          raise TypeError
        return _int_feature(tf, v)
      if ftype == "float_list":
        return _float_feature(tf, v)
      if not all(isinstance(x, str) for x in v):
        raise TypeError
      return _bytes_feature(tf, [x.encode("utf-8") for x in v])
    except (TypeError, ValueError):
      raise DataError(
          f"{where}: field {name!r} = {v!r} does not fit its type {ftype!r} (set by the first text or text_fields)"
      ) from None

  # -- publish.
  def close(self) -> dict:
    """Finishes the shards, writes the manifest and renames the folder into place."""
    if self._closed:
      raise RuntimeError("writer already closed")
    for kind in ("images", "texts"):
      self._finish_shard(kind)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "created_at": _now(),
        "created_by": self.source,
        "skipped": dict(self.skipped),
        "skipped_examples": dict(self.skip_examples),
    }
    manifest.update(self.extra)
    if self._count["images"]:
      nbb = np.asarray(self._nbb)
      manifest["images"] = {
          "count": self._count["images"],
          "feat_dim": self.feat_dim,
          "feature_dtype": "float16",
          "pos_dim": 7,
          "soft_labels": bool(self.has_soft_labels),
          "label_dim": self.label_dim,
          "box_policy": self.box_policy.to_json() if self.box_policy else {"kind": "keep_all"},
          "images_with_boxes_dropped_by_policy": self._truncated_boxes,
          "num_boxes": {"min": int(nbb.min()), "max": int(nbb.max()), "mean": round(float(nbb.mean()), 3)},
          "extraction": self.extraction,
          "index_file": IMAGE_INDEX,
          "shards": self._shards["images"],
      }
      with open(os.path.join(self.tmp_dir, IMAGE_INDEX), "w") as f:
        json.dump({"shards": self._index}, f)
    if self._count["texts"]:
      ntok = np.asarray(self._ntok)
      manifest["texts"] = {
          "count": self._count["texts"],
          "images_per_text": self.images_per_text,
          "fields": self.text_fields,
          "tokenizer": self.tokenizer,
          "num_tokens": {"min": int(ntok.min()), "max": int(ntok.max()), "mean": round(float(ntok.mean()), 3)},
          "unk_tokens": self._unk_tokens,
          "texts_with_unk": self._texts_with_unk,
          "shards": self._shards["texts"],
      }
    if not self._count["images"] and not self._count["texts"]:
      self.abort()
      raise DataError(
          f"nothing to write to {self.out_dir}: every record was skipped or the input was empty "
          f"(skipped: {self.skipped or 'none'}); check the input paths"
      )
    if self._files:
      manifest["files"] = list(self._files)
    with open(os.path.join(self.tmp_dir, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    # Publish: an existing folder is moved aside only now, so a failure above keeps the old data.
    try:
      files.publish_dir(self.tmp_dir, self.out_dir, overwrite=self.overwrite, not_ours=not_our_dataset)
    except BaseException:
      self.abort()
      raise
    self._closed = True
    return manifest

  def add_file(self, name: str, data: bytes) -> None:
    """Adds a file beside the shards (e.g. VQA's ans2label.json), published with the dataset."""
    if os.path.basename(name) != name or name in (MANIFEST, IMAGE_INDEX):
      raise ValueError(f"add_file: {name!r} must be a plain file name other than {MANIFEST} / {IMAGE_INDEX}")
    with open(os.path.join(self.tmp_dir, name), "wb") as f:
      f.write(data)
    self._files.append(name)


def not_our_dataset(path: str) -> str | None:
  """Why `path` is not a dataset folder this project wrote; None when it is (--overwrite may
  replace it): a folder with our manifest.json and only the files that manifest lists."""
  if not os.path.isdir(path):
    return "is not a folder"
  try:
    m = read_manifest(path)
  except DataError:
    return f"is not a dataset made by data_prep (no {FORMAT_NAME} {MANIFEST})"
  ours = {MANIFEST, m.get("images", {}).get("index_file", IMAGE_INDEX), *m.get("files", ()), *_UNLISTED_FILES}
  for kind in ("images", "texts"):
    ours.update(shard["file"] for shard in m.get(kind, {}).get("shards", ()))
  other = sorted(set(os.listdir(path)) - ours)
  if other:
    return f"holds files its {MANIFEST} does not list ({', '.join(other[:5])}{' ...' if len(other) > 5 else ''})"
  return None


def write_dataset(
    out_dir: str | os.PathLike,
    images: Iterable[dict] | None = None,
    texts: Iterable[dict] | None = None,
    **kwargs,
) -> dict:
  """Writes image and/or text records to `out_dir` atomically; returns the manifest.

  Keyword arguments are those of `DatasetWriter` (overwrite, source, extraction, box_policy,
  tokenizer, text_fields, skip_bad, shard_mb, texts_per_shard, feat_dim, extra).
  """
  with DatasetWriter(out_dir, **kwargs) as w:
    for rec in images or ():
      w.add_image(rec)
    for rec in texts or ():
      w.add_text(rec)
  return read_manifest(out_dir)


# ----------------------------------------------------------------------------------------------
# Reading.


def read_manifest(path: str | os.PathLike) -> dict:
  """Loads and checks `path/manifest.json`."""
  mpath = os.path.join(os.fspath(path), MANIFEST)
  if not os.path.exists(mpath):
    raise DataError(
        f"{mpath} not found: {path} is not a dataset folder, or its conversion did not finish "
        "(re-run the data_prep converter)"
    )
  with open(mpath) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{mpath} is not valid JSON ({e}); re-run the converter with --overwrite") from None
  if manifest.get("format") != FORMAT_NAME:
    raise DataError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
  if manifest.get("schema_version", 0) > SCHEMA_VERSION:
    raise DataError(
        f"{mpath}: schema version {manifest['schema_version']} is newer than this code reads "
        f"({SCHEMA_VERSION}); upgrade uniter_jax"
    )
  return manifest


def shard_paths(path: str | os.PathLike, kind: str, manifest: dict | None = None, check: bool = True) -> list[str]:
  """Absolute shard paths of `kind` ('images' or 'texts'), checked against the manifest sizes."""
  path = os.fspath(path)
  manifest = manifest or read_manifest(path)
  if kind not in manifest:
    raise DataError(f"{path} holds no {kind} (manifest has {[k for k in ('images', 'texts') if k in manifest]})")
  out = []
  for shard in manifest[kind]["shards"]:
    p = os.path.join(path, shard["file"])
    if check:
      if not os.path.exists(p):
        raise DataError(f"shard {p} listed in the manifest is missing; copy the whole dataset folder again")
      size = os.path.getsize(p)
      if "bytes" in shard and size != shard["bytes"]:
        raise DataError(
            f"shard {p} is {size} bytes but the manifest says {shard['bytes']}: truncated or modified; "
            "copy it again or re-run the converter with --overwrite"
        )
    out.append(p)
  return out


def _tf_reason(e) -> str:
  """TensorFlow's error text without its graph node names ('corrupted record at 191334')."""
  text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\bname: *$", "", e.message.splitlines()[0])
  return " ".join(text.split())


def _iter_examples(paths: list[str]) -> Iterator[tuple[str, int, Any]]:
  """(file, record number, tf.train.Example) over shards, with corrupt-shard errors named."""
  tf = _tf()
  for p in paths:
    i = 0
    try:
      for raw in tf.data.TFRecordDataset(p).as_numpy_iterator():
        yield p, i, tf.train.Example.FromString(raw)
        i += 1
    except tf.errors.DataLossError as e:
      raise DataError(
          f"shard {p} is corrupt or truncated at record {i} ({_tf_reason(e)}); "
          "copy it again or re-run the converter with --overwrite"
      ) from None


def _bytes(ex, key):
  return ex.features.feature[key].bytes_list.value


def _ints(ex, key):
  return ex.features.feature[key].int64_list.value


def decode_image_example(ex, where: str = "") -> dict:
  """A tf.train.Example of an image shard -> NumPy dict; a record that does not decode (missing
  field, wrong sizes) is a DataError naming `where`."""
  try:
    return _decode_image(ex, where)
  except (IndexError, ValueError, UnicodeDecodeError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{where}: not a valid image record ({e}); re-run the converter") from None


def check_image_shard(path: str, feat_dim: int | None = None) -> None:
  """Reads and decodes every record of one image shard (features `feat_dim`-d, the manifest's);
  a DataError names the file and the record of the first bad one."""
  for p, i, ex in _iter_examples([path]):
    where = f"shard {p} record {i}"
    d = decode_image_example(ex, where)["features"].shape[1]
    if feat_dim is not None and d != feat_dim:
      raise DataError(f"{where}: {d}-d features, the manifest says {feat_dim}-d; the shard does not "
                      "belong to this dataset, re-run the converter")


def _decode_image(ex, where: str) -> dict:
  n = _ints(ex, "num_boxes")[0]
  d = _ints(ex, "feat_dim")[0]
  feats = np.frombuffer(_bytes(ex, "features")[0], "<f2")
  if feats.size != n * d:
    raise DataError(f"{where}: {feats.size} feature values, expected {n} x {d}; re-run the converter")
  rec = {
      "image_id": _bytes(ex, "image_id")[0].decode("utf-8"),
      "num_boxes": n,
      "features": feats.reshape(n, d).astype(np.float16),
      "img_pos": np.frombuffer(_bytes(ex, "img_pos")[0], "<f4").reshape(n, 7).copy(),
      "conf": np.frombuffer(_bytes(ex, "conf")[0], "<f4").copy(),
  }
  rec["norm_bb"] = rec["img_pos"][:, :6]
  if "soft_labels" in ex.features.feature:
    rec["soft_labels"] = np.frombuffer(_bytes(ex, "soft_labels")[0], "<f2").reshape(n, -1).astype(np.float16)
  for k in ("image_w", "image_h"):
    if k in ex.features.feature:
      rec[k] = _ints(ex, k)[0]
  return rec


def iter_image_records(path: str | os.PathLike, feat_dim: int | None = None) -> Iterator[dict]:
  """Yields the image records of a dataset folder as NumPy dicts.

  Keys: image_id (str), num_boxes, features (n, D) float16, img_pos (n, 7) float32,
  norm_bb (n, 6) (a view of img_pos), conf (n,) float32, soft_labels (n, C) float16 when
  stored, image_w / image_h when stored. `feat_dim` (e.g. the model's img_dim) is checked.
  """
  manifest = read_manifest(path)
  mdim = manifest.get("images", {}).get("feat_dim")
  if feat_dim is not None and mdim != feat_dim:
    raise DataError(
        f"{path}: features are {mdim}-d (manifest) but {feat_dim}-d were asked for (model img_dim); "
        "use features from the matching extractor or set the model's img_dim to match"
    )
  for p, i, ex in _iter_examples(shard_paths(path, "images", manifest)):
    rec = decode_image_example(ex, f"{p} record {i}")
    if rec["features"].shape[1] != mdim:
      raise DataError(
          f"{p} record {i} (image {rec['image_id']!r}): feature dim {rec['features'].shape[1]} differs from "
          f"the manifest's {mdim}; the shard does not belong to this dataset, re-run the converter"
      )
    yield rec


def _decode_field(ex, key: str, ftype: str):
  f = ex.features.feature[key]
  if ftype == "int":
    return int(f.int64_list.value[0])
  if ftype == "float":
    return float(f.float_list.value[0])
  if ftype == "str":
    return f.bytes_list.value[0].decode("utf-8")
  if ftype == "int_list":
    return np.asarray(f.int64_list.value, np.int64)
  if ftype == "float_list":
    return np.asarray(f.float_list.value, np.float32)
  return [b.decode("utf-8") for b in f.bytes_list.value]


def iter_text_records(path: str | os.PathLike) -> Iterator[dict]:
  """Yields the text records of a dataset folder as NumPy dicts.

  Keys: id (str), image_id (str, or a list when texts have several images), image_ids
  (always a list), input_ids (int32 array, no [CLS]/[SEP]) and every task field.
  """
  manifest = read_manifest(path)
  fields = manifest["texts"]["fields"] if "texts" in manifest else {}
  for _, _, ex in _iter_examples(shard_paths(path, "texts", manifest)):
    image_ids = [b.decode("utf-8") for b in _bytes(ex, "image_ids")]
    rec = {
        "id": _bytes(ex, "id")[0].decode("utf-8"),
        "image_ids": image_ids,
        "image_id": image_ids[0] if len(image_ids) == 1 else image_ids,
        "input_ids": np.asarray(_ints(ex, "input_ids"), np.int32),
    }
    for k, t in fields.items():
      rec[k] = _decode_field(ex, "x:" + k, t)
    yield rec


def read_image_index(path: str | os.PathLike, manifest: dict | None = None) -> list[dict]:
  """The per-shard image ids and box counts (no feature bytes are read)."""
  manifest = manifest or read_manifest(path)
  ipath = os.path.join(os.fspath(path), manifest["images"].get("index_file", IMAGE_INDEX))
  with open(ipath) as f:
    index = json.load(f)["shards"]
  names = [s["file"] for s in manifest["images"]["shards"]]
  if [s["file"] for s in index] != names:
    raise DataError(f"{ipath} does not match the manifest's shard list; re-run the converter with --overwrite")
  return index


def _rows(x) -> list:
  """Rows of a ragged batch as the numpy iterator returns it (RaggedTensorValue or object array)."""
  return x.to_list() if hasattr(x, "to_list") else [list(r) for r in x]


def load_text_table(path: str | os.PathLike) -> dict:
  """All texts of a dataset as columns (fast, batched parse); used by the input pipeline.

  Returns {"ids": list[str], "image_ids": list[tuple[str, ...]], "input_ids": list of int32
  arrays, "fields": {name: list of values}, "manifest": manifest}.
  """
  tf = _tf()
  path = os.fspath(path)
  manifest = read_manifest(path)
  paths = shard_paths(path, "texts", manifest)
  fields = manifest["texts"]["fields"]
  spec = {
      "id": tf.io.FixedLenFeature([], tf.string),
      "image_ids": tf.io.RaggedFeature(tf.string),
      "input_ids": tf.io.RaggedFeature(tf.int64),
  }
  dtypes = {"int": tf.int64, "float": tf.float32, "str": tf.string}
  for k, t in fields.items():
    spec["x:" + k] = tf.io.RaggedFeature(dtypes[t.replace("_list", "")])
  out: dict[str, Any] = {"ids": [], "image_ids": [], "input_ids": [], "fields": {k: [] for k in fields}}
  for p in paths:
    ds = tf.data.TFRecordDataset(p).batch(8192).map(lambda s: tf.io.parse_example(s, spec))
    n = 0
    try:
      for b in ds.as_numpy_iterator():
        out["ids"].extend(x.decode("utf-8") for x in b["id"])
        out["image_ids"].extend(tuple(x.decode("utf-8") for x in row) for row in _rows(b["image_ids"]))
        out["input_ids"].extend(np.asarray(r, np.int32) for r in _rows(b["input_ids"]))
        for k, t in fields.items():
          col = _rows(b["x:" + k])
          if t == "str":
            out["fields"][k].extend(r[0].decode("utf-8") for r in col)
          elif t == "str_list":
            out["fields"][k].extend([x.decode("utf-8") for x in r] for r in col)
          elif t in ("int", "float"):
            out["fields"][k].extend(r[0] for r in col)
          else:
            out["fields"][k].extend(np.asarray(r) for r in col)
        n += len(b["id"])
    except tf.errors.DataLossError as e:
      raise DataError(
          f"shard {p} is corrupt or truncated near record {n} ({_tf_reason(e)}); "
          "copy it again or re-run the converter with --overwrite"
      ) from None
  out["manifest"] = manifest
  return out
