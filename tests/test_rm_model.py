"""A reward model of another shape than the policy (`config.rm_model`).

The paper trains one 6B RM for every policy size, and the PPO value model
starts as the RM, so it has the RM's shape. A tiny run with a policy of
width 32 and an RM of width 48 goes rm -> sft (kept by RM score) -> ppo_ptx
-> eval on one device, every model one layer deep and trained from scratch,
for speed.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from instructrl import config_files
from instructrl.model import LanguageModel, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.stages import loop
from instructrl.stages import runner
from instructrl.stages import inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Two steps per stage; evaluations only at the end; small eval sets.
OVERRIDES = {
    "model.num_layers": 1, "rm.init": "none", "rm.epochs": 0.25,
    "rm.demo_batches": 1, "sft.init": "none", "sft.epochs": 0.25,
    "sft.eval_batches": 1, "sft.select_rm": "rm", "ppo.iterations": 2,
    "eval.heldout_batches": 1, "rm.candidates": "world",  # RM runs before SFT here.
}


def load_config(stage: str, **overrides):
  config = config_files.get_config(ROOT / "configs" / "default.py", "tiny")
  config.update_from_flattened_dict({**OVERRIDES, "stage": stage, **overrides})
  config.rm_model = mlc.ConfigDict(dict(config.model, d_model=48))
  return config


def shapes(tree) -> dict:
  return {jax.tree_util.keystr(k).replace("'", ""): tuple(np.shape(v))
          for k, v in jax.tree.leaves_with_path(tree)}


def abstract_shapes(model_cls, cfg) -> dict:
  return shapes(nnx.to_pure_dict(abstract(model_cls, cfg)[1]))


def restore(path) -> dict:
  with ocp.StandardCheckpointer() as c:
    return c.restore(os.path.abspath(path))


def test_rm_init_from_a_policy_stage_is_a_config_error(tmp_path):
  config = load_config("pipeline", **{"rm.init": "sft"})
  with pytest.raises(loop.ConfigError, match=r"config\.rm\.init='sft'"):
    runner.run(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  assert not (tmp_path / "w").exists()


def test_rm_model_shape_runs_rm_sft_ppo_ptx_eval(tmp_path):
  workdir, devices = str(tmp_path / "w"), jax.devices()[:1]
  cfg = inputs.model_config(load_config("rm"))
  rm_cfg = inputs.rm_model_config(load_config("rm"))
  assert (cfg.d_model, rm_cfg.d_model) == (32, 48)
  for stage in ("rm", "sft", "ppo_ptx", "eval"):
    runner.run(load_config(stage), workdir, devices=devices)
  rm_shapes = abstract_shapes(ScalarModel, rm_cfg)
  assert shapes(restore(f"{workdir}/rm/export/params")) == rm_shapes
  assert loop.read_info(workdir, "sft")["final"]["val_rm_score"] is not None
  state = restore(f"{workdir}/ppo_ptx/ckpt/2/state")
  assert shapes(state["value_params"]) == rm_shapes
  assert shapes(state["params"]) == abstract_shapes(LanguageModel, cfg)
  assert np.isfinite(loop.read_info(workdir, "ppo_ptx")["final"]["score"])
  report = json.loads(pathlib.Path(workdir, "eval", "report.json").read_text())
  assert set(report) == {"sft", "ppo_ptx"}  # No pretrain stage: no base model.
  assert all(np.isfinite(e["rm_score"]) for e in report.values())
