"""A TFDS builder over our dataset folders: text records joined with their images' regions.

    from uniter_jax.data import tfds_builder

    b = tfds_builder.builder(text_dirs={"train": "world/txt/vqa_train", "validation": "world/txt/vqa_val"},
                             image_dirs=["world/img_db"], data_dir="/data/tfds")
    ds = b.as_dataset(split="train")  # or tfds.load("uniter_regions", builder_kwargs=..., data_dir=...)

Each example is one text: `id`, `input_ids` (int32, no [CLS]/[SEP]), its task fields, and under
`image` (`image_0`, `image_1`, ... for texts with several images, NLVR2) the image's `image_id`,
`features` float16 (n, D), `img_pos` float32 (n, 7), `conf` float32 (n,) and `soft_labels`
float16 (n, C) when every image dir stores them. Records are read with format.py's readers; the
folders are checked as the input pipeline checks them and problems are `DataError`s.

Importing this module imports tensorflow_datasets (not TensorFlow, which TFDS loads on first use);
`import uniter_jax.data` does not import it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from uniter_jax.data import format as fmt

NAME = "uniter_regions"
PathLike = str | os.PathLike
# Top-level keys of an example besides the task fields; a task field may not take one of them.
_TEXT_KEYS = ("id", "input_ids")


@dataclasses.dataclass(eq=False)
class UniterRegionsConfig(tfds.core.BuilderConfig):
  """The folders of one prepared dataset: text dirs per split, image dirs shared by all splits."""

  # Not in the repr: TFDS logs the config, and the description already names the folders.
  text_dirs: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict, repr=False)
  image_dirs: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  skip_missing: bool = False  # texts whose image no image dir holds: drop (counted) instead of DataError
  fingerprint: str = ""  # of the manifests: prepared data made from other folders is refused


def _as_tuple(dirs: PathLike | Sequence[PathLike]) -> tuple[str, ...]:
  """One folder or several, as absolute paths."""
  if isinstance(dirs, (str, os.PathLike)):
    dirs = [dirs]
  return tuple(os.path.abspath(os.fspath(d)) for d in dirs)


def _manifest(path: str, kind: str) -> dict:
  """The manifest of `path`, which must hold `kind` ('texts' or 'images')."""
  m = fmt.read_manifest(path)
  if kind not in m:
    raise fmt.DataError(f"{path} holds no {kind} (its manifest has {[k for k in ('images', 'texts') if k in m]}); "
                        f"pass it as {'an image' if kind == 'texts' else 'a text'} dir instead")
  return m


def make_config(
    text_dirs: Mapping[str, PathLike | Sequence[PathLike]],
    image_dirs: PathLike | Sequence[PathLike],
    name: str | None = None,
    skip_missing: bool = False,
) -> UniterRegionsConfig:
  """A config for these folders; `name` (default: the fingerprint) names its TFDS subfolder."""
  if not text_dirs:
    raise ValueError("text_dirs: give at least one split, e.g. {'train': 'data/coco_txt'}")
  splits = {str(s): _as_tuple(d) for s, d in text_dirs.items()}
  images = _as_tuple(image_dirs)
  if not images or not all(splits.values()):
    raise ValueError(f"every split needs a text dir and there must be an image dir ({splits}, {list(images)})")
  twice = sorted({d for d in images if images.count(d) > 1})
  if twice:
    raise fmt.DataError(f"image dir(s) {twice} given twice; give each image dir once")
  # The manifests carry the creation time and shard sizes: a re-converted folder changes the print.
  manifests = {"texts": {s: [_manifest(d, "texts") for d in ds] for s, ds in splits.items()},
               "images": [_manifest(d, "images") for d in images], "skip_missing": skip_missing}
  fp = hashlib.sha256(json.dumps(manifests, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return UniterRegionsConfig(
      name=name or f"fp{fp}", text_dirs=splits, image_dirs=images, skip_missing=skip_missing, fingerprint=fp,
      description=f"texts {splits} joined with the regions of {list(images)}",
  )


def _region_features(dim: int, label_dim: int | None) -> tfds.features.FeaturesDict:
  """One image's regions; raw-bytes encoding keeps float16 as float16 and n variable."""

  def array(shape, dtype):
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)

  spec = {"image_id": tfds.features.Text(), "features": array((None, dim), np.float16),
          "img_pos": array((None, 7), np.float32), "conf": array((None,), np.float32)}
  if label_dim is not None:
    spec["soft_labels"] = array((None, label_dim), np.float16)
  return tfds.features.FeaturesDict(spec)


_FIELD_FEATURES = {
    "int": lambda: tfds.features.Scalar(np.int64),
    "float": lambda: tfds.features.Scalar(np.float32),
    "str": tfds.features.Text,
    "int_list": lambda: tfds.features.Tensor(shape=(None,), dtype=np.int64),
    "float_list": lambda: tfds.features.Tensor(shape=(None,), dtype=np.float32),
    "str_list": lambda: tfds.features.Tensor(shape=(None,), dtype=np.str_),
}


