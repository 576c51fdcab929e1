"""The training programs `instructrl.aot` compiles, with abstract inputs.

Each program is the function a stage jits, with `jax.ShapeDtypeStruct`
arguments that carry training's `NamedSharding`s, so XLA sees exactly the
shapes and layouts a real run would, without any parameters in memory:
  sft        steps.train_step + steps.lm_loss_fn   (config.sft)
  rm         steps.train_step + steps.rm_loss_fn   (config.rm, rm_model shape)
  ppo_learn  ppo.learn: epochs x minibatches of PPO + ptx + value updates
  rollout    rollout.make_experience: sampler, reference, RM and value passes

"model" FLOPs (what MFU is defined against) count the matmuls of the useful
passes, remat recompute not included. The rollout's decode floor: each
decode step reads the policy's weights (bf16, split over the tensor axis)
and this chip's KV cache from HBM; ICI time not included.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from instructrl import mesh as mesh_lib
from instructrl import ppo as ppo_lib
from instructrl import rollout as rollout_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.train import stages

PROGRAMS = ("sft", "rm", "ppo_learn", "rollout")
LM_KEYS = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
           "segment_ids": jnp.int32, "positions": jnp.int32}


@dataclasses.dataclass
class Program:
  """One jitted function with abstract, sharded arguments."""
  name: str
  fn: Callable
  args: tuple
  in_shardings: Any
  out_shardings: Any
  donate: tuple
  model_flops: float  # One step, all chips together.
  decode_bytes: float = 0.0  # Rollout: HBM bytes per chip per decode token.
  decode_tokens: int = 0
  # PPO: bytes per chip of every model's state, which stays in HBM while
  # either program runs (a program's arguments hold only what it reads).
  resident_bytes: float = 0.0


def rm_model_config(config) -> ModelConfig:
  """The reward/value shape: `config.rm_model` if present, else the policy's."""
  if "rm_model" not in config:
    return stages.model_config(config)
  d = dict(config.rm_model, dropout_rate=0.0)
  if not d["vocab_size"]:
    d["vocab_size"] = stages.model_config(config).vocab_size
  return ModelConfig.from_dict(d)


def forward_flops(cfg: ModelConfig, tokens: float, context: float,
                  lm_head: bool = True) -> float:
  """Matmul FLOPs of a forward pass: `tokens` tokens, each attending to `context`."""
  d, f = cfg.d_model, cfg.ff_dim
  q = cfg.num_heads * cfg.dim_per_head
  kv = cfg.kv_heads * cfg.dim_per_head
  mlp = (2 if cfg.style == "gpt" else 3) * d * f
  layer = 2 * (2 * d * q + 2 * d * kv + mlp) + 2 * 2 * q * context
  head = 2 * d * cfg.vocab_size if lm_head else 2 * d
  return tokens * (cfg.num_layers * layer + head)


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), tree, shardings)


def _rows(mesh, shape, dtype):  # Rows split over the data axes, as put_batch does.
  return _sds(shape, dtype, mesh_lib.batch_sharding(mesh, len(shape)))


