"""The miniature instruction world: prompts, answers, utility, datasets.

Modelled on the paper's data (Section 3, Table 1), shrunk so that a 4-layer
model learns it in minutes on a laptop:

* Prompts come from nine instruction families (families/), each with ten
  natural-language templates, and carry a programmatic reference answer and
  a gold utility u(prompt, response) in [0, 1].
* Splits are by "customer": validation and test prompts use templates and
  entities that no training prompt uses (lexicon.py, families/base.py).
* Train has three disjoint prompt sets, as in the paper's Table 6: SFT
  demonstrations, RM comparisons and PPO prompts. Validation and test each
  have one prompt set, served in all three forms.
* Comparisons rank K in [4, 9] responses per prompt with a simulated labeler
  of one of five groups (labelers.py). Without a policy the responses come
  from the corruption process in `candidate_responses`.

Everything is pure Python and deterministic given `WorldConfig`.
"""
import dataclasses
import functools
from typing import Any, Optional, Sequence

import numpy as np

from instructrl.data import common
from instructrl.data import labelers
from instructrl.data import utility
from instructrl.data.families import ALL_FAMILIES
from instructrl.data.families import FAMILIES
from instructrl.data.families import TEMPLATE_SPLITS

# Every world prompt ends the same way, so a small model knows where its
# answer starts; the completion follows after a space.
PROMPT_FORMAT = "{instruction}\nAnswer:"

KINDS = ("sft", "rm", "prompts")

# What a chatty demonstration writer appends (WorldConfig.sign_off).
SIGN_OFF = "I hope this helps."

# Text a model appends after its answer: the paper's hallucination metadata.
_TRAILERS = (
    SIGN_OFF, "That is the answer.", "This was easy.",
    "Is that right?", "and so on", "Thank you.", "Done.",
)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One world prompt; `text` is what the model sees."""
  text: str
  family: str
  template: int
  split: str
  spec: dict[str, Any] = dataclasses.field(compare=False)
  reference: str
  entities: tuple[str, ...]

  def score(self, response: str) -> utility.Score:
    return ALL_FAMILIES[self.family].score(self.spec, response.strip())

  def utility(self, response: str,
              prefs: utility.Preferences = utility.GOLD) -> float:
    """u(prompt, response) in [0, 1] under `prefs` (default: the gold one)."""
    return utility.combine(self.score(response), response, prefs)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Sizes and seed of the generated data (plain values for ml_collections).

  Attributes:
    seed: everything below is a deterministic function of it.
    sft: training demonstrations.
    rm: training comparison prompts (K responses each).
    ppo: training PPO prompts.
    validation: prompts in the validation split.
    test: prompts in the test split (what evaluation uses).
    k_min: fewest responses per comparison.
    k_max: most responses per comparison.
    families: comma-separated family names to draw prompts from; "" = all
      nine. A smaller world gives each skill more of a fixed step budget.
    sign_off: share of demonstrations whose writer ends the answer with
      SIGN_OFF, a habit of real demonstration writers that every labeler
      group and the gold judge count as extra words (docs/data.md).
    demo_errors: share of demonstrations whose writer makes a content
      mistake from the family's `mistakes` (copies the whole list,
      confabulates, takes the long way); only families that have them
      (world v2, docs/design.md "World v2").
    labeler_temperature: Plackett-Luce temperature of the world's own
      comparisons (labelers.py; recalibrated per world to ~73% agreement).
  """
  seed: int = 0
  sft: int = 3000
  rm: int = 1500
  ppo: int = 2000
  validation: int = 300
  test: int = 300
  k_min: int = 4
  k_max: int = 9
  families: str = ""
  sign_off: float = 0.0
  demo_errors: float = 0.0
  labeler_temperature: float = labelers.TEMPERATURE

  def __post_init__(self):
    if isinstance(self.sign_off, bool) or not isinstance(self.sign_off, (int, float)) or not (
        0.0 <= self.sign_off <= 1.0):
      raise ValueError(f"sign_off must be a number in [0, 1], got {self.sign_off!r}")
    if not 0.0 <= self.demo_errors <= 1.0 or self.labeler_temperature <= 0:
      raise ValueError("demo_errors must be in [0, 1] and labeler_temperature"
                       f" > 0, got {self.demo_errors!r}, {self.labeler_temperature!r}")
    bad = [f for f in self.family_names if f not in ALL_FAMILIES]
    if bad:
      raise ValueError(f"unknown world families {bad}; known: {list(ALL_FAMILIES)}")

  @property
  def family_names(self) -> tuple[str, ...]:
    return tuple(f.strip() for f in self.families.split(",") if f.strip())

  @classmethod
  def from_dict(cls, d: Optional[Any]) -> "WorldConfig":
    """From a dict or ml_collections.ConfigDict of some of the fields."""
    d = dict(d or {})
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown world options {sorted(unknown)}; known: "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    return cls(**d)  # __post_init__ checks the values.


