"""PNG plots from a workdir: win-rate bars (the paper's Figure 1), training
curves of every stage, and the coefficient sweeps of the notebooks.

    python -m instructrl.eval.plot --workdir=DIR [--out=DIR/plots]

writes DIR/plots/<stage>.png for every stage in DIR/metrics.jsonl (loss,
accuracy, reward, KL, ptx loss, ... with validation next to training) and,
when the eval stage ran, DIR/eval/win_rate.png and the overview curves.
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


# Bookkeeping, not learning curves.
_SKIP = ("stage", "step", "time", "elapsed", "nonfinite", "steps_per_s",
         "tokens_per_s", "num_tokens", "num_pairs", "num_prompts")
# The curves a reader looks for first; the rest follow alphabetically.
_FIRST = ("loss", "accuracy", "score", "reward", "kl", "ptx_loss", "perplexity",
          "margin", "policy_loss", "value_loss")
# Validation metrics share a panel with their training counterpart.
_VARIANTS = (("val_heldout_group_", "val (held-out labelers)"), ("val_", "val"),
             ("", "train"))


def _panel(key: str) -> tuple[str, str]:
  for prefix, label in _VARIANTS:
    if key.startswith(prefix):
      return key[len(prefix):], label
  return key, "train"


def stage_curves(records: list[dict], stage: str, path: str, ncols: int = 4) -> bool:
  """One PNG for one stage: a panel per metric, train and val together."""
  rows = [r for r in records if r.get("stage") == stage]
  panels: dict[str, dict[str, dict[int, float]]] = {}
  for r in rows:
    for k, v in r.items():
      if k in _SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
        continue
      name, label = _panel(k)
      panels.setdefault(name, {}).setdefault(label, {})[r["step"]] = v
  if not panels:
    return False
  order = {k: i for i, k in enumerate(_FIRST)}
  panels = dict(sorted(panels.items(), key=lambda kv: (order.get(kv[0], len(order)),
                                                       kv[0])))
  plt = _plt()
  n = len(panels)
  cols = min(ncols, n)
  nrows = (n + cols - 1) // cols
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows),
                           squeeze=False)
  for ax, (name, lines) in zip(axes.flat, panels.items()):
    for label, pts in lines.items():
      xs = sorted(pts)  # A resumed stage logs some steps twice: last wins.
      ax.plot(xs, [pts[x] for x in xs], marker="." if len(xs) < 30 else None,
              label=label)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step" if not stage.startswith("ppo") else "iteration")
    if len(lines) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  fig.suptitle(stage)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def stage_plots(workdir: str, out: str | None = None) -> list[str]:
  """Writes <out>/<stage>.png for every stage logged in metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = metrics_lib.read_metrics(path)
  out = out or os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  stages = list(dict.fromkeys(r.get("stage") for r in records if r.get("stage")))
  written = []
  for stage in stages:
    png = os.path.join(out, f"{stage}.png")
    if stage_curves(records, stage, png):
      written.append(png)
  return written


def sweep(points: list[dict], coef: str, path: str, reference: dict | None = None,
          others: list[dict] | None = None, title: str = "") -> None:
  """The notebooks' coefficient sweep (the shape of the paper's Figs. 33-34).

  `points`: dicts with the coefficient under `coef`, "heldout_lm_loss" (the
  alignment tax) and "rm_score" (reward on held-out prompts). `reference`
  (SFT) is drawn as dashed lines; `others` are extra labelled markers (e.g.
  PPO-ptx on the beta plot).
  """
  plt = _plt()
  pts = sorted(points, key=lambda p: p[coef])
  xs = [p[coef] for p in pts]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, key, label in ((axes[0], "heldout_lm_loss", "held-out pretraining loss"),
                         (axes[1], "rm_score", "reward (RM, held-out prompts)")):
    ax.plot(xs, [p[key] for p in pts], "o-", label=f"PPO, varying {coef}")
    if reference:
      ax.axhline(reference[key], color="gray", ls="--", label="SFT")
    for o in others or []:
      ax.plot([o[coef]], [o[key]], "s", label=o.get("label", ""))
    if min(xs) > 0:
      ax.set_xscale("log")
    elif min(xs) == 0 and max(xs) > 0:  # Log-like, with 0 (plain PPO) shown.
      lin = min(x for x in xs if x > 0)
      ax.set_xscale("symlog", linthresh=lin)
      ax.set_xlim(-0.1 * lin, max(xs) * 1.5)
    ax.set_xlabel(coef)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  ax = axes[2]
  ax.plot([p["heldout_lm_loss"] for p in pts], [p["rm_score"] for p in pts], "o-")
  for i, p in enumerate(pts):  # Alternate sides: close points stay readable.
    ax.annotate(f"{coef}={p[coef]:g}", (p["heldout_lm_loss"], p["rm_score"]),
                fontsize=7, xytext=(5, 0) if i % 2 else (-5, 0),
                textcoords="offset points", ha="left" if i % 2 else "right",
                va="center")
  if reference:
    ax.plot([reference["heldout_lm_loss"]], [reference["rm_score"]], "k*", label="SFT")
  for o in others or []:
    ax.plot([o["heldout_lm_loss"]], [o["rm_score"]], "s", label=o.get("label", ""))
  ax.set_xlabel("held-out pretraining loss (lower: less tax)")
  ax.set_ylabel("reward")
  ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv) -> None:
  args = {"workdir": "workdir", "out": None}
  it = iter(argv[1:])
  for a in it:
    name, eq, value = a.lstrip("-").partition("=")
    if name not in args:
      sys.exit(f"usage: python -m instructrl.eval.plot --workdir=DIR [--out=DIR]; "
               f"unknown argument {a!r}")
    args[name] = value if eq else next(it, None)
  workdir = args["workdir"]
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    sys.exit(f"error: {workdir}/metrics.jsonl: no such file (not a workdir?)")
  for p in stage_plots(workdir, args["out"]) + eval_plots(workdir):
    print(p)


if __name__ == "__main__":
  main(sys.argv)
