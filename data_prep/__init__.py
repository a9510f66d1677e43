"""Converters from the region-feature and caption formats users already have to our dataset format.

Each is a module runnable as `python -m data_prep.NAME --help`:
  butd_tsv    bottom-up-attention TSV (BUTD / LXMERT columns, base64 float32) -> image shards
  uniter_db   official UNITER img_db LMDB (+ txt_db LMDBs) -> image (+ text) shards
  npz_dir     a folder of per-image .npz files (features, norm_bb, conf, soft_labels) -> image shards
  captions    COCO captions JSON or JSONL {image_id, caption} + a BERT vocab -> text shards
  vqa         VQA v2 questions + annotations (or Visual Genome QA) + a BERT vocab -> VQA text shards
  snli_ve     SNLI-VE jsonl + a BERT vocab -> visual entailment text shards (one image per text)
  nlvr2       NLVR2 JSON lines + a BERT vocab -> two-image text shards (left, right)
common.py holds what they share. From the command line an input mistake is one `error: ...` line
on stderr and exit status 1 (argparse's usage errors: status 2). The format is described in
docs/data_format.md.
"""
