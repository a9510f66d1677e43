"""Nested dicts <-> flat {path: leaf} maps (parameter trees, official batches, metadata)."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping[Any, Any], *, sep: str | None = None, drop_none: bool = False
            ) -> dict[Any, Any]:
  """{'a': {'b': x}} -> {('a', 'b'): x}, or {'a.b': x} with sep='.'.

  Keys become str (bytes are decoded); with drop_none, None leaves are left out.
  """
  out: dict[Any, Any] = {}

  def walk(node: Mapping[Any, Any], prefix: tuple[str, ...]) -> None:
    for k, v in node.items():
      path = prefix + (k.decode() if isinstance(k, bytes) else str(k),)
      if isinstance(v, Mapping):
        walk(v, path)
      elif v is not None or not drop_none:
        out[path if sep is None else sep.join(path)] = v

  walk(tree, ())
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """The inverse of flatten (tuple keys)."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out
