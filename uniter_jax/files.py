"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any, Callable

PathLike = str | os.PathLike


def atomic_write(path: PathLike, write: Callable[[Any], None], *, overwrite: bool) -> None:
  """Calls write(file) on a temp file in the target folder, then renames it into place.

  An existing `path` is refused unless overwrite; an error leaves no temp file behind.
  """
  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_bytes(path: PathLike, data: bytes, *, overwrite: bool) -> None:
  """atomic_write of a bytes object."""
  atomic_write(path, lambda f: f.write(data), overwrite=overwrite)
