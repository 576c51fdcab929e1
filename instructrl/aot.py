"""Compiles the real training programs for a real TPU slice, from a CPU host.

    python -m instructrl.aot --config=configs/ppo_ptx_175b.py [--programs=all]

libtpu (`pip install -e ".[tpu]"`) describes the slice named by `config.tpu`;
we lay `config.mesh` over its chips, give the programs abstract inputs
(`jax.ShapeDtypeStruct`s with training's `NamedSharding`s) and let XLA:TPU
compile them. XLA:TPU refuses a program that does not fit in HBM, so "it
compiles" means "it fits". Per program and chip we print argument, output,
temporary and total bytes against HBM, FLOPs per step and the step time at a
stated MFU, then one JSON line. jax itself stays on the CPU (JAX_PLATFORMS).

Programs, jitted as the stages jit them:
  sft        steps.train_step + steps.lm_loss_fn   (config.sft)
  rm         steps.train_step + steps.rm_loss_fn   (config.rm, rm_model shape)
  ppo_learn  ppo.learn: epochs x minibatches of PPO + ptx + value updates
  rollout    rollout.make_experience: sampler, reference, RM and value passes

"model" FLOPs (what MFU is defined against) count the matmuls of the useful
passes, remat recompute not included; XLA's `cost_analysis` counts a loop
body once (one layer under scan_layers). The rollout's decode floor: each
decode step reads the policy's weights (bf16, split over the tensor axis)
and this chip's KV cache from HBM; ICI time not included.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
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

GiB = 1024**3
# device_kind -> (name, HBM bytes, peak bf16 FLOP/s, HBM bytes/s), per chip.
CHIPS = {
    "TPU v4": ("v4", 32 * GiB, 275e12, 1.2e12),
    "TPU v5 lite": ("v5e", 16 * GiB, 197e12, 0.82e12),
    "TPU v5": ("v5p", 95 * GiB, 459e12, 2.76e12),
    "TPU v6 lite": ("v6e", 32 * GiB, 918e12, 1.64e12),
}
PROGRAMS = ("sft", "rm", "ppo_learn", "rollout")
BY_STAGE = {"pretrain": ("sft",), "sft": ("sft",), "rm": ("rm",),
            "ppo": ("ppo_learn", "rollout"), "ppo_ptx": ("ppo_learn", "rollout"),
            "eval": ("rollout",), "pipeline": PROGRAMS}
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


def quiet_libtpu() -> None:
  """Host facts libtpu would otherwise probe for (and warn about) off a TPU VM.

  Topology descriptions do not depend on them; values already set win.
  """
  for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
               ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
               # Compiling uses no chip: let planners and tests run side by side.
               ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(k, v)


def topology_devices(tpu) -> list:
  """The devices of the TPU slice `tpu` (config.tpu) as libtpu describes it."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if int(tpu.num_slices) != 1:
    raise ValueError("config.tpu.num_slices > 1 needs a DCN-aware mesh, which "
                     "instructrl.mesh.make_mesh does not build yet")
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=tpu.topology,
      chip_config_name=tpu.chip_config_name,
      chips_per_host_bounds=tuple(tpu.chips_per_host_bounds),
      num_slices=int(tpu.num_slices))
  return list(desc.devices)


