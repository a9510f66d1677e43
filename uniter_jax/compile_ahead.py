"""Ahead-of-time compilation: every train-step shape a run's data can yield, at start-up.

The input pipeline pads batches to static buckets, so a step is one XLA program per bucket
shape. Compiled on first use, a run would stall whenever the data first meets a bucket (mid-run,
with a wrong ETA until then). `compile_steps` compiles them all before the first step; the
jitted functions then reuse the compiled programs (jax keys its cache on the lowered shapes and
shardings, so a later call with real arrays of those shapes does not compile again).

`CompileCounter` counts XLA compilations and persistent-cache hits with jax.monitoring, for the
start-up report and for tests that check a run compiles nothing after start-up.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Any, Callable, Sequence

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileCounter:
  """Counts XLA compilations (by jitted function name) and persistent-cache hits while open.

      with CompileCounter() as c:
        ...
      c.compiles, c.by_name["step"], c.cache_hits
  """

  compiles: int = 0
  cache_hits: int = 0
  by_name: dict = dataclasses.field(default_factory=dict)

  def __enter__(self) -> "CompileCounter":
    _install()
    with _LOCK:
      _ACTIVE.append(self)
    return self

  def __exit__(self, *exc) -> None:
    with _LOCK:
      _ACTIVE.remove(self)


_ACTIVE: list[CompileCounter] = []
_LOCK = threading.Lock()
_INSTALLED = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del duration
  if event != _BACKEND_COMPILE:
    return
  name = str(kwargs.get("fun_name", "?"))
  with _LOCK:
    for c in _ACTIVE:
      c.compiles += 1
      c.by_name[name] = c.by_name.get(name, 0) + 1


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event == _CACHE_HIT:
    with _LOCK:
      for c in _ACTIVE:
        c.cache_hits += 1


def _install() -> None:
  """Registers the listeners once per process (jax keeps them for the process's life)."""
  global _INSTALLED
  with _LOCK:
    if not _INSTALLED:
      jax.monitoring.register_event_duration_secs_listener(_on_duration)
      jax.monitoring.register_event_listener(_on_event)
      _INSTALLED = True


def compile_steps(jobs: Sequence[tuple[Callable, tuple[Any, ...]]], *,
                  threads: int | None = None) -> tuple[float, CompileCounter]:
  """Lowers every (jitted_fn, abstract_args) job, then compiles them, `threads` at a time.

  Lowering (tracing) runs here, in order, in the caller's context (mesh, rules); XLA's
  compilation releases the GIL, so several programs compile in parallel on a many-core host.
  Returns (seconds, counter of the compilations and cache hits it made).
  """
  t0 = time.time()
  with CompileCounter() as counter:
    lowered = [fn.lower(*args) for fn, args in jobs]
    n = max(1, min(threads or os.cpu_count() or 1, len(lowered)))
    if n == 1:
      for low in lowered:
        low.compile()
    else:
      with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda low: low.compile(), lowered))
  return time.time() - t0, counter
