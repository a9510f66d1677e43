"""Draws a run's train and eval curves to a PNG (losses, held-out ITM AUC, grounding probe).

    python scripts/plot_metrics.py WORKDIR [--out WORKDIR/curves.png]

Reads WORKDIR/metrics.jsonl (train) and WORKDIR/eval/metrics.jsonl (held-out evals), as the
trainer writes them; panels whose metrics a run lacks are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# (title, [(metric, label)], y limits or None); a panel is drawn when any of its metrics exists.
PANELS = (
    ("train loss per objective", [("loss_mlm", "mlm"), ("loss_mrfr", "mrfr"), ("loss_mrc", "mrc"),
                                  ("loss_mrckl", "mrckl"), ("loss_itm", "itm + WRA"),
                                  ("loss_vqa", "vqa")], None),
    ("held-out ITM (balanced pairs)", [("itm/auc", "AUC"), ("itm/accuracy", "accuracy")],
     (0.3, 1.0)),
    ("grounding probe: focus words hidden", [("mlm_focus/accuracy_own_image", "own image"),
                                             ("mlm_focus/accuracy_other_image",
                                              "another image")], (0.0, 1.0)),
    ("held-out WRA distance", [("itm/ot_pos", "matched"), ("itm/ot_neg", "mismatched")], None),
    ("held-out accuracy", [("mlm/accuracy", "mlm"), ("mrckl/accuracy", "mrckl"),
                           ("vqa_score", "vqa score"),
                           ("mlm/majority_baseline", "mlm: commonest word"),
                           ("mrckl/majority_baseline", "mrckl: commonest class")], (0.0, 1.0)),
)


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot(workdir: str, out: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  rows += read_jsonl(os.path.join(workdir, "eval", "metrics.jsonl"))
  if not rows:
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl (is this a training workdir?)")
  panels = [p for p in PANELS if any(series(rows, k)[0] for k, _ in p[1])]
  cols = min(3, len(panels))
  rows_n = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, (title, metrics, ylim) in zip(axes.flat, panels):
    for key, label in metrics:
      x, y = series(rows, key)
      if x:
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=label,
                ls="--" if key.endswith("majority_baseline") else "-")  # the chance level, dashed
    if title.startswith("held-out ITM"):
      ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    if ylim:
      ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("update")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(os.path.basename(os.path.normpath(workdir)), fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir")
  p.add_argument("--out", help="PNG path (default: WORKDIR/curves.png)")
  a = p.parse_args(argv)
  try:
    path = plot(a.workdir, a.out or os.path.join(a.workdir, "curves.png"))
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