def chip_spec(devices, topology: str) -> dict:
  """Per-device HBM, peak FLOP/s and bandwidth (a chip's, over its devices)."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f"no HBM/FLOP figures for device kind {kind!r}; known: "
                     f"{sorted(CHIPS)}")
  name, hbm, peak, bw = CHIPS[kind]
  chips = math.prod(int(x) for x in topology.split(":")[-1].split("x"))
  per_chip = max(len(devices) // chips, 1)  # v4 without megacore: 2 cores.
  return dict(chip=name, device_kind=kind, chips=chips, devices=len(devices),
              hbm=hbm / per_chip, peak=peak / per_chip, hbm_bw=bw / per_chip)


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


def _oom_bytes(message: str) -> float | None:
  """The bytes XLA:TPU's out-of-memory error says the program needs, if any.

  E.g. "... required for HLO temporaries (30.80G) exceeds available HBM
  (15.75G)" or "Used 120.5G of 95.7G hbm".
  """
  m = (re.search(r"\(([\d.]+)([KMGT])i?B?\) exceeds", message)
       or re.search(r"[Uu]sed ([\d.]+)([KMGT])", message))
  return float(m.group(1)) * 1024**" KMGT".index(m.group(2)) if m else None


def compile_program(p: Program, mesh, spec: dict, mfu: float) -> dict:
  """Lowers and compiles `p`; returns its per-chip figures."""
  jitted = jax.jit(p.fn, in_shardings=p.in_shardings, out_shardings=p.out_shardings,
                   donate_argnums=p.donate)
  t0 = time.monotonic()
  row = dict(program=p.name, model_flops_per_chip=p.model_flops / spec["devices"])
  row["step_s_at_mfu"] = row["model_flops_per_chip"] / (spec["peak"] * mfu)
  if p.decode_tokens:
    row["decode_floor_s"] = p.decode_tokens * p.decode_bytes / spec["hbm_bw"]
  try:
    with jax.set_mesh(mesh):
      compiled = jitted.lower(*p.args).compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
      raise
    row.update(fits=False, total_bytes=_oom_bytes(text),
               compile_s=time.monotonic() - t0,
               error=text.strip().splitlines()[0][:300])
    return row
  row["compile_s"] = time.monotonic() - t0
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes + m.temp_size_in_bytes)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row.update(argument_bytes=m.argument_size_in_bytes,
             output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes,
             temp_bytes=m.temp_size_in_bytes, total_bytes=total,
             xla_flops_per_chip=cost.get("flops"))
  if p.resident_bytes:  # Plus the state this program does not take.
    total += max(0.0, p.resident_bytes - m.argument_size_in_bytes)
    row.update(resident_bytes=p.resident_bytes, peak_bytes=total)
  row["fits"] = total <= spec["hbm"]
  return row


def plan(config, programs=None, mfu: float = 0.4, devices=None) -> list[dict]:
  """Compiles `programs` (default: those of config.stage) for config.tpu.

  Returns one dict per program: per-chip bytes, FLOPs, times, and the
  target's figures. `devices` replaces the topology (tests).
  """
  devices = devices or topology_devices(config.tpu)
  spec = chip_spec(devices, config.tpu.topology)
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  names = programs or BY_STAGE[config.stage]
  unknown = set(names) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"unknown program(s) {sorted(unknown)}; known: {PROGRAMS}")
  common = dict(topology=config.tpu.topology, mesh=dict(mesh.shape), mfu=mfu,
                **{k: spec[k] for k in ("chip", "chips", "devices", "hbm")})
  rows = []
  for p in build_programs(config, mesh, names):
    rows.append(dict(common, **compile_program(p, mesh, spec, mfu)))
  return rows


def _gib(x) -> str:
  return "?" if x is None else f"{x / GiB:.2f}"


def format_table(rows: list[dict]) -> str:
  """Per-chip figures, one line per program, under a title naming the slice."""
  lines = [("program", "args GiB", "out GiB", "temp GiB", "total/HBM GiB", "fits",
            "model TFLOP", "XLA TFLOP*", "step s", "compile s")]
  for r in rows:
    step = f"{r['step_s_at_mfu']:.3g}"
    if "decode_floor_s" in r:
      step += f" (decode>={r['decode_floor_s']:.3g})"
    xla = r.get("xla_flops_per_chip")
    lines.append((
        r["program"], *(_gib(r.get(k)) for k in ("argument_bytes", "output_bytes",
                                                 "temp_bytes")),
        f"{_gib(r.get('peak_bytes', r['total_bytes']))}/{_gib(r['hbm'])}",
        "yes" if r["fits"] else "NO",
        f"{r['model_flops_per_chip'] / 1e12:.4g}",
        "-" if xla is None else f"{xla / 1e12:.4g}", step, f"{r['compile_s']:.1f}"))
  widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
  r = rows[0]
  title = (f"{r['topology']} ({r['chips']} {r['chip']} chips), mesh {r['mesh']}; "
           f"per chip; step time at {100 * r['mfu']:.0f}% MFU; "
           "total includes PPO state a program does not take; "
           "*XLA counts each loop body once")
  return "\n".join([title] + ["  ".join(c.ljust(w) for c, w in zip(l, widths))
                              for l in lines])


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # optax's schedule notes.
  f = flags.FLAGS
  config = f.config
  names = None
  if f.programs:
    names = PROGRAMS if f.programs == "all" else tuple(f.programs.split(","))
  rows = plan(config, names, f.mfu)
  print(format_table(rows))
  for r in rows:
    line = json.dumps(dict(r, config=f["config"].config_filename), sort_keys=True)
    print(line)
    if f.json_out:
      with open(f.json_out, "a", encoding="utf-8") as out:
        out.write(line + "\n")
  if not all(r["fits"] for r in rows):
    sys.exit(1)


def run() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config[:variant].",
                                  lock_config=True)
  flags.DEFINE_string("programs", "", "Comma-separated subset of "
                      f"{','.join(PROGRAMS)}, or 'all' (default: config.stage's).")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation for the step times.")
  flags.DEFINE_string("json_out", "", "Also append the JSON lines to this file.")
  flags.mark_flag_as_required("config")
  # Compiling for TPU needs no TPU: keep jax on the CPU unless told otherwise.
  jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  quiet_libtpu()
  app.run(main)


if __name__ == "__main__":
  run()
