"""Official UNITER LMDBs (img_db and txt_db) -> one dataset folder.

    python -m data_prep.uniter_db --img-db img_db/coco_train2014 \\
        --txt-db txt_db/pretrain_coco_train.db --out data/coco_train

img_db: an LMDB of per-image arrays (features, norm_bb, conf, soft_labels) keyed by the npz
file name, each value either an .npz (the `*_compressed` DBs) or a msgpack dict of msgpack-numpy
arrays. `--img-db` may point at the LMDB itself or at the folder holding one (all_compressed,
feat_th0.2_max100_min10, feat_numbb100, ...; pick with --db-name when there are several). The
box policy defaults to the one in the DB name (feat_th0.2_max100_min10 -> 0.2, 10, 100;
feat_numbb100 -> 100 boxes), else the official 0.2 / 10 / 100.

txt_db: an LMDB of lz4-compressed msgpack dicts keyed by example id, with meta.json (special ids,
tokenizer name), txt2img.json, img2txts.json, id2len.json. Every key of an example other than
input_ids and img_fname becomes a task field (nested dicts flattened: target.labels,
target.scores); fields whose values are not ints, floats, strings or flat lists of them are
dropped and listed. Image ids drop the ".npz" suffix in both DBs, so they still match.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Iterator

import numpy as np

from data_prep import common
from uniter_jax import pytree
from uniter_jax.data import format as fmt
from uniter_jax.data.boxes import BoxPolicy


def _np_hook(obj):
  """Decodes msgpack-numpy's array encoding ({'nd': True, 'type', 'shape', 'data'}) without the package."""
  if not isinstance(obj, dict):
    return obj
  get = lambda k: obj.get(k, obj.get(k.encode()))  # noqa: E731  (old msgpack-numpy uses bytes keys)
  nd = get("nd")
  if nd is None or get("data") is None or get("type") is None:
    return obj
  dtype = get("type")
  dtype = np.dtype(dtype.decode() if isinstance(dtype, bytes) else dtype)
  if nd:
    return np.frombuffer(get("data"), dtype=dtype).reshape(get("shape")).copy()
  return np.frombuffer(get("data"), dtype=dtype)[0]


def decode_value(value: bytes, where: str) -> dict:
  """One img_db value (npz or msgpack) -> dict of arrays."""
  import msgpack  # pylint: disable=g-import-not-at-top

  if value[:2] == b"PK":  # a zip archive: np.savez / savez_compressed
    with np.load(io.BytesIO(value), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  try:
    out = msgpack.unpackb(value, raw=False, object_hook=_np_hook, strict_map_key=False)
  except Exception as e:  # msgpack raises several types for corrupt input
    raise fmt.DataError(f"{where}: value is neither an npz nor a msgpack dict ({type(e).__name__}: {e})") from None
  return {(k.decode() if isinstance(k, bytes) else k): v for k, v in out.items()}


def find_img_lmdb(img_db: str, db_name: str | None) -> str:
  """The LMDB folder inside an official img_db directory."""
  if db_name:
    path = os.path.join(img_db, db_name)
    if not os.path.exists(os.path.join(path, "data.mdb")):
      raise fmt.DataError(f"{path} is not an LMDB (no data.mdb); list {img_db} for the DB names it has")
    return path
  if os.path.exists(os.path.join(img_db, "data.mdb")):
    return img_db
  found = sorted(d for d in os.listdir(img_db) if os.path.exists(os.path.join(img_db, d, "data.mdb")))
  if len(found) != 1:
    raise fmt.DataError(
        f"{img_db} holds {len(found)} LMDBs ({found}); pick one with --db-name" if found else
        f"{img_db} holds no LMDB (no data.mdb in it or in a subfolder); pass the img_db folder"
    )
  return os.path.join(img_db, found[0])


def policy_from_name(name: str) -> BoxPolicy | None:
  """The box policy an official DB name encodes, if any."""
  m = re.match(r"feat_th([-0-9.]+)_max(\d+)_min(\d+)", name)
  if m:
    return BoxPolicy(conf_th=float(m.group(1)), max_bb=int(m.group(2)), min_bb=int(m.group(3)))
  m = re.match(r"feat_numbb(\d+)", name)
  if m:
    return BoxPolicy(num_bb=int(m.group(1)))
  return None


def _open(path: str):
  import lmdb  # pylint: disable=g-import-not-at-top

  return lmdb.open(path, readonly=True, create=False, lock=False, readahead=False, subdir=True)


def read_img_db(path: str, soft_labels: bool = True) -> Iterator[dict]:
  """Yields image records from an official image LMDB."""
  env = _open(path)
  with env.begin(buffers=False) as txn:
    for key, value in txn.cursor():
      name = key.decode("utf-8")
      if name == "__keys__":
        continue
      where = f"{path} key {name!r}"
      d = decode_value(value, where)
      for k in ("features", "norm_bb"):
        if k not in d:
          raise fmt.DataError(f"{where}: no {k!r} array (has {sorted(d)}); not an official img_db")
      rec = {
          "image_id": common.strip_npz(name),
          "features": np.asarray(d["features"]),
          "norm_bb": np.asarray(d["norm_bb"], np.float32),
          "conf": None if d.get("conf") is None else np.asarray(d["conf"], np.float32),
      }
      if soft_labels and d.get("soft_labels") is not None:
        rec["soft_labels"] = np.asarray(d["soft_labels"])
      yield rec
  env.close()


def _flatten(d: dict) -> dict:
  """Nested metadata -> dotted keys with JSON-ready values."""
  return {k: v.tolist() if isinstance(v, np.ndarray) else v
          for k, v in pytree.flatten(d, sep=".").items()}


def _field_type(v) -> str | None:
  if isinstance(v, bool) or isinstance(v, (int, np.integer)):
    return "int"
  if isinstance(v, (float, np.floating)):
    return "float"
  if isinstance(v, str):
    return "str"
  if isinstance(v, (list, tuple)):
    if all(isinstance(x, str) for x in v):
      return "str_list"
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v):
      return "int_list"
    if all(isinstance(x, (int, float, np.integer, np.floating)) for x in v):
      return "float_list"
  return None


