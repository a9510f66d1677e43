"""Where a train step's time goes: the XLA ops of one compiled pretraining step, by kind.

    taskset -c 0 python benchmarks/profile_step.py --size small --objective mlm --threads 1

Builds the same step as benchmarks/train_step.py (one objective, masked-position heads, a batch
made on device), runs it under jax.profiler for --steps steps, then reads the trace: every op
the XLA:CPU runtime executed that contains no other op (a leaf), its time summed over the
steps and divided by their number, grouped by the op's HLO name without its number
(`ynn_fusion.14` -> `ynn_fusion`). Prints the table and writes it as JSON with --out; the raw
trace stays in --trace-dir for TensorBoard's profile plugin.

Reading the trace needs TensorFlow's XPlane protobuf (in requirements.txt); without it the
script only writes the trace. On a GPU the host events are the launches, not the kernels, so
use the trace in the profile plugin there.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import official  # noqa: E402  (imports no jax: XLA reads its thread flags before jax loads)

if official.threads_arg(sys.argv, default=0):
  os.environ["XLA_FLAGS"] = official.thread_flags(official.threads_arg(sys.argv))

import jax  # noqa: E402

import train_step as bench_step  # noqa: E402

# Events that contain other ops (control flow and the executors), not work of their own.
_CONTAINERS = ("ThunkExecutor", "cond", "while", "call", "closed_call")


def leaf_times(trace_dir: str, steps: int) -> dict[str, float]:
  """Seconds per step of each op kind on the XLA:CPU worker threads, leaves only."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: PLC0415 (optional)

  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  space = xplane_pb2.XSpace()
  with open(files[-1], "rb") as f:
    space.ParseFromString(f.read())
  total = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # the threads that run the compiled program's ops
        continue
      for ev in line.events:
        name = names.get(ev.metadata_id, "?")
        if name.startswith(_CONTAINERS):
          continue
        total[re.sub(r"\.\d+$", "", name)] += ev.duration_ps / 1e12 / steps
  return dict(total)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="small")
  p.add_argument("--objective", default="mlm", help="mlm, mrfr, mrckl or itm")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--txt-len", type=int, default=64)
  p.add_argument("--regions", type=int, default=36)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--ot-solver", default="sinkhorn")
  p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
  p.add_argument("--threads", type=int, default=0, help="XLA:CPU threads (0: XLA's default)")
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--trace-dir", default="", help="where the trace goes (default: a temp dir)")
  p.add_argument("--out", default="", help="write the table as JSON here")
  a = p.parse_args()
  solver = bench_step.usable_solver(a.ot_solver)
  built = bench_step.build(a.size, a.batch, a.dtype, a.txt_len, a.regions, solver,
                           {a.objective: 1.0})
  step, state, batch = built["step"], built["state"], built["batch"]
  trace_dir = a.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
  with jax.set_mesh(built["mesh"]):
    for _ in range(2):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(a.steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / a.steps
    jax.profiler.start_trace(trace_dir)
    for _ in range(a.steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
  res = {"size": a.size, "objective": a.objective, "batch": a.batch, "txt_len": a.txt_len,
         "regions": a.regions, "dtype": a.dtype, "threads": a.threads or "default",
         "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "wall_s_per_step": round(wall, 4), "trace_dir": trace_dir}
  try:
    ops = leaf_times(trace_dir, a.steps)
  except ImportError:
    print(f"TensorFlow is not installed: the trace is in {trace_dir} (TensorBoard's profile "
          "plugin reads it)")
    ops = {}
  leaf = sum(ops.values())
  res["leaf_s_per_step"] = round(leaf, 4)
  res["ops"] = {k: round(v, 4) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}
  print(f"{a.size} {a.objective}: {wall * 1e3:.0f} ms/step wall, {leaf * 1e3:.0f} ms in XLA ops "
        f"(leaves); trace in {trace_dir}")
  print("| op kind | ms / step | share of op time |\n|---|---|---|")
  for k, v in list(res["ops"].items())[:a.top]:
    print(f"| `{k}` | {v * 1e3:.1f} | {100 * v / leaf:.1f}% |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
  sys.stdout.flush()
  # The interpreter's shutdown can hang here once TensorFlow's protobuf module and the jax
  # profiler are both loaded (seen with jaxlib 0.10.2 and TF 2.21); nothing is left to do.
  os._exit(0)
