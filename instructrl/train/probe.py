"""Gold utility of finished stages' greedy answers on a world split.

A quick check between stages, lighter than the eval stage (no RM, no KL, no
pairwise judging): how good is this SFT (or PPO) model by itself, per
instruction family?

  python -m instructrl.train.probe --workdir=W --stages=sft,ppo_ptx \
      --split=validation [--config=configs/default.py ...overrides]
"""
from __future__ import annotations

import os

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel
from instructrl.model.sharded import abstract
from instructrl.sampling import SampleConfig, make_sampler
from instructrl.train import answers
from instructrl.train import common
from instructrl.train.stages import model_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "default.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline workdir.", required=True)
_STAGES = flags.DEFINE_list("stages", ["sft"], "Finished LM stages to probe.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"],
                           "World split of the PPO prompts.")
_NUM = flags.DEFINE_integer("num_prompts", 300, "At most this many prompts.")


def greedy_answers(config, graphdef, shardings, params, texts, mesh) -> list[str]:
  from instructrl.data import EOS_ID, pipeline  # pylint: disable=g-import-not-at-top
  sampler = make_sampler(graphdef, shardings, SampleConfig(
      config.eval.max_new_tokens, 0.0, eos_id=EOS_ID), mesh)
  vocab = pipeline.resolve_vocab(config.data.vocab, config.data.cache_dir or None)
  return answers.generate(sampler, params, texts, mesh, vocab=vocab,
                          seq_len=config.ppo.prompt_len,
                          batch_size=config.eval.batch_size, tag="probe")


def main(_):
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  from instructrl.train.pipeline import make_mesh  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  mesh = make_mesh(config)
  graphdef, abs_lm = abstract(LanguageModel, model_config(config))
  shardings = mesh_lib.state_shardings(abs_lm, mesh)
  prompts = pipeline.get_prompts("world", _SPLIT.value,
                                 world=dict(config.data.world))[:_NUM.value]
  for stage in _STAGES.value:
    params = common.load_export(_WORKDIR.value, stage, abs_lm, shardings)
    answers = greedy_answers(config, graphdef, shardings, params,
                             [p.text for p in prompts], mesh)
    by_family = {}
    for p, a in zip(prompts, answers):
      by_family.setdefault(p.family, []).append(p.utility(a))
    utility = np.mean([p.utility(a) for p, a in zip(prompts, answers)])
    correct = np.mean([p.score(a).exact for p, a in zip(prompts, answers)])
    print(f"{stage}: gold utility {utility:.3f}, exact {correct:.3f} ({len(prompts)} "
          f"{_SPLIT.value} prompts) | " + " ".join(
              f"{f} {np.mean(u):.2f}" for f, u in sorted(by_family.items())))


if __name__ == "__main__":
  app.run(main)
