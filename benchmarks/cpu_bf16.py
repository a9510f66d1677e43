"""bfloat16 on XLA:CPU: can it run the dots faster than float32, and does the train step gain?

    taskset -c 0 python benchmarks/cpu_bf16.py --matmul          # every XLA flag set below
    taskset -c 0 python benchmarks/cpu_bf16.py --step --sizes small --objectives mlm,itm

--matmul: one child process per XLA:CPU flag set (XLA reads its flags once per process), each
at one thread, timing the UNITER-base dots (2048 x 768 @ 768 x 768, 2048 x 768 @ 768 x 3072
and 2048 x 3072 @ 3072 x 768) as float32, as bfloat16 in and out, as bfloat16 in with float32
accumulation out (preferred_element_type), and float32 under
jax.default_matmul_precision("bfloat16"); torch's float32 and bfloat16 (oneDNN) matmuls of the
same shapes in the same process; whether XLA's optimised program calls oneDNN / XNNPACK; and
the CPU's bf16 / AMX features. Prints one JSON line per flag set, then a table.

--step: our pretraining step (benchmarks/train_step.py `build`) with model.dtype float32 and
bfloat16 (parameters, optimizer, losses and OT stay float32), compiled in one process and
timed in alternating rounds on the same batch; the first update's loss of each (same
weights, batch and keys) and their difference. --xla-flags adds flags (e.g. a set that
--matmul found faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import official  # noqa: E402  (benchmarks/official.py: imports no jax)

# XLA:CPU flag sets tried (names from this jaxlib's flag table: `strings` on
# jaxlib/libjax_common.so | grep xla_cpu_): oneDNN rewrites, oneDNN / XNNPACK / YNNPACK fusions.
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn_fusion_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_fusion_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_fusion_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
}
SHAPES = ((2048, 768, 768), (2048, 768, 3072), (2048, 3072, 768))  # (m, k, n)


def cpu_features() -> list[str]:
  """The bf16 / AMX / AVX-512 flags /proc/cpuinfo lists (what oneDNN can use for bf16)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
  except OSError:
    return []
  return sorted(x for x in flags if "bf16" in x or x.startswith("amx") or x in
                ("avx512f", "avx512_vnni", "avx512_fp16"))


def _rate(fn, flops: float, seconds: float) -> float:
  """Median GFLOP/s of fn() over repeats lasting about `seconds`."""
  fn()
  ts, t_end = [], time.perf_counter() + seconds
  while time.perf_counter() < t_end or len(ts) < 3:
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return round(flops / statistics.median(ts) / 1e9, 1)


