"""What a model needs beside its parameters: the vocab, the answer list and the run's settings.

Looked up, in order, from what the caller passes, then the model's folder (an export that
holds vocab.txt / ans2label.json), then the training run that made it: WORKDIR/config.json
(the run's resolved config) of a workdir, or of the workdir an export folder sits in
(WORKDIR/export). The run config resolves the data folders exactly as the run did
(Task.data), so a synthetic world's vocab and a VQA run's ans2label.json are found there.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import ml_collections

from uniter_jax import checkpointing, tasks
from uniter_jax.data.tokenizer import WordPieceTokenizer
from uniter_jax.tasks import pretrain as pretrain_task
from uniter_jax.tasks import vqa as vqa_task

# The names an export and a workdir use (WORKDIR/config.json is written by uniter_jax.train).
RUN_CONFIG, VOCAB, ANS2LABEL = checkpointing.RUN_CONFIG, checkpointing.VOCAB, checkpointing.ANS2LABEL


def model_folder(path: str | os.PathLike) -> str:
  """The folder of a model source: the folder itself, or the one holding a checkpoint file."""
  path = os.path.abspath(os.fspath(path))
  return path if os.path.isdir(path) else os.path.dirname(path)


def _candidates(folder: str) -> list[str]:
  """The model's folder, then its parent (the workdir of WORKDIR/export)."""
  return [folder, os.path.dirname(folder)]


def run_config(folder: str) -> ml_collections.ConfigDict | None:
  """The config of the run that made the model in `folder` (None when there is none)."""
  for d in _candidates(folder):
    path = os.path.join(d, RUN_CONFIG)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
      if isinstance(cfg, dict) and cfg.get("task") and "data" in cfg:
        return ml_collections.ConfigDict(cfg)
  return None


def _run_data(cfg: ml_collections.ConfigDict | None) -> tasks.DataSpec | None:
  """The run's data folders as its task resolved them (None when they are gone)."""
  if cfg is None:
    return None
  try:
    return tasks.get(cfg.task).data(cfg)
  except (FileNotFoundError, ValueError, KeyError, AttributeError):  # moved, or another layout
    return None


def find_vocab(folder: str | None, cfg: ml_collections.ConfigDict | None,
               given: str | os.PathLike | WordPieceTokenizer | None = None
               ) -> WordPieceTokenizer:
  """The tokenizer: `given`, else vocab.txt in (or beside) the model's folder, else the run's."""
  if isinstance(given, WordPieceTokenizer):
    return given
  if given is not None:
    return WordPieceTokenizer(given)
  for d in _candidates(folder) if folder else []:
    if os.path.isfile(os.path.join(d, VOCAB)):
      return WordPieceTokenizer(os.path.join(d, VOCAB))
  data = _run_data(cfg)
  if data is not None and data.vocab and os.path.isfile(data.vocab):
    return WordPieceTokenizer(data.vocab)
  raise FileNotFoundError(f"no vocab for the model at {folder}: pass vocab=PATH (the vocab.txt "
                          f"its texts were tokenised with), or put {VOCAB} in its folder")


def find_answers(folder: str | None, cfg: ml_collections.ConfigDict | None,
                 given: str | os.PathLike | Mapping[str, int] | Sequence[str] | None = None
                 ) -> tuple[str, ...] | None:
  """label -> answer: `given` (a path, {answer: label} or the list itself), else
  ans2label.json in (or beside) the model's folder, else a VQA run's; None if none."""
  if isinstance(given, Mapping):
    return vqa_task.answers_of(given)
  if isinstance(given, (list, tuple)):
    return tuple(given)
  if given is not None:
    return vqa_task.read_answers(os.path.abspath(os.fspath(given)))
  for d in _candidates(folder) if folder else []:
    if os.path.isfile(os.path.join(d, ANS2LABEL)):
      return vqa_task.read_answers(os.path.join(d, ANS2LABEL))
  data = _run_data(cfg)
  if data is not None and cfg.task == vqa_task.VqaTask.name:
    path = vqa_task.ans2label_path(cfg, data)
    if os.path.isfile(path):
      return vqa_task.read_answers(path)
  return None


def processor_settings(cfg: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """The run's text / region buckets and truncation (so batches equal its eval batches)."""
  if cfg is None:
    return {}
  d = cfg.data
  return {"txt_buckets": tuple(d.txt_buckets), "img_buckets": tuple(d.img_buckets),
          "max_txt_len": int(d.max_txt_len), "feat_dtype": str(d.feat_dtype)}


def ot_settings(cfg: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """A pretraining run's WRA solver options (uniter_jax.losses.ot_distance keywords)."""
  if cfg is None or "pretrain" not in cfg:
    return {}
  return dict(pretrain_task.ot_options(cfg.pretrain.ot))


def vcr_choice_len(cfg: ml_collections.ConfigDict | None) -> int | None:
  """A VCR run's config.vcr.max_choice_len (the width of each choice's slots); else None."""
  if cfg is None or "vcr" not in cfg:
    return None
  return int(cfg.vcr.max_choice_len)
