"""Compiles the real training programs for a real TPU slice, from a CPU host.

    python -m instructrl.tools.aot --config=configs/ppo_ptx_175b.py [--programs=all]

libtpu (`pip install -e ".[tpu]"`) describes the slice named by `config.tpu`;
we lay `config.mesh` over its chips, take the programs each stage's `build`
returns with their abstract inputs (`jax.ShapeDtypeStruct`s with training's
`NamedSharding`s) and let XLA:TPU compile them. XLA:TPU refuses a program
that does not fit in HBM, so "it compiles" means "it fits". Per program and
chip we print argument, output, temporary and total bytes against HBM, FLOPs
per step and the step time at a stated MFU, then one JSON line. jax itself
stays on the CPU (JAX_PLATFORMS).

Programs, each exactly what its stage's `build` returns (so a plan cannot
drift from a run):
  sft        stages.lm.build(...).train      steps.train_step, config.sft
  rm         stages.rm.build(...).train      Eq. 1, config.rm_model's shape
  ppo_learn  stages.ppo.build(...).learn     epochs x minibatches of PPO-ptx
  rollout    stages.ppo.build(...).rollout   sampler, reference, RM, values;
             with ppo.sampling_layout k >= 1 its three programs instead:
             rollout:reshard (policy to the sampling mesh), rollout:sample,
             rollout:score (stages.ppo_sampling)
"model" FLOPs (what MFU is defined against) count the matmuls of the useful
passes, remat recompute not included. XLA's `cost_analysis` counts a loop
body once (one layer under scan_layers), so its FLOPs are printed beside the
model FLOPs, not instead of them. The rollout's decode floor: each decode
step reads the policy's weights (bf16, split over the tensor axis) and this
chip's KV cache from HBM. The interconnect: every collective of the compiled
HLO, times its loops' trip counts (`tools.hlo_comm`), in bytes per chip and
as seconds at the chip's bidirectional ICI bandwidth (a lower bound); for
the rollout also per generated token.

The rollout needs the vocabulary's EOS and PAD ids (constants in the
program, nothing else): where the config's tokenizer file is absent, pass
`--config.data.vocab=byte`; the shapes stay (`model.vocab_size` is explicit).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax

from instructrl import mesh as mesh_lib
from instructrl.model import ModelConfig
from instructrl.stages import lm
from instructrl.stages import ppo
from instructrl.stages import rm
from instructrl.tools import hlo_comm

PROGRAMS = ("sft", "rm", "ppo_learn", "rollout")

GiB = 1024**3
# device_kind -> (name, HBM bytes, peak bf16 FLOP/s, HBM bytes/s, ICI bytes/s
# bidirectional), per chip; ICI from Cloud TPU's spec tables (v4's is not
# in them as a per-chip figure: its ICI time is left out).
CHIPS = {
    "TPU v4": ("v4", 32 * GiB, 275e12, 1.2e12, None),
    "TPU v5 lite": ("v5e", 16 * GiB, 197e12, 0.82e12, 400e9),
    "TPU v5": ("v5p", 95 * GiB, 459e12, 2.76e12, 1200e9),
    "TPU v6 lite": ("v6e", 32 * GiB, 918e12, 1.64e12, 800e9),
}
BY_STAGE = {"pretrain": ("sft",), "sft": ("sft",), "rm": ("rm",),
            "ppo": ("ppo_learn", "rollout"), "ppo_ptx": ("ppo_learn", "rollout"),
            "eval": ("rollout",), "pipeline": PROGRAMS}


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
  name, hbm, peak, bw, ici = CHIPS[kind]
  chips = math.prod(int(x) for x in topology.split(":")[-1].split("x"))
  per_chip = max(len(devices) // chips, 1)  # v4 without megacore: 2 cores.
  return dict(chip=name, device_kind=kind, chips=chips, devices=len(devices),
              hbm=hbm / per_chip, peak=peak / per_chip, hbm_bw=bw / per_chip,
              ici_bw=ici and ici / per_chip)


def _oom_bytes(message: str) -> float | None:
  """The bytes XLA:TPU's out-of-memory error says the program needs, if any.

  E.g. "... required for HLO temporaries (30.80G) exceeds available HBM
  (15.75G)" or "Used 120.5G of 95.7G hbm".
  """
  m = (re.search(r"\(([\d.]+)([KMGT])i?B?\) exceeds", message)
       or re.search(r"[Uu]sed ([\d.]+)([KMGT])", message))
  return float(m.group(1)) * 1024**" KMGT".index(m.group(2)) if m else None


@dataclasses.dataclass(frozen=True)
class Planned:
  """One program of a stage, with the figures the plan reports beside XLA's."""
  name: str
  program: mesh_lib.Program
  model_flops: float  # One step, all chips together.
  decode_bytes: float = 0.0  # Rollout: HBM bytes per chip per decode token.
  decode_tokens: int = 0
  # PPO: bytes per chip of every model's state, which stays in HBM while
  # either program runs (a program's arguments hold only what it reads).
  resident_bytes: float = 0.0
  # Bytes of the program's arguments that are part of that state (None: all;
  # the sample program of the sampling layout takes none of it).
  args_resident: float | None = None


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


