"""Stage 3: PPO (ptx_coef = 0) and PPO-ptx against the reward model.

Per iteration the host feeds one batch of prompts (and, for PPO-ptx, the
pretraining rows) and logs; the rollout (sample, score, reference and value
passes, GAE) is one compiled program and the learner (epochs x minibatches)
another. The policy and the frozen reference start from the SFT export; the
value model starts from the RM export (the paper, Section 3.5).
"""
from __future__ import annotations

import functools
import time

import jax

from instructrl import mesh as mesh_lib
from instructrl import ppo as ppo_lib
from instructrl import rollout as rollout_lib
from instructrl import steps
from instructrl.model import LanguageModel, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.train import common
from instructrl.train.stages import _iterator, model_config, rm_key, rm_model_config

PROMPT_KEYS = {"prompt_tokens": 2, "prompt_mask": 2, "prompt_id": 1}
PTX_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _with_ptx(prompts, ptx):
  return {**prompts, **{f"ptx_{k}": v for k, v in ptx.items()}}


def _load_models(config, workdir, cfg, mesh):
  """Frozen reference + RM, and the initial policy/value params. The value
  model has the RM's shape (`config.rm_model`, if set): it starts as the RM."""
  g_lm, abs_lm = abstract(LanguageModel, cfg)
  g_sc, abs_sc = abstract(ScalarModel, rm_model_config(config))
  sh_lm = mesh_lib.state_shardings(abs_lm, mesh)
  sh_sc = mesh_lib.state_shardings(abs_sc, mesh)
  sft = common.load_export(workdir, "sft", abs_lm, sh_lm)
  rm = common.load_export(workdir, "rm", abs_sc, sh_sc)
  graphdefs = {"policy": g_lm, "ref": g_lm, "rm": g_sc, "value": g_sc}
  return graphdefs, {"ref": sft, "rm": rm}, (abs_lm, sh_lm), (abs_sc, sh_sc)


def initial_state(frozen, txs, kl_coef, state_sh, mesh):
  """The policy starts as the SFT model and the value model as the RM (the
  paper, 3.5); both get fresh optimizers."""
  init = functools.partial(ppo_lib.init_state, policy_tx=txs["policy"],
                           value_tx=txs["value"], kl_coef=kl_coef)
  return common.mesh_jit(init, mesh, out_shardings=state_sh)(frozen["ref"],
                                                             frozen["rm"])


def _jit_rollout(graphdefs, frozen_sh, state_sh, mesh, rc):
  def fn(frozen, state, batch, key):
    params = {"policy": state["params"], "value": state["value_params"], **frozen}
    return rollout_lib.make_experience(graphdefs, params, batch["prompt_tokens"],
                                       batch["prompt_mask"], key, state["kl_coef"], rc)
  rows = {k: mesh_lib.batch_sharding(mesh, n) for k, n in PROMPT_KEYS.items()}
  jitted = jax.jit(fn, in_shardings=(frozen_sh, state_sh, rows,
                                     mesh_lib.replicated(mesh)))
  return jitted