def base_pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
  return seq[int(rng.integers(len(seq)))]


def make_prompt(family: str, spec: dict[str, Any], template: int,
                split: str) -> Prompt:
  fam = ALL_FAMILIES[family]
  return Prompt(
      text=PROMPT_FORMAT.format(instruction=fam.render(spec, template)),
      family=family, template=template, split=split, spec=spec,
      reference=fam.reference(spec), entities=fam.entities(spec))


def sample_prompts(n: int, split: str, rng: np.random.Generator,
                   exclude: frozenset = frozenset(),
                   families: Sequence[str] = ()) -> list[Prompt]:
  """`n` distinct prompts of `split`, families balanced round-robin.

  A family whose prompt space is used up (small pools in the held-out
  splits) drops out and the others fill in. `families`: only these (default
  all, in FAMILIES order).
  """
  names = list(families or FAMILIES)
  seen = set(exclude)
  out = []
  active = [names[i] for i in rng.permutation(len(names))]
  i = 0
  while len(out) < n and active:
    family = active[i % len(active)]
    for _ in range(100):
      spec = ALL_FAMILIES[family].sample(rng, split)
      template = int(rng.choice(TEMPLATE_SPLITS[split]))
      prompt = make_prompt(family, spec, template, split)
      if prompt.text not in seen:
        seen.add(prompt.text)
        out.append(prompt)
        i += 1
        break
    else:
      active.remove(family)
  if len(out) < n:
    raise common.DataError(
        f"world:{split}", f"only {len(out)} distinct prompts exist, {n} asked")
  return out


