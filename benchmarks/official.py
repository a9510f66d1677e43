"""The official PyTorch UNITER beside ours in the benchmarks: import it, same weights, probes.

`--official DIR` in benchmarks/retrieval_eval.py and benchmarks/vs_official.py: DIR is a
checkout of github ChenRocks/UNITER (or any folder holding its `model/` package; its `optim/`
is used when present). Its code is imported from there at run time, never copied here. It
needs PyTorch, which is not in requirements.txt: `pip install -r requirements-torch.txt` (for
the CPU build alone: `pip install torch --index-url https://download.pytorch.org/whl/cpu`).

Import shims, no official file edited: apex's FusedLayerNorm (a CUDA extension) is
torch.nn.LayerNorm (the same math), and model/ot.py's `trace` is the diagonal sum (the
official one selects it with a uint8 mask, which torch >= 2 rejects).
"""

from __future__ import annotations

import os
import sys
import time
import types
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # no jax import here: callers set XLA_FLAGS (thread_flags) first
  from uniter_jax.models import UniterConfig

TORCH_HINT = ("PyTorch is needed to run the official code: pip install -r requirements-torch.txt "
              "(CPU only: pip install torch --index-url https://download.pytorch.org/whl/cpu)")


def require_torch():
  """The torch module, or exit with one line saying how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit(f"error: {TORCH_HINT}") from None
  return torch


def thread_flags(threads: int) -> str:
  """XLA_FLAGS that hold XLA:CPU to `threads` threads (set before jax is imported)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
    flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  elif threads > 1 and "intra_op_parallelism_threads" not in flags:
    flags += f" intra_op_parallelism_threads={threads}"
  return flags.strip()


def threads_arg(argv: list[str], default: int = 1) -> int:
  """--threads from a command line, read before jax is imported (XLA reads its flags once)."""
  for i, a in enumerate(argv):
    if a.startswith("--threads="):
      return int(a.split("=", 1)[1])
    if a == "--threads" and i + 1 < len(argv):
      return int(argv[i + 1])
  return default


def import_official(src: str) -> types.SimpleNamespace:
  """The official modules imported from `src`: model.{model, pretrain, itm, ot}, and
  optim.misc (its AdamW and parameter groups) or None when `src` has no optim/ folder."""
  torch = require_torch()
  if not os.path.isdir(os.path.join(src, "model")):
    raise SystemExit(f"error: --official {src}: no model/ folder there; point it at a checkout "
                     "of github ChenRocks/UNITER")
  try:
    import apex.normalization.fused_layer_norm  # noqa: F401  pylint: disable=import-outside-toplevel
  except ImportError:
    for name in ("apex", "apex.normalization", "apex.normalization.fused_layer_norm"):
      sys.modules[name] = types.ModuleType(name)
    sys.modules["apex.normalization.fused_layer_norm"].FusedLayerNorm = torch.nn.LayerNorm
  sys.path.insert(0, os.path.abspath(src))
  # pylint: disable=import-outside-toplevel
  import model.itm as itm  # the official package
  import model.model as official_model
  import model.ot as ot
  import model.pretrain as pretrain
  ot.trace = lambda x: torch.diagonal(x, dim1=1, dim2=2).sum(-1)
  misc = None
  if os.path.isdir(os.path.join(src, "optim")):
    import optim.misc as misc
  return types.SimpleNamespace(model=official_model, itm=itm, pretrain=pretrain, ot=ot,
                               optim=misc)


def official_config(off: types.SimpleNamespace, cfg: "UniterConfig"):
  """The official UniterConfig of the same sizes as ours."""
  return off.model.UniterConfig(
      cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
      hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
      initializer_range=cfg.initializer_range)


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  """A torch module's tensors as float32 NumPy arrays (what load_official_checkpoint reads)."""
  return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def torch_matmul_gflops(seconds: float = 1.0, n: int = 1024, dtype: str = "float32") -> float:
  """Sustained GFLOP/s of torch.mm (n x n) at torch's current thread setting."""
  torch = require_torch()
  x = torch.randn(n, n).to(getattr(torch, dtype))
  y = torch.randn(n, n).to(getattr(torch, dtype))
  torch.mm(x, y)
  k, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    torch.mm(x, y)
    k += 1
  return 2.0 * n ** 3 * k / (time.perf_counter() - t0) / 1e9


def xla_matmul_gflops(seconds: float = 1.0, n: int = 1024, dtype: str = "float32") -> float:
  """Sustained GFLOP/s of a jitted n x n matmul on jax's default device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  y = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(jnp.matmul)
  mm(x, y).block_until_ready()
  k, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    mm(x, y).block_until_ready()
    k += 1
  return 2.0 * n ** 3 * k / (time.perf_counter() - t0) / 1e9


def machine() -> dict[str, Any]:
  """CPU model, the cores this process may run on and the load average (for the record)."""
  model = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
  except OSError:
    pass
  return {"cpu": model, "cpus": os.cpu_count(),
          "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "loadavg": [round(x, 2) for x in os.getloadavg()]}