_PROMOTE = {("int", "float"): "float", ("int_list", "float_list"): "float_list"}


def _merge_type(a: str | None, b: str | None) -> str | None:
  if a == b or b is None and a is not None:
    return a
  if a is None:
    return b
  if a in ("str_list", "int_list", "float_list") and b in ("str_list", "int_list", "float_list") and "str_list" not in (a, b):
    return "float_list"
  return _PROMOTE.get((a, b)) or _PROMOTE.get((b, a)) or "mixed"


def read_txt_db(path: str) -> tuple[dict, dict, Iterator[dict]]:
  """(meta.json, field types, iterator of text records) of an official text LMDB."""
  import lz4.frame  # pylint: disable=g-import-not-at-top
  import msgpack  # pylint: disable=g-import-not-at-top

  meta_path = os.path.join(path, "meta.json")
  if not os.path.exists(meta_path):
    raise fmt.DataError(f"{meta_path} not found; --txt-db must be an official txt_db folder")
  with open(meta_path) as f:
    meta = json.load(f)
  txt2img = {}
  if os.path.exists(os.path.join(path, "txt2img.json")):
    with open(os.path.join(path, "txt2img.json")) as f:
      txt2img = json.load(f)

  def decode(key: bytes, value: bytes) -> dict:
    where = f"{path} key {key.decode('utf-8', 'replace')!r}"
    try:
      d = msgpack.unpackb(lz4.frame.decompress(value), raw=False, object_hook=_np_hook, strict_map_key=False)
    except Exception as e:  # lz4 and msgpack raise several types for corrupt input
      raise fmt.DataError(f"{where}: not an lz4-compressed msgpack record ({type(e).__name__}: {e})") from None
    return _flatten(d)

  # Field types from a sample (ints that are floats elsewhere get promoted).
  types: dict[str, str | None] = {}
  env = _open(path)
  with env.begin() as txn:
    for i, (key, value) in enumerate(txn.cursor()):
      if i >= 2000:
        break
      for k, v in decode(key, value).items():
        if k not in ("input_ids", "img_fname"):
          types[k] = _merge_type(types.get(k), _field_type(v)) if k in types else _field_type(v)
  kept = {k: t for k, t in types.items() if t not in (None, "mixed")}
  dropped = sorted(set(types) - set(kept))

  def records() -> Iterator[dict]:
    with env.begin() as txn:
      for key, value in txn.cursor():
        tid = key.decode("utf-8")
        d = decode(key, value)
        img = d.get("img_fname", txt2img.get(tid))
        if img is None:
          raise fmt.DataError(f"{path} key {tid!r}: no img_fname and no txt2img entry; the txt_db is incomplete")
        imgs = [img] if isinstance(img, str) else list(img)
        rec = {"id": tid, "image_id": [common.strip_npz(x) for x in imgs], "input_ids": list(d.get("input_ids", []))}
        if len(imgs) == 1:
          rec["image_id"] = rec["image_id"][0]
        for k in kept:
          if k not in d:
            raise fmt.DataError(f"{path} key {tid!r}: lacks field {k!r} that other records have")
          rec[k] = d[k]
        yield rec
    env.close()

  meta["_dropped_fields"] = dropped
  return meta, kept, records()