def hlo_summary(hlo: str) -> dict:
  """What XLA made of a dot: the library fusions / custom calls it emitted (YNNPACK, XNNPACK,
  oneDNN) and the element type the dot itself computes in (f32 for bf16 inputs = upcast)."""
  calls = set(re.findall(r"%((?:ynn|xnn|onednn)\w*?fusion)", hlo, re.I))
  calls |= set(re.findall(r'custom_call_target="([^"]+)"', hlo))
  return {"library_calls": sorted(calls),
          "dot_types": sorted(set(re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? dot\(", hlo)))}


def probe(seconds: float) -> dict:
  """This process's matmul table (run with XLA_FLAGS already set)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  torch = official.require_torch()
  torch.set_num_threads(1)
  out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
         "torch": torch.__version__, "shapes": {}}
  for m, k, n in SHAPES:
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((m, k)).astype(np.float32)
    w32 = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    exact = x32.astype(np.float64) @ w32.astype(np.float64)
    xb, wb = jnp.asarray(x32, jnp.bfloat16), jnp.asarray(w32, jnp.bfloat16)
    xf, wf = jnp.asarray(x32), jnp.asarray(w32)
    variants = {
        "xla_f32": (jax.jit(jnp.matmul), (xf, wf)),
        "xla_bf16": (jax.jit(jnp.matmul), (xb, wb)),
        "xla_bf16_f32acc": (jax.jit(lambda a, b: jnp.matmul(
            a, b, preferred_element_type=jnp.float32)), (xb, wb)),
    }
    variants["xla_f32_precision_bf16"] = (jax.jit(lambda a, b: jnp.matmul(a, b) + 0.0),
                                          (xf, wf))
    row = {}
    for name, (fn, args) in variants.items():
      # The precision context acts when the function is traced, i.e. at lower().
      ctx = (jax.default_matmul_precision("bfloat16") if name == "xla_f32_precision_bf16"
             else contextlib.nullcontext())
      with ctx:
        compiled = fn.lower(*args).compile()
      hlo = compiled.as_text()
      run = lambda c=compiled, a=args: c(*a).block_until_ready()
      got = np.asarray(compiled(*args).astype(jnp.float32), np.float64)
      row[name] = {"gflops": _rate(run, 2.0 * m * k * n, seconds),
                   "rel_err": float(np.abs(got - exact).max() / np.abs(exact).max()),
                   **hlo_summary(hlo)}
    tx, tw = torch.from_numpy(x32), torch.from_numpy(w32)
    for name, (a, b) in {"torch_f32": (tx, tw),
                         "torch_bf16": (tx.bfloat16(), tw.bfloat16())}.items():
      got = torch.mm(a, b).float().double().numpy()
      row[name] = {"gflops": _rate(lambda a=a, b=b: torch.mm(a, b), 2.0 * m * k * n, seconds),
                   "rel_err": float(np.abs(got - exact).max() / np.abs(exact).max())}
    out["shapes"][f"{m}x{k}x{n}"] = row
  return out


def matmul_table(a) -> list[dict]:
  """One child per flag set; a failed set (flag unknown to this jaxlib) is reported as such."""
  rows = []
  for name, flags in FLAG_SETS.items():
    env = dict(os.environ, XLA_FLAGS=f"{official.thread_flags(1)} {flags}".strip())
    proc = subprocess.run([sys.executable, __file__, "--_probe", f"--seconds={a.seconds}"],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      err = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
      row = {"flag_set": name, "flags": flags, "error": err}
    else:
      row = {"flag_set": name, "flags": flags, **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(f"\nCPU: {official.machine()['cpu']}; bf16 / AMX features: "
        f"{', '.join(cpu_features()) or 'none'}; one thread; GFLOP/s (median)")
  names = ("xla_f32", "xla_bf16", "xla_bf16_f32acc", "xla_f32_precision_bf16", "torch_f32",
           "torch_bf16")
  print("| flag set | shape | " + " | ".join(names) + " | XLA bf16 dot: library, computes in |")
  print("|---|---|" + "---|" * (len(names) + 1))
  for r in rows:
    if "error" in r:
      print(f"| {r['flag_set']} | - | rejected by this jaxlib: {r['error']} |")
      continue
    for shape, row in r["shapes"].items():
      calls = (f"{','.join(row['xla_bf16']['library_calls']) or 'none'}, "
               f"{','.join(row['xla_bf16']['dot_types'])}")
      print(f"| {r['flag_set']} | {shape} | "
            + " | ".join(str(row[n]["gflops"]) for n in names) + f" | {calls} |")
  return rows


def step_table(a) -> list[dict]:
  """Our step in float32 and bfloat16, alternating rounds."""
  os.environ["XLA_FLAGS"] = f"{official.thread_flags(1)} {a.xla_flags}".strip()
  import jax  # pylint: disable=import-outside-toplevel
  import train_step as bench_step  # pylint: disable=import-outside-toplevel
  solver = bench_step.usable_solver("sinkhorn")
  rows = []
  for size in a.sizes.split(","):
    for objective in a.objectives.split(","):
      built = {d: bench_step.build(size, a.batch, d, a.txt_len, a.regions, solver,
                                   {objective: 1.0}) for d in ("float32", "bfloat16")}
      times: dict[str, list[float]] = {d: [] for d in built}
      first = {}
      for d, b in built.items():  # first update: same weights, batch and keys
        with jax.set_mesh(b["mesh"]):
          b["state"], m = b["step"](b["state"], b["batch"])
          first[d] = float(m["loss"])
      for r in range(a.rounds):
        for d in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
          b = built[d]
          with jax.set_mesh(b["mesh"]):
            for _ in range(a.steps):
              t0 = time.perf_counter()
              b["state"], m = b["step"](b["state"], b["batch"])
              jax.block_until_ready(m["loss"])
              times[d].append(time.perf_counter() - t0)
      med = {d: statistics.median(t) for d, t in times.items()}
      row = {"size": size, "objective": objective, "batch": a.batch, "txt_len": a.txt_len,
             "regions": a.regions, "xla_flags": os.environ["XLA_FLAGS"],
             "ms_float32": round(med["float32"] * 1e3, 1),
             "ms_bfloat16": round(med["bfloat16"] * 1e3, 1),
             "bf16_speedup": round(med["float32"] / med["bfloat16"], 3),
             "first_loss_float32": first["float32"], "first_loss_bfloat16": first["bfloat16"],
             "first_loss_rel_diff": abs(first["bfloat16"] - first["float32"])
                                    / abs(first["float32"]),
             "loadavg": os.getloadavg()[0]}
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--matmul", action="store_true", help="the matmul table over XLA flag sets")
  p.add_argument("--step", action="store_true", help="our train step, float32 vs bfloat16")
  p.add_argument("--seconds", type=float, default=2.0, help="timing per matmul variant")
  p.add_argument("--sizes", default="small")
  p.add_argument("--objectives", default="mlm,itm")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--txt-len", type=int, default=64)
  p.add_argument("--regions", type=int, default=36)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--xla-flags", default="", help="extra XLA flags for --step")
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._probe:  # pylint: disable=protected-access
    print(json.dumps(probe(a.seconds)))
    return
  if not (a.matmul or a.step):
    p.error("say --matmul, --step or both")
  res = {"machine": official.machine(), "cpu_features": cpu_features()}
  if a.matmul:
    res["matmul"] = matmul_table(a)
  if a.step:
    res["step"] = step_table(a)
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
