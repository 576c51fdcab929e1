"""Stage 3: PPO (ptx_coef = 0) and PPO-ptx against the reward model.

Per iteration the host feeds one batch of prompts (and, for PPO-ptx, the
pretraining rows) and logs; the rollout (sample, score, reference and value
passes, GAE; `rl.rollout`) is one compiled program (three with
`ppo.sampling_layout`: `stages.ppo_sampling`) and the learner (epochs x
minibatches; `rl.learner`) another. The policy and the frozen reference
start from `ppo.init` (default: the SFT export), the RM and the value model
from `ppo.rm_init` (default: the RM export), the paper's Section 3.5; either
may be a Hugging Face directory ("hf:DIR", `stages.pretrained`). `build` makes both programs (and the state's
initialiser) with abstract arguments; `run` loads the exports and loops.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import jax
import jax.numpy as jnp

from instructrl import mesh as mesh_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.rl import learner
from instructrl.rl import rollout as rollout_lib
from instructrl.stages import inputs
from instructrl.stages import lm
from instructrl.stages import loop
from instructrl.stages import ppo_sampling
from instructrl.stages.validate import check_stage

PROMPT_BATCH = {"prompt_tokens": jnp.int32, "prompt_mask": bool, "prompt_id": jnp.int32}
PTX_KEYS = tuple(lm.LM_BATCH)


@dataclasses.dataclass(frozen=True)
class Programs:
  """PPO's compiled programs and what they are built from.

  `init(ref, rm) -> state`: the policy starts as the SFT model and the value
  model as the RM, both with fresh optimizers. `rollout(frozen, state,
  prompts, key) -> (Experience, metrics)` and `learn(state, exp, ptx, rng,
  rollout_kl) -> (state, metrics)` are `mesh_lib.Program`s; the rollout's
  key and the learner's come apart from the run's `rng`
  (`learner.iteration_keys`). With `ppo.sampling_layout` k >= 1 the rollout
  is three programs instead (`stages.ppo_sampling`): `rollout` is None and
  `sampling` holds reshard, sample and score; `rollout_fn` runs either.
  """
  cfg: ModelConfig
  rm_cfg: ModelConfig
  graphdefs: dict  # policy, ref, rm, value.
  shardings: dict  # Of the PPO state (rl.learner's docstring).
  ptx_coef: float
  init: mesh_lib.Jitted
  rollout: mesh_lib.Program | None
  learn: mesh_lib.Program
  sampling: dict | None = None  # reshard, sample, score (sampling_layout >= 1).

  def rollout_programs(self) -> dict:
    """The rollout's programs by name, in the order they run."""
    return dict(self.sampling) if self.sampling else {"rollout": self.rollout}

  def rollout_fn(self):
    """`(frozen, state, prompts, key) -> (Experience, metrics)`, either layout."""
    if not self.sampling:
      return self.rollout.fn
    return ppo_sampling.chain(*(self.sampling[k].fn
                                for k in ("reshard", "sample", "score")))


def learner_config(config, stage: str) -> learner.PPOConfig:
  sc = config.ppo
  return learner.PPOConfig(
      epochs=sc.epochs, minibatch_size=sc.minibatch_size, clip_eps=sc.clip_eps,
      value_clip_eps=sc.value_clip_eps,
      ptx_coef=sc.ptx_coef if stage == "ppo_ptx" else 0.0, ema_decay=sc.ema_decay,
      kl_target=sc.kl_target, kl_horizon=sc.kl_horizon)


def rollout_config(config) -> rollout_lib.RolloutConfig:
  sc = config.ppo
  return rollout_lib.RolloutConfig(max_new_tokens=sc.max_new_tokens, lam=sc.lam,
                                   gamma=1.0,
                                   missing_eos_penalty=sc.missing_eos_penalty,
                                   recompute_logp=sc.recompute_logp,
                                   forward_rows=sc.minibatch_size,
                                   **inputs.special_ids(config))


