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


def win_rate(outcomes: Sequence[float], z: float = 1.96) -> dict:
  """Mean of outcomes in {0, 0.5, 1} with a normal-approximation CI.

  A tie counts half a win, as in the paper's pairwise comparisons. The
  interval is mean +- z * sd / sqrt(n) with the sample sd of the outcomes
  (this accounts for ties, unlike the Bernoulli p(1-p) form).
  """
  n = len(outcomes)
  if n == 0:
    return {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
  mean = sum(outcomes) / n
  var = sum((o - mean) ** 2 for o in outcomes) / max(n - 1, 1)
  half = z * math.sqrt(var / n)
  return {"rate": mean, "lo": max(0.0, mean - half), "hi": min(1.0, mean + half),
          "n": n}


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
              extra: dict[str, dict] | None = None, sign_off: str = "") -> dict:
  """The report: per model overall and per family numbers.

  `by_model` maps model name -> decoded responses (same order as prompts);
  `extra` adds per-model scalars computed on device (RM score, KL, tax).
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
    entry.update((extra or {}).get(name, {}))
    report[name] = entry
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

  The sign-off cut and LM tax columns appear only when some model has them.
  """
  cut = f"win_rate_vs_{baseline}_without_sign_off"
  tax = f"lm_tax_vs_{baseline}"

  def ci(e):
    w = e[f"win_rate_vs_{baseline}"]
    return f"{w['rate']:.3f} [{w['lo']:.3f}, {w['hi']:.3f}]"

  columns = [  # (header, cell of a report entry, shown only if this key is present)
      (f"win vs {baseline} [95% CI]", ci, None),
      ("sign-off cut", lambda e: _fmt(e.get(cut, {}).get("rate")), cut),
      ("gold u", lambda e: _fmt(e["gold_utility"]), None),
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
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _fmt(x, spec: str = ".3f") -> str:
  return "-" if x is None else format(x, spec)
