"""A loaded model with its processor: each task's prediction from raw inputs, in a few lines.

    import uniter_jax
    p = uniter_jax.predictor("workdir/vqa/export")     # an export, a workdir or an official .pt
    image = uniter_jax.Regions.from_pixels(features, boxes_xyxy, image_w, image_h)
    p.answer("what colour is the star ?", image, top_k=3)   # [(answer, score), ...]

Every helper takes one text and one image, or lists of them (a single one is paired with each
item of the other side). It batches them (Processor: the input pipeline's truncation and
buckets), runs one jitted model call per batch and returns Python / NumPy values. For the same
inputs, what a helper picks equals what the task's `--mode=predict` writes
(tests/test_inference.py compares them).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniter_jax import loading, sharding
from uniter_jax.evaluators import retrieval as ret_eval
from uniter_jax.inference import resources
from uniter_jax.inference.alignment import Alignment
from uniter_jax.inference.inputs import ImageLike, Processor, Regions, as_regions, is_one_image
from uniter_jax.losses.ot import ot_distance
from uniter_jax.models import (UniterForImageTextRetrieval, UniterForNlvr2, UniterForPretraining,
                               UniterForReferringExpressionComprehension,
                               UniterForVcr, UniterForVisualEntailment, UniterForVqa)
from uniter_jax.tasks import retrieval_scores as scoring
from uniter_jax.tasks import vcr as vcr_task
from uniter_jax.tasks import ve as ve_task

MASK = "[MASK]"
Texts = str | Sequence[str]
Images = ImageLike | Sequence[ImageLike]


# -- what each helper computes inside its jitted call ----------------------------------------
def _logits(model: nnx.Module, batch: dict) -> jax.Array:
  """The task head's output: answer / class logits, or one score per region (RE)."""
  return model(batch, deterministic=True)


def _itm_probability(model: UniterForPretraining, batch: dict) -> jax.Array:
  """P(match), the softmax of the ITM head's 2 logits (class 1 = match)."""
  logits = model.itm_logits(model.encode(batch, deterministic=True).pooled)
  return jax.nn.softmax(logits, axis=-1)[:, 1]


def _mlm_top_k(model: UniterForPretraining, batch: dict, *, k: int) -> dict[str, jax.Array]:
  """The k likeliest tokens at every text position: probabilities and ids (B, Lt, k)."""
  logits = model.mlm_logits(model.encode(batch, deterministic=True).txt)
  logp, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
  return {"prob": jnp.exp(logp), "ids": ids}


