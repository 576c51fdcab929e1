"""Stages 0 and 1: pretraining the tiny base model, and SFT (the paper, 3.5).

`build(config, mesh, stage)` makes the stage's compiled programs (the train
step, the validation step) with their shardings and abstract arguments;
`run(config, workdir, mesh, stage)` reads the data and the initial
parameters, calls the shared loop, and exports the best parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import mesh as mesh_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.stages import inputs
from instructrl.stages import loop
from instructrl.stages import sft_extras
from instructrl.stages.validate import check_stage, rows_per_step

# Batch leaves of the LM loss and their dtypes: int32 [B, T], loss_mask f32.
LM_BATCH = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
            "segment_ids": jnp.int32, "positions": jnp.int32}
# Only the LR schedule depends on the step count, not any shape: what a
# program is compiled with when the data (which fixes SFT's) is not read.
PLAN_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class Programs:
  """A training stage's compiled programs and what they are built from.

  `train` (`steps.train_step`, state donated) and `eval` (validation
  metrics of params) are `mesh_lib.Program`s: call `.fn`, or lower it with
  its abstract `.args` (the AOT planner).
  """
  cfg: ModelConfig
  graphdef: Any
  tx: Any
  shardings: dict  # Of the train state {"params", "opt_state", "step"}.
  rows: int  # Rows per global batch (SFT: demonstrations + pretraining rows).
  train: mesh_lib.Program
  eval: mesh_lib.Program


def abstract_rows(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  """A batch leaf of global `shape`, rows split over the data axes."""
  return jax.ShapeDtypeStruct(tuple(shape), dtype,
                              sharding=mesh_lib.batch_sharding(mesh, len(shape)))


def abstract_key(mesh) -> jax.ShapeDtypeStruct:
  """A replicated typed PRNG key, as steps and the rollout take it."""
  return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                              sharding=mesh_lib.replicated(mesh))


def train_program(model_cls, cfg, sc, mesh, loss_maker, batch: dict,
                  num_steps: int):
  """(graphdef, tx, state shardings, Program) of `steps.train_step`."""
  tx = steps.make_optimizer(sc.lr, num_steps, sc.warmup_steps,
                            weight_decay=sc.weight_decay)
  graphdef, abs_params = abstract(model_cls, cfg)
  shardings = steps.train_state_shardings(
      mesh_lib.param_shardings(abs_params, mesh), tx, abs_params, mesh)
  step_fn = functools.partial(steps.train_step, loss_fn=loss_maker(graphdef), tx=tx,
                              num_micro=sc.microbatches, use_dropout=sc.dropout > 0)
  fn = steps.jit_step(step_fn, shardings, mesh, {k: v.ndim for k, v in batch.items()})
  args = (steps.abstract_train_state(abs_params, tx, shardings), batch,
          abstract_key(mesh))
  return graphdef, tx, shardings, mesh_lib.Program(fn, args)


def lm_eval_program(graphdef, abstract_params, batch: dict, mesh) -> mesh_lib.Program:
  """Validation loss and accuracy of params on one LM batch (token-weighted)."""
  loss = steps.lm_loss_fn(graphdef)

  def fn(params, b):
    _, m = loss.fn(params, b, None)
    return {"loss": m["loss"], "accuracy": m["accuracy"], "weight": m["num_tokens"]}
  return mesh_lib.Program(mesh_lib.jit(fn, mesh), (abstract_params, batch))


def build(config, mesh, stage: str, num_steps: int | None = None) -> Programs:
  """The programs of "pretrain" or "sft"; `num_steps` sets the LR schedule."""
  sc = config[stage]
  cfg = inputs.model_config(config, dropout=sc.dropout)
  rows = rows_per_step(config, mesh, stage)
  batch = {k: abstract_rows(mesh, (rows, sc.seq_len), dt) for k, dt in LM_BATCH.items()}
  val = {k: abstract_rows(mesh, (sc.batch_size, sc.seq_len), dt)
         for k, dt in LM_BATCH.items()}  # Validation batches hold no pretraining rows.
  num_steps = num_steps or (sc.steps if stage == "pretrain" else PLAN_STEPS)
  graphdef, tx, shardings, train = train_program(
      LanguageModel, cfg, sc, mesh, steps.lm_loss_fn, batch, num_steps)
  return Programs(cfg, graphdef, tx, shardings, rows, train,
                  lm_eval_program(graphdef, train.args[0]["params"], val, mesh))


def run(config, workdir: str, mesh, stage: str) -> dict:
  """Pretraining ("pretrain", packed corpus) or SFT ("sft", demonstrations)."""
  check_stage(config, stage, mesh)
  sc = config[stage]
  t0 = time.monotonic()
  kind = "lm" if stage == "pretrain" else "sft"
  train_it = inputs.iterator(config, kind, sc.data, "train", sc.batch_size,
                             sc.seq_len, config.seed)
  if stage == "pretrain":
    num_steps = sc.steps
  else:  # config.sft.steps > 0 overrides the epochs.
    num_steps = sc.get("steps", 0) or int(np.ceil(sc.epochs *
                                                  train_it.batches_per_epoch))
  p = build(config, mesh, stage, num_steps)
  if p.rows > sc.batch_size:
    train_it = sft_extras.mixed_batches(train_it, inputs.iterator(
        config, "lm", sc.ptx_data, "train", p.rows - sc.batch_size, sc.seq_len,
        config.seed + 1))
  init = inputs.init_params(config, workdir, stage, LanguageModel, p.cfg, mesh)
  _, state, _ = steps.create_train_state(LanguageModel, p.cfg, p.tx, mesh, config.seed,
                                         params=init)
  val_it = inputs.iterator(config, kind, sc.data, "validation", sc.batch_size,
                           sc.seq_len, config.seed, infinite=False)
  select = _rm_selection(config, workdir, stage, p, mesh)

  def eval_fn(params):
    m = loop.batch_eval(p.eval.fn, params, val_it, mesh, sc.eval_batches)
    if select is not None:
      m.update(select(params))
    return m
  lc = loop.LoopConfig.of(stage, sc, num_steps, config.seed,
                          tokens_per_step=p.rows * sc.seq_len,
                          eval_key="loss" if select is None else "rm_score",
                          eval_mode="min" if select is None else "max")
  state, best, summary = loop.train_loop(
      lc, workdir, state=state, shardings=p.shardings, step_fn=p.train.fn,
      batches=train_it, mesh=mesh, eval_fn=eval_fn, config_json=config.to_json())
  info = {"stage": stage, "steps": summary["steps"], "best": summary["best"],
          "final": summary["last"], "wall_s": time.monotonic() - t0}
  loop.export(workdir, stage, best, info)
  return info


def _rm_selection(config, workdir, stage, p: Programs, mesh):
  """With `sft.select_rm` set (a finished "rm" stage or a params path), the
  kept SFT checkpoint is the best by RM score on validation prompts."""
  if stage != "sft" or not config.sft.select_rm:
    return None
  rm_cfg = inputs.rm_model_config(config)
  src = config.sft.select_rm
  if src == "rm":
    g_rm, rm, _ = inputs.load_model(workdir, "rm", ScalarModel, rm_cfg, mesh)
  else:
    g_rm, abs_rm = abstract(ScalarModel, rm_cfg)
    rm = loop.load_params(src, abs_rm, mesh_lib.param_shardings(abs_rm, mesh))
  sc = config.sft
  prompts = inputs.iterator(config, "prompts", sc.data, "validation", sc.batch_size,
                            sc.select_prompt_len, config.seed, infinite=False)
  return sft_extras.rm_score_eval(p.graphdef, p.shardings["params"], g_rm, rm, prompts,
                                  mesh, inputs.special_ids(config), sc.select_new_tokens)
