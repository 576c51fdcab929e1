"""Prints what the miniature world contains: `python -m instructrl.data.report`.

Per family: example prompts and references; the K distribution of the
comparisons; the measured inter-labeler agreement; split sizes; and, with
--tokens, token lengths under a vocabulary (this imports seqio).
"""
import argparse
import collections
import time

import numpy as np

from instructrl.data import corpus
from instructrl.data import labelers
from instructrl.data import world as world_lib


def _section(title: str) -> None:
  print(f"\n== {title} ==")


def _families(world: world_lib.World, examples: int) -> None:
  _section("families: train examples, then one test example")
  by_family = collections.defaultdict(list)
  for p in world.prompts("sft", "train"):
    by_family[p.family].append(p)
  tests = {}
  for p in world.prompts("prompts", "test"):
    tests.setdefault(p.family, p)
  for family, prompts in by_family.items():
    print(f"[{family}]")
    for p in prompts[:examples] + ([tests[family]] if family in tests else []):
      text = p.text.replace("\n", " | ")
      print(f"  {p.split:5.5} t{p.template}  {text}  ->  {p.reference!r}")


def _comparisons(world: world_lib.World, seed: int) -> None:
  _section("comparisons (train)")
  comps = world.comparisons("train")
  prompts = world.prompts("rm", "train")
  ks = collections.Counter(len(c.completions) for c in comps)
  print("K distribution:", dict(sorted(ks.items())))
  groups = collections.Counter(c.group for c in comps)
  print("labeler groups:", {labelers.GROUPS[g].name: n
                            for g, n in sorted(groups.items())})
  u = np.concatenate([labelers.utilities(p, c.completions)
                      for p, c in zip(prompts, comps)])
  print(f"gold utility of responses: mean {u.mean():.3f}, exact "
        f"{np.mean(u == 1):.1%}, zero {np.mean(u == 0):.1%}")
  best = [c.completions[int(np.argmin(c.ranks))] for c in comps]
  top = np.mean([p.utility(b) for p, b in zip(prompts, best)])
  print(f"gold utility of the labelers' top choice: mean {top:.3f}")
  responses = [c.completions for c in comps]
  t = time.perf_counter()
  agree = labelers.measure_agreement(prompts, responses, seed=seed)
  within = labelers.measure_agreement(prompts, responses, seed=seed,
                                      same_group=True)
  across = labelers.measure_agreement(prompts, responses, seed=seed,
                                      same_group=False)
  print(f"inter-labeler agreement (T = {labelers.TEMPERATURE}): {agree:.1%} "
        f"(same group {within:.1%}, different groups {across:.1%}; "
        f"{time.perf_counter() - t:.1f}s)  [paper: ~73%]")


def _sizes(world: world_lib.World) -> None:
  _section("split sizes (prompts; the test split is what evaluation uses)")
  for split in ("train", "validation", "test"):
    row = {k: len(world.prompts(k, split)) for k in world_lib.KINDS}
    fams = collections.Counter(p.family for p in world.prompts("prompts",
                                                               split))
    print(f"{split:10} sft {row['sft']:5}  rm {row['rm']:5}  "
          f"prompts {row['prompts']:5}   families {dict(sorted(fams.items()))}")
  data = corpus.load()
  for split, docs in data.items():
    print(f"corpus {split:10} {len(docs):5} documents, "
          f"{sum(map(len, docs)) / 1e6:.2f} M characters")


def _tokens(world: world_lib.World, vocab_spec: str) -> None:
  from instructrl.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  _section(f"token lengths ({vocab_spec})")
  vocab = vocab_lib.get_vocabulary(vocab_spec)
  for split in ("train", "test"):
    ps = world.prompts("sft", split) + world.prompts("prompts", split)
    plen = np.array([len(x) for x in vocab.encode_batch([p.text for p in ps])])
    rlen = np.array([len(x) for x in vocab.encode_batch([p.reference for p in ps])])
    print(f"{split:5} prompts: mean {plen.mean():.1f} max {plen.max()}; "
          f"references: mean {rlen.mean():.1f} max {rlen.max()}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0, help="world seed")
  parser.add_argument("--examples", type=int, default=2)
  parser.add_argument("--tokens", default="",
                      help="also report token lengths under this vocab spec")
  args = parser.parse_args(argv)
  t = time.perf_counter()
  world = world_lib.World(world_lib.WorldConfig(seed=args.seed))
  _families(world, args.examples)
  _sizes(world)
  built = time.perf_counter() - t
  _comparisons(world, args.seed)
  if args.tokens:
    _tokens(world, args.tokens)
  print(f"\nbuilt the world and corpus in {built:.1f}s; "
        f"total {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
  main()