def image_keys(images_per_text: int) -> list[str]:
  """Example keys of a text's images: `image`, or `image_0`, `image_1`, ... for several."""
  return ["image"] if images_per_text == 1 else [f"image_{i}" for i in range(images_per_text)]


def _text_layout(config: UniterRegionsConfig) -> tuple[dict[str, str], int]:
  """(task field types, images per text), equal over every text dir of every split."""
  first, layout = None, None
  for d in (d for ds in config.text_dirs.values() for d in ds):
    t = _manifest(d, "texts")["texts"]
    this = (dict(t["fields"]), int(t["images_per_text"]))
    if layout is None:
      first, layout = d, this
    elif this != layout:
      raise fmt.DataError(f"{d}: task fields / images per text {this} differ from {first}'s {layout}; "
                          "one TFDS dataset holds the texts of one task")
  fields, k = layout
  clash = sorted(set(fields) & {*_TEXT_KEYS, *image_keys(k)})
  if clash:
    raise fmt.DataError(f"{first}: task field(s) {clash} clash with the example keys {_TEXT_KEYS} / {image_keys(k)}")
  return fields, k


def _image_layout(config: UniterRegionsConfig) -> tuple[int, int | None]:
  """(feature dim, soft-label classes or None), checked over the image dirs."""
  dim, label_dim, soft = None, None, True
  for d in config.image_dirs:
    m = _manifest(d, "images")["images"]
    if dim not in (None, m["feat_dim"]):
      raise fmt.DataError(f"{d}: features are {m['feat_dim']}-d but {config.image_dirs[0]} has {dim}-d; "
                          "use features from one extractor")
    dim = m["feat_dim"]
    soft = soft and bool(m.get("soft_labels"))
    if m.get("soft_labels"):
      if label_dim not in (None, m["label_dim"]):
        raise fmt.DataError(f"{d}: soft labels have {m['label_dim']} classes, other image dirs {label_dim}")
      label_dim = m["label_dim"]
  return dim, label_dim if soft else None  # as the pipeline: soft labels only when all dirs have them


def _image_homes(image_dirs: Sequence[str]) -> dict[str, str]:
  """image id -> its image dir, from the image indexes (no features read); ids must be unique."""
  home: dict[str, str] = {}
  for d in image_dirs:
    for shard in fmt.read_image_index(d):
      for iid in shard["image_ids"]:
        if home.setdefault(iid, d) != d:
          raise fmt.DataError(f"image id {iid!r} is in both {home[iid]} and {d}; image ids must be unique "
                              "across the image dirs (drop one copy)")
  return home


def _load_texts(text_dirs: Sequence[str]) -> list[tuple[str, dict]]:
  """(example key, text record) of every text of a split; keys stay unique across its text dirs."""
  return [(f"{j}/{rec['id']}", rec) for j, d in enumerate(text_dirs) for rec in fmt.iter_text_records(d)]


def _drop_missing(texts: list[tuple[str, dict]], home: dict[str, str], config: UniterRegionsConfig,
                  split: str) -> tuple[list[tuple[str, dict]], int]:
  """Texts whose images all exist, and how many were dropped; a DataError unless skip_missing."""
  missing = [(rec["id"], i) for _, rec in texts for i in rec["image_ids"] if i not in home]
  if missing and not config.skip_missing:
    raise fmt.DataError(
        f"split {split!r}: {len(missing)} text(s) refer to images no image dir holds (first: {missing[:3]}; "
        f"text dirs {list(config.text_dirs[split])}, image dirs {list(config.image_dirs)}); add the image "
        "dir that has them, or pass skip_missing=True to drop such texts")
  kept = [(key, rec) for key, rec in texts if all(i in home for i in rec["image_ids"])]
  return kept, len(texts) - len(kept)


def _region_example(img: dict, soft: bool) -> dict:
  keys = ("image_id", "features", "img_pos", "conf") + (("soft_labels",) if soft else ())
  return {k: img[k] for k in keys}


def _example(rec: dict, images: list[dict], fields: Mapping[str, str], soft: bool) -> dict:
  """One text record and its image records -> a TFDS example."""
  ex = {"id": rec["id"], "input_ids": rec["input_ids"]}
  for k, t in fields.items():
    # An empty str list has no dtype to infer; give it one.
    ex[k] = np.asarray(rec[k], dtype=np.object_) if t == "str_list" else rec[k]
  for key, img in zip(image_keys(len(images)), images):
    ex[key] = _region_example(img, soft)
  return ex


def join(texts: list[tuple[str, dict]], images: Iterator[dict]) -> Iterator[tuple[str, dict, list[dict]]]:
  """(key, text, its image records) for every text, in one pass over `images`.

  An image is kept only until the last text that needs it is out, so memory is the texts plus the
  images of texts still waiting for another image (none when each text has one image).
  """
  needed_by = collections.defaultdict(list)
  for t, (_, rec) in enumerate(texts):
    for iid in set(rec["image_ids"]):
      needed_by[iid].append(t)
  waiting = [len(set(rec["image_ids"])) for _, rec in texts]
  users = {iid: len(ts) for iid, ts in needed_by.items()}
  cache: dict[str, dict] = {}
  for img in images:
    ts = needed_by.pop(img["image_id"], ())
    if ts:
      cache[img["image_id"]] = img
    for t in ts:
      waiting[t] -= 1
      if waiting[t]:
        continue
      key, rec = texts[t]
      yield key, rec, [cache[i] for i in rec["image_ids"]]
      for iid in set(rec["image_ids"]):
        users[iid] -= 1
        if not users[iid]:
          del cache[iid]