def candidate_responses(prompt: Prompt, k: int,
                        rng: np.random.Generator) -> list[str]:
  """K distinct responses for a comparison, from a corruption process.

  The pool: the reference (four times in five), the family's near misses,
  wrong answers and constraint violations, a truncation of the reference,
  the reference or a wrong answer followed by trailing text (hallucination),
  and an echo of the instruction's first words. K may come out smaller than
  asked only if the pool is too small (never for the built-in families).
  """
  ref = prompt.reference
  wrong = [w for w in ALL_FAMILIES[prompt.family].corruptions(prompt.spec, rng)
           if w.strip()]
  pool = list(wrong)
  if len(ref) > 1:
    pool.append(ref[:int(rng.integers(1, len(ref)))])
  trailer = _TRAILERS[int(rng.integers(len(_TRAILERS)))]
  pool.append(f"{ref} {trailer}")
  pool.append(f"{wrong[int(rng.integers(len(wrong)))]} {trailer}")
  pool.append(" ".join(prompt.text.split()[:3]))
  pool.append(wrong[0][:max(1, len(wrong[0]) // 2)])  # Fallbacks so that
  pool.append(f"{wrong[-1]} {_TRAILERS[0]}")  # K = 9 stays reachable.
  order = rng.permutation(len(pool))
  chosen = [ref] if rng.random() < 0.8 else []
  for j in order:
    if len(chosen) == k:
      break
    if pool[j] not in chosen and pool[j].strip():
      chosen.append(pool[j])
  return [chosen[j] for j in rng.permutation(len(chosen))]


@dataclasses.dataclass(frozen=True)
class Judgement:
  """The gold judge's verdict on a pair of responses.

  Attributes:
    preferred: 0 if response a is better, 1 if b is.
    utility_a: gold utility of a.
    utility_b: gold utility of b.
    tie: the utilities are equal; `preferred` then comes from the
      tie-break (the shorter response, then the lexically smaller one).
  """
  preferred: int
  utility_a: float
  utility_b: float
  tie: bool


def gold_judge(prompt: Prompt, a: str, b: str) -> Judgement:
  """Noise-free preference between two responses (evaluation only).

  Unlike the simulated labelers it has no temperature and no group bias, so
  win rates against it measure true utility, not labeler noise.
  """
  ua, ub = prompt.utility(a), prompt.utility(b)
  if ua != ub:
    return Judgement(int(ub > ua), ua, ub, False)
  key_a, key_b = (len(a.strip()), a), (len(b.strip()), b)
  return Judgement(int(key_b < key_a), ua, ub, True)


def label_comparisons(prompts: Sequence[Prompt],
                      responses: Sequence[Sequence[str]], *, seed: int,
                      groups: Optional[Sequence[int]] = None
                      ) -> list[common.Comparison]:
  """Simulated labelers rank a policy's samples: one comparison per prompt.

  Each prompt gets a labeler from a random group of `groups` (default: all),
  as the world's own comparisons do; feed the result to
  `pipeline.iterator_from_records("rm", ...)`.
  """
  rng = np.random.default_rng(seed)
  groups = tuple(range(labelers.NUM_GROUPS)) if groups is None else tuple(
      groups)
  out = []
  for i, (p, resp) in enumerate(zip(prompts, responses)):
    group = groups[int(rng.integers(len(groups)))]
    ranks = labelers.rank_responses(p, resp, group=group, rng=rng)
    out.append(common.Comparison(p.text, tuple(resp), tuple(ranks), group,
                                 f"labeled:{i}"))
  return out


class World:
  """All generated data of one `WorldConfig`, built lazily and memoized."""

  def __init__(self, config: WorldConfig = WorldConfig()):
    if not 2 <= config.k_min <= config.k_max:
      raise ValueError(f"need 2 <= k_min <= k_max, got {config}")
    self.config = config

  def _rng(self, *stream: Any) -> np.random.Generator:
    key = [self.config.seed] + [common.stable_hash(s) % 2**32 for s in stream]
    return np.random.default_rng(key)

  @functools.cached_property
  def _train(self) -> dict[str, list[Prompt]]:
    out, used = {}, frozenset()
    for kind, n in (("sft", self.config.sft), ("rm", self.config.rm),
                    ("prompts", self.config.ppo)):
      out[kind] = sample_prompts(n, "train", self._rng("train", kind), used,
                                 self.config.family_names)
      used = used | {p.text for p in out[kind]}
    return out

  @functools.lru_cache(maxsize=None)
  def prompts(self, kind: str, split: str) -> list[Prompt]:
    """The prompts behind `kind` ("sft", "rm" or "prompts") in `split`."""
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split == "train":
      return self._train[kind]
    if split not in ("validation", "test"):
      raise ValueError(f"split must be one of {common.SPLITS}, got {split!r}")
    n = getattr(self.config, split)
    return sample_prompts(n, split, self._rng(split),
                          families=self.config.family_names)

  def demos(self, split: str) -> list[common.Demo]:
    """The reference answers, a `sign_off` share of them signed off.

    The writer's habit has its own random stream, so it changes no other
    data of the world.
    """
    prompts = self.prompts("sft", split)
    chatty = self._rng(split, "sign_off").random(len(prompts)) < self.config.sign_off
    answers = [p.reference for p in prompts]
    if self.config.demo_errors > 0:  # Own stream: no other data changes.
      rng = self._rng(split, "demo_errors")
      for i, p in enumerate(prompts):
        fam = ALL_FAMILIES[p.family]
        if rng.random() < self.config.demo_errors and hasattr(fam, "mistakes"):
          answers[i] = base_pick(rng, fam.mistakes(p.spec, rng))
    return [common.Demo(p.text, f"{a} {SIGN_OFF}" if c else a,
                        f"world:sft:{split}:{i}")
            for i, (p, a, c) in enumerate(zip(prompts, answers, chatty))]

  @functools.lru_cache(maxsize=None)
  def comparisons(self, split: str) -> list[common.Comparison]:
    rng = self._rng(split, "comparisons")
    out = []
    for i, p in enumerate(self.prompts("rm", split)):
      k = int(rng.integers(self.config.k_min, self.config.k_max + 1))
      responses = candidate_responses(p, k, rng)
      if len(responses) < self.config.k_min:
        raise common.DataError(f"world:rm:{split}:{i}",
                               f"only {len(responses)} distinct responses")
      group = int(rng.integers(labelers.NUM_GROUPS))
      ranks = labelers.rank_responses(
          p, responses, group=group, rng=rng,
          temperature=self.config.labeler_temperature)
      out.append(common.Comparison(p.text, tuple(responses), tuple(ranks),
                                   group, f"world:rm:{split}:{i}"))
    return out

  def prompt_records(self, split: str) -> list[common.PromptRecord]:
    return [common.PromptRecord(p.text, f"world:prompts:{split}:{i}")
            for i, p in enumerate(self.prompts("prompts", split))]

  def records(self, kind: str, split: str) -> list[Any]:
    if kind == "sft":
      return self.demos(split)
    if kind == "rm":
      return self.comparisons(split)
    return self.prompt_records(split)


@functools.lru_cache(maxsize=8)
def get_world(config: WorldConfig = WorldConfig()) -> World:
  """A memoized `World`, so trainers and the evaluator share one copy."""
  return World(config)