def _wra(model: nnx.Module, batch: dict, *, ot: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The WRA transport plan between the final word and region states, and its distance."""
  out = model.encode(batch, deterministic=True)
  dist, plan = ot_distance(out.txt, out.img, batch["txt_mask"], batch["img_mask"],
                           return_plan=True, **ot)
  return {"distance": dist, "plan": plan}


# -- inputs ------------------------------------------------------------------------------------
def _listed(value: Any, one: bool) -> tuple[list, bool]:
  return ([value], True) if one else (list(value), False)


def _align(*sides: list) -> list[list]:
  """Lists of one item are repeated to the longest; the other lengths must agree."""
  n = max(len(s) for s in sides)
  if any(len(s) not in (1, n) for s in sides) or n == 0:
    raise ValueError(f"inputs of {[len(s) for s in sides]} items: give one item or equally "
                     "many on every side")
  return [s * n if len(s) == 1 else s for s in sides]


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _softmax(x: np.ndarray) -> np.ndarray:
  z = np.exp(np.asarray(x, np.float64) - np.max(x))
  return z / z.sum()


class Predictor:
  """A model, its processor and its task's vocabulary, with one helper per task.

  Build it with `Predictor.from_path(path)` (or `uniter_jax.predictor(path)`), or from a
  model in memory: `Predictor(model, Processor(WordPieceTokenizer(vocab)), answers=...)`.
  """

  def __init__(self, model: nnx.Module, processor: Processor, *,
               answers: Sequence[str] | None = None, ot_options: Mapping[str, Any] | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None,
               vcr_choice_len: int | None = None):
    """mesh / rules: run on a device mesh, the parameters sharded by their logical names
    (loading.place) and each batch's rows split over the rules' batch axes where they divide.
    vcr_choice_len: the VCR run's config.vcr.max_choice_len (None: the longest choice given)."""
    self.vcr_choice_len = vcr_choice_len
    self.mesh = mesh
    self.rules = sharding.FSDP_RULES if rules is None else rules
    self.model = loading.place(model, mesh, self.rules)
    self.processor = processor
    self.answers = None if answers is None else tuple(answers)
    self.ot_options = dict(ot_options or {})
    if processor.tokenizer.vocab_size > model.config.vocab_size:
      raise ValueError(f"the vocab has {processor.tokenizer.vocab_size} tokens, the model "
                       f"{model.config.vocab_size}: pass the vocab the model was trained with")
    self._graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
    self._fns: dict[Any, Callable] = {}

  @classmethod
  def from_path(cls, path: str | os.PathLike, *, vocab: Any = None, ans2label: Any = None,
                ot_options: Mapping[str, Any] | None = None,
                processor_settings: Mapping[str, Any] | None = None,
                mesh: jax.sharding.Mesh | Mapping[str, int] | None = None,
                rules: sharding.Rules | None = None, **load_kwargs: Any) -> "Predictor":
    """The model at `path` (uniter_jax.load) with its vocab, answers and the run's settings.

    vocab: a vocab.txt path or WordPieceTokenizer; default: vocab.txt in the model's folder
    (or beside it), else the vocab of the run that made it (WORKDIR/config.json).
    ans2label: a path, {answer: label} or the answer list (VQA); found the same way.
    ot_options: WRA solver options; default: the pretraining run's (config.pretrain.ot).
    processor_settings: Processor fields (txt_buckets, img_buckets, max_txt_len, ...) over
    the run's. mesh / rules: shard the model over a mesh (uniter_jax.load's arguments).
    load_kwargs: for official checkpoints (config=, task=).
    """
    folder = resources.model_folder(path)
    cfg = resources.run_config(folder)
    settings = {**resources.processor_settings(cfg), **dict(processor_settings or {})}
    processor = Processor(resources.find_vocab(folder, cfg, vocab), **settings)
    mesh = loading.as_mesh(mesh)
    return cls(loading.load(path, mesh=mesh, rules=rules, **load_kwargs), processor,
               answers=resources.find_answers(folder, cfg, ans2label),
               ot_options=resources.ot_settings(cfg) if ot_options is None else ot_options,
               mesh=mesh, rules=rules, vcr_choice_len=resources.vcr_choice_len(cfg))

  # -- running the model ---------------------------------------------------------------------
  def _need(self, what: str, kind: type, *, not_kind: type | None = None) -> None:
    if not isinstance(self.model, kind) or (not_kind and isinstance(self.model, not_kind)):
      raise TypeError(f"{what} needs a {kind.__name__} model; this predictor holds a "
                      f"{type(self.model).__name__}")

  def _jitted(self, key: Any, fn: Callable[[nnx.Module, dict], Any]) -> Callable:
    """fn(model, batch) jitted once per key (it compiles once per batch shape)."""
    if key not in self._fns:
      graphdef = self._graphdef
      self._fns[key] = jax.jit(lambda params, rest, b: fn(nnx.merge(graphdef, params, rest), b))
    return self._fns[key]

  def _rows(self, key: Any, fn: Callable, batches: Iterator[tuple[dict, int]]) -> list:
    """Per input row, fn's outputs as NumPy (padding rows dropped)."""
    return self._collect(self._jitted(key, fn), batches)

  def _collect(self, jitted: Callable, batches: Iterator[tuple[dict, int]]) -> list:
    """Per input row, jitted(params, rest, batch)'s outputs as NumPy (padding rows dropped)."""
    out = []
    for batch, n in batches:
      with self._on_mesh():
        res = jax.device_get(jitted(self._params, self._rest, batch))
      out += [jax.tree.map(lambda x, r=r: np.asarray(x[r]), res) for r in range(n)]
    return out

  @contextlib.contextmanager
  def _on_mesh(self) -> Iterator[None]:
    """The mesh and rules active while a helper traces and runs (nothing without a mesh)."""
    if self.mesh is None:
      yield
      return
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      yield

  def _pairs(self, texts: list[str], images: list[Regions]) -> Iterator[tuple[dict, int]]:
    for sl in self.processor.chunks(len(texts)):
      yield self.processor.batch(texts[sl], images[sl]), sl.stop - sl.start

  def _inputs(self, text: Texts, image: Images) -> tuple[list[str], list[Regions], bool]:
    """(texts, images, one pair given); a single text or image goes with each of the other."""
    texts, one_text = _listed(text, isinstance(text, str))
    images, one_image = _listed(image, is_one_image(image))
    texts, images = _align(texts, [as_regions(im) for im in images])
    self._check_features(images)
    return texts, images, one_text and one_image

  def _check_features(self, images: Sequence[Regions]) -> None:
    want = self.model.config.img_dim
    bad = [im.features.shape[1] for im in images if im.features.shape[1] != want]
    if bad:
      raise ValueError(f"region features are {bad[0]}-d, the model's img_dim is {want}: use "
                       "features from the extractor the model was trained with")

  def _token_strings(self, ids: np.ndarray) -> list[str]:
    return [self.processor.tokenizer.ids_to_tokens[int(i)] for i in ids]

  # -- pretraining heads -----------------------------------------------------------------------
  def itm_score(self, text: Texts, image: Images) -> float | np.ndarray:
    """P(text and image match) in [0, 1] from the pretraining model's ITM head."""
    self._need("itm_score", UniterForPretraining)
    texts, images, one = self._inputs(text, image)
    p = np.asarray([float(r) for r in self._rows("itm", _itm_probability,
                                                   self._pairs(texts, images))])
    return float(p[0]) if one else p

  def fill_mask(self, text: Texts, image: Images, top_k: int = 5) -> list:
    """Per [MASK] of the text, the top_k (token, probability) of the pretraining MLM head.

    A list with one entry per [MASK], in text order (a list of those for several texts).
    """
    self._need("fill_mask", UniterForPretraining)
    texts, images, one = self._inputs(text, image)
    # Spaced out, a [MASK] glued to a word or a full stop stays one token (BERT's rule).
    texts = [t.replace(MASK, f" {MASK} ") for t in texts]
    rows = self._rows(("mlm", top_k), functools.partial(_mlm_top_k, k=top_k),
                      self._pairs(texts, images))
    out = []
    for t, row in zip(texts, rows):
      where = np.nonzero(self.processor.token_ids(t) == self.processor.tokenizer.mask_id)[0]
      if not where.size:
        raise ValueError(f"fill_mask: no {MASK} in {t.strip()!r} (after truncation)")
      out.append([list(zip(self._token_strings(row["ids"][i]), row["prob"][i].tolist()))
                  for i in where])
    return out[0] if one else out

  def word_region_alignment(self, text: Texts, image: Images) -> Alignment | list[Alignment]:
    """The WRA optimal-transport plan between the text's tokens ([CLS] .. [SEP]) and the
    image's regions, with its distance (uniter_jax.losses.ot_distance, the solver options of
    the run that made the model). Any model with a UNITER backbone."""
    texts, images, one = self._inputs(text, image)
    key = ("wra", tuple(sorted(self.ot_options.items())))
    rows = self._rows(key, functools.partial(_wra, ot=self.ot_options),
                      self._pairs(texts, images))
    out = []
    for t, im, row in zip(texts, images, rows):
      ids = self.processor.token_ids(t)
      out.append(Alignment(tokens=self._token_strings(ids), regions=im,
                           plan=row["plan"][: len(ids), : self.processor.kept(im)],
                           distance=float(row["distance"])))
    return out[0] if one else out

  # -- downstream heads -------------------------------------------------------------------------
  def answer(self, question: Texts, image: Images, top_k: int = 1) -> list:
    """The top_k answers of a VQA model, [(answer, score)], best first (top 1 = the answer
    --mode=predict writes). Scores are sigmoid(logit): the head is trained with BCE."""
    self._need("answer", UniterForVqa, not_kind=UniterForVisualEntailment)
    if self.answers is None:
      raise ValueError("answer: no answer list; pass ans2label= (a path or {answer: label}) "
                       f"or put {resources.ANS2LABEL} in the model's folder")
    if len(self.answers) != self.model.num_answers:
      raise ValueError(f"{len(self.answers)} answers for a head of {self.model.num_answers}")
    texts, images, one = self._inputs(question, image)
    rows = self._rows("logits", _logits, self._pairs(texts, images))
    out = []
    for row in rows:
      best = ret_eval.top_k(row[None], top_k)[0]  # ties to the lower label, as argmax
      out.append([(self.answers[j], float(_sigmoid(row[j]))) for j in best])
    return out[0] if one else out

  def entails(self, premise_image: Images, hypothesis: Texts) -> dict | list[dict]:
    """SNLI-VE: {"label": contradiction | entailment | neutral, "scores": {label: sigmoid}}."""
    self._need("entails", UniterForVisualEntailment)
    texts, images, one = self._inputs(hypothesis, premise_image)
    names = ve_task.VeTask.class_names
    out = [{"label": names[int(np.argmax(row))],
            "scores": dict(zip(names, _sigmoid(row).tolist()))}
           for row in self._rows("logits", _logits, self._pairs(texts, images))]
    return out[0] if one else out

  def nlvr2(self, text: Texts, image_left: Images, image_right: Images) -> dict | list[dict]:
    """NLVR2: {"label": is the statement true of the (left, right) pair, "p_true"}."""
    self._need("nlvr2", UniterForNlvr2)
    texts, one_text = _listed(text, isinstance(text, str))
    lefts, one_left = _listed(image_left, is_one_image(image_left))
    rights, one_right = _listed(image_right, is_one_image(image_right))
    texts, lefts, rights = _align(texts, [as_regions(i) for i in lefts],
                                  [as_regions(i) for i in rights])
    self._check_features(lefts + rights)

    def batches():
      for sl in self.processor.chunks(len(texts)):
        yield self.processor.pair_batch(texts[sl], lefts[sl], rights[sl]), sl.stop - sl.start

    out = [{"label": bool(np.argmax(row) == 1), "p_true": float(_softmax(row)[1])}
           for row in self._rows("logits", _logits, batches())]
    return out[0] if one_text and one_left and one_right else out

  def ground(self, expression: Texts, image: Images) -> dict | list[dict]:
    """Referring expressions: the region the expression names.

    {"region": index, "box": [x, y, w, h] (pixels when the image size is known, else
    normalised), "score": its raw score, "scores": every region's, "probabilities": their
    softmax (the "cls" loss's distribution)}.
    """
    self._need("ground", UniterForReferringExpressionComprehension)
    texts, images, one = self._inputs(expression, image)
    out = []
    for im, row in zip(images, self._rows("logits", _logits, self._pairs(texts, images))):
      scores = row[: self.processor.kept(im)]
      region = int(np.argmax(scores))
      out.append({"region": region, "box": im.boxes()[region].tolist(),
                  "score": float(scores[region]), "scores": scores,
                  "probabilities": _softmax(scores)})
    return out[0] if one else out

  def vcr(self, question: Texts, answers: Sequence, rationales: Sequence, image: Images
          ) -> dict | list[dict]:
    """VCR: which of 4 answers, and which of 4 rationales under each answer.

    question: one string with `answers` and `rationales` 4 strings each, or lists of those
    (one 4-list per question). Object references are written as the data writes them
    (data_prep.vcr: [OBJ_j] tokens). Returns {"answer": index, "answer_probs": softmax over
    the 4 (4,), "answer_logits" (4,), "rationale": index under the chosen answer,
    "rationale_probs" (4,) under it, "rationale_logits" (4, 4): row a = the rationales under
    answer a}; the logits are the columns --mode=predict writes (answer_i,
    rationale_conditioned_on_a{i}_{j}), by the task's own scorer.
    """
    self._need("vcr", UniterForVcr)
    one = isinstance(question, str)
    questions, _ = _listed(question, one)
    answer_sets, rationale_sets = ([answers], [rationales]) if one else (answers, rationales)
    images, one_image = _listed(image, is_one_image(image))
    questions, answer_sets, rationale_sets, images = _align(
        questions, [list(a) for a in answer_sets], [list(r) for r in rationale_sets],
        [as_regions(im) for im in images])
    self._check_features(images)
    encode = self.processor.tokenizer.encode
    longest = max((len(encode(c)) for sets in (answer_sets, rationale_sets) for four in sets
                   for c in four), default=0)
    width = self.vcr_choice_len or longest
    if longest > width:
      raise ValueError(f"vcr: a choice has {longest} tokens, more than the run's "
                       f"config.vcr.max_choice_len={width}; shorten it")
    if ("vcr", width) not in self._fns:
      # The task's own jitted scorer (what --mode=predict runs).
      self._fns[("vcr", width)] = vcr_task.make_scorer(self._graphdef, width, conditioned=True)

    def batches():
      for sl in self.processor.chunks(len(questions)):
        batch = self.processor.vcr_batch(questions[sl], answer_sets[sl], rationale_sets[sl],
                                         images[sl])
        longest_seq = batch["input_ids"].shape[1] + 2 * (width + 1)
        if longest_seq > self.model.config.max_position_embeddings:
          raise ValueError(f"vcr: sequences of {longest_seq} tokens (question, answer and "
                           "rationale), more than the model's max_position_embeddings "
                           f"{self.model.config.max_position_embeddings}; shorten the texts")
        yield batch, sl.stop - sl.start

    out = []
    for row in self._collect(self._fns[("vcr", width)], batches()):
      answer = int(np.argmax(row["qa"]))
      out.append({"answer": answer, "answer_probs": _softmax(row["qa"]),
                  "answer_logits": row["qa"],
                  "rationale": int(np.argmax(row["qar_all"][answer])),
                  "rationale_probs": _softmax(row["qar_all"][answer]),
                  "rationale_logits": row["qar_all"]})
    return out[0] if one and one_image else out

  def retrieval_scores(self, texts: Sequence[str], images: Sequence[ImageLike]) -> np.ndarray:
    """The (texts, images) rank-score matrix of a retrieval model, in jitted blocks of at
    most max_batch pairs (the task's block scorer)."""
    self._need("retrieval", UniterForImageTextRetrieval)
    images = [as_regions(im) for im in images]
    self._check_features(images)
    p = self.processor
    # Blocks of at most max_batch pairs, each side a batch bucket (one compile per shape).
    block_img = p.batch_size(min(len(images), p.max_batch))
    block_txt = min(max(1, p.max_batch // block_img), p.batch_size(min(len(texts), p.max_batch)))
    if "itr" not in self._fns:
      self._fns["itr"] = scoring.make_block_scorer(self._graphdef,
                                                   self.rules if self.mesh else ())
    with self._on_mesh():
      return scoring.score_all_pairs(self._fns["itr"], self._params, self._rest,
                                     p.text_batch(list(texts)), p.image_batch(images),
                                     block_txt=block_txt, block_img=block_img)

  def retrieve(self, query: Texts, gallery: Sequence[ImageLike], k: int = 10) -> list:
    """The k best images of `gallery` for the query, [(gallery index, score)], best first
    (ties to the lower index, as the task's rankings)."""
    queries, one = _listed(query, isinstance(query, str))
    scores = self.retrieval_scores(queries, gallery)
    best = ret_eval.top_k(scores, min(k, scores.shape[1]))
    out = [[(int(j), float(scores[i, j])) for j in row] for i, row in enumerate(best)]
    return out[0] if one else out
