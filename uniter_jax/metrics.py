"""Metric writing (clu TensorBoard writers + WORKDIR/metrics.jsonl), progress and MFU."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPU) report no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a lowered or compiled function, from XLA's cost analysis.

  A scanned loop body is counted once (see uniter_jax.flops).
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


class Writer:
  """Writes scalars to TensorBoard (clu) and to WORKDIR/metrics.jsonl; host 0 only."""

  def __init__(self, workdir: str, *, subdir: str = ""):
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    self.active = jax.process_index() == 0
    logdir = os.path.join(workdir, subdir) if subdir else workdir
    os.makedirs(logdir, exist_ok=True)
    self.tb = metric_writers.create_default_writer(logdir, just_logging=not self.active,
                                                   asynchronous=False)
    self.jsonl = os.path.join(logdir, "metrics.jsonl")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    clean = {k: float(v) for k, v in scalars.items() if v is not None and np.isfinite(float(v))}
    self.tb.write_scalars(step, clean)
    if self.active:
      with open(self.jsonl, "a") as f:
        f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()
                                                 if v is not None}}) + "\n")

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    """The resolved run config as TensorBoard hparams (dotted keys; lists and tuples as text,
    since hparams take only scalars and strings)."""
    from uniter_jax import pytree  # pylint: disable=import-outside-toplevel
    flat = pytree.flatten(config, sep=".")
    self.tb.write_hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                           for k, v in flat.items()})

  def close(self) -> None:
    self.tb.flush()
    self.tb.close()


class Progress:
  """A one-line progress report with steps/s and ETA, measured from the first completed step
  (so compilation does not count as training time)."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start = total_steps, start_step
    self.t0 = time.time()

  def first_step_done(self, step: int) -> None:
    """Call once the first step has finished: the rate counts from here."""
    self.start, self.t0 = step, time.time()

  def rate_eta(self, step: int) -> tuple[float, str]:
    """(steps per second, 'ETA 1m05s') at `step`."""
    done = max(step - self.start, 1)
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    return rate, f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"

  def line(self, step: int, loss: float) -> str:
    rate, eta = self.rate_eta(step)
    return f"step {step}/{self.total} loss {loss:.4f} {rate:.2f} steps/s {eta}"
