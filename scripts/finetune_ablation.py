"""Does pretraining help? A fine-tuning task on the synthetic world from random init vs our
pretraining, with the world's chance and text-only baselines beside it.

Runs (each a plain main.py command, so every row can be re-run by hand):
  1. the default pretraining into WORKDIR/pretrain (skipped when its export exists) and,
     with --uniform-masking, the same run with the official uniform MLM masking
     (mlm_focus_words='') into WORKDIR/pretrain_uniform; for vcr also the second-stage
     pretraining (configs/pretrain_vcr.py) from that export into WORKDIR/pretrain_vcr;
  2. configs/TASK.py from random init and from each pretraining export, once per seed
     (skipped when its eval exists);
then prints the world's chance and text-only baselines (manifest.json, which names the
text-only method) and a markdown table of the held-out (val) metrics: the task's main metrics
per seed and their mean, the other metrics averaged over seeds.

  python scripts/finetune_ablation.py --task=vqa --workdir=workdir/ablation --seeds=42,43
  python scripts/finetune_ablation.py --task=ve --workdir=workdir/ablation --seeds=42,43
  python scripts/finetune_ablation.py --task=nlvr2 --workdir=workdir/ablation --seeds=42,43
  python scripts/finetune_ablation.py --task=vcr --workdir=workdir/ablation --seeds=42,43
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# task -> its main held-out metrics and the manifest's name of each one's baselines (None:
# the manifest states one number per split)
MAIN_METRIC = {"vqa": {"vqa_score": None}, "ve": {"ve/accuracy": None},
               "nlvr2": {"nlvr2/accuracy": None}, "re": {"re/accuracy": None},
               "vcr": {"vcr/qa_accuracy": "qa", "vcr/qar_accuracy": "qar",
                       "vcr/q_ar_accuracy": "q_ar"}}


def run(args: list[str]) -> None:
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), *args]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def pretrain(workdir: str, extra: list[str], config: str = "configs/pretrain.py") -> str:
  export = os.path.join(workdir, "export", "params.msgpack")
  if not os.path.exists(export):
    base = [f"--config={config}", f"--workdir={workdir}", *extra]
    run(base)
    run(base + ["--mode=export"])
  return export


def last_eval(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval", "metrics.jsonl"), encoding="utf-8") as f:
    return json.loads(f.read().strip().splitlines()[-1])


def baseline(val: dict, kind: str, key: str | None) -> float:
  """The manifest's `kind` baseline (chance / text_only) on val for one metric."""
  return val[kind] if key is None else val[kind][key]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--task", choices=sorted(MAIN_METRIC), default="vqa")
  p.add_argument("--workdir", default="workdir/ablation")
  p.add_argument("--seeds", default="42,43", help="fine-tuning seeds (init of the head, data order)")
  p.add_argument("--steps", type=int, default=0, help="0 = the task config's default")
  p.add_argument("--uniform-masking", action="store_true",
                 help="also pretrain with the official uniform MLM masking")
  p.add_argument("--second-stage-steps", type=int, default=0,
                 help="vcr: updates of configs/pretrain_vcr.py, 0 = its default")
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
  if a.task == "vcr":  # VCR's second stage starts from the default pretraining's export
    steps = [f"--config.total_steps={a.second_stage_steps}"] if a.second_stage_steps else []
    inits["pretrained + second stage"] = ("pretrain_vcr", pretrain(
        os.path.join(w, "pretrain_vcr"),
        [f"--config.init_from={inits['pretrained (default)'][1]}", *steps],
        config="configs/pretrain_vcr.py"))
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
  main_keys = MAIN_METRIC[a.task]
  others = sorted(k for k in next(iter(rows.values()))[0]
                  if k not in main_keys and k != "step"
                  and not k.endswith(("/examples", "questions", "/expressions")))
  named = lambda kind: ", ".join(
      f"{baseline(val, kind, b):.3f}" if b is None else f"{b} {baseline(val, kind, b):.3f}"
      for b in main_keys.values())
  print(f"\nbaselines on val from {a.world}/manifest.json (its metric {info['metric']!r}): "
        f"chance {named('chance')}, text-only {named('text_only')} "
        f"({info['text_only_method']})")
  header = ["init", *(c for k in main_keys for c in (f"{k} (val), per seed", "mean")), *others]
  print("\n| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for name, evals in rows.items():
    cells = []
    for k in main_keys:
      vals = [e[k] for e in evals]
      cells += [", ".join(f"{s:.3f}" for s in vals), f"{sum(vals) / len(vals):.3f}"]
    cells += [f"{sum(e.get(k, float('nan')) for e in evals) / len(evals):.3f}" for k in others]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