def optimizers(config) -> dict:
  """Policy and value AdamW; the paper: constant LR after a warmup over the
  first 10 iterations from 1/10."""
  sc = config.ppo
  per_iter = sc.epochs * (sc.batch_size // sc.minibatch_size)
  return {name: steps.make_optimizer(lr, sc.iterations * per_iter,
                                     sc.warmup_iterations * per_iter,
                                     schedule="constant", clip_norm=sc.clip_norm)
          for name, lr in (("policy", sc.lr), ("value", sc.value_lr))}


def state_shardings(lm_shardings, sc_shardings, abs_lm, abs_sc, txs, mesh) -> dict:
  """Shardings of the PPO state (keys: `rl.learner`'s docstring)."""
  rep = mesh_lib.replicated(mesh)
  return {"params": lm_shardings,
          "opt_state": steps.opt_state_shardings(lm_shardings, txs["policy"], abs_lm,
                                                 mesh),
          "value_params": sc_shardings,
          "value_opt_state": steps.opt_state_shardings(sc_shardings, txs["value"],
                                                       abs_sc, mesh),
          "ema": lm_shardings, "kl_coef": rep, "step": rep}


def jit_rollout(graphdefs, rc, frozen_sh, state_sh, mesh) -> mesh_lib.Jitted:
  """`(frozen, state, prompts, key) -> (Experience, metrics)`, one program."""
  def fn(frozen, state, batch, key):
    params = {"policy": state["params"], "value": state["value_params"], **frozen}
    return rollout_lib.make_experience(graphdefs, params, batch["prompt_tokens"],
                                       batch["prompt_mask"], key, state["kl_coef"], rc)
  prompt_sh = {k: mesh_lib.batch_sharding(mesh, 1 if k == "prompt_id" else 2)
               for k in PROMPT_BATCH}
  return mesh_lib.jit(fn, mesh, in_shardings=(frozen_sh, state_sh, prompt_sh,
                                              mesh_lib.replicated(mesh)))


def jit_learn(graphdefs, txs, pc: learner.PPOConfig, state_sh, mesh) -> mesh_lib.Jitted:
  """`rl.learner.learn` with the state donated (no copy of params and Adam)."""
  rep = mesh_lib.replicated(mesh)
  return mesh_lib.jit(
      functools.partial(learner.learn, graphdefs=graphdefs, txs=txs, cfg=pc), mesh,
      in_shardings=(state_sh, None, None, rep, rep), out_shardings=(state_sh, rep),
      donate_argnums=(0,))


def _experience(mesh, b: int, l: int, n: int) -> rollout_lib.Experience:
  rows = lambda shape, dt: lm.abstract_rows(mesh, shape, dt)
  f32 = jnp.float32
  return rollout_lib.Experience(
      rows((b, l + n), jnp.int32), rows((b, l + n), bool), rows((b, n), jnp.int32),
      rows((b, n), bool), *[rows((b, n), f32) for _ in range(6)], rows((b,), f32))


def build(config, mesh, stage: str) -> Programs:
  """`stage` is "ppo" (ptx_coef forced to 0) or "ppo_ptx"."""
  sc = config.ppo
  cfg, rm_cfg = inputs.model_config(config), inputs.rm_model_config(config)
  g_lm, abs_lm = abstract(LanguageModel, cfg)
  g_sc, abs_sc = abstract(ScalarModel, rm_cfg)
  sh_lm = mesh_lib.param_shardings(abs_lm, mesh)
  sh_sc = mesh_lib.param_shardings(abs_sc, mesh)
  txs = optimizers(config)
  rep = mesh_lib.replicated(mesh)
  state_sh = state_shardings(sh_lm, sh_sc, abs_lm, abs_sc, txs, mesh)
  frozen_sh = {"ref": sh_lm, "rm": sh_sc}
  graphdefs = {"policy": g_lm, "ref": g_lm, "rm": g_sc, "value": g_sc}
  init_fn = functools.partial(learner.init_state, policy_tx=txs["policy"],
                              value_tx=txs["value"], kl_coef=sc.kl_coef)
  init = mesh_lib.jit(init_fn, mesh, out_shardings=state_sh)
  state = steps.with_shardings(jax.eval_shape(init_fn, abs_lm, abs_sc), state_sh)
  frozen = {"ref": steps.with_shardings(abs_lm, sh_lm),
            "rm": steps.with_shardings(abs_sc, sh_sc)}
  key = lm.abstract_key(mesh)
  b, l, n = sc.batch_size, sc.prompt_len, sc.max_new_tokens
  prompts = {k: lm.abstract_rows(mesh, (b,) + ((l,) if k != "prompt_id" else ()), dt)
             for k, dt in PROMPT_BATCH.items()}
  rc, k = rollout_config(config), sc.get("sampling_layout", 0)
  rollout = sampling = None
  if k:
    sampling = ppo_sampling.programs(graphdefs, rc, abs_lm, frozen, state, prompts,
                                     key, mesh, k)
  else:
    rollout = mesh_lib.Program(jit_rollout(graphdefs, rc, frozen_sh, state_sh, mesh),
                               (frozen, state, prompts, key))
  pc = learner_config(config, stage)
  ptx = None
  if pc.ptx_coef:
    ptx = {k: lm.abstract_rows(mesh, (sc.ptx_ratio * b, sc.ptx_seq_len), dt)
           for k, dt in lm.LM_BATCH.items()}
  learn = jit_learn(graphdefs, txs, pc, state_sh, mesh)
  kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  return Programs(
      cfg, rm_cfg, graphdefs, state_sh, pc.ptx_coef, init, rollout,
      mesh_lib.Program(learn, (state, _experience(mesh, b, l, n), ptx, key, kl)),
      sampling)


def resident_bytes(p: Programs) -> float:
  """Bytes per device of every model's state, which stays in HBM while either
  program runs (a program's arguments hold only what it reads)."""
  frozen, state = (p.rollout or p.sampling["score"]).args[:2]
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves((frozen, state)))


