"""The interface every instruction family implements.

A family is a kind of task from the paper's Table 1 shrunk to a few tokens:
it samples a `spec` (the entities of one prompt), renders it with one of its
templates, knows the reference answer, scores any response, and proposes
plausible wrong answers for the comparison data.
"""
from typing import Any, Sequence

import numpy as np

from instructrl.data import utility

Spec = dict[str, Any]

# Ten templates per family: which ones each split may use. Test templates
# (and validation ones) never appear in training prompts, like the paper's
# split by customer.
TEMPLATE_SPLITS = {
    "train": (0, 1, 2, 3, 4, 5, 6),
    "validation": (7,),
    "test": (8, 9),
}


def pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
  """A uniform draw that keeps Python types (np.choice returns np.str_)."""
  return seq[int(rng.integers(len(seq)))]


def sample_distinct(rng: np.random.Generator, seq: Sequence[Any], k: int):
  idx = rng.choice(len(seq), size=k, replace=False)
  return [seq[int(i)] for i in idx]


class Family:
  """Base class; subclasses fill in the five methods below."""

  name: str = ""
  templates: tuple[str, ...] = ()

  def sample(self, rng: np.random.Generator, split: str) -> Spec:
    """Entities for one prompt, drawn only from `split`'s pools."""
    raise NotImplementedError

  def fields(self, spec: Spec) -> dict[str, Any]:
    """Values for the template placeholders."""
    return dict(spec)

  def entities(self, spec: Spec) -> tuple[str, ...]:
    """The entity keys of a prompt (what must not leak across splits)."""
    raise NotImplementedError

  def reference(self, spec: Spec) -> str:
    raise NotImplementedError

  def score(self, spec: Spec, response: str) -> utility.Score:
    raise NotImplementedError

  def corruptions(self, spec: Spec, rng: np.random.Generator) -> list[str]:
    """Near misses, wrong answers and constraint violations (no empties)."""
    raise NotImplementedError

  def render(self, spec: Spec, template: int) -> str:
    return self.templates[template].format(**self.fields(spec))
