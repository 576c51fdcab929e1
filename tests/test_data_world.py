"""The miniature world: references, gold utility, labelers, splits, judge.

Pure Python (no TensorFlow): these run in a couple of seconds.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from instructrl.data import labelers
from instructrl.data import lexicon
from instructrl.data import utility
from instructrl.data import world
from instructrl.data.families import FAMILIES
from instructrl.data.families import TEMPLATE_SPLITS


def _prompt(family, spec, template=0):
  return world.make_prompt(family, spec, template, "train")


@pytest.fixture(scope="module")
def default_world():
  return world.World()


# (family, spec, reference, [(response, gold utility)]) -- computed by hand
# from the rules in families/ and utility.combine (docs/data.md).
HAND_CHECKED = [
    ("reverse", {"word": "apple"}, "elppa", [
        ("elppa", 1.0),
        ("elppa.", 1.0),
        ("elppa I hope this helps.", 0.5),  # 4 extra words: 1 / (1 + 1).
        ("ELPPA", 0.8),                     # Right letters, wrong case.
        ("elpa", 0.56),                     # 0.7 * (1 - 1/5).
        ("apple", 0.14),                    # 0.7 * (1 - 4/5).
        ("", 0.0),
    ]),
    ("case", {"words": "apple pie", "text": "apple pie", "mode": "upper",
              "how": "capital letters"}, "APPLE PIE", [
                  ("APPLE PIE", 1.0),
                  ("apple pie", 0.2),   # 0.2 + 0.6 * 0/8 letters in case.
                  ("APPLE pie", 0.575),  # 0.2 + 0.6 * 5/8.
                  ("APPLE PIE please", 0.8),
              ]),
    ("sort", {"nums": [7, 3, 9, 1], "direction": "asc",
              "order": "from smallest to largest"}, "1, 3, 7, 9", [
                  ("1, 3, 7, 9", 1.0),
                  ("1 3 7 9", 1.0),
                  ("1, 3, 9, 7", 0.6),    # Same numbers, 2/4 in place.
                  ("1, 3, 7", 0.375),     # A number lost: 0.5 * 3/4.
                  ("9, 7, 3, 1", 0.3),    # Wrong direction: 0.3 + 0.
                  ("1, 3, 7, 9. Done", 0.8),
              ]),
    ("arithmetic", {"a": 7, "b": 5, "op": "+"}, "12", [
        ("12", 1.0), ("12.", 1.0), ("13", 0.4), ("10", 0.2), ("15", 0.0),
        ("twelve", 0.0), ("12 because 7 + 5 = 12", 0.4),  # 6 extra words.
    ]),
    ("repeat", {"phrase": "cat", "count": 3, "as_word": False}, "cat cat cat", [
        ("cat cat cat", 1.0),
        ("cat cat cat.", 1.0),
        ("cat cat", 2 / 3),
        ("cat cat cat cat", 2 / 3),
        ("cat, cat, cat", 0.5),     # Right count, broken separator.
        ("cat cat cat meow", 0.8),
    ]),
    ("count", {"word": "banana", "letter": "a"}, "3", [
        ("3", 1.0), ("2", 0.4), ("6", 0.0), ("3 times", 0.8),
    ]),
    ("kth_word", {"sentence": "lake moon rice gold", "k": 2}, "moon", [
        ("moon", 1.0), ("Moon", 0.8), ("lake", 0.25), ("sun", 0.0),
        ("moon rice", 0.8),
    ]),
    ("context_qa", {"facts": [["Mia", "Oslo"], ["Tom", "Lima"]],
                    "name": "Tom"}, "Lima", [
                        ("Lima", 1.0), ("Lima.", 1.0), ("Oslo", 0.2),
                        ("Paris", 0.0), ("unknown", 0.1),
                        ("Lima or Oslo", 2 / 3),
                    ]),
    ("context_qa", {"facts": [["Mia", "Oslo"], ["Tom", "Lima"]],
                    "name": "Ana"}, "unknown", [
                        ("unknown", 1.0), ("Oslo", 0.0), ("Paris", 0.0),
                    ]),
    ("list", {"category": "colors", "count": 3, "exclude": "red",
              "as_word": False, "answer": ["blue", "green", "pink"]},
     "blue, green, pink", [
         ("blue, green, pink", 1.0),
         ("gray, white, black", 1.0),      # Any valid answer is right.
         ("blue, green", 1 / 3),           # Too few: 2/3 credit * 0.5.
         ("blue, green, red", 1 / 3),      # Excluded item: 2/3 * 0.5.
         ("blue green pink", 0.5),         # No commas.
         ("blue, green, pink, gray", 0.5),  # Too many.
         ("blue, green, pink I hope", 2 / 3),
         ("blue, blue, blue", 1 / 3),      # Duplicates count once.
     ]),
]


# The v2 families (families/judged.py), by hand as HAND_CHECKED.
V2_HAND_CHECKED = [
    ("select", {"kind": "animals", "items": ["cat", "red", "dog", "fox"],
                "members": ["cat", "dog", "fox"], "skip": "dog"}, "cat, fox",
     [("fox, cat", 1.0), ("cat, dog, fox", 0.5 * 0.6 * 2 / 2), ("cat", 0.3),
      ("cat, red, dog, fox", 0.5 * 0.6 * 1 / 2), ("cat, fox. Done", 0.8)]),
    ("lookup", {"facts": [["Ana", "cat"], ["Ben", "pear"]], "who": "Ben"},
     "pear", [("pear", 1.0), ("cat", 0.0), ("unknown", 0.15)]),
    ("lookup", {"facts": [["Ana", "cat"], ["Ben", "pear"]], "who": "Max"},
     "unknown", [("unknown", 1.0), ("cat", 0.0), ("Unknown.", 1.0)]),
    ("route", {"roads": [["A", "B"], ["B", "C"], ["C", "D"], ["D", "E"],
                         ["B", "D"]], "src": "A", "dst": "E"}, "A B D E",
     [("A B D E", 1.0), ("A B C D E", 0.5), ("A E", 0.0), ("A C E", 0.0),
      ("A B C E", 0.3 * 2 / 3 * 0.5)]),
]


@pytest.mark.parametrize("family,spec,reference,cases",
                         HAND_CHECKED + V2_HAND_CHECKED)
def test_reference_and_gold_utility(family, spec, reference, cases):
  p = _prompt(family, spec)
  assert p.reference == reference
  assert p.utility(reference) == 1.0
  for response, expected in cases:
    assert p.utility(response) == pytest.approx(expected), response


def test_every_family_is_covered_and_has_ten_templates():
  assert len(FAMILIES) >= 8
  assert {f for f, *_ in HAND_CHECKED} == set(FAMILIES)
  for fam in FAMILIES.values():
    assert len(fam.templates) == 10
    assert len(set(fam.templates)) == 10


def test_prompts_end_with_answer_marker_and_references_are_short(
    default_world):
  for p in default_world.prompts("sft", "train"):
    assert p.text.endswith("\nAnswer:")
    assert p.utility(p.reference) == 1.0
    assert 1 <= len(p.reference.split()) <= 5
    assert len(p.reference) <= 40


def test_labeler_groups_weigh_differently():
  p = _prompt("reverse", {"word": "apple"})
  trailing = "elppa I hope this helps."
  scores = {g.name: p.utility(trailing, g.prefs) for g in labelers.GROUPS}
  assert len(labelers.GROUPS) >= 5
  assert scores["brevity"] < scores["guidelines"] < scores["lenient"]
  assert p.utility("elppa", labelers.GROUPS[1].prefs) == pytest.approx(
      1 / 1.05)  # Brevity group: length cost on one word.
  lst = _prompt("list", HAND_CHECKED[-1][1])
  assert lst.utility("blue green pink", labelers.GROUPS[4].prefs) == 0.25


def test_gold_judge_prefers_higher_utility_then_shorter():
  p = _prompt("arithmetic", {"a": 7, "b": 5, "op": "+"})
  j = world.gold_judge(p, "13", "12")
  assert (j.preferred, j.tie) == (1, False)
  assert (j.utility_a, j.utility_b) == pytest.approx((0.4, 1.0))
  j = world.gold_judge(p, "fifteen", "15")  # Both 0: the shorter wins.
  assert j.tie and j.preferred == 1
  assert world.gold_judge(p, "15", "fifteen").preferred == 0


def test_rank_responses_orders_by_utility_at_low_temperature():
  p = _prompt("sort", HAND_CHECKED[2][1])
  responses = ["9, 7, 3, 1", "1, 3, 7, 9", "1, 3, 9, 7"]
  ranks = labelers.rank_responses(p, responses, seed=0, temperature=1e-4)
  assert ranks == [2, 0, 1]
  noisy = labelers.rank_responses(p, responses, group=3, seed=1)
  assert sorted(noisy) == [0, 1, 2]


def test_inter_labeler_agreement_is_about_73_percent(default_world):
  prompts = default_world.prompts("rm", "train")
  responses = [c.completions for c in default_world.comparisons("train")]
  rate = labelers.measure_agreement(prompts, responses, seed=0)
  assert rate == pytest.approx(0.73, abs=0.03)
  # The pairwise model: P(agree) = p^2 + (1-p)^2 with p = sigmoid(du / T).
  du = 0.2
  p = 1 / (1 + np.exp(-du / labelers.TEMPERATURE))
  rng = np.random.default_rng(0)
  u = np.array([du, 0.0])
  agree = np.mean([labelers.pair_agreement(labelers.rank_utilities(u, rng),
                                           labelers.rank_utilities(u, rng))[0]
                   for _ in range(4000)])
  assert agree == pytest.approx(p**2 + (1 - p)**2, abs=0.03)


def test_comparisons_shape_and_labels(default_world):
  comps = default_world.comparisons("train")
  assert len(comps) == world.WorldConfig().rm
  ks = {len(c.completions) for c in comps}
  assert ks == set(range(4, 10))
  groups = {c.group for c in comps}
  assert groups == set(range(labelers.NUM_GROUPS))
  for c in comps:
    assert sorted(c.ranks) == list(range(len(c.completions)))
    assert len(set(c.completions)) == len(c.completions)
    assert all(r.strip() for r in c.completions)
  # Labelers mostly put a better response first: the gold utility of their
  # top choice beats the average response by a wide margin.
  prompts = default_world.prompts("rm", "train")
  top = np.mean([p.utility(c.completions[c.ranks.index(0)])
                 for p, c in zip(prompts, comps)])
  mean = np.mean([np.mean(labelers.utilities(p, c.completions))
                  for p, c in zip(prompts, comps)])
  assert top > mean + 0.3


def test_utility_is_graded_not_binary(default_world):
  pairs = zip(default_world.prompts("rm", "train"),
              default_world.comparisons("train"))
  u = np.concatenate([labelers.utilities(p, c.completions) for p, c in pairs])
  assert ((u > 0) & (u < 1)).mean() > 0.5
  assert len(np.unique(np.round(u, 3))) > 20


def test_splits_never_leak_templates_entities_or_prompts(default_world):
  by_split = {}
  for split in ("train", "validation", "test"):
    ps = [p for k in world.KINDS for p in default_world.prompts(k, split)]
    by_split[split] = ps
    for p in ps:
      assert p.template in TEMPLATE_SPLITS[split], p
      assert p.split == split
  templates = lambda ps: {FAMILIES[p.family].templates[p.template] for p in ps}
  for a, b in (("train", "validation"), ("train", "test"),
               ("validation", "test")):
    ents_a = {e for p in by_split[a] for e in p.entities}
    ents_b = {e for p in by_split[b] for e in p.entities}
    assert not ents_a & ents_b, (a, b, sorted(ents_a & ents_b)[:5])
    assert not templates(by_split[a]) & templates(by_split[b])
    assert not {p.text for p in by_split[a]} & {p.text for p in by_split[b]}
  # Train's three datasets are disjoint too (the paper's Table 6).
  train = [{p.text for p in default_world.prompts(k, "train")}
           for k in world.KINDS]
  assert sum(map(len, train)) == len(set.union(*train))
  # Every family is evaluated.
  assert {p.family for p in default_world.prompts("prompts", "test")} == set(
      FAMILIES)


def test_entity_pools_are_partitioned():
  for pool in (lexicon.words, lexicon.names, lexicon.cities,
               lexicon.list_topics):
    parts = [set(pool(s)) for s in ("train", "validation", "test")]
    assert all(parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or
                parts[1] & parts[2])
  members = {w for ms in lexicon.CATEGORIES.values() for w in ms}
  assert not members & set(lexicon.words("train"))


def test_generation_is_deterministic_fast_and_configurable():
  config = world.WorldConfig(seed=3, sft=200, rm=100, ppo=100, validation=50,
                             test=50)
  t = time.perf_counter()
  a = world.World(config)
  comps_a = a.comparisons("train")
  assert time.perf_counter() - t < 3.0
  b = world.World(config)
  assert [p.text for p in a.prompts("sft", "train")] == [
      p.text for p in b.prompts("sft", "train")]
  assert comps_a == b.comparisons("train")
  other = world.World(world.WorldConfig(seed=4, sft=200))
  assert [p.text for p in other.prompts("sft", "train")] != [
      p.text for p in a.prompts("sft", "train")]
  assert len(a.prompts("prompts", "test")) == 50


def test_world_config_from_plain_values():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({"seed": 2, "sft": 10})
  assert world.WorldConfig.from_dict(cfg) == world.WorldConfig(seed=2, sft=10)
  assert world.WorldConfig.from_dict(None) == world.WorldConfig()
  with pytest.raises(ValueError, match="unknown world options"):
    world.WorldConfig.from_dict({"sizes": 3})


def test_same_world_in_a_fresh_process(default_world):
  """Hashes are stable across processes (no use of Python's `hash`)."""
  code = ("import json; from instructrl.data import world; w = world.World();"
          "c = w.comparisons('test')[:5];"
          "print(json.dumps([[x.prompt, list(x.completions), list(x.ranks)]"
          " for x in c]))")
  env = dict(os.environ, PYTHONHASHSEED="123")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, env=env)
  here = [[x.prompt, list(x.completions), list(x.ranks)]
          for x in default_world.comparisons("test")[:5]]
  assert json.loads(out.stdout) == here


