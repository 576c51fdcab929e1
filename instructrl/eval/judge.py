"""Evaluation against the gold judge: win rates, utilities, the alignment tax.

The host-side part of the eval stage: given each model's decoded responses to
the held-out test prompts, compare them with the SFT baseline's responses
under the gold judge (the simulated "human evaluation" of the paper's
Figure 1) and aggregate per model and per instruction family. Only this
module and the eval stage ever call the gold judge; neither the policy nor
the reward model sees it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# The paired comparisons reported beside the win rates vs the baseline:
# (model, other) judged on the same prompts, when both are in the report.
PAIRS = (("ppo_ptx", "ppo"),)


def win_rate(outcomes: Sequence[float], z: float = 1.96) -> dict:
  """Mean of outcomes in {0, 0.5, 1} with a normal-approximation CI.

  A tie counts half a win, as in the paper's pairwise comparisons. The
  interval is mean +- z * sd / sqrt(n) with the sample sd of the outcomes
  (this accounts for ties, unlike the Bernoulli p(1-p) form). Also the
  counts: wins (1), ties (0.5) and losses (0).
  """
  n = len(outcomes)
  counts = _counts(outcomes)
  if n == 0:
    return {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0,
            **counts}
  mean = sum(outcomes) / n
  var = sum((o - mean) ** 2 for o in outcomes) / max(n - 1, 1)
  half = z * math.sqrt(var / n)
  return {"rate": mean, "lo": max(0.0, mean - half), "hi": min(1.0, mean + half),
          "n": n, **counts}


def _counts(outcomes) -> dict:
  return {"wins": sum(o == 1.0 for o in outcomes),
          "ties": sum(o == 0.5 for o in outcomes),
          "losses": sum(o == 0.0 for o in outcomes)}


def bootstrap_means(values, resamples: int, seed: int, level: float = 0.95):
  """Percentile bootstrap over prompts: (mean, lo, hi) of `values` [n].

  Resample b draws n prompt indices with replacement (row b of one
  [resamples, n] `integers` call of numpy's default generator seeded with
  `seed`) and takes the mean; lo/hi are the (1 - level)/2 and (1 + level)/2
  quantiles of those means (numpy's linear interpolation).
  """
  x = np.asarray(values, np.float64)
  idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
  means = x[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(x.mean()), float(lo), float(hi)


def paired_comparison(prompts, responses, other, resamples: int = 10_000,
                      seed: int = 0) -> dict:
  """`responses` vs `other` on the same prompts, with paired bootstrap CIs.

  Per prompt: the gold judge's outcome (1 win, 0.5 tie, 0 loss; the win rate
  counts a tie as half a win) and the gold-utility difference. Both are
  resampled by prompt, so the interval keeps the pairing (a prompt both
  models get right or wrong moves neither).
  """
  judged = judge_against(prompts, responses, other)
  outcomes = [o for o, _, _ in judged]
  rate, lo, hi = bootstrap_means(outcomes, resamples, seed)
  d, dlo, dhi = bootstrap_means([u - v for _, u, v in judged], resamples, seed)
  return {"rate": rate, "lo": lo, "hi": hi, "n": len(outcomes), **_counts(outcomes),
          "utility_diff": {"mean": d, "lo": dlo, "hi": dhi},
          "resamples": resamples, "seed": seed}


def judge_against(prompts, responses: Sequence[str], baseline: Sequence[str]):
  """Per prompt: (outcome for `responses` vs `baseline`, utility, baseline utility)."""
  from instructrl.data import world  # pylint: disable=g-import-not-at-top
  out = []
  for p, a, b in zip(prompts, responses, baseline):
    j = world.gold_judge(p, a, b)
    outcome = 0.5 if j.tie else (1.0 if j.preferred == 0 else 0.0)
    out.append((outcome, j.utility_a, j.utility_b))
  return out


def strip_suffix(response: str, suffix: str) -> str:
  """`response` without trailing copies of `suffix` that start a word."""
  text = response.strip()
  while suffix and text.endswith(suffix):
    head = text[:-len(suffix)]
    if head and not head[-1].isspace():
      break
    text = head.rstrip()
  return text


def behaviour(prompt, response: str) -> dict:
  """The paper's metadata (Table 3) for one response, from the family's Score."""
  s = prompt.score(response)
  return {"correct": float(s.exact), "hallucination": float(s.extra_words > 0),
          "constraint_violation": float(s.broken > 0)}


def summarise(prompts, by_model: dict[str, list[str]], baseline: str = "sft",
              extra: dict[str, dict] | None = None, sign_off: str = "",
              sampled: dict[str, list[str]] | None = None,
              resamples: int = 10_000, seed: int = 0) -> dict:
  """The report: per model overall and per family numbers.

  `by_model` maps model name -> decoded responses (same order as prompts);
  `extra` adds per-model scalars computed on device (RM score, KL, tax).
  `sampled` maps a model to one temperature-1 sample per prompt: its mean
  gold utility is "gold_utility_t1", beside the greedy "gold_utility".
  For each pair of `PAIRS` present, the first model's entry gets
  "paired_vs_<second>" (`paired_comparison`, `resamples` and `seed`).
  `sign_off`: also report the win rate with this suffix cut from both
  responses ("..._without_sign_off"): how much of a win is the answer itself.
  Where `extra` has "heldout_lm_loss" for the baseline, each such model also
  gets "lm_tax_vs_<baseline>", its loss minus the baseline's: the alignment
  tax in nats per token (negative: the model's LM is better).
  """
  base = by_model[baseline]
  base_cut = [strip_suffix(r, sign_off) for r in base] if sign_off else None
  families = sorted({p.family for p in prompts})
  report = {}
  for name, responses in by_model.items():
    judged = judge_against(prompts, responses, base)
    meta = [behaviour(p, r) for p, r in zip(prompts, responses)]
    entry = {"win_rate_vs_" + baseline: win_rate([o for o, _, _ in judged]),
             "gold_utility": _mean([u for _, u, _ in judged])}
    if sign_off:
      cut = judge_against(prompts, [strip_suffix(r, sign_off) for r in responses],
                          base_cut)
      entry[f"win_rate_vs_{baseline}_without_sign_off"] = win_rate([o for o, _, _ in cut])
    for key in ("correct", "hallucination", "constraint_violation"):
      entry[key + "_rate"] = _mean([m[key] for m in meta])
    entry["families"] = {}
    for fam in families:
      idx = [i for i, p in enumerate(prompts) if p.family == fam]
      entry["families"][fam] = {
          "win_rate": win_rate([judged[i][0] for i in idx])["rate"],
          "gold_utility": _mean([judged[i][1] for i in idx]),
          "hallucination_rate": _mean([meta[i]["hallucination"] for i in idx]),
          "constraint_violation_rate": _mean(
              [meta[i]["constraint_violation"] for i in idx]),
          "n": len(idx)}
    if name in (sampled or {}):
      entry["gold_utility_t1"] = _mean(p.utility(a) for p, a in zip(prompts,
                                                                    sampled[name]))
    entry.update((extra or {}).get(name, {}))
    report[name] = entry
  for a, b in PAIRS:
    if a in by_model and b in by_model:
      report[a][f"paired_vs_{b}"] = paired_comparison(
          prompts, by_model[a], by_model[b], resamples, seed)
  base_lm = report[baseline].get("heldout_lm_loss")
  if base_lm is not None:
    for entry in report.values():
      if entry.get("heldout_lm_loss") is not None:
        entry[f"lm_tax_vs_{baseline}"] = entry["heldout_lm_loss"] - base_lm
  return report


def _mean(xs) -> float:
  xs = list(xs)
  return sum(xs) / len(xs) if xs else float("nan")


def table(report: dict, baseline: str = "sft") -> str:
  """The short summary table printed at the end of the pipeline.

  The sign-off cut, T=1 and LM tax columns appear only when some model has
  them; each paired comparison (`PAIRS`) follows as a line under the table.
  """
  cut = f"win_rate_vs_{baseline}_without_sign_off"
  tax = f"lm_tax_vs_{baseline}"

  def ci(e):
    w = e[f"win_rate_vs_{baseline}"]
    return f"{w['rate']:.3f} [{w['lo']:.3f}, {w['hi']:.3f}]"

  columns = [  # (header, cell of a report entry, shown only if this key is present)
      (f"win vs {baseline} [95% CI]", ci, None),
      ("W/T/L", lambda e: _wtl(e[f"win_rate_vs_{baseline}"]), None),
      ("sign-off cut", lambda e: _fmt(e.get(cut, {}).get("rate")), cut),
      ("gold u", lambda e: _fmt(e["gold_utility"]), None),
      ("gold u T=1", lambda e: _fmt(e.get("gold_utility_t1")), "gold_utility_t1"),
      ("RM score", lambda e: _fmt(e.get("rm_score")), None),
      ("KL to SFT", lambda e: _fmt(e.get("kl_to_sft")), None),
      ("heldout LM loss", lambda e: _fmt(e.get("heldout_lm_loss")), None),
      (f"LM tax vs {baseline}", lambda e: _fmt(e.get(tax), "+.3f"), tax),
      ("halluc.", lambda e: _fmt(e["hallucination_rate"]), None),
      ("constr.", lambda e: _fmt(e["constraint_violation_rate"]), None),
  ]
  columns = [c for c in columns
             if c[2] is None or any(c[2] in e for e in report.values())]
  rows = [("model",) + tuple(h for h, _, _ in columns)]
  rows += [(name,) + tuple(cell(e) for _, cell, _ in columns)
           for name, e in report.items()]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  for a, b in PAIRS:
    c = report.get(a, {}).get(f"paired_vs_{b}")
    if c:
      d = c["utility_diff"]
      lines.append(
          f"{a} vs {b}, same prompts (paired bootstrap, {c['resamples']} resamples; "
          f"a tie counts half): win {c['rate']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}], "
          f"W/T/L {_wtl(c)}, gold u diff {d['mean']:+.3f} "
          f"[{d['lo']:+.3f}, {d['hi']:+.3f}]")
  return "\n".join(lines)


def _wtl(w: dict) -> str:
  return f"{w['wins']}/{w['ties']}/{w['losses']}"


def _fmt(x, spec: str = ".3f") -> str:
  return "-" if x is None else format(x, spec)
