"""NLVR2 metrics: accuracy and consistency (lil-lab/nlvr, nlvr2/eval/metrics.py), and the
official prediction CSV (`identifier,True|False`, as train_nlvr2.py writes it)."""

from __future__ import annotations

from typing import Sequence

from uniter_jax import files


def sentence_key(identifier: str) -> str:
  """The sentence an example belongs to: its identifier with the image-pair part blanked.

  NLVR2 identifiers are split-set-pair-sentence ("dev-850-0-0"); the examples of one
  sentence differ only in the pair. An identifier of another shape is its own sentence.
  """
  parts = identifier.split("-")
  if len(parts) < 4:
    return identifier
  parts[2] = ""
  return "-".join(parts)


def consistency(identifiers: Sequence[str], correct: Sequence[bool]) -> float:
  """The fraction of sentences whose every example is predicted correctly."""
  ok: dict[str, bool] = {}
  for ident, c in zip(identifiers, correct):
    key = sentence_key(ident)
    ok[key] = ok.get(key, True) and bool(c)
  return sum(ok.values()) / len(ok) if ok else 0.0


def write_csv(path: str, identifiers: Sequence[str], predictions: Sequence[int]) -> str:
  """The official results CSV: one `identifier,True|False` line per example (1 = True)."""
  if len(set(identifiers)) != len(identifiers):
    raise ValueError("duplicate NLVR2 identifiers in the predictions")
  text = "".join(f"{i},{'True' if p == 1 else 'False'}\n"
                 for i, p in zip(identifiers, predictions))
  files.write_bytes(path, text.encode(), overwrite=True)
  return path