def run_ppo_stage(config, workdir: str, mesh, stage: str) -> dict:
  """`stage` is "ppo" (ptx_coef forced to 0) or "ppo_ptx"."""
  sc = config.ppo
  t0 = time.monotonic()
  cfg = model_config(config)
  mesh_lib.check_batch_divides(sc.batch_size, mesh, "ppo.batch_size")
  if sc.batch_size % sc.minibatch_size:
    raise common.ConfigError(f"config.ppo.batch_size={sc.batch_size} does not split "
                             f"into config.ppo.minibatch_size={sc.minibatch_size}")
  ptx_coef = sc.ptx_coef if stage == "ppo_ptx" else 0.0
  pc = ppo_lib.PPOConfig(epochs=sc.epochs, minibatch_size=sc.minibatch_size,
                         clip_eps=sc.clip_eps, value_clip_eps=sc.value_clip_eps,
                         ptx_coef=ptx_coef, ema_decay=sc.ema_decay,
                         kl_target=sc.kl_target, kl_horizon=sc.kl_horizon)
  from instructrl.data import EOS_ID, PAD_ID  # pylint: disable=g-import-not-at-top
  rc = rollout_lib.RolloutConfig(max_new_tokens=sc.max_new_tokens, eos_id=EOS_ID,
                                 pad_id=PAD_ID, lam=sc.lam, gamma=1.0,
                                 no_eos_penalty=sc.no_eos_penalty)
  for key, max_len in (("model", cfg.max_len),
                       (rm_key(config), rm_model_config(config).max_len)):
    if sc.prompt_len + sc.max_new_tokens > max_len:
      raise common.ConfigError("config.ppo.prompt_len + config.ppo.max_new_tokens "
                               f"exceeds config.{key}.max_len={max_len}")
  graphdefs, frozen, (abs_lm, sh_lm), (abs_sc, sh_sc) = _load_models(
      config, workdir, cfg, mesh)
  updates_per_iter = sc.epochs * (sc.batch_size // sc.minibatch_size)
  # The paper: constant LR with warmup over the first 10 iterations from 1/10.
  txs = {name: steps.make_optimizer(lr, sc.iterations * updates_per_iter,
                                    sc.warmup_iterations * updates_per_iter,
                                    schedule="constant", clip_norm=sc.clip_norm)
         for name, lr in (("policy", sc.lr), ("value", sc.value_lr))}
  p_state_sh = steps.state_shardings(sh_lm, txs["policy"], abs_lm, mesh)
  v_state_sh = steps.state_shardings(sh_sc, txs["value"], abs_sc, mesh)
  rep = mesh_lib.replicated(mesh)
  state_sh = {"params": sh_lm, "opt_state": p_state_sh["opt_state"],
              "value_params": sh_sc, "value_opt_state": v_state_sh["opt_state"],
              "ema": sh_lm, "kl_coef": rep, "step": rep}
  state = initial_state(frozen, txs, sc.kl_coef, state_sh, mesh)
  frozen_sh = {"ref": sh_lm, "rm": sh_sc}
  rollout = _jit_rollout(graphdefs, frozen_sh, state_sh, mesh, rc)
  learn = jax.jit(
      functools.partial(ppo_lib.learn, graphdefs=graphdefs, txs=txs, cfg=pc),
      in_shardings=(state_sh, None, None, rep, rep), out_shardings=(state_sh, rep),
      donate_argnums=(0,))

  def step_fn(state, batch, rng):
    with jax.set_mesh(mesh):
      key = jax.random.fold_in(rng, state["step"])
      exp, rm = rollout(frozen, state, {k: batch[k] for k in PROMPT_KEYS}, key)
      ptx = None
      if ptx_coef:
        ptx = {k: batch[f"ptx_{k}"] for k in PTX_KEYS}
      state, lm = learn(state, exp, ptx, rng, rm["kl"])
    return state, {**rm, **lm}

  prompts = _iterator(config, "prompts", sc.data, "train", sc.batch_size,
                      sc.prompt_len, config.seed)
  ptx_it = None
  if ptx_coef:
    ptx_it = _iterator(config, "lm", sc.ptx_data, "train",
                       sc.ptx_ratio * sc.batch_size, sc.ptx_seq_len, config.seed + 1)
  batches = common.JointBatches(prompts, ptx_it, _with_ptx, ("prompts", "ptx"))
  state, _, summary = common.train_loop(
      stage=stage, workdir=workdir, state=state, shardings=state_sh, step_fn=step_fn,
      batches=batches, mesh=mesh, num_steps=sc.iterations,
      seed=config.seed, log_every=sc.log_every, save_every=sc.save_every,
      meta={"config": config.to_json()})
  params = state["ema"] if sc.ema_decay else state["params"]
  info = {"stage": stage, "steps": summary["steps"], "final": summary["last"],
          "ptx_coef": ptx_coef, "wall_s": time.monotonic() - t0}
  common.export(workdir, stage, params, info)
  return info
