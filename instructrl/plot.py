"""PNG plots from a workdir: win-rate bars (the paper's Figure 1) and PPO curves.

    python -m instructrl.plot --workdir=DIR
"""
from __future__ import annotations

import json
import os
import sys

from instructrl import metrics as metrics_lib


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # No display: write files only.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def win_rate_bars(report: dict, path: str, baseline: str = "sft") -> None:
  plt = _plt()
  names = list(report)
  key = f"win_rate_vs_{baseline}"
  rates = [report[n][key]["rate"] for n in names]
  err = [[r - report[n][key]["lo"] for n, r in zip(names, rates)],
         [report[n][key]["hi"] - r for n, r in zip(names, rates)]]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.bar(names, rates, yerr=err, capsize=4, color="#4C72B0")
  ax.axhline(0.5, color="gray", lw=1, ls="--")
  ax.set_ylim(0, 1)
  ax.set_ylabel(f"win rate vs {baseline.upper()} (gold judge)")
  ax.set_title("Held-out prompts: preference over SFT")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def curves(workdir: str, stages, keys, path: str) -> bool:
  """One panel per metric key, one line per stage, from metrics.jsonl."""
  records = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  present = [k for k in keys if any(r.get(k) is not None and r["stage"] in stages
                                    for r in records)]
  if not present:
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2))
  axes = axes if len(present) > 1 else [axes]
  for ax, key in zip(axes, present):
    for stage in stages:
      pts = {r["step"]: r[key] for r in records
             if r["stage"] == stage and r.get(key) is not None}
      if pts:
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], label=stage)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def eval_plots(workdir: str, report: dict | None = None) -> list[str]:
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  written = []
  if report is None and os.path.exists(os.path.join(out, "report.json")):
    with open(os.path.join(out, "report.json")) as f:
      report = json.load(f)
  if report:
    path = os.path.join(out, "win_rate.png")
    win_rate_bars(report, path)
    written.append(path)
  path = os.path.join(out, "ppo_curves.png")
  if curves(workdir, ("ppo", "ppo_ptx"), ("score", "kl", "ptx_loss"), path):
    written.append(path)
  path = os.path.join(out, "training_curves.png")
  if curves(workdir, ("pretrain", "sft", "rm"), ("loss", "val_loss", "val_accuracy"),
            path):
    written.append(path)
  return written


def main(argv) -> None:
  workdir = "workdir"
  for a in argv[1:]:
    if a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
  for p in eval_plots(workdir):
    print(p)


if __name__ == "__main__":
  main(sys.argv)
