"""VCR (question, choice) sequences built inside the jitted step from one row per question.

The pipeline delivers each question once: `input_ids` = [CLS] Q [SEP] (B, Lt) with `txt_mask`,
and the choices as flat int lists, `input_ids_as` / `input_ids_rs` (B, F) with their lengths
`lens_as` / `lens_rs` (B, 4). Here every question becomes 4 rows (one per choice), with the
official token types (docs/official.md, *Downstream heads: VCR*):

  Q->A   [CLS] Q [SEP] A_c [SEP]                types 0 .. 0, 2 (the first [SEP]), 2 .. 2
  QA->R  [CLS] Q [SEP] A_a [SEP] R_c [SEP]      types 0 .. 0, 2, 2 .. 2, 3 ([SEP] after A), 3 .. 3

and for 2nd-stage pretraining (`pretrain_batch`) one row per question with the gold choices:

  Q+A+R  [CLS] Q [SEP] A_gold [SEP] R_gold [SEP] types 0 .. 0, 0 (the first [SEP]), 2 .. 2, 3 .. 3

Shapes are static: each choice segment takes `max_choice_len + 1` slots ([SEP] included) and the
pieces are packed left (text positions are explicit, the rest is padding under txt_mask).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

NUM_CHOICES = 4
QUESTION, ANSWER, RATIONALE = 0, 2, 3  # token types (1 is the regions')
IMAGE_KEYS = ("img_feat", "img_pos", "img_mask", "img_type_ids", "img_soft_labels")


def _choice(flat: jax.Array, lens: jax.Array, pick: jax.Array, width: int, sep_id: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """Choice `pick` (B,) of each row + [SEP] (sep_id (B, 1)): ids (B, width + 1) 0-padded,
  lengths (B,)."""
  offsets = jnp.cumsum(lens, axis=1) - lens
  start = jnp.take_along_axis(offsets, pick[:, None], axis=1)
  n = jnp.take_along_axis(lens, pick[:, None], axis=1)  # (B, 1)
  j = jnp.arange(width + 1)[None]
  tok = jnp.take_along_axis(flat, jnp.clip(start + j, 0, flat.shape[1] - 1), axis=1)
  ids = jnp.where(j < n, tok, jnp.where(j == n, sep_id, 0))
  return ids.astype(jnp.int32), n[:, 0] + 1


def _pack(parts: list[tuple[jax.Array, jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array,
                                                                          jax.Array]:
  """Ragged (ids (B, W), types (B, W), length (B,)) parts -> left-packed ids, types, mask."""
  b = parts[0][0].shape[0]
  width = sum(p[0].shape[1] for p in parts)
  ids = jnp.zeros((b, width), jnp.int32)
  types = jnp.zeros((b, width), jnp.int32)
  rows = jnp.arange(b)[:, None]
  start = jnp.zeros((b,), jnp.int32)
  for part_ids, part_types, n in parts:
    j = jnp.arange(part_ids.shape[1])[None]
    # Positions past a part's length go out of bounds and are dropped.
    pos = jnp.where(j < n[:, None], start[:, None] + j, width)
    ids = ids.at[rows, pos].set(part_ids, mode="drop")
    types = types.at[rows, pos].set(part_types, mode="drop")
    start = start + n
  return ids, types, jnp.arange(width)[None] < start[:, None]


def choice_batch(batch: Mapping[str, Any], kind: str, *, max_choice_len: int,
                 answer: jax.Array | None = None) -> dict:
  """The model batch of 4 rows per question (row 4q + c = choice c of question q).

  kind "qa": the 4 answers. kind "qar": the 4 rationales after answer `answer` (B,) (the
  gold answer `qa_target` when None, as the official val mode conditions on it). The [SEP]
  id is the one closing each question (the pipeline's).
  """
  q_ids = batch["input_ids"].astype(jnp.int32)
  q_len = jnp.sum(batch["txt_mask"].astype(jnp.int32), axis=1)
  lt = q_ids.shape[1]
  sep_id = jnp.take_along_axis(q_ids, jnp.maximum(q_len - 1, 0)[:, None], axis=1)
  # The [SEP] closing the question takes the answer's type, as the official VcrDataset.
  q_types = jnp.where(jnp.arange(lt)[None] == q_len[:, None] - 1, ANSWER, QUESTION)

  def rep(x):
    return jnp.repeat(x, NUM_CHOICES, axis=0)

  every = jnp.tile(jnp.arange(NUM_CHOICES, dtype=jnp.int32), q_ids.shape[0])
  question = (rep(q_ids), rep(q_types), rep(q_len))
  if kind == "qa":
    a_ids, a_len = _choice(rep(batch["input_ids_as"]), rep(batch["lens_as"]), every,
                           max_choice_len, rep(sep_id))
    parts = [question, (a_ids, jnp.full_like(a_ids, ANSWER), a_len)]
  elif kind == "qar":
    gold = batch["qa_target"] if answer is None else answer
    a_ids, a_len = _choice(batch["input_ids_as"], batch["lens_as"],
                           jnp.maximum(gold.astype(jnp.int32), 0), max_choice_len, sep_id)
    # The [SEP] closing the answer takes the rationale's type.
    a_types = jnp.where(jnp.arange(a_ids.shape[1])[None] == a_len[:, None] - 1, RATIONALE,
                        ANSWER)
    r_ids, r_len = _choice(rep(batch["input_ids_rs"]), rep(batch["lens_rs"]), every,
                           max_choice_len, rep(sep_id))
    parts = [question, (rep(a_ids), rep(a_types), rep(a_len)),
             (r_ids, jnp.full_like(r_ids, RATIONALE), r_len)]
  else:
    raise ValueError(f"VCR sequences: kind {kind!r}; use 'qa' or 'qar'")
  ids, types, mask = _pack(parts)
  out = {"input_ids": ids, "txt_type_ids": types, "txt_mask": mask}
  out.update({k: rep(batch[k]) for k in IMAGE_KEYS if k in batch})
  return out


def pretrain_batch(batch: Mapping[str, Any], *, max_choice_len: int) -> dict:
  """One row per question for 2nd-stage pretraining: [CLS] Q [SEP] A_gold [SEP] R_gold [SEP].

  Token types as the official VcrPretrainDataset: 0 up to and including the [SEP] after Q
  (unlike fine-tuning), 2 for the answer and its [SEP], 3 for the rationale and its [SEP]. A
  question without gold labels (-1) reads choice 0 (training data is checked to have them).
  The image fields and img_ids pass through.
  """
  q_ids = batch["input_ids"].astype(jnp.int32)
  q_len = jnp.sum(batch["txt_mask"].astype(jnp.int32), axis=1)
  sep_id = jnp.take_along_axis(q_ids, jnp.maximum(q_len - 1, 0)[:, None], axis=1)
  pieces = [(q_ids, jnp.full_like(q_ids, QUESTION), q_len)]
  for flat, lens, gold, kind in (("input_ids_as", "lens_as", "qa_target", ANSWER),
                                 ("input_ids_rs", "lens_rs", "qar_target", RATIONALE)):
    ids, n = _choice(batch[flat], batch[lens], jnp.maximum(batch[gold].astype(jnp.int32), 0),
                     max_choice_len, sep_id)
    pieces.append((ids, jnp.full_like(ids, kind), n))
  ids, types, mask = _pack(pieces)
  out = {k: v for k, v in batch.items() if k in IMAGE_KEYS or k == "img_ids"}
  return {**out, "input_ids": ids, "txt_type_ids": types, "txt_mask": mask}


def choice_targets(batch: Mapping[str, Any], kind: str) -> jax.Array:
  """(4B,) 1 for the right choice's row, else 0 (the per-sequence binary targets)."""
  gold = batch["qa_target" if kind == "qa" else "qar_target"].astype(jnp.int32)
  every = jnp.arange(NUM_CHOICES, dtype=jnp.int32)[None]
  return (every == gold[:, None]).astype(jnp.int32).reshape(-1)


def stacked(batches: list[dict]) -> dict:
  """Several choice batches (each 4B rows) as one: text padded to the widest, rows stacked in
  order, so one forward pass (one compiled program) scores them all."""
  width = max(b["input_ids"].shape[1] for b in batches)

  def pad(x):
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))

  out = {k: jnp.concatenate([pad(b[k]) for b in batches])
         for k in ("input_ids", "txt_type_ids", "txt_mask")}
  out.update({k: jnp.concatenate([b[k] for b in batches]) for k in IMAGE_KEYS
              if k in batches[0]})
  return out