def _with_ptx(prompts, ptx):
  return {**prompts, **{f"ptx_{k}": v for k, v in ptx.items()}}


def run(config, workdir: str, mesh, stage: str) -> dict:
  check_stage(config, stage, mesh)
  sc = config.ppo
  t0 = time.monotonic()
  p = build(config, mesh, stage)
  # ppo.init (default: the SFT export) and ppo.rm_init (the RM's), e.g. "hf:DIR".
  frozen = {"ref": inputs.init_params(config, workdir, stage, LanguageModel, p.cfg,
                                      mesh, "init", "sft"),
            "rm": inputs.init_params(config, workdir, stage, ScalarModel, p.rm_cfg,
                                     mesh, "rm_init", "rm")}
  state = p.init(frozen["ref"], frozen["rm"])
  rollout, learn = p.rollout_fn(), p.learn.fn

  def step_fn(state, batch, rng):
    # `learn` derives its own key from the run's (iteration_keys(...)[1]).
    rollout_key = learner.iteration_keys(rng, state["step"])[0]
    exp, rm = rollout(frozen, state, {k: batch[k] for k in PROMPT_BATCH}, rollout_key)
    ptx = {k: batch[f"ptx_{k}"] for k in PTX_KEYS} if p.ptx_coef else None
    state, metrics = learn(state, exp, ptx, rng, rm["kl"])
    return state, {**rm, **metrics}

  prompts = inputs.iterator(config, "prompts", sc.data, "train", sc.batch_size,
                            sc.prompt_len, config.seed)
  ptx_it = None
  if p.ptx_coef:
    ptx_it = inputs.iterator(config, "lm", sc.ptx_data, "train",
                             sc.ptx_ratio * sc.batch_size, sc.ptx_seq_len,
                             config.seed + 1)
  batches = loop.JointBatches(prompts, ptx_it, _with_ptx, ("prompts", "ptx"))
  lc = loop.LoopConfig.of(stage, sc, sc.iterations, config.seed)
  state, _, summary = loop.train_loop(
      lc, workdir, state=state, shardings=p.shardings, step_fn=step_fn,
      batches=batches, mesh=mesh, config_json=config.to_json())
  params = state["ema"] if sc.ema_decay else state["params"]
  info = {"stage": stage, "steps": summary["steps"], "final": summary["last"],
          "ptx_coef": p.ptx_coef, "wall_s": time.monotonic() - t0}
  loop.export(workdir, stage, params, info)
  return info
