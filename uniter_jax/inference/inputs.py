"""Raw inputs -> model batches: texts (str) and images (region features + boxes).

A batch is what the input pipeline would have made of the same text and image
(uniter_jax/batch.py): `[CLS] WordPiece ids [SEP]` truncated to `max_txt_len` words, at most
`img_buckets[-1]` regions, each block right-padded to the smallest bucket that holds it. The
batch axis is padded to a bucket as well (empty rows, as eval batches are), so a jitted
model call compiles once per (batch, text, region) bucket and not once per input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from uniter_jax.data.boxes import img_pos_from_norm_bb, norm_bb_from_xyxy
from uniter_jax.data.pipeline import PipelineConfig
from uniter_jax.data.tokenizer import WordPieceTokenizer
from uniter_jax.evaluators import refer as refer_eval
from uniter_jax.tasks.vcr_inputs import NUM_CHOICES

_PIPELINE = PipelineConfig()  # the pipeline's defaults are the processor's


@dataclasses.dataclass(frozen=True)
class Regions:
  """One image as the model sees it: region features and their 7-d box features.

  Attributes:
    features: (n, D) region features (D = the model's img_dim), best region first.
    img_pos: (n, 7) [x1, y1, x2, y2, w, h, w*h], normalised by the image size.
    image_w, image_h: the image size in pixels, when known (for pixel boxes).
    image_id: a name for the image (returned with retrieval results and drawings).
  """

  features: np.ndarray
  img_pos: np.ndarray
  image_w: float | None = None
  image_h: float | None = None
  image_id: str | None = None

  def __post_init__(self):
    feats, pos = np.asarray(self.features), np.asarray(self.img_pos, np.float32)
    if feats.ndim != 2 or not feats.shape[0]:
      raise ValueError(f"region features must be (n >= 1, D), got {feats.shape}")
    if pos.shape != (feats.shape[0], 7):
      raise ValueError(f"box features must be ({feats.shape[0]}, 7) for {feats.shape[0]} "
                       f"regions, got {pos.shape}")
    object.__setattr__(self, "features", feats)
    object.__setattr__(self, "img_pos", pos)

  @classmethod
  def from_pixels(cls, features: Any, boxes: Any, image_w: float, image_h: float, *,
                  image_id: str | None = None) -> "Regions":
    """boxes (n, 4) [x1, y1, x2, y2] in pixels of an image_w x image_h picture."""
    norm_bb = norm_bb_from_xyxy(boxes, image_w, image_h)
    return cls(features, img_pos_from_norm_bb(norm_bb), image_w, image_h, image_id)

  @classmethod
  def from_normalized(cls, features: Any, boxes: Any, *, image_w: float | None = None,
                      image_h: float | None = None, image_id: str | None = None
                      ) -> "Regions":
    """boxes already divided by the image size: (n, 4) [x1, y1, x2, y2], (n, 6) the stored
    norm_bb [x1, y1, x2, y2, w, h] or (n, 7) the box features themselves."""
    boxes = np.asarray(boxes, np.float32)
    width = boxes.shape[-1] if boxes.ndim == 2 else None
    if width == 4:
      boxes = img_pos_from_norm_bb(norm_bb_from_xyxy(boxes, 1.0, 1.0))
    elif width == 6:
      boxes = img_pos_from_norm_bb(boxes)
    elif width != 7:
      raise ValueError(f"normalised boxes must be (n, 4), (n, 6) or (n, 7), got {boxes.shape}")
    return cls(features, boxes, image_w, image_h, image_id)

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "Regions":
    """An image record of uniter_jax.data.iter_image_records (features, img_pos, ...)."""
    return cls(record["features"], record["img_pos"], record.get("image_w"),
               record.get("image_h"), record.get("image_id"))

  @property
  def num_regions(self) -> int:
    return int(self.features.shape[0])

  @property
  def has_size(self) -> bool:
    return self.image_w is not None and self.image_h is not None

  def boxes(self) -> np.ndarray:
    """(n, 4) [x, y, w, h] boxes: pixels when the image size is known, else normalised."""
    w, h = (self.image_w, self.image_h) if self.has_size else (1.0, 1.0)
    return refer_eval.region_boxes(self.img_pos, w, h)


ImageLike = Regions | Mapping[str, Any]


def as_regions(image: ImageLike) -> Regions:
  """A Regions, or an image record (a mapping with features and img_pos) made into one."""
  if isinstance(image, Regions):
    return image
  if isinstance(image, Mapping) and "features" in image and "img_pos" in image:
    return Regions.from_record(image)
  raise TypeError(f"an image is a Regions or an image record (features, img_pos), got "
                  f"{type(image).__name__}")


def is_one_image(image: Any) -> bool:
  return isinstance(image, (Regions, Mapping))


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds n (the pipeline's rule); n must fit the largest."""
  for b in sorted(buckets):
    if b >= n:
      return b
  raise ValueError(f"{n} does not fit the largest bucket {max(buckets)}")


@dataclasses.dataclass(frozen=True)
class Processor:
  """Texts and images -> padded model batches, with the input pipeline's truncation rules.

  Settings default to the pipeline's (PipelineConfig); a run's own come from its config
  (uniter_jax.inference.resources.processor_settings), so batches equal its eval batches.
  """

  tokenizer: WordPieceTokenizer
  txt_buckets: tuple[int, ...] = _PIPELINE.txt_buckets
  img_buckets: tuple[int, ...] = _PIPELINE.img_buckets
  max_txt_len: int = _PIPELINE.max_txt_len
  feat_dtype: str = _PIPELINE.feat_dtype
  batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)

  def __post_init__(self):
    for name in ("txt_buckets", "img_buckets", "batch_buckets"):
      object.__setattr__(self, name, tuple(sorted(int(b) for b in getattr(self, name))))
    if self.max_txt_len + 2 > self.txt_buckets[-1]:
      raise ValueError(f"max_txt_len {self.max_txt_len} + [CLS]/[SEP] exceeds the largest "
                       f"text bucket {self.txt_buckets[-1]}")

  @property
  def max_batch(self) -> int:
    return self.batch_buckets[-1]

  # -- text -----------------------------------------------------------------------------------
  def token_ids(self, text: str) -> np.ndarray:
    """[CLS] the text's WordPiece ids (at most max_txt_len) [SEP], as the pipeline builds them."""
    ids = self.tokenizer.encode(text)[: self.max_txt_len]
    return np.asarray([self.tokenizer.cls_id, *ids, self.tokenizer.sep_id], np.int32)

  def text_batch(self, texts: Sequence[str], size: int | None = None) -> dict[str, np.ndarray]:
    """input_ids and txt_mask (size, Lt): the texts, then empty rows up to `size`."""
    rows = [self.token_ids(t) for t in texts]
    size = size or len(rows)
    lt = bucket(max(len(r) for r in rows), self.txt_buckets)
    ids = np.zeros((size, lt), np.int32)
    for i, r in enumerate(rows):
      ids[i, : len(r)] = r
    lens = np.asarray([len(r) for r in rows] + [0] * (size - len(rows)))
    return {"input_ids": ids, "txt_mask": np.arange(lt)[None] < lens[:, None]}

  # -- images ---------------------------------------------------------------------------------
  def kept(self, image: Regions) -> int:
    """Regions of `image` the model sees (the pipeline keeps the first img_buckets[-1])."""
    return min(image.num_regions, self.img_buckets[-1])

  def region_bucket(self, images: Sequence[Regions]) -> int:
    return bucket(max(self.kept(im) for im in images), self.img_buckets)

  def image_batch(self, images: Sequence[Regions], size: int | None = None,
                  li: int | None = None) -> dict[str, np.ndarray]:
    """img_feat (size, Li, D), img_pos and img_mask: the images, then empty rows."""
    size = size or len(images)
    li = li or self.region_bucket(images)
    dims = {im.features.shape[1] for im in images}
    if len(dims) != 1:
      raise ValueError(f"images of one batch need one feature size, got {sorted(dims)}")
    dtype = jnp.dtype(self.feat_dtype)
    feat = np.zeros((size, li, dims.pop()), dtype)
    pos = np.zeros((size, li, 7), np.float32)
    mask = np.zeros((size, li), bool)
    for i, im in enumerate(images):
      n = self.kept(im)
      feat[i, :n], pos[i, :n], mask[i, :n] = im.features[:n], im.img_pos[:n], True
    return {"img_feat": feat, "img_pos": pos, "img_mask": mask}

  # -- batches --------------------------------------------------------------------------------
  def batch_size(self, n: int) -> int:
    return bucket(n, self.batch_buckets)

  def batch(self, texts: Sequence[str], images: Sequence[Regions]) -> dict[str, np.ndarray]:
    """Text i with image i, for at most max_batch pairs; rows padded to a batch bucket."""
    if len(texts) != len(images):
      raise ValueError(f"{len(texts)} texts for {len(images)} images")
    size = self.batch_size(len(texts))
    return {**self.text_batch(texts, size), **self.image_batch(images, size)}

  def pair_batch(self, texts: Sequence[str], lefts: Sequence[Regions],
                 rights: Sequence[Regions]) -> dict[str, np.ndarray]:
    """NLVR2 rows: text i with (left i, right i) on an image axis, (B, 2, Li, ...)."""
    if not len(texts) == len(lefts) == len(rights):
      raise ValueError(f"{len(texts)} texts for {len(lefts)} left and {len(rights)} right images")
    size = self.batch_size(len(texts))
    li = self.region_bucket(list(lefts) + list(rights))  # one bucket for both, as the pipeline
    sides = [self.image_batch(side, size, li) for side in (lefts, rights)]
    images = {k: np.stack([sides[0][k], sides[1][k]], axis=1) for k in sides[0]}
    return {**self.text_batch(texts, size), **images}

  def vcr_batch(self, questions: Sequence[str], answers: Sequence[Sequence[str]],
                rationales: Sequence[Sequence[str]], images: Sequence[Regions]
                ) -> dict[str, np.ndarray]:
    """VCR rows as the pipeline delivers them: question i with image i (`batch`), and its 4
    answers and 4 rationales as input_ids_as / input_ids_rs (B, F), each row the choices'
    WordPiece ids one after another, with lens_as / lens_rs (B, 4); qa_target -1 (unknown).
    The VCR task builds the (question, choice) sequences from them inside its step."""
    batch = self.batch(questions, images)
    size = batch["input_ids"].shape[0]
    for key, sets in (("as", answers), ("rs", rationales)):
      if len(sets) != len(questions) or any(len(four) != NUM_CHOICES for four in sets):
        raise ValueError(f"vcr: every question needs {NUM_CHOICES} answers and {NUM_CHOICES} "
                         "rationales")
      words = [[self.tokenizer.encode(c) for c in four] for four in sets]
      lens = np.zeros((size, NUM_CHOICES), np.int32)
      lens[: len(words)] = [[len(w) for w in four] for four in words]
      flat = np.zeros((size, max(1, int(lens.sum(1).max()))), np.int32)
      for i, four in enumerate(words):
        ids = [t for w in four for t in w]
        flat[i, : len(ids)] = ids
      batch[f"input_ids_{key}"], batch[f"lens_{key}"] = flat, lens
    batch["qa_target"] = np.full((size,), -1, np.int32)
    return batch

  def chunks(self, n: int) -> Iterator[slice]:
    """Slices of at most max_batch rows covering range(n)."""
    for start in range(0, n, self.max_batch):
      yield slice(start, min(n, start + self.max_batch))
