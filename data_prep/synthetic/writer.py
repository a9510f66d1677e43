"""Writes a generated world to disk in the project's dataset format, atomically.

Layout of DIR (docs/synthetic_world.md):
  images/synth_NNNNNN.png   rendered pictures
  img_db/                   region features of every image (uniter_jax.data format)
  txt/{task}_{split}/       text datasets (same format), VQA folders also hold ans2label.json
  vocab.txt                 the WordPiece vocab every text was tokenised with
  scenes.json               the kept scene description + detector output per image
  splits.json               image ids per split
  manifest.json             counts, chance and text-only baselines, generator version, seed;
                            written last: its presence marks a complete world
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from data_prep.synthetic import baselines, detector, featurizer, scene as scene_lib, world as world_lib
from data_prep.synthetic.tasks import lexicon, vqa
from uniter_jax import files
from uniter_jax.data import format as fmt
from uniter_jax.data.tokenizer import WordPieceTokenizer

GENERATOR = "data_prep.synthetic"
GENERATOR_VERSION = "1.0"
MANIFEST = "manifest.json"
TASKS = ("pretrain", "retrieval", "vqa", "nlvr2", "ve", "re", "vcr")
# Fields of each task's text records besides id / image_id / input_ids (docs/synthetic_world.md).
_FIELDS = {
    "pretrain": ("text",),
    "retrieval": ("text",),
    "vqa": ("question", "question_type", "answer", "answers", "labels", "scores"),
    "nlvr2": ("sentence", "target", "identifier", "template"),
    "ve": ("hypothesis", "target", "template"),
    "re": ("sent", "target", "obj", "bbox", "image_w", "image_h"),
    "vcr": ("question", "answers", "rationales", "input_ids_as", "lens_as", "input_ids_rs",
            "lens_rs", "qa_target", "qar_target", "kind", "tag_regions"),
}
_TEXT_KEY = {"pretrain": "text", "retrieval": "text", "vqa": "question", "nlvr2": "sentence",
             "ve": "hypothesis", "re": "sent", "vcr": "question"}
_TEXT_TYPES = {"scores": "float_list", "bbox": "float_list", "labels": "int_list",
               "lens_as": "int_list", "lens_rs": "int_list", "input_ids_as": "int_list",
               "input_ids_rs": "int_list", "tag_regions": "int_list", "answers": "str_list",
               "rationales": "str_list"}


class _Encoder:
  """tokenizer.encode with a per-word cache (BERT tokenises each whitespace word on its own)."""

  def __init__(self, tok: WordPieceTokenizer):
    self.tok = tok
    self.cache: dict[str, list[int]] = {}

  def __call__(self, text: str) -> list[int]:
    ids: list[int] = []
    for w in text.split():
      if w not in self.cache:
        self.cache[w] = self.tok.encode(w)
      ids.extend(self.cache[w])
    return ids


class _DeterministicExample:
  """Serialises a tf.train.Example with sorted map keys.

  tf.train.Features is a protobuf map, and the upb runtime orders map entries differently in
  every process unless asked for `deterministic=True`; without this, one seed would not give
  byte-identical shards.
  """

  def __init__(self, example):
    self.example = example

  def SerializeToString(self) -> bytes:  # pylint: disable=invalid-name
    return self.example.SerializeToString(deterministic=True)


class _Writer(fmt.DatasetWriter):
  """The project's DatasetWriter with deterministic record bytes (adapter; see above)."""

  def _write(self, kind, example, index_entry=None):
    super()._write(kind, _DeterministicExample(example), index_entry)


def _write_dataset(out: str, images=(), texts=(), **kwargs) -> None:
  with _Writer(out, **kwargs) as w:
    for rec in images:
      w.add_image(rec)
    for rec in texts:
      w.add_text(rec)


def _text_records(task: str, recs: list[dict], enc: _Encoder):
  for r in recs:
    r = dict(r)
    if task == "nlvr2" or task == "ve":
      r["target"] = r.pop("label")
    if task == "vcr":
      a_ids = [enc(a) for a in r["answers"]]
      r_ids = [enc(x) for x in r["rationales"]]
      r["input_ids_as"] = [i for x in a_ids for i in x]
      r["lens_as"] = [len(x) for x in a_ids]
      r["input_ids_rs"] = [i for x in r_ids for i in x]
      r["lens_rs"] = [len(x) for x in r_ids]
      r["tag_regions"] = r.pop("tags")
    out = {"id": r["id"], "image_id": r["image_id"], "input_ids": enc(r[_TEXT_KEY[task]])}
    out.update({k: r[k] for k in _FIELDS[task]})
    yield out