def tokenizer_info(meta: dict, vocab: str | None) -> dict:
  """Tokenizer description for the manifest from meta.json (and the vocab file when given)."""
  info = {
      "kind": "official_txt_db",
      "name": meta.get("bert", meta.get("toker")),
      "cls_id": meta["CLS"], "sep_id": meta["SEP"], "mask_id": meta["MASK"], "unk_id": meta.get("UNK"),
      "v_range": meta.get("v_range"),
  }
  if meta.get("v_range"):
    info["vocab_size"] = meta["v_range"][1]
  if vocab:
    tok = common.load_tokenizer(vocab, lowercase="uncased" in str(info["name"] or ""))
    for k in ("cls_id", "sep_id", "mask_id"):
      if info[k] != getattr(tok, k):
        raise fmt.DataError(f"--vocab {vocab}: {k} is {getattr(tok, k)}, the txt_db's meta.json says {info[k]}; wrong vocab")
    info.update(vocab_hash=tok.vocab_hash, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
  return info


def main(argv: list[str] | None = None) -> dict:
  parser = common.make_parser("data_prep.uniter_db", __doc__)
  parser.add_argument("--img-db", default=None, help="official img_db folder (or the LMDB inside it)")
  parser.add_argument("--db-name", default=None, help="LMDB name inside --img-db (e.g. feat_th0.2_max100_min10)")
  parser.add_argument("--txt-db", nargs="*", default=[], help="official txt_db folder(s); their texts go to --out too")
  parser.add_argument("--vocab", default=None, help="the BERT vocab.txt the txt_db used (records its hash; optional)")
  parser.add_argument("--no-soft-labels", action="store_true", help="do not store soft_labels (saves 1601 x 2 bytes per box)")
  common.add_box_args(parser)
  common.add_output_args(parser)
  args = parser.parse_args(argv)
  if not args.img_db and not args.txt_db:
    parser.error("give --img-db and/or --txt-db")
  common.check_out(args.out, args.overwrite,
                   inputs=[p for p in (args.img_db, *args.txt_db, args.vocab) if p])

  images, policy, extraction = None, None, {"source_format": "uniter_img_db"}
  if args.img_db:
    lmdb_path = find_img_lmdb(args.img_db, args.db_name)
    name = os.path.basename(os.path.normpath(lmdb_path))
    policy = common.box_policy(args, policy_from_name(name))
    images = read_img_db(lmdb_path, soft_labels=not args.no_soft_labels)
    extraction.update(db=name, detector="BUTD Faster R-CNN R101 (VG 1600 classes), per the official release")

  texts, tokenizer, fields = None, None, {}
  metas = []
  readers = []
  for path in args.txt_db:
    meta, types, recs = read_txt_db(path)
    if meta["_dropped_fields"]:
      print(f"{path}: dropping fields of unsupported type {meta['_dropped_fields']}", file=sys.stderr)
    info = tokenizer_info(meta, args.vocab)
    if tokenizer is not None and (info["cls_id"], info["sep_id"]) != (tokenizer["cls_id"], tokenizer["sep_id"]):
      raise fmt.DataError(f"{path}: special ids differ from {args.txt_db[0]}; convert the text DBs separately")
    if metas and types != fields:
      raise fmt.DataError(f"{path}: fields {types} differ from {args.txt_db[0]}'s {fields}; convert them separately")
    tokenizer, fields = info, types
    metas.append({k: v for k, v in meta.items() if not k.startswith("_")})
    readers.append(recs)
  if readers:
    texts = (r for recs in readers for r in recs)

  manifest = fmt.write_dataset(
      args.out, images=images, texts=texts, overwrite=args.overwrite, skip_bad=args.skip_bad,
      shard_mb=args.shard_mb, box_policy=policy, tokenizer=tokenizer, text_fields=fields,
      source="data_prep.uniter_db", extraction=common.extraction(args, extraction),
      extra={"source": {"img_db": args.img_db, "db_name": args.db_name, "txt_db": args.txt_db, "txt_meta": metas}},
  )
  common.print_summary(manifest, args.out)
  return manifest


if __name__ == "__main__":
  sys.exit(common.run_cli(main))
