"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import sys
import tempfile
from typing import Any, Callable, Iterable

PathLike = str | os.PathLike


def is_writer() -> bool:
  """Whether this process writes a run's files: always in one process; in a run of several
  processes (jax.distributed: they share the workdir and hold the same results) process 0."""
  jax = sys.modules.get("jax")  # not imported: not a distributed run (data_prep tools)
  return jax is None or jax.process_index() == 0


def atomic_write(path: PathLike, write: Callable[[Any], None], *, overwrite: bool) -> None:
  """Calls write(file) on a temp file in the target folder, then renames it into place.

  An existing `path` is refused unless overwrite; an error leaves no temp file behind. In a
  run of several processes only process 0 writes (is_writer); the others return at once.
  """
  if not is_writer():
    return
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


# -- folders written as one unit (datasets, exports).


def temp_dir_beside(path: PathLike) -> str:
  """A fresh hidden folder next to `path` (on its file system, so a rename publishes it), named
  after this host and process: those that runs on this host left behind when they were killed
  (their process is gone) are removed first."""
  parent, name = os.path.split(os.path.abspath(os.fspath(path)))
  os.makedirs(parent, exist_ok=True)
  prefix = f".{name}.tmp-"
  _remove_dead_temp_dirs(parent, prefix)
  return tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=parent)


def _remove_dead_temp_dirs(parent: str, prefix: str) -> None:
  """Removes parent/PREFIX<host>-<pid>-* folders of this host whose process no longer runs."""
  host = socket.gethostname()
  for entry in os.listdir(parent):
    if not entry.startswith(prefix):
      continue
    try:
      owner, pid, _ = entry[len(prefix):].rsplit("-", 2)
      pid = int(pid)
    except ValueError:
      continue
    if owner == host and not _pid_alive(pid):  # another host's process is not ours to judge
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def check_replaceable(path: PathLike, *, overwrite: bool, not_ours: Callable[[str], str | None],
                      flag: str = "--overwrite") -> None:
  """Refuses an existing `path` (but an empty folder) unless overwrite, and even then unless this
  project made it.

  not_ours(path) says why a folder is not one of ours (None: ours, e.g. a dataset with our
  manifest.json): an input, a home folder or files someone else wrote are never replaced.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
    return  # nothing there to lose (an empty folder made beforehand is filled)
  if not overwrite:
    raise FileExistsError(f"{path} exists; pick another output or pass {flag} to replace it")
  why = not_ours(path)
  if why:
    raise FileExistsError(f"{path} exists and {why}; {flag} replaces only a folder this project "
                          "wrote: pick another output, or move that folder away yourself")


def publish_dir(tmp: PathLike, path: PathLike, *, overwrite: bool,
                not_ours: Callable[[str], str | None], flag: str = "--overwrite") -> None:
  """Renames the finished folder `tmp` to `path`, replacing an old `path` only as
  check_replaceable allows; the old folder is moved aside first and deleted last."""
  path = os.path.abspath(os.fspath(path))
  check_replaceable(path, overwrite=overwrite, not_ours=not_ours, flag=flag)
  old = None
  if os.path.lexists(path):
    old = f"{os.fspath(tmp)}.old"
    os.rename(path, old)
  os.rename(tmp, path)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def make_shareable(path: PathLike) -> None:
  """Makes `path` (a file, or a folder and everything in it) readable by everyone: files 0644,
  folders 0755. mkstemp / mkdtemp create owner-only ones, which would make an export or a
  conversion unreadable to the colleagues it is written for."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    os.chmod(path, 0o644)
    return
  os.chmod(path, 0o755)
  for root, dirs, names in os.walk(path):
    for d in dirs:
      os.chmod(os.path.join(root, d), 0o755)
    for n in names:
      os.chmod(os.path.join(root, n), 0o644)


def check_apart(out: PathLike, inputs: Iterable[PathLike], flag: str = "--out") -> None:
  """ValueError when `out` is an input, lies inside an input folder or holds an input, so
  that replacing it could destroy what is being read; checked before anything is written."""
  o = os.path.realpath(os.fspath(out))
  for i in inputs:
    r = os.path.realpath(os.fspath(i))
    if o == r or o.startswith(r + os.sep) or r.startswith(o + os.sep):
      how = "is" if o == r else ("is inside" if o.startswith(r + os.sep) else "holds")
      raise ValueError(f"{flag} {out} {how} the input {i}; write the output elsewhere")