def _image_records(world: world_lib.World):
  for pic, feats in zip(world.pictures, world.features):
    reg = pic.regions
    yield {
        "image_id": pic.fname,
        "features": feats,
        "img_pos": detector.box_features(reg.boxes, pic.scene.width, pic.scene.height),
        "conf": reg.conf,
        "soft_labels": reg.soft_labels,
        "image_w": pic.scene.width,
        "image_h": pic.scene.height,
    }


def _scene_json(world: world_lib.World) -> dict:
  out = {}
  for pic in world.pictures:
    d = pic.scene.to_json()
    d["split"] = world.split_of[pic.fname]
    reg = pic.regions
    d["regions"] = [{"box": [round(float(v), 3) for v in b], "kind": k, "obj": o, "conf": round(float(c), 4)}
                    for b, k, o, c in zip(reg.boxes, reg.kind, reg.obj, reg.conf)]
    out[pic.fname] = d
  return out


def _json_dump(obj, path: str, compact: bool = False) -> None:
  with open(path, "w") as f:
    if compact:
      json.dump(obj, f, sort_keys=True, separators=(",", ":"))
    else:
      json.dump(obj, f, indent=1, sort_keys=True)


def config_json(cfg: world_lib.Config) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}


def write_world(tmp: str, cfg: world_lib.Config, workers: int = 1, log=print) -> dict:
  """Generates the world into the (new, empty) folder tmp; returns the manifest."""
  log(f"rendering {cfg.num_images} images (seed {cfg.seed}, img_dim {cfg.img_dim}) ...")
  t0 = time.time()
  world = world_lib.build_images(cfg, workers=workers)
  texts = world_lib.build_texts(world)
  log(f"  images and texts built in {time.time() - t0:.1f} s")

  os.makedirs(os.path.join(tmp, "images"))
  for pic, png in zip(world.pictures, world.pngs):
    with open(os.path.join(tmp, "images", pic.fname + ".png"), "wb") as f:
      f.write(png)
  vocab_path = os.path.join(tmp, "vocab.txt")
  with open(vocab_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lexicon.vocab_tokens()) + "\n")
  tok = WordPieceTokenizer(vocab_path)
  enc = _Encoder(tok)

  extraction = {
      "detector": "simulated (data_prep.synthetic.detector): jittered object boxes, part and "
                  "background boxes, Bayes-calibrated soft labels",
      "featurizer": "data_prep.synthetic.featurizer: hue/edge/mask-moment descriptors, fixed "
                    f"random projection (seed {featurizer.PROJ_SEED}) + ReLU",
      "classes": [scene_lib.class_name(i) for i in range(scene_lib.num_classes())],
  }
  log("writing img_db ...")
  _write_dataset(os.path.join(tmp, "img_db"), images=_image_records(world), source=GENERATOR,
                    extraction=extraction, box_policy=None, feat_dim=cfg.img_dim)
  counts = {}
  for name, recs in texts.items():
    task = name.split("_")[0]
    path = os.path.join(tmp, "txt", name)
    types = {k: _TEXT_TYPES[k] for k in _FIELDS[task] if k in _TEXT_TYPES}
    _write_dataset(path, texts=_text_records(task, recs, enc), source=GENERATOR,
                      tokenizer=tok.info(), text_fields=types)
    if task == "vqa":
      _json_dump(vqa.ans2label(), os.path.join(path, "ans2label.json"))
    counts[name] = len(recs)
  log(f"  wrote {sum(counts.values())} texts in {len(counts)} text datasets ({time.time() - t0:.1f} s)")
  _json_dump(_scene_json(world), os.path.join(tmp, "scenes.json"), compact=True)
  splits = {s: sorted(p.fname for p in world.split(s)) for s in world_lib.SPLITS}
  _json_dump(splits, os.path.join(tmp, "splits.json"))

  manifest = _manifest(cfg, world, texts, counts, tok)
  _json_dump(manifest, os.path.join(tmp, MANIFEST))
  return manifest