def _ppo_programs(config, mesh, p: ppo.Programs) -> list[Planned]:
  sc = config.ppo
  b, l, n = sc.batch_size, sc.prompt_len, sc.max_new_tokens
  t = l + n
  cfg, rm_cfg = p.cfg, p.rm_cfg
  learn = 3 * (forward_flops(cfg, b * t, t) + forward_flops(rm_cfg, b * t, t, False))
  if p.ptx_coef:
    r, tp = sc.ptx_ratio * b, sc.ptx_seq_len
    learn += 3 * forward_flops(cfg, r * tp, tp)
  sample = (forward_flops(cfg, b * l, t) + forward_flops(cfg, b * n, t)
            + forward_flops(cfg, b * t, t) + 2 * forward_flops(rm_cfg, b * t, t, False))
  shape = dict(mesh.shape)  # Decode floor: see the module docstring.
  kv = (cfg.num_layers * b * t * 2 * cfg.kv_heads * cfg.dim_per_head * 2
        / math.prod(shape.values()))
  k = sc.get("sampling_layout", 0)
  weights = cfg.num_params() * 2 / (shape["tensor"] * max(k, 1))
  resident = ppo.resident_bytes(p)
  out = [Planned("ppo_learn", p.learn, sc.epochs * learn, resident_bytes=resident)]
  if not k:
    return out + [Planned("rollout", p.rollout, sample, weights + kv, n, resident)]
  decode = forward_flops(cfg, b * l, t) + forward_flops(cfg, b * n, t)
  progs = p.sampling
  return out + [
      Planned("rollout:reshard", progs["reshard"], 0.0, resident_bytes=resident),
      Planned("rollout:sample", progs["sample"], decode, weights + kv, n, resident,
              args_resident=0.0),
      Planned("rollout:score", progs["score"], sample - decode,
              resident_bytes=resident)]


def build_programs(config, mesh, names) -> list[Planned]:
  """The named programs, from the stages' own `build` functions."""
  out, ppo_planned = [], None
  for name in names:
    if name == "sft":
      p, t = lm.build(config, mesh, "sft"), config.sft.seq_len
      out.append(Planned("sft", p.train, 3 * forward_flops(p.cfg, p.rows * t, t)))
    elif name == "rm":
      p = rm.build(config, mesh)
      rows, k, t = p.train.args[1]["tokens"].shape
      out.append(Planned("rm", p.train, 3 * forward_flops(p.cfg, rows * k * t, t,
                                                           False)))
    else:
      if ppo_planned is None:
        stage = "ppo" if config.stage == "ppo" else "ppo_ptx"
        ppo_planned = _ppo_programs(config, mesh, ppo.build(config, mesh, stage))
      out += [q for q in ppo_planned if q.name.split(":")[0] == name]
  return out


def compile_program(p: Planned, spec: dict, mfu: float) -> dict:
  """Lowers and compiles `p`; returns its per-chip figures."""
  t0 = time.monotonic()
  row = dict(program=p.name, model_flops_per_chip=p.model_flops / spec["devices"])
  row["step_s_at_mfu"] = row["model_flops_per_chip"] / (spec["peak"] * mfu)
  if p.decode_tokens:
    row["decode_floor_s"] = p.decode_tokens * p.decode_bytes / spec["hbm_bw"]
  try:
    compiled = p.program.lower().compile()
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
    taken = m.argument_size_in_bytes if p.args_resident is None else p.args_resident
    total += max(0.0, p.resident_bytes - taken)
    row.update(resident_bytes=p.resident_bytes, peak_bytes=total)
  row["fits"] = total <= spec["hbm"]
  row.update(interconnect(compiled.as_text(), p, spec))
  return row


def interconnect(hlo: str, p: Planned, spec: dict) -> dict:
  """Collective bytes per chip (tools.hlo_comm) and their time at ICI speed.

  For the rollout, the decode loop (the while loop run once per new token,
  the one with the most iterations) gives the bytes per generated token.
  """
  comm = hlo_comm.collective_bytes(hlo, spec["devices"])
  out = dict(ici_bytes=comm["total"], ici_by_kind=comm["by_kind"],
             ici_unknown_trips=comm["unknown_trips"])
  if spec["ici_bw"]:
    out["ici_s"] = comm["total"] / spec["ici_bw"]
  if p.decode_tokens and comm["loops"]:
    n, per_token = max(comm["loops"])
    out.update(decode_loop_trips=n, decode_ici_bytes_per_token=per_token)
    if spec["ici_bw"]:
      out["decode_ici_s"] = n * per_token / spec["ici_bw"]
  return out


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
  if "ppo" in config:
    common["sampling_layout"] = config.ppo.get("sampling_layout", 0)
  rows = []
  for p in build_programs(config, mesh, names):
    rows.append(dict(common, **compile_program(p, spec, mfu)))
  return rows


def _gib(x) -> str:
  return "?" if x is None else f"{x / GiB:.2f}"


def format_table(rows: list[dict]) -> str:
  """Per-chip figures, one line per program, under a title naming the slice."""
  lines = [("program", "args GiB", "out GiB", "temp GiB", "total/HBM GiB", "fits",
            "model TFLOP", "XLA TFLOP*", "step s", "ICI GiB", "ICI s", "compile s")]
  for r in rows:
    step = f"{r['step_s_at_mfu']:.3g}"
    if "decode_floor_s" in r:
      step += f" (decode>={r['decode_floor_s']:.3g})"
    if "decode_ici_s" in r:
      step += f" (decode ICI>={r['decode_ici_s']:.3g})"
    xla = r.get("xla_flops_per_chip")
    ici_s = r.get("ici_s")
    lines.append((
        r["program"], *(_gib(r.get(k)) for k in ("argument_bytes", "output_bytes",
                                                 "temp_bytes")),
        f"{_gib(r.get('peak_bytes', r['total_bytes']))}/{_gib(r['hbm'])}",
        "yes" if r["fits"] else "NO",
        f"{r['model_flops_per_chip'] / 1e12:.4g}",
        "-" if xla is None else f"{xla / 1e12:.4g}", step, _gib(r.get("ici_bytes")),
        "-" if ici_s is None else f"{ici_s:.3g}", f"{r['compile_s']:.1f}"))
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
