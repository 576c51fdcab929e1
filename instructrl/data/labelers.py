"""Simulated labelers: noisy rankings of K responses, in five groups.

A labeler ranks responses by Plackett-Luce over its group's utility: it picks
the best with probability softmax(u / T), then the best of the rest, and so
on (sampled with the Gumbel trick). For one pair this gives
P(i above j) = sigmoid((u_i - u_j) / T), so two labelers agree on a pair with
probability p^2 + (1 - p)^2; T is set so that agreement over the world's
comparison data is about 73%, the paper's inter-labeler agreement
(Section 3.4).

Groups weigh answers slightly differently (`utility.Preferences`), so a
reward model trained on four groups can be tested on the fifth, as in the
paper's Appendix E.2. None of them is the gold judge: that one is noiseless
and uses the default preferences.
"""
import dataclasses
from typing import Optional, Protocol, Sequence

import numpy as np

from instructrl.data import utility

# `calibrate_temperature` on the default world's train comparisons gives
# 0.176-0.186 for world seeds 0-3; at 0.18 agreement is 72.7-73.6%
# (docs/data.md has the table).
TEMPERATURE = 0.18


@dataclasses.dataclass(frozen=True)
class LabelerGroup:
  name: str
  prefs: utility.Preferences


GROUPS = (
    LabelerGroup("guidelines", utility.Preferences()),
    LabelerGroup("brevity", utility.Preferences(extra_word_cost=0.5,
                                                length_cost=0.05)),
    LabelerGroup("lenient", utility.Preferences(extra_word_cost=0.1,
                                                partial_credit=1.2)),
    LabelerGroup("strict", utility.Preferences(partial_credit=0.6)),
    LabelerGroup("format", utility.Preferences(constraint_factor=0.25)),
)
NUM_GROUPS = len(GROUPS)


class Scorable(Protocol):
  """Anything with a utility per response (world.Prompt is one)."""

  def utility(self, response: str, prefs: utility.Preferences = ...) -> float:
    ...


def utilities(prompt: Scorable, responses: Sequence[str],
              prefs: utility.Preferences = utility.GOLD) -> np.ndarray:
  return np.array([prompt.utility(r, prefs) for r in responses], np.float64)


def rank_utilities(u: np.ndarray, rng: np.random.Generator,
                   temperature: float = TEMPERATURE) -> np.ndarray:
  """A Plackett-Luce ranking of utilities `u`: 0 is the best."""
  keys = u / temperature + rng.gumbel(size=u.shape)
  order = np.argsort(-keys, kind="stable")
  ranks = np.empty(len(u), np.int32)
  ranks[order] = np.arange(len(u), dtype=np.int32)
  return ranks


def rank_responses(prompt: Scorable, responses: Sequence[str], *,
                   group: int = 0, seed: Optional[int] = None,
                   rng: Optional[np.random.Generator] = None,
                   temperature: float = TEMPERATURE) -> list[int]:
  """One simulated labeler of `group` ranks `responses` (0 = best).

  This is how later stages label policy samples: pass the world prompt and
  the decoded responses. Give `seed` (or an `rng`) for reproducibility.

  Args:
    prompt: a `world.Prompt` (anything with `utility(response, prefs)`).
    responses: K response strings.
    group: labeler group index in [0, NUM_GROUPS).
    seed: seeds a fresh generator when `rng` is not given.
    rng: the generator to draw the labeler's noise from.
    temperature: Plackett-Luce temperature in utility units.

  Returns:
    The rank of each response; lower is preferred, no ties.
  """
  if rng is None:
    rng = np.random.default_rng(seed)
  u = utilities(prompt, responses, GROUPS[group].prefs)
  return rank_utilities(u, rng, temperature).tolist()


def pair_agreement(ranks_a: np.ndarray, ranks_b: np.ndarray) -> tuple[int, int]:
  """(agreeing pairs, pairs) between two rankings of the same responses."""
  a = np.sign(ranks_a[:, None] - ranks_a[None, :])
  b = np.sign(ranks_b[:, None] - ranks_b[None, :])
  upper = np.triu(np.ones_like(a, dtype=bool), k=1)
  return int(np.sum((a == b) & upper)), int(np.sum(upper))


def measure_agreement(prompts: Sequence[Scorable],
                      responses: Sequence[Sequence[str]], *, seed: int = 0,
                      temperature: float = TEMPERATURE,
                      same_group: Optional[bool] = None) -> float:
  """Fraction of response pairs on which two simulated labelers agree.

  For every prompt two labelers are drawn (groups at random; both from one
  group if `same_group` is True, from two different groups if False) and
  rank its responses independently; agreement is pooled over all pairs.
  """
  rng = np.random.default_rng(seed)
  agree = total = 0
  for prompt, resp in zip(prompts, responses):
    g1 = int(rng.integers(NUM_GROUPS))
    if same_group is None:
      g2 = int(rng.integers(NUM_GROUPS))
    elif same_group:
      g2 = g1
    else:
      g2 = (g1 + 1 + int(rng.integers(NUM_GROUPS - 1))) % NUM_GROUPS
    u1 = utilities(prompt, resp, GROUPS[g1].prefs)
    u2 = u1 if g2 == g1 else utilities(prompt, resp, GROUPS[g2].prefs)
    a, n = pair_agreement(rank_utilities(u1, rng, temperature),
                          rank_utilities(u2, rng, temperature))
    agree, total = agree + a, total + n
  return agree / max(total, 1)


def calibrate_temperature(prompts: Sequence[Scorable],
                          responses: Sequence[Sequence[str]], *,
                          target: float = 0.73, seed: int = 0,
                          iters: int = 20) -> float:
  """The temperature at which `measure_agreement` hits `target`.

  Bisection in log space; agreement falls as the temperature rises. The
  same seed is used at every step so the measured curve is monotone.
  """
  lo, hi = np.log(1e-3), np.log(10.0)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    rate = measure_agreement(prompts, responses, seed=seed,
                             temperature=float(np.exp(mid)))
    lo, hi = (mid, hi) if rate > target else (lo, mid)
  return float(np.exp(0.5 * (lo + hi)))
