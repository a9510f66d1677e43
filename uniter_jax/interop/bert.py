"""BERT initialisation: the official `uniter-base-init` path.

See docs/official.md, *BERT initialisation*.

A Hugging Face BERT checkpoint (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`; names
with or without the `bert.` prefix) fills the text embeddings, the encoder, the pooler and
the MLM head (`cls.predictions.*`). The image embedder and the other heads keep their
fresh init, as they do in the official pretraining. The official converter renames `bert`
to `uniter` in every key; this does the same without an intermediate file.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import numpy as np
from flax import nnx

from uniter_jax.interop import io
from uniter_jax.interop.checkpoint import (CheckpointMismatchError, LoadReport, load_into,
                                           official_names)

# What BERT provides. Anything else in the model may be missing (fresh init).
_FROM_BERT = ("uniter.embeddings.", "uniter.encoder.", "uniter.pooler.", "cls.predictions.")
# What a BERT checkpoint must provide: without these the text encoder would be random.
_REQUIRED = ("uniter.embeddings.", "uniter.encoder.")
_BERT_UNUSED = ("cls.seq_relationship.", "uniter.embeddings.position_ids")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class _Holder(nnx.Module):
  """Gives a bare UniterModel the `uniter.` prefix of the official names."""

  def __init__(self, uniter: nnx.Module):
    self.uniter = uniter


def read_bert_tensors(source: io.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A BERT checkpoint file, a Hugging Face model folder (sharded or not), or a mapping."""
  if isinstance(source, Mapping):
    return io.read_tensors(source)
  path = pathlib.Path(source)
  if not path.is_dir():
    return io.read_tensors(path)
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = path / index_name
    if index.exists():
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      out: dict[str, np.ndarray] = {}
      for shard in shards:
        out.update(io.read_tensors(path / shard))
      return out
  for name in _WEIGHT_FILES:
    if (path / name).exists():
      return io.read_tensors(path / name)
  raise FileNotFoundError(f"{path}: no {' or '.join(_WEIGHT_FILES)} (or a sharded index) "
                          "in this folder")


def bert_to_official(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Hugging Face BERT names -> official UNITER names (`bert.` / no prefix -> `uniter.`)."""
  out = {}
  for name, arr in tensors.items():
    if name.startswith("bert."):
      name = name[len("bert."):]
    if not name.startswith("cls."):
      name = "uniter." + name
    out[name] = arr
  # Newer transformers store the MLM output bias twice (decoder.bias is tied to it).
  dup = out.pop("cls.predictions.decoder.bias", None)
  if dup is not None and "cls.predictions.bias" in out and not np.array_equal(
      dup, out["cls.predictions.bias"]):
    raise CheckpointMismatchError("cls.predictions.decoder.bias differs from "
                                  "cls.predictions.bias; they should be one tied tensor")
  if dup is not None and "cls.predictions.bias" not in out:
    out["cls.predictions.bias"] = dup
  return out


def load_bert(source: io.PathLike | Mapping[str, Any], model: nnx.Module) -> LoadReport:
  """Loads Hugging Face BERT weights into `model` in place (UniterForPretraining, any task
  model with a `.uniter` backbone, or a bare UniterModel).

  `source`: a `model.safetensors` or `pytorch_model.bin` file (the latter needs torch), a
  Hugging Face model folder, or a mapping name -> array. The model config must match BERT's
  sizes (UniterConfig.from_official_json reads a BERT config.json). Text embeddings and the
  encoder are required; the pooler and MLM head are loaded when present. Everything else
  (image embedder, MRFR / MRC / ITM and task heads) keeps its init and is listed in the
  report. Unknown tensors and shape mismatches raise CheckpointMismatchError.
  """
  target = model if hasattr(model, "uniter") else _Holder(model)
  tensors = bert_to_official(read_bert_tensors(source))
  missing_required = [p for p in _REQUIRED if not any(n.startswith(p) for n in tensors)]
  if missing_required:
    raise CheckpointMismatchError(f"no BERT tensors under {missing_required} in {source}; "
                                  "is this a BERT checkpoint?")
  # Everything outside the BERT part may be missing; inside it, only pooler and MLM head
  # (BertForMaskedLM has no pooler, BertModel no MLM head). Missing encoder or embedding
  # tensors stay errors.
  allow = [n for n in official_names(target) if not n.startswith(_FROM_BERT)]
  allow += ["uniter.pooler.", "cls.predictions."]
  return load_into(target, tensors, unused=_BERT_UNUSED, allow_missing=allow, task="bert")

