"""Stage 2: the reward model, Eq. 1 over all C(K,2) pairs of each prompt.

Trains on every labeler group but `heldout_group`; reports validation
accuracy on the training groups and, separately, on the held-out group (the
paper's Appendix E.2). Afterwards the bias is set so that the training
demonstrations score mean 0 (Section 3.5). With `rm.candidates = "sft"` the
comparisons rank the SFT model's own samples (`rm_data`).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instructrl import losses
from instructrl import mesh as mesh_lib
from instructrl import steps
from instructrl.data.labelers import NUM_GROUPS
from instructrl.data.pipeline import K_MAX  # Completion slots per prompt row.
from instructrl.model import ScalarModel
from instructrl.stages import inputs
from instructrl.stages import lm
from instructrl.stages import loop
from instructrl.stages import rm_data
from instructrl.stages.validate import check_stage


def _batch(mesh, p: int, t: int) -> dict:
  rows = lambda shape, dt: lm.abstract_rows(mesh, shape, dt)
  return {"tokens": rows((p, K_MAX, t), jnp.int32),
          "segment_ids": rows((p, K_MAX, t), jnp.int32),
          "positions": rows((p, K_MAX, t), jnp.int32),
          "ranks": rows((p, K_MAX), jnp.int32), "valid": rows((p, K_MAX), bool),
          "group": rows((p,), jnp.int32)}


def _eval_program(graphdef, abstract_params, batch, mesh) -> mesh_lib.Program:
  def fn(params, b):
    scores = steps.rm_scores(graphdef, params, b)
    _, m = losses.ranking_loss(scores, b["ranks"], b["valid"])
    return {"loss": m["loss"], "accuracy": m["accuracy"], "weight": m["num_pairs"]}
  return mesh_lib.Program(mesh_lib.jit(fn, mesh), (abstract_params, batch))


def build(config, mesh, stage: str = "rm", num_steps: int | None = None) -> lm.Programs:
  """The RM's train and validation programs (the RM's shape: `rm_model`)."""
  sc = config[stage]
  cfg = inputs.rm_model_config(config, dropout=sc.dropout)
  batch = _batch(mesh, sc.batch_size, sc.seq_len)
  graphdef, tx, shardings, train = lm.train_program(
      ScalarModel, cfg, sc, mesh, steps.rm_loss_fn, batch, num_steps or lm.PLAN_STEPS)
  return lm.Programs(cfg, graphdef, tx, shardings, sc.batch_size, train,
                     _eval_program(graphdef, train.args[0]["params"], batch, mesh))


def demo_score_mean(config, graphdef, params, mesh, seq_len) -> float:
  """Mean RM score of the training demonstrations (prompt + reference) of
  `rm.demo_data` ("": the SFT data)."""
  sc = config.rm
  it = inputs.iterator(config, "sft", sc.demo_data or config.sft.data, "train",
                       sc.batch_size * 4, seq_len, config.seed, infinite=False)

  def fn(p, batch):
    # SFT rows hold inputs x[:-1] and targets x[1:]; the RM reads the whole
    # sequence x, EOS included, as in its own comparison rows.
    # The whole x has at most seq_len tokens, so x = tokens[0] + targets[:-1]
    # keeps every real token within the model's positions.
    seg = batch["segment_ids"]
    full = jnp.concatenate([batch["tokens"][:, :1], batch["targets"][:, :-1]], axis=1)
    full_seg = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
    pos = jnp.broadcast_to(jnp.arange(full.shape[1], dtype=jnp.int32), full.shape)
    r = nnx.merge(graphdef, p).reward(full, pos, full_seg)
    real = jnp.any(seg > 0, axis=1)
    return {"score": jnp.sum(jnp.where(real, r, 0.0)) / jnp.maximum(jnp.sum(real), 1),
            "weight": jnp.sum(real)}
  return loop.batch_eval(mesh_lib.jit(fn, mesh), params, it, mesh,
                         sc.demo_batches)["score"]


def run(config, workdir: str, mesh, stage: str = "rm") -> dict:
  check_stage(config, stage, mesh)
  sc = config.rm
  t0 = time.monotonic()
  held = sc.heldout_group
  train_groups = [g for g in range(NUM_GROUPS) if g != held]
  spec, sampled = sc.data, {}
  if sc.get("candidates", "world") == "sft":
    sampled = {s: rm_data.write_comparisons(config, workdir, mesh, s)
               for s in ("train", "validation")}
    print(f"[rm] labelled SFT samples: {sampled}")
    spec = rm_data.data_spec(workdir)
  it = inputs.iterator(config, "rm", spec, "train", sc.batch_size, sc.seq_len,
                       config.seed, groups=train_groups if held >= 0 else None)
  num_steps = sc.get("steps", 0) or int(np.ceil(sc.epochs * it.batches_per_epoch))
  p = build(config, mesh, stage, num_steps)
  init = inputs.init_params(config, workdir, "rm", ScalarModel, p.cfg, mesh)
  _, state, _ = steps.create_train_state(ScalarModel, p.cfg, p.tx, mesh, config.seed,
                                         params=init)
  val = {name: inputs.iterator(config, "rm", spec, "validation", sc.batch_size,
                               sc.seq_len, config.seed, infinite=False, groups=groups)
         for name, groups in (("", train_groups), ("heldout_group_", [held]))
         if groups != [-1]}

  def eval_fn(params):
    m = {}
    for prefix, vit in val.items():
      m.update({prefix + k: v for k, v in loop.batch_eval(p.eval.fn, params, vit,
                                                          mesh).items()})
    return m
  lc = loop.LoopConfig.of("rm", sc, num_steps, config.seed, eval_key="accuracy",
                          eval_mode="max")
  state, best, summary = loop.train_loop(
      lc, workdir, state=state, shardings=p.shardings, step_fn=p.train.fn,
      batches=it, mesh=mesh, eval_fn=eval_fn, config_json=config.to_json())
  mean = demo_score_mean(config, p.graphdef, best, mesh, sc.seq_len)
  best = jax.tree.map(lambda x: x, best)
  best["bias"].set_value(best["bias"].get_value() - mean)
  info = {"stage": "rm", "steps": summary["steps"], "best": summary["best"],
          "final": summary["last"], "demo_mean_before_bias": mean,
          "heldout_group": held, "sampled_data": sampled,
          "wall_s": time.monotonic() - t0}
  loop.export(workdir, "rm", best, info)
  return info
