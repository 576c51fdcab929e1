"""Gold utility of finished stages' greedy answers on a world split.

A quick check between stages, lighter than the eval stage (no RM, no KL, no
pairwise judging): how good is this SFT (or PPO) model by itself, per
instruction family?

  python -m instructrl.tools.probe --workdir=W --stages=sft,ppo_ptx \
      --split=validation [--best_of=16] [--config=configs/default.py ...overrides]

`--best_of=N` also samples N answers per prompt at temperature 1 and
reports the headroom RL has near this policy: mean gold utility of the
samples, of the best sample by the gold judge (what a perfect reward model
could pick, at a KL of about log N - (N-1)/N nats), and of the sample the
trained RM ranks first, with the within-prompt correlation of RM scores and
gold utility. Best-of-N at moderate N is a standard stand-in for what PPO
against the same reward reaches at a similar KL.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

import jax
import jax.numpy as jnp

from instructrl import mesh as mesh_lib
from instructrl.eval import answers
from instructrl.model import LanguageModel, ScalarModel
from instructrl.stages import evaluate
from instructrl.stages import inputs
from instructrl.stages import validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "default.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline workdir.", required=True)
_STAGES = flags.DEFINE_list("stages", ["sft"], "Finished LM stages to probe.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"],
                           "World split of the PPO prompts.")
_NUM = flags.DEFINE_integer("num_prompts", 300, "At most this many prompts.")
_BEST_OF = flags.DEFINE_integer("best_of", 0, "Also report best-of-N statistics.")
_USE_RM = flags.DEFINE_bool("rm", True, "Score samples with the workdir's RM; "
                            "without one the by-RM figures are a random sample's.")


def greedy_answers(config, progs, params, texts, mesh, vocab) -> list[str]:
  """Decoded greedy answers; `progs` from `stages.evaluate.build`."""
  return answers.generate(progs.greedy, params, texts, mesh, vocab=vocab,
                          seq_len=config.ppo.prompt_len,
                          batch_size=config.eval.batch_size, tag="probe")


def selection_stats(utility, scores, exact=None, small_n: int = 4) -> dict:
  """Best-of-N figures from gold utilities and RM scores, both [prompts, N].

  `by_rm` takes each prompt's first sample of highest score, `by_rm_small`
  the same among the first `small_n` samples (issue 18's best-of-4 check);
  `corr` is the mean Pearson correlation over prompts whose utilities and
  scores both vary (NaN if none do); `any_exact`, given `exact` [prompts, N]
  booleans, is the share of prompts with a right sample.
  """
  u, r = np.asarray(utility, np.float64), np.asarray(scores, np.float64)
  extra = {}
  if u.shape[1] >= small_n:
    us, rs = u[:, :small_n], r[:, :small_n]
    extra["by_rm_small"] = float(us[np.arange(len(u)), rs.argmax(axis=1)].mean())
  if exact is not None:
    extra["any_exact"] = float(np.asarray(exact, bool).any(axis=1).mean())
  rows = np.arange(len(u))
  vary = (np.ptp(u, axis=1) > 0) & (np.ptp(r, axis=1) > 0)  # std of equal floats may be 1e-17.
  corr = [np.corrcoef(u[i], r[i])[0, 1] for i in np.flatnonzero(vary)]
  return {"sample": float(u.mean()), "oracle": float(u.max(axis=1).mean()),
          "by_rm": float(u[rows, r.argmax(axis=1)].mean()),
          "corr": float(np.mean(corr)) if corr else float("nan"),
          "any_positive": float((u.max(axis=1) > 0).mean()), **extra}


def best_of_n(config, progs, params, rm, prompts, mesh, n: int, vocab,
              seed: int = 0) -> dict:
  """Samples `n` answers per prompt at temperature 1 (`progs.sample`), scores
  them with the RM (`progs.score`); `selection_stats` of them."""
  utility, scores, exact, start = [], [], [], 0
  batches = answers.prompt_batches([p.text for p in prompts], vocab=vocab,
                                   seq_len=config.ppo.prompt_len,
                                   batch_size=config.eval.batch_size, tag="probe")
  for b, batch in enumerate(batches):
    x = mesh_lib.put_batch(batch, mesh)
    real = int(np.asarray(batch["prompt_mask"]).any(axis=1).sum())
    u, r = np.zeros((real, n)), np.zeros((real, n))
    e = np.zeros((real, n), bool)
    for k in range(n):
      out = progs.sample(params, x["prompt_tokens"], x["prompt_mask"],
                         jax.random.key(seed + b * n + k))
      mask = jnp.concatenate([x["prompt_mask"], out.response_mask], axis=1)
      if rm is not None:
        r[:, k] = np.asarray(progs.score(rm, out.tokens, mask))[:real]
      texts = answers.decode(vocab, batch, out)
      u[:, k] = [p.utility(t) for p, t in zip(prompts[start:start + real], texts)]
      e[:, k] = [p.score(t).exact for p, t in zip(prompts[start:start + real], texts)]
    utility.append(u)
    scores.append(r)
    exact.append(e)
    start += real
  u, r, e = (np.concatenate(x) for x in (utility, scores, exact))
  out = selection_stats(u, r, e)
  families = [p.family for p in prompts]
  # Per family without `corr` (NaN != NaN would make equal runs unequal).
  out["by_family"] = {
      f: {k: v for k, v in selection_stats(u[m], r[m], e[m]).items() if k != "corr"}
      for f in sorted(set(families)) for m in [np.array([x == f for x in families])]}
  return out


def main(_):
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  mesh = validate.make_mesh(config)
  progs = evaluate.build(config, mesh)  # Compiled once, for every stage.
  vocab = inputs.vocabulary(config)
  rm = (inputs.load_model(_WORKDIR.value, "rm", ScalarModel, progs.rm_cfg, mesh)[1]
        if _BEST_OF.value and _USE_RM.value else None)
  prompts = pipeline.get_prompts("world", _SPLIT.value,
                                 world=dict(config.data.world))[:_NUM.value]
  for stage in _STAGES.value:
    _, params, _ = inputs.load_model(_WORKDIR.value, stage, LanguageModel, progs.cfg,
                                     mesh)
    got = greedy_answers(config, progs, params, [p.text for p in prompts], mesh, vocab)
    by_family = {}
    for p, a in zip(prompts, got):
      by_family.setdefault(p.family, []).append(p.utility(a))
    utility = np.mean([u for us in by_family.values() for u in us])
    correct = np.mean([p.score(a).exact for p, a in zip(prompts, got)])
    exact_by = {}
    for p, a in zip(prompts, got):
      exact_by.setdefault(p.family, []).append(p.score(a).exact)
    print(f"{stage}: gold utility {utility:.3f}, exact {correct:.3f} ({len(prompts)} "
          f"{_SPLIT.value} prompts) | " + " ".join(
              f"{f} {np.mean(u):.2f} (exact {np.mean(exact_by[f]):.2f})"
              for f, u in sorted(by_family.items())))
    if _BEST_OF.value:
      st = best_of_n(config, progs, params, rm, prompts, mesh, _BEST_OF.value, vocab)
      print(f"{stage}: temperature 1, {_BEST_OF.value} samples per prompt: mean gold "
            f"utility {st['sample']:.3f}; best by gold {st['oracle']:.3f}; best by RM "
            f"{st['by_rm']:.3f}; corr(RM, gold) within prompts {st['corr']:.3f}; "
            f"prompts with a useful sample {st['any_positive']:.2f}; with a right "
            f"sample {st['any_exact']:.2f}; best of 4 by RM {st['by_rm_small']:.3f}")
      for f, fs in st["by_family"].items():
        print(f"  {f}: sample {fs['sample']:.3f} best-by-gold {fs['oracle']:.3f} "
              f"right-sample {fs['any_exact']:.2f} best-of-{_BEST_OF.value}-by-RM "
              f"{fs['by_rm']:.3f} best-of-4-by-RM {fs.get('by_rm_small', np.nan):.3f}")


if __name__ == "__main__":
  app.run(main)
