"""On-policy comparison data: simulated labelers rank the SFT model's samples.

The paper's labelers ranked K outputs *of the models being trained* for each
prompt (Sections 3.4-3.5), not hand-made variants of a reference. That
matters: a reward model only guides PPO where it has seen the policy's own
kind of output. With `config.rm.candidates = "sft"` the RM stage first draws
K in [k_min, k_max] temperature-1 samples from the SFT export for each RM
prompt, has a labeler of a random group rank them (equal utilities under
that labeler's preferences are marked as ties, which Eq. 1 drops, as the
paper's ranking interface allowed), and writes the comparisons as JSONL that
the ordinary "jsonl:" data path then trains on. Prompts whose samples are
all tied, or have fewer than k_min distinct answers, are topped up with the
world's hand-made candidates so every prompt still yields pairs.
"""
from __future__ import annotations

import json
import os

import numpy as np

from instructrl.eval import answers
from instructrl.model import LanguageModel
from instructrl.sampling import SampleConfig, make_sampler
from instructrl.stages import inputs
from instructrl.stages import loop


def data_spec(workdir: str) -> str:
  """The jsonl spec of the sampled comparisons ({split} is filled per split)."""
  return "jsonl:" + os.path.join(loop.stage_dir(workdir, "rm"), "data",
                                 "comparisons_{split}.jsonl")


def tied_ranks(u: np.ndarray, rng: np.random.Generator, temperature: float) -> list[int]:
  """A Plackett-Luce ranking of the distinct utilities; equal ones share a rank.

  One noise draw per distinct value: ranking every answer and giving a tie
  group its best member's rank would rank the group by the maximum of its
  members' draws, so seven equal wrong answers would beat one right answer
  far more often than one wrong answer does.
  """
  from instructrl.data import labelers  # pylint: disable=g-import-not-at-top
  values = np.unique(u)
  ranks = np.asarray(labelers.rank_utilities(values, rng, temperature))
  return ranks[np.searchsorted(values, u)].tolist()


def _samples(config, workdir, mesh, texts, n_per_prompt):
  """Decoded temperature-1 SFT samples: n_per_prompt[i] answers to texts[i]."""
  sc = config.rm
  g, params, sh = inputs.load_model(workdir, "sft", LanguageModel,
                                    inputs.model_config(config), mesh)
  sampler = make_sampler(g, sh, SampleConfig(sc.sample_new_tokens, sc.sample_temperature,
                                             **inputs.special_ids(config)), mesh)
  vocab = inputs.vocabulary(config)
  owner = np.repeat(np.arange(len(texts)), n_per_prompt)
  flat = answers.generate(sampler, params, [texts[i] for i in owner], mesh, vocab=vocab,
                          seq_len=config.ppo.prompt_len,
                          batch_size=sc.sample_batch_size, seed=config.seed * 7919,
                          tag="rm-sample")
  out = [[] for _ in texts]
  for i, a in zip(owner, flat):
    out[i].append(a.strip())
  return out


def write_comparisons(config, workdir: str, mesh, split: str) -> dict:
  """Samples, labels and writes one split's comparisons; returns counts."""
  from instructrl.data import labelers, world  # pylint: disable=g-import-not-at-top
  path = data_spec(workdir)[len("jsonl:"):].format(split=split)
  if os.path.exists(path):
    return {"reused": path}
  wc = world.WorldConfig.from_dict(dict(config.data.world))
  prompts = world.get_world(wc).prompts("rm", split)
  rng = np.random.default_rng([config.seed, 0x524d, ("train", "validation", "test").index(split)])
  ks = rng.integers(wc.k_min, wc.k_max + 1, size=len(prompts))
  samples = _samples(config, workdir, mesh, [p.text for p in prompts], ks)
  rows, topped, agree, pairs = [], 0, 0, 0
  for p, k, got in zip(prompts, ks, samples):
    cands = list(dict.fromkeys(s for s in got if s))
    group = int(rng.integers(labelers.NUM_GROUPS))
    prefs = labelers.GROUPS[group].prefs
    u = labelers.utilities(p, cands, prefs)
    if len(cands) < wc.k_min or len(np.unique(u)) < 2:
      # Half the samples stay; the world's candidates (usually the reference
      # and near misses) fill the rest, so the prompt still teaches the RM.
      topped += 1
      keep = cands[:int(k) // 2]
      extra = [c for c in world.candidate_responses(p, int(k), rng) if c not in keep]
      cands = (keep + extra)[:int(k)]
      u = labelers.utilities(p, cands, prefs)
      if len(np.unique(u)) < 2:
        continue
    ranks = tied_ranks(u, rng, labelers.TEMPERATURE)
    # A second labeler of the same group: how noisy are these labels?
    a, n = labelers.pair_agreement(np.asarray(ranks), np.asarray(
        tied_ranks(u, rng, labelers.TEMPERATURE)))
    agree, pairs = agree + a, pairs + n
    rows.append({"prompt": p.text, "completions": cands, "ranks": ranks, "group": group})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)  # Atomic: a killed run never leaves half a file.
  return {"prompts": len(prompts), "comparisons": len(rows), "topped_up": topped,
          "mean_k": float(np.mean([len(r["completions"]) for r in rows])),
          "labeler_agreement": agree / max(pairs, 1)}
