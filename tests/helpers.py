"""Shared test helpers: tiny configs and random batches in our batch layout."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from uniter_jax.models import UniterConfig


def tiny_config(**overrides) -> UniterConfig:
  return UniterConfig.preset("tiny", **overrides)


def random_batch(seed: int, b: int = 4, lt: int = 9, li: int = 6, *, cfg: UniterConfig,
                 txt_lens=None, num_bbs=None, soft_labels: bool = True) -> dict:
  """A batch with [CLS] w.. [SEP] text of random lengths and random regions (NumPy arrays)."""
  rng = np.random.default_rng(seed)
  txt_lens = rng.integers(3, lt + 1, b) if txt_lens is None else np.asarray(txt_lens)
  num_bbs = rng.integers(1, li + 1, b) if num_bbs is None else np.asarray(num_bbs)
  ids = rng.integers(4, cfg.vocab_size, (b, lt)).astype(np.int32)
  txt_mask = np.arange(lt)[None] < txt_lens[:, None]
  ids[:, 0] = 1
  ids[np.arange(b), txt_lens - 1] = 2
  ids = np.where(txt_mask, ids, 0)
  img_mask = np.arange(li)[None] < num_bbs[:, None]
  batch = {
      "input_ids": ids,
      "txt_mask": txt_mask,
      "img_feat": (rng.normal(size=(b, li, cfg.img_dim)) * img_mask[..., None]).astype(np.float32),
      "img_pos": (rng.random((b, li, 7)) * img_mask[..., None]).astype(np.float32),
      "img_mask": img_mask,
      "img_ids": np.arange(b, dtype=np.int32),
  }
  if soft_labels:
    logits = rng.normal(size=(b, li, cfg.img_label_dim)) * 2
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p[..., 2] = 0.0  # a zero-probability class exercises the q = 0 branch of KL
    batch["img_soft_labels"] = (p / p.sum(-1, keepdims=True)).astype(np.float32)
  return batch


def to_jnp(batch: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def world_config(config_module, world: str, **overrides):
  """A task config's tiny variant on a synthetic world and the (data 4, fsdp 2) mesh.

  Overrides are `key=value` or dotted `section.key=value` (e.g. `**{"data.val_text_dirs": d}`).
  """
  c = config_module.get_config("tiny")
  c.data.synthetic = world
  c.mesh = {"data": 4, "fsdp": 2}
  for k, v in overrides.items():
    *parents, leaf = k.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def vocab_file(folder, tokens) -> str:
  """A vocab.txt of `tokens` (id = position) in `folder`; returns its path."""
  path = os.path.join(str(folder), "vocab.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(tokens) + "\n")
  return path
