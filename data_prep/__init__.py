"""Converters from the region-feature and caption formats users already have to our dataset format.

Each is a module runnable as `python -m data_prep.NAME --help`:
  butd_tsv    bottom-up-attention TSV (BUTD / LXMERT columns, base64 float32) -> image shards
  uniter_db   official UNITER img_db LMDB (+ txt_db LMDBs) -> image (+ text) shards
  npz_dir     a folder of per-image .npz files (features, norm_bb, conf, soft_labels) -> image shards
  captions    COCO captions JSON or JSONL {image_id, caption} + a BERT vocab -> text shards
The format is described in docs/data_format.md.
"""