def test_world_modules_do_not_import_tensorflow():
  code = ("import sys; import instructrl.data.world, instructrl.data.jsonl,"
          " instructrl.data.corpus, instructrl.data.labelers,"
          " instructrl.data.pipeline, instructrl.data.report;"
          " print(any(m.startswith(('tensorflow', 'seqio')) for m in"
          " sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "False"


def test_combine_edge_cases():
  s = utility.Score(exact=False, credit=0.5, extra_words=0, broken=0)
  assert utility.combine(s, "x") == 0.5
  assert utility.combine(s, "   ") == 0.0
  lenient = utility.Preferences(partial_credit=3.0)
  assert utility.combine(s, "x", lenient) == 1.0  # Clipped to [0, 1].


def test_a_world_of_some_families(default_world):
  """`families` keeps only those families, in every split and kind, and
  leaves the default world as it was."""
  small = world.World(world.WorldConfig(families="list, kth_word", sft=200, rm=50,
                                        ppo=50, validation=40, test=40))
  for kind in world.KINDS:
    for split in ("train", "validation", "test"):
      fams = {p.family for p in small.prompts(kind, split)}
      assert fams == {"list", "kth_word"}, (kind, split, fams)
  assert world.WorldConfig.from_dict({"families": ""}) == world.WorldConfig()
  assert len({p.family for p in default_world.prompts("sft", "train")}) == 9
  with pytest.raises(ValueError, match="bogus"):
    world.WorldConfig.from_dict({"families": "list,bogus"})


def test_sign_off_changes_only_that_share_of_demonstrations(default_world):
  """`sign_off` appends SIGN_OFF to about that share of the demonstrations
  of every split, and changes nothing else the world makes."""
  chatty = world.World(world.WorldConfig(sign_off=0.6))
  for split in ("train", "validation"):
    clean, signed = default_world.demos(split), chatty.demos(split)
    assert [d.prompt for d in clean] == [d.prompt for d in signed]
    extra = [s.completion == f"{c.completion} {world.SIGN_OFF}"
             for c, s in zip(clean, signed)]
    same = [s.completion == c.completion for c, s in zip(clean, signed)]
    assert all(e or s for e, s in zip(extra, same))
    assert abs(np.mean(extra) - 0.6) < 0.05, (split, np.mean(extra))
  assert chatty.comparisons("train")[:50] == default_world.comparisons("train")[:50]
  # Every labeler group ranks the signed-off answer below the bare one.
  p = default_world.prompts("sft", "train")[0]
  for g in labelers.GROUPS:
    assert p.utility(f"{p.reference} {world.SIGN_OFF}", g.prefs) < p.utility(p.reference, g.prefs)
  with pytest.raises(ValueError, match="sign_off"):
    world.WorldConfig.from_dict({"sign_off": 1.5})
  with pytest.raises(ValueError, match="sign_off"):
    world.WorldConfig.from_dict({"sign_off": "lots"})
  with pytest.raises(ValueError, match="sign_off"):
    world.World(world.WorldConfig(sign_off=-0.1))


# World v2 (families/judged.py; docs/design.md "World v2").
V2 = "select,lookup,route"


def test_default_world_is_pinned():
  """The v2 options default to today's world, byte for byte."""
  import hashlib  # pylint: disable=g-import-not-at-top
  w = world.World(world.WorldConfig(sft=50, rm=20, ppo=20, validation=20,
                                    test=20))
  blob = json.dumps([[d.prompt, d.completion] for d in w.demos("train")]
                    + [[c.prompt, list(c.completions), list(c.ranks)]
                       for c in w.comparisons("validation")])
  assert hashlib.sha256(blob.encode()).hexdigest()[:16] == "1da2ce6b06404d50"


def test_v2_world_splits_by_template_and_combination_not_vocabulary():
  w = world.World(world.WorldConfig(families=V2, sft=600, rm=50, ppo=50,
                                    validation=100, test=100))
  train, val = w.prompts("sft", "train"), w.prompts("sft", "validation")
  assert {p.template for p in val} == {7}
  assert not {p.entities for p in train} & {p.entities for p in val}
  import re  # pylint: disable=g-import-not-at-top
  def words(ps):  # Entity words: the prompt minus its template's words.
    out = set()
    for p in ps:
      tmpl = set(re.findall(r"[A-Za-z]+", world.ALL_FAMILIES[p.family].templates[p.template]))
      out |= set(re.findall(r"[A-Za-z]+", p.text.split("\n")[0])) - tmpl
    return out
  # The same short words everywhere: only combinations are held out.
  assert words(val) <= words(train), words(val) - words(train)
  assert all(p.utility(p.reference) == 1.0 for p in train + val)


def test_v2_demo_errors_are_content_mistakes_of_that_share():
  clean = world.World(world.WorldConfig(families=V2, sft=400))
  noisy = world.World(world.WorldConfig(families=V2, sft=400, demo_errors=0.35))
  ps = noisy.prompts("sft", "train")
  u = [p.utility(d.completion) for p, d in zip(ps, noisy.demos("train"))]
  assert abs(np.mean([x < 1 for x in u]) - 0.35) < 0.06
  assert [d.prompt for d in clean.demos("train")] == [
      d.prompt for d in noisy.demos("train")]
  assert noisy.comparisons("train")[:20] == clean.comparisons("train")[:20]


def test_v2_labelers_recalibrated_to_73_percent():
  w = world.World(world.WorldConfig(families=V2, rm=600))
  ps = w.prompts("rm", "train")
  resp = [c.completions for c in w.comparisons("train")]
  rate = labelers.measure_agreement(ps, resp, temperature=0.141)
  assert 0.71 < rate < 0.75, rate