def _manifest(cfg, world, texts, counts, tok) -> dict:
  held_out = ("val", "test")

  def evals(task):
    return {s: texts.get(f"{task}_{s}", []) for s in held_out}

  nl = {k: [dict(r, target=r["label"]) for r in v] for k, v in texts.items() if k.startswith(("nlvr2", "ve"))}
  regions_of = {p.fname: [tuple(map(float, b)) for b in p.regions.boxes] for p in world.pictures}
  n_test = len(world.split("test"))
  tasks = {
      "pretrain": {"metric": "MLM / MRM / ITM losses"},
      "retrieval": {"metric": "recall@K", "splits": {
          "test": {"images": n_test, "chance": baselines.retrieval_chance(n_test, cfg.captions_per_image)}}},
      "vqa": baselines.vqa_baselines(texts["vqa_train"], evals("vqa")),
      "nlvr2": baselines.label_baselines(nl["nlvr2_train"], {s: nl[f"nlvr2_{s}"] for s in held_out}, 2),
      "ve": baselines.label_baselines(nl["ve_train"], {s: nl[f"ve_{s}"] for s in held_out}, 3),
      "re": baselines.re_baselines(evals("re"), regions_of.__getitem__),
      "vcr": baselines.vcr_baselines(texts["vcr_train"], evals("vcr")),
  }
  for task, d in tasks.items():
    d["datasets"] = {n: {"path": f"txt/{n}", "count": c}
                     for n, c in counts.items() if n.split("_")[0] == task}
  nbb = [len(p.regions.kind) for p in world.pictures]
  return {
      "generator": GENERATOR,
      "generator_version": GENERATOR_VERSION,
      "seed": cfg.seed,
      "config": config_json(cfg),
      "image_size": [scene_lib.WIDTH, scene_lib.HEIGHT],
      "img_dim": cfg.img_dim,
      "label_dim": scene_lib.num_classes(),
      "num_regions": {"min": int(min(nbb)), "max": int(max(nbb)), "mean": round(float(np.mean(nbb)), 3)},
      "splits": {s: len(world.split(s)) for s in world_lib.SPLITS},
      "img_db": "img_db",
      "vocab": {"file": "vocab.txt", "size": tok.vocab_size, "hash": tok.vocab_hash},
      "vqa_score": "min(#annotators giving the answer / 3, 1) over 10 annotators",
      "tasks": tasks,
      "complete": True,
  }


# ---- publishing ---------------------------------------------------------------------------


def read_world_manifest(path: str) -> dict | None:
  """The manifest of a complete synthetic world at path, or None."""
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      m = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  return m if m.get("generator") == GENERATOR and m.get("complete") else None


def _not_a_world(path: str) -> str | None:
  """Why `path` is not a synthetic world (None: it is one, and --overwrite may replace it)."""
  if read_world_manifest(path) is None:
    return f"is not a complete synthetic world (no {MANIFEST} of {GENERATOR})"
  return None


def default_workers() -> int:
  """Processes for rendering: the usable cores, at most 4 (spawn overhead beyond that)."""
  try:
    n = len(os.sched_getaffinity(0))
  except AttributeError:
    n = os.cpu_count() or 1
  return max(1, min(4, n))


def generate(out: str, *, overwrite: bool = False, workers: int | None = None, log=print, **config) -> dict:
  """Generates a world into `out` (refused if it exists, unless overwrite); returns the manifest.

  Keyword arguments are the fields of world.Config (num_images, seed, img_dim, ...). The world
  is built in a temporary sibling folder and renamed into place when complete. `workers`
  (default: usable cores, at most 4) only changes speed, never the bytes written.
  """
  cfg = world_lib.Config(**config)
  out = os.path.abspath(out)
  files.check_replaceable(out, overwrite=overwrite, not_ours=_not_a_world)
  tmp = files.temp_dir_beside(out)  # also removes those of killed runs
  try:
    manifest = write_world(tmp, cfg, workers=default_workers() if workers is None else workers, log=log)
    files.publish_dir(tmp, out, overwrite=overwrite, not_ours=_not_a_world)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def ensure_dataset(path: str, *, workers: int | None = None, log=print, **config) -> str:
  """Returns `path` holding a complete synthetic world with this config, generating it if needed.

  Reuses a complete world made with the same config and generator version. A world from an
  older generator version is regenerated; a complete world with a different config, or a
  folder that is not a synthetic world, raises (choose another path or delete it). A run
  killed mid-way leaves only a hidden temporary folder, removed by the next call, and two
  processes racing to create the same world both end up using the first one published.
  """
  path = os.path.abspath(path)
  want = config_json(world_lib.Config(**config))
  for _ in range(2):
    m = read_world_manifest(path)
    if m is not None:
      if m["config"] == want and m["generator_version"] == GENERATOR_VERSION:
        return path
      if m["config"] != want:
        raise ValueError(f"{path} holds a synthetic world with config {m['config']}, not {want}; "
                         "use another path or delete that folder")
      log(f"{path} was made by generator {m['generator_version']}; regenerating with {GENERATOR_VERSION}")
      generate(path, overwrite=True, workers=workers, log=log, **config)
      return path
    if os.path.exists(path):
      raise FileExistsError(f"{path} exists but is not a complete synthetic world (no {MANIFEST}); "
                            "delete it or pick another path")
    try:
      generate(path, workers=workers, log=log, **config)
      return path
    except FileExistsError:
      continue  # another process published it first: check what it wrote
  raise RuntimeError(f"could not create a synthetic world at {path}")


def ensure_world(path: str, *, log=print) -> str:
  """The trainer's world provider: any complete world at `path` is reused as it is (a small
  test world too); otherwise the default world is generated there."""
  if read_world_manifest(path) is None:
    log(f"generating the synthetic world in {path} (first run only) ...")
    ensure_dataset(path, log=log)
  return os.path.abspath(path)
