"""On-policy RM data (`rm.candidates = "sft"`): labelled SFT samples.

The SFT export here is a randomly initialised tiny model, so its samples are
noise; what is checked is the plumbing: every comparison's ranks agree with
the labeler's utilities on ties, prompts whose samples are all tied get the
world's candidates, the file is deterministic and reused, and the RM stage
trains on it.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from instructrl import config_files
from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel
from instructrl.stages import loop
from instructrl.stages import rm
from instructrl.stages import rm_data
from instructrl.stages import inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
  config = config_files.get_config(ROOT / "configs" / "default.py", "tiny")
  config.update_from_flattened_dict({
      "model.num_layers": 1, "rm.candidates": "sft", "rm.init": "sft",
      "rm.sample_new_tokens": 8, "rm.sample_batch_size": 16, "rm.demo_batches": 1,
      "data.world.rm": 16, "data.world.validation": 8, **overrides})
  return config


def export_random_sft(config, workdir):
  model = LanguageModel(inputs.model_config(config), nnx.Rngs(0))
  loop.export(workdir, "sft", nnx.split(model)[1], {"stage": "sft"})


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp("rm_data"))
  export_random_sft(config, workdir)
  return config, workdir


def read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_tied_ranks_share_a_rank_and_follow_utility():
  u = np.array([0.5, 0.0, 0.0, 1.0, 0.5])
  ranks = rm_data.tied_ranks(u, np.random.default_rng(0), temperature=1e-9)
  assert ranks == [1, 2, 2, 0, 1]


def test_a_tie_group_is_ranked_by_one_draw_at_the_labelers_temperature():
  """One right answer (u=0.6) and seven equal wrong ones (u=0) at the
  labelers' T=0.18: wrong beats right as often as one wrong answer would,
  1 / (1 + exp(0.6 / 0.18)) = 3.4%, not as the best of seven draws (~20%)."""
  from instructrl.data import labelers  # pylint: disable=g-import-not-at-top
  u = np.array([0.6] + [0.0] * 7)
  rng = np.random.default_rng(0)
  wrong_first = [r[1] < r[0] for r in (
      rm_data.tied_ranks(u, rng, labelers.TEMPERATURE) for _ in range(4000))]
  expected = 1 / (1 + np.exp(0.6 / labelers.TEMPERATURE))
  assert abs(np.mean(wrong_first) - expected) < 0.01, np.mean(wrong_first)


def test_build_labels_samples_and_is_deterministic(sft_workdir, tmp_path):
  from instructrl.data import labelers, world  # pylint: disable=g-import-not-at-top
  config, workdir = sft_workdir
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  info = rm_data.write_comparisons(config, workdir, mesh, "validation")
  path = rm_data.data_spec(workdir)[len("jsonl:"):].format(split="validation")
  rows = read(path)
  assert info["comparisons"] == len(rows) > 0
  assert 0.5 < info["labeler_agreement"] <= 1.0
  prompts = {p.text: p for p in world.get_world(world.WorldConfig.from_dict(
      dict(config.data.world))).prompts("rm", "validation")}
  wc = config.data.world
  for r in rows:
    c, ranks = r["completions"], np.asarray(r["ranks"])
    assert len(set(c)) == len(c) and all(s.strip() for s in c)
    assert len(set(ranks.tolist())) >= 2  # Never all tied: Eq. 1 needs a pair.
    assert len(c) <= wc.k_max
    u = labelers.utilities(prompts[r["prompt"]], c, labelers.GROUPS[r["group"]].prefs)
    same_u = u[:, None] == u[None, :]
    assert np.array_equal(same_u, ranks[:, None] == ranks[None, :])
  # Same seed and SFT weights: the same file; a finished file is reused.
  export_random_sft(config, str(tmp_path))
  rm_data.write_comparisons(config, str(tmp_path), mesh, "validation")
  again = rm_data.data_spec(str(tmp_path))[len("jsonl:"):].format(split="validation")
  assert read(again) == rows
  assert rm_data.write_comparisons(config, workdir, mesh, "validation") == {"reused": path}


def test_rm_stage_trains_on_sampled_comparisons(sft_workdir):
  config, workdir = sft_workdir
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  # Built here unless the test above did, in this process (xdist may run it
  # elsewhere): either way the stage must reuse the finished file.
  rm_data.write_comparisons(config, workdir, mesh, "validation")
  info = rm.run(config, workdir, mesh)
  sampled = info["sampled_data"]
  assert sampled["train"]["comparisons"] > 0
  assert "reused" in sampled["validation"]
  assert info["steps"] > 0 and np.isfinite(info["final"]["loss"])