class UniterRegions(tfds.core.GeneratorBasedBuilder):
  """Texts of our dataset folders joined with their images' regions (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Texts joined with region features (dataset format schema 1)."}
  # Nothing is downloaded, so there are no URL checksums. Saying so also skips TFDS's lookup of
  # this module's path, which imports the undeclared `importlib_resources` on TFDS 4.9.x with
  # Python >= 3.9 (tensorflow/datasets#11212) and fails where it is not installed.
  url_infos = None

  def __init__(
      self,
      *,
      text_dirs: Mapping[str, PathLike | Sequence[PathLike]] | None = None,
      image_dirs: PathLike | Sequence[PathLike] | None = None,
      config_name: str | None = None,
      skip_missing: bool = False,
      config: UniterRegionsConfig | None = None,
      **kwargs,
  ):
    """Folders as `builder` takes them, or a ready `config` (TFDS passes one when unpickling).

    The keyword is `config_name`, not `name`: `tfds.load` / `tfds.builder` take `name` themselves.
    """
    if config is None:
      if text_dirs is None or image_dirs is None:
        raise ValueError(f"{NAME} needs text_dirs={{split: dir(s)}} and image_dirs=[dir, ...] (or a config)")
      config = make_config(text_dirs, image_dirs, name=config_name, skip_missing=skip_missing)
    # TFDS imports TensorFlow on first use; format._tf() imports it with the accelerators hidden so
    # TF does not take the memory of the GPUs/TPUs that JAX uses.
    fmt._tf()  # pylint: disable=protected-access
    super().__init__(config=config, **kwargs)
    stored = self.info.metadata.get("fingerprint") if self.info.metadata is not None else None
    if stored is not None and stored != config.fingerprint:
      raise fmt.DataError(
          f"{self.data_dir} was prepared from other folders or an older conversion (fingerprint {stored}, "
          f"these folders {config.fingerprint}); use another config_name, or delete that folder to prepare it again")

  def _info(self) -> tfds.core.DatasetInfo:
    fields, k = _text_layout(self.builder_config)
    dim, label_dim = _image_layout(self.builder_config)
    spec = {"id": tfds.features.Text(), "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
    spec.update({name: _FIELD_FEATURES[t]() for name, t in fields.items()})
    spec.update({key: _region_features(dim, label_dim) for key in image_keys(k)})
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description="UNITER region-feature dataset: each text joined with its image's regions.",
        features=tfds.features.FeaturesDict(spec),
        metadata=tfds.core.MetadataDict(fingerprint=cfg.fingerprint, image_dirs=list(cfg.image_dirs),
                                        text_dirs={s: list(d) for s, d in cfg.text_dirs.items()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    home = _image_homes(self.builder_config.image_dirs)
    return {split: self._generate_examples(split, home) for split in self.builder_config.text_dirs}

  def _generate_examples(self, split: str, home: dict[str, str]):
    cfg = self.builder_config
    fields, _ = _text_layout(cfg)
    soft = _image_layout(cfg)[1] is not None
    texts, dropped = _drop_missing(_load_texts(cfg.text_dirs[split]), home, cfg, split)
    # Saved with the dataset (metadata.json) when preparation ends.
    self.info.metadata.setdefault("texts_missing_image", {})[split] = dropped
    # Only the image dirs this split uses are read, once each.
    used = {home[i] for _, rec in texts for i in rec["image_ids"]}
    images = (img for d in cfg.image_dirs if d in used for img in fmt.iter_image_records(d))
    for key, rec, imgs in join(texts, images):
      yield key, _example(rec, imgs, fields, soft)


def builder(
    text_dirs: Mapping[str, PathLike | Sequence[PathLike]],
    image_dirs: PathLike | Sequence[PathLike],
    data_dir: PathLike | None = None,
    *,
    config_name: str | None = None,
    skip_missing: bool = False,
    prepare: bool = True,
) -> UniterRegions:
  """The builder for these folders, prepared under `data_dir` (reused when already prepared).

  text_dirs: {split: text dir or list of text dirs}, e.g. {"train": ..., "validation": ...}.
  image_dirs: the image dir(s) holding the images of every split's texts.
  config_name: the subfolder of data_dir/uniter_regions; default: the folders' fingerprint.
  skip_missing: drop texts whose image no image dir holds (counted in the dataset's metadata.json)
    instead of raising DataError.
  prepare: write the TFDS files now (a no-op when they exist); False only builds the builder.
  """
  b = UniterRegions(text_dirs=text_dirs, image_dirs=image_dirs, config_name=config_name, skip_missing=skip_missing,
                    data_dir=None if data_dir is None else os.fspath(data_dir))
  if prepare:
    b.download_and_prepare()
  return b