def _shard_bytes(tree) -> float:
  """Bytes per chip of abstract arrays under their shardings (no padding)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _key(mesh):
  key = jax.eval_shape(lambda: jax.random.key(0))
  return _sds((), key.dtype, mesh_lib.replicated(mesh))


def _train_program(name, mesh, model_cls, cfg, loss_maker, sc, batch,
                   flops) -> Program:
  """steps.train_step exactly as stages.py jits it (steps.jit_step)."""
  tx = steps.make_optimizer(sc.lr, 1000, sc.warmup_steps,
                            weight_decay=sc.weight_decay)
  graphdef, abs_params = abstract(model_cls, cfg)
  p_sh = mesh_lib.state_shardings(abs_params, mesh)
  s_sh = steps.state_shardings(p_sh, tx, abs_params, mesh)
  state = _with_shardings(
      jax.eval_shape(lambda p: steps.init_state(p, tx), abs_params), s_sh)
  fn = functools.partial(steps.train_step, loss_fn=loss_maker(graphdef), tx=tx,
                         num_micro=sc.microbatches, use_dropout=sc.dropout > 0)
  rep = mesh_lib.replicated(mesh)
  batch_sh = {k: v.sharding for k, v in batch.items()}
  return Program(name, fn, (state, batch, _key(mesh)), (s_sh, batch_sh, rep),
                 (s_sh, rep), (0,), flops)


def sft_program(config, mesh) -> Program:
  sc = config.sft
  cfg = stages.model_config(config, dropout=sc.dropout)
  b, t = sc.batch_size, sc.seq_len
  batch = {k: _rows(mesh, (b, t), dt) for k, dt in LM_KEYS.items()}
  return _train_program("sft", mesh, LanguageModel, cfg, steps.lm_loss_fn,
                        sc, batch, 3 * forward_flops(cfg, b * t, t))


def rm_program(config, mesh) -> Program:
  sc = config.rm
  cfg = dataclasses.replace(rm_model_config(config), dropout_rate=sc.dropout)
  p, k, t = sc.batch_size, config.data.world.k_max, sc.seq_len
  batch = {key: _rows(mesh, (p, k, t), jnp.int32)
           for key in ("tokens", "segment_ids", "positions")}
  batch.update(ranks=_rows(mesh, (p, k), jnp.int32), valid=_rows(mesh, (p, k), bool),
               group=_rows(mesh, (p,), jnp.int32))
  return _train_program("rm", mesh, ScalarModel, cfg, steps.rm_loss_fn,
                        sc, batch, 3 * forward_flops(cfg, p * k * t, t, False))


def _ppo_setup(config, mesh) -> dict:
  """Models, optimizers and the PPO state, as train/ppo.py builds them."""
  sc = config.ppo
  cfg, rm_cfg = stages.model_config(config), rm_model_config(config)
  g_lm, abs_lm = abstract(LanguageModel, cfg)
  g_sc, abs_sc = abstract(ScalarModel, rm_cfg)
  sh_lm = mesh_lib.state_shardings(abs_lm, mesh)
  sh_sc = mesh_lib.state_shardings(abs_sc, mesh)
  per_iter = sc.epochs * (sc.batch_size // sc.minibatch_size)
  txs = {name: steps.make_optimizer(lr, sc.iterations * per_iter,
                                    sc.warmup_iterations * per_iter,
                                    schedule="constant", clip_norm=sc.clip_norm)
         for name, lr in (("policy", sc.lr), ("value", sc.value_lr))}
  rep = mesh_lib.replicated(mesh)
  state_sh = {
      "params": sh_lm,
      "opt_state": steps.state_shardings(sh_lm, txs["policy"], abs_lm,
                                         mesh)["opt_state"],
      "value_params": sh_sc,
      "value_opt_state": steps.state_shardings(sh_sc, txs["value"], abs_sc,
                                               mesh)["opt_state"],
      "ema": sh_lm, "kl_coef": rep, "step": rep}
  state = jax.eval_shape(functools.partial(
      ppo_lib.init_state, policy_tx=txs["policy"], value_tx=txs["value"],
      kl_coef=sc.kl_coef), abs_lm, abs_sc)
  s = dict(cfg=cfg, rm_cfg=rm_cfg, txs=txs, state_sh=state_sh,
           state=_with_shardings(state, state_sh),
           graphdefs={"policy": g_lm, "ref": g_lm, "rm": g_sc, "value": g_sc},
           frozen_sh={"ref": sh_lm, "rm": sh_sc},
           frozen={"ref": _with_shardings(abs_lm, sh_lm),
                   "rm": _with_shardings(abs_sc, sh_sc)})
  s["resident"] = _shard_bytes(s["state"]) + _shard_bytes(s["frozen"])
  return s


def ppo_learn_program(config, mesh, s: dict) -> Program:
  sc = config.ppo
  b, n = sc.batch_size, sc.max_new_tokens
  t = sc.prompt_len + n
  f32 = jnp.float32
  exp = rollout_lib.Experience(
      _rows(mesh, (b, t), jnp.int32), _rows(mesh, (b, t), bool),
      _rows(mesh, (b, n), jnp.int32), _rows(mesh, (b, n), bool),
      *[_rows(mesh, (b, n), f32) for _ in range(6)], _rows(mesh, (b,), f32))
  ptx, flops = None, 3 * (forward_flops(s["cfg"], b * t, t)
                          + forward_flops(s["rm_cfg"], b * t, t, False))
  if config.stage != "ppo" and sc.ptx_coef:
    r, tp = sc.ptx_ratio * b, sc.ptx_seq_len
    ptx = {k: _rows(mesh, (r, tp), dt) for k, dt in LM_KEYS.items()}
    flops += 3 * forward_flops(s["cfg"], r * tp, tp)
  pc = ppo_lib.PPOConfig(epochs=sc.epochs, minibatch_size=sc.minibatch_size,
                         clip_eps=sc.clip_eps, value_clip_eps=sc.value_clip_eps,
                         ptx_coef=sc.ptx_coef if ptx else 0.0,
                         ema_decay=sc.ema_decay, kl_target=sc.kl_target,
                         kl_horizon=sc.kl_horizon)
  fn = functools.partial(ppo_lib.learn, graphdefs=s["graphdefs"], txs=s["txs"],
                         cfg=pc)
  rep = mesh_lib.replicated(mesh)
  kl = _sds((), jnp.float32, rep)
  data_sh = jax.tree.map(lambda x: x.sharding, (exp, ptx))
  return Program("ppo_learn", fn, (s["state"], exp, ptx, _key(mesh), kl),
                 (s["state_sh"], *data_sh, rep, rep), (s["state_sh"], rep), (0,),
                 sc.epochs * flops, resident_bytes=s["resident"])


def rollout_program(config, mesh, s: dict) -> Program:
  sc = config.ppo
  b, l, n = sc.batch_size, sc.prompt_len, sc.max_new_tokens
  cfg, rm_cfg = s["cfg"], s["rm_cfg"]
  rc = rollout_lib.RolloutConfig(max_new_tokens=n, lam=sc.lam, gamma=1.0,
                                 no_eos_penalty=sc.no_eos_penalty)

  def fn(frozen, state, batch, key):  # train/ppo.py's _jit_rollout.
    params = {"policy": state["params"], "value": state["value_params"], **frozen}
    return rollout_lib.make_experience(s["graphdefs"], params, batch["prompt_tokens"],
                                       batch["prompt_mask"], key, state["kl_coef"], rc)
  batch = {"prompt_tokens": _rows(mesh, (b, l), jnp.int32),
           "prompt_mask": _rows(mesh, (b, l), bool),
           "prompt_id": _rows(mesh, (b,), jnp.int32)}
  flops = (forward_flops(cfg, b * l, l + n) + forward_flops(cfg, b * n, l + n)
           + forward_flops(cfg, b * (l + n), l + n)
           + 2 * forward_flops(rm_cfg, b * (l + n), l + n, False))
  shape = dict(mesh.shape)  # Decode floor: see the module docstring.
  kv = (cfg.num_layers * b * (l + n) * 2 * cfg.kv_heads * cfg.dim_per_head * 2
        / math.prod(shape.values()))
  weights = cfg.num_params() * 2 / shape["tensor"]
  rep = mesh_lib.replicated(mesh)
  args = (s["frozen"], s["state"], batch, _key(mesh))
  in_sh = (s["frozen_sh"], s["state_sh"], {k: v.sharding for k, v in batch.items()},
           rep)
  return Program("rollout", fn, args, in_sh, None, (), flops, weights + kv, n,
                 s["resident"])


def build_programs(config, mesh, names) -> list[Program]:
  out, ppo = [], None
  for name in names:
    if name == "sft":
      out.append(sft_program(config, mesh))
    elif name == "rm":
      out.append(rm_program(config, mesh))
    else:
      ppo = ppo or _ppo_setup(config, mesh)
      make = ppo_learn_program if name == "ppo_learn" else rollout_program
      out.append(make(config, mesh, ppo))
  return out
