"""Does pretraining help? A fine-tuning task on the synthetic world from random init vs our
pretraining, with the world's chance and text-only baselines beside it.

Runs (each a plain main.py command, so every row can be re-run by hand):
  1. the default pretraining into WORKDIR/pretrain (skipped when its export exists) and,
     with --uniform-masking, the same run with the official uniform MLM masking
     (mlm_focus_words='') into WORKDIR/pretrain_uniform;
  2. configs/TASK.py from random init and from each pretraining export, once per seed
     (skipped when its eval exists);
then prints the world's chance and text-only baselines (manifest.json, which names the
text-only method) and a markdown table of the held-out (val) metrics: the task's main metric
per seed and their mean, the other metrics averaged over seeds.

  python scripts/finetune_ablation.py --task=vqa --workdir=workdir/ablation --seeds=42,43
  python scripts/finetune_ablation.py --task=ve --workdir=workdir/ablation --seeds=42,43
  python scripts/finetune_ablation.py --task=nlvr2 --workdir=workdir/ablation --seeds=42,43
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# task -> its main held-out metric (the one the world's baselines are stated in)
MAIN_METRIC = {"vqa": "vqa_score", "ve": "ve/accuracy", "nlvr2": "nlvr2/accuracy",
               "re": "re/accuracy"}


def run(args: list[str]) -> None:
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), *args]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def pretrain(workdir: str, extra: list[str]) -> str:
  export = os.path.join(workdir, "export", "params.msgpack")
  if not os.path.exists(export):
    base = ["--config=configs/pretrain.py", f"--workdir={workdir}", *extra]
    run(base)
    run(base + ["--mode=export"])
  return export


def last_eval(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval", "metrics.jsonl"), encoding="utf-8") as f:
    return json.loads(f.read().strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--task", choices=sorted(MAIN_METRIC), default="vqa")
  p.add_argument("--workdir", default="workdir/ablation")
  p.add_argument("--seeds", default="42,43", help="fine-tuning seeds (init of the head, data order)")
  p.add_argument("--steps", type=int, default=0, help="0 = the task config's default")
  p.add_argument("--uniform-masking", action="store_true",
                 help="also pretrain with the official uniform MLM masking")
  p.add_argument("--world", default="data/synthetic")
  p.add_argument("--extra", default="", help="space-separated main.py flags for every "
                 "fine-tuning run, e.g. '--config.nlvr2.variant=triplet'")
  a = p.parse_args()
  w = os.path.abspath(a.workdir)
  # row name -> (workdir tag, params to start from)
  inits = {"random init": ("scratch", None),
           "pretrained (default)": ("pretrain", pretrain(os.path.join(w, "pretrain"), []))}
  if a.uniform_masking:
    inits["pretrained (uniform MLM masking)"] = ("pretrain_uniform", pretrain(
        os.path.join(w, "pretrain_uniform"), ["--config.pretrain.mlm_focus_words="]))
  cfg = f"configs/{a.task}.py" + (f":default,steps={a.steps}" if a.steps else "")
  rows = {}
  for name, (tag, init) in inits.items():
    for seed in (int(s) for s in a.seeds.split(",")):
      wd = os.path.join(w, f"{a.task}_{tag}_s{seed}")
      if not os.path.exists(os.path.join(wd, "eval", "metrics.jsonl")):
        run([f"--config={cfg}", f"--workdir={wd}", f"--config.seed={seed}", *a.extra.split()]
            + ([f"--config.init_from={init}"] if init else []))
      rows.setdefault(name, []).append(last_eval(wd))
  with open(os.path.join(ROOT, a.world, "manifest.json"), encoding="utf-8") as f:
    info = json.load(f)["tasks"][a.task]
  val = info["splits"]["val"]
  main_key = MAIN_METRIC[a.task]
  others = sorted(k for k in next(iter(rows.values()))[0]
                  if k != main_key and k != "step"
                  and not k.endswith(("/examples", "questions", "/expressions")))
  print(f"\nbaselines on val from {a.world}/manifest.json (its metric {info['metric']!r}): "
        f"chance {val['chance']:.3f}, text-only {val['text_only']:.3f} "
        f"({info['text_only_method']})")
  print(f"\n| init | {main_key} (val), per seed | mean | " + " | ".join(others) + " |")
  print("|---|---|---|" + "---|" * len(others))
  for name, evals in rows.items():
    main_vals = [e[main_key] for e in evals]
    means = [sum(e.get(k, float("nan")) for e in evals) / len(evals) for k in others]
    print(f"| {name} | {', '.join(f'{s:.3f}' for s in main_vals)} | "
          f"{sum(main_vals) / len(main_vals):.3f} | " + " | ".join(f"{v:.3f}" for v in means)
          + " |")


if __name__ == "__main__":
  main()
