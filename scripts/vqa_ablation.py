"""Does pretraining help? VQA on the synthetic world from random init vs our pretraining.

Runs (each a plain main.py command, so every row can be re-run by hand):
  1. the default pretraining into WORKDIR/pretrain (skipped when its export exists) and,
     with --uniform-masking, the same run with the official uniform MLM masking
     (mlm_focus_words='') into WORKDIR/pretrain_uniform;
  2. configs/vqa.py from random init and from each pretraining export, once per seed;
then prints a markdown table of held-out (val) VQA scores (official 10-choose-9 accuracy, and
the stored soft score, the definition of the text-only baseline in the world's manifest.json).

  python scripts/vqa_ablation.py --workdir=workdir/ablation --seeds=42,43 --uniform-masking
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  p.add_argument("--workdir", default="workdir/ablation")
  p.add_argument("--seeds", default="42,43", help="fine-tuning seeds (init of the head, data order)")
  p.add_argument("--vqa-steps", type=int, default=0, help="0 = configs/vqa.py's default")
  p.add_argument("--uniform-masking", action="store_true",
                 help="also pretrain with the official uniform MLM masking")
  p.add_argument("--world", default="data/synthetic")
  a = p.parse_args()
  w = os.path.abspath(a.workdir)
  # row name -> (workdir tag, params to start from)
  inits = {"random init": ("scratch", None),
           "pretrained (default)": ("pretrain", pretrain(os.path.join(w, "pretrain"), []))}
  if a.uniform_masking:
    inits["pretrained (uniform MLM masking)"] = ("pretrain_uniform", pretrain(
        os.path.join(w, "pretrain_uniform"), ["--config.pretrain.mlm_focus_words="]))
  vqa_cfg = "configs/vqa.py" + (f":default,steps={a.vqa_steps}" if a.vqa_steps else "")
  rows = {}
  for name, (tag, init) in inits.items():
    for seed in (int(s) for s in a.seeds.split(",")):
      wd = os.path.join(w, f"vqa_{tag}_s{seed}")
      if not os.path.exists(os.path.join(wd, "eval", "metrics.jsonl")):
        run([f"--config={vqa_cfg}", f"--workdir={wd}", f"--config.seed={seed}"]
            + ([f"--config.init_from={init}"] if init else []))
      rows.setdefault(name, []).append(last_eval(wd))
  with open(os.path.join(ROOT, a.world, "manifest.json"), encoding="utf-8") as f:
    text_only = json.load(f)["tasks"]["vqa"]["splits"]["val"]["text_only"]
  types = sorted(k.split("/")[1] for k in next(iter(rows.values()))[0] if k.startswith("vqa_score/"))
  print("\n| init | VQA score (val), per seed | mean | soft score, mean | "
        + " | ".join(types) + " |")
  print("|---|---|---|---|" + "---|" * len(types))
  print(f"| text-only baseline (manifest: majority answer per question type) | | | {text_only:.3f} |"
        + " |" * len(types))
  for name, evals in rows.items():
    scores = [e["vqa_score"] for e in evals]
    soft = sum(e["soft_score"] for e in evals) / len(evals)
    per_type = [sum(e[f"vqa_score/{t}"] for e in evals) / len(evals) for t in types]
    print(f"| {name} | {', '.join(f'{s:.3f}' for s in scores)} | {sum(scores) / len(scores):.3f} | "
          f"{soft:.3f} | " + " | ".join(f"{v:.3f}" for v in per_type) + " |")

if __name__ == "__main__":
  main()
