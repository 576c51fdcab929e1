"""Scoring helpers shared by the instruction families.

A family scores a response as a `Score`: how much of the answer is right, how
many words follow the answer, and how many explicit constraints it breaks.
`combine` turns that into a utility in [0, 1] under a set of `Preferences`;
the gold judge uses the default preferences, each simulated labeler group a
slightly different set (labelers.py). Keeping the family logic separate from
the weighting is what lets five groups disagree in a controlled way.
"""
import dataclasses
import re

_NUMBER = re.compile(r"^[+-]?\d+$")
_EDGE_PUNCT = ".,;:!?\"'()[]"


@dataclasses.dataclass(frozen=True)
class Score:
  """A family's verdict on one response, before weighting.

  Attributes:
    exact: the answer part is exactly the reference (or, for open-ended
      families, fully valid).
    credit: partial credit in [0, 1] for an answer that is not exact.
    extra_words: words after the answer (text nobody asked for; the paper's
      "hallucination" metadata on closed-domain tasks).
    broken: explicit constraints of the prompt that the response breaks.
  """
  exact: bool
  credit: float = 0.0
  extra_words: int = 0
  broken: int = 0


@dataclasses.dataclass(frozen=True)
class Preferences:
  """How a judge weighs a `Score`. Defaults are the gold guidelines.

  Attributes:
    extra_word_cost: utility is divided by (1 + cost * extra_words), so one
      extra word costs 20% and eight cost two thirds at the default.
    partial_credit: scales the credit of inexact answers (0 = all or nothing).
    constraint_factor: utility is multiplied by this per broken constraint.
    length_cost: divides by (1 + cost * words): a dislike of long answers
      that, unlike `extra_word_cost`, applies to correct words too.
  """
  extra_word_cost: float = 0.25
  partial_credit: float = 1.0
  constraint_factor: float = 0.5
  length_cost: float = 0.0


GOLD = Preferences()


def combine(score: Score, response: str, prefs: Preferences = GOLD) -> float:
  """The utility in [0, 1] of a scored response under `prefs`."""
  if not response.strip():
    return 0.0
  value = 1.0 if score.exact else min(1.0, prefs.partial_credit * score.credit)
  value /= 1.0 + prefs.extra_word_cost * score.extra_words
  value *= prefs.constraint_factor**score.broken
  value /= 1.0 + prefs.length_cost * len(response.split())
  return float(min(1.0, max(0.0, value)))


def words(text: str) -> list[str]:
  return text.split()


def strip_punct(word: str) -> str:
  """'Lima.' -> 'Lima': answers often end with a full stop."""
  return word.strip(_EDGE_PUNCT)


def parse_int(word: str):
  """The integer in `word` (edge punctuation ignored), or None."""
  word = strip_punct(word)
  return int(word) if _NUMBER.match(word) else None


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance; inputs here are a few characters long."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def similarity(a: str, b: str) -> float:
  """1 - normalised edit distance, in [0, 1]."""
  if not a and not b:
    return 1.0
  return max(0.0, 1.0 - edit_distance(a, b) / max(len(a), len(b)))


def score_number(response: str, target: int, scale: float = 0.2) -> Score:
  """One-number answers: exact, or 0.6 - scale * |error| for near misses."""
  ws = words(response)
  if not ws:
    return Score(False)
  got = parse_int(ws[0])
  extra = len(ws) - 1
  if got is None:
    return Score(False, 0.0, extra)
  if got == target:
    return Score(True, 1.0, extra)
  return Score(False, max(0.0, 0.6 - scale * abs(got - target)), extra)


def score_words(response: str, reference: str, near: float = 0.7) -> Score:
  """Answers of fixed word count: compare that many leading words.

  Inexact answers get `near` times their character similarity, so a word
  with one letter wrong scores well above one with every letter wrong.
  """
  n = len(words(reference))
  ws = words(response)
  head = " ".join(ws[:n])
  extra = max(0, len(ws) - n)
  head = strip_punct(head)
  if head == reference:
    return Score(True, 1.0, extra)
  if head.lower() == reference.lower():
    return Score(False, 0.8, extra)
  return Score(False, near * similarity(head, reference), extra)
