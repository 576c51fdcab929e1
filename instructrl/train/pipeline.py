"""Dispatch on `config.stage`; "pipeline" runs every stage not yet done."""
from __future__ import annotations

import json
import os
import time

import jax

from instructrl import mesh as mesh_lib
from instructrl.train import common

STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "eval")


def _user_errors():
  errors = [common.ConfigError]
  try:
    from instructrl.data.common import DataError  # pylint: disable=g-import-not-at-top
    errors.append(DataError)
  except ImportError:  # The data extra is not installed.
    pass
  return tuple(errors)


USER_ERRORS = _user_errors()


def make_mesh(config, devices=None):
  """The config's mesh over `devices` (default: all; tests pass a subset)."""
  try:
    return mesh_lib.make_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise common.ConfigError(f"config.mesh: {e}") from None


def check_config(config, workdir: str, mesh) -> None:
  """Config mistakes, found before any stage starts or any file is written.

  A pipeline should not stop at the RM's batch size after the SFT ran; and
  these checks need no data layer (slow TensorFlow import) and no parameters.
  The stages check again, for callers that skip this.
  """
  if config.stage not in STAGES + ("pipeline",):
    raise common.ConfigError(f"config.stage: unknown stage {config.stage!r}; "
                             f"one of {STAGES + ('pipeline',)}")
  if "data" in config and "world" in config.data:
    from instructrl.data import world  # pylint: disable=g-import-not-at-top
    try:
      world.WorldConfig.from_dict(dict(config.data.world))
    except (TypeError, ValueError) as e:
      raise common.ConfigError(f"config.data.world: {e}") from None
  todo = ([s for s in STAGES if not common.is_done(workdir, s)]
          if config.stage == "pipeline" else [config.stage])
  for stage in (s for s in todo if s in ("pretrain", "sft", "rm")):
    sc = config[stage]
    try:
      mesh_lib.check_batch_divides(sc.batch_size, mesh,
                                   f"config.{stage}.batch_size")
    except ValueError as e:
      raise common.ConfigError(str(e)) from None
    # The RM has the shape of `config.rm_model` where the config has one.
    key = "rm_model" if stage == "rm" and "rm_model" in config else "model"
    if sc.seq_len > config[key].max_len:
      raise common.ConfigError(f"config.{stage}.seq_len={sc.seq_len} exceeds "
                               f"config.{key}.max_len={config[key].max_len}")
    init = sc.get("init", "none")
    if "rm_model" in config:
      from instructrl.train import stages  # pylint: disable=g-import-not-at-top
      stages.check_init_shape(config, stage, init)
    if init in STAGES and init not in todo and not common.is_done(workdir, init):
      raise common.ConfigError(
          f"config.{stage}.init={init!r}: stage {init!r} has no finished result "
          f"in {common.stage_dir(workdir, init)} (run it first)")
    if init not in STAGES + ("", "none") and not os.path.isdir(init):
      raise common.ConfigError(f"config.{stage}.init: no parameters at {init}")


def run_stage(config, workdir: str, stage: str, mesh) -> dict:
  from instructrl.train import stages  # pylint: disable=g-import-not-at-top
  try:
    if stage in ("pretrain", "sft"):
      return stages.run_lm_stage(config, workdir, stage, mesh)
    if stage == "rm":
      return stages.run_rm_stage(config, workdir, mesh)
    if stage in ("ppo", "ppo_ptx"):
      from instructrl.train import ppo  # pylint: disable=g-import-not-at-top
      return ppo.run_ppo_stage(config, workdir, mesh, stage)
    if stage == "eval":
      from instructrl.train import evaluate  # pylint: disable=g-import-not-at-top
      return evaluate.run_eval_stage(config, workdir, mesh)
  except ValueError as e:
    # Shape/divisibility mistakes found while building a stage name their key.
    if "does not divide" in str(e) or "config key" in str(e):
      raise common.ConfigError(str(e)) from None
    raise
  raise common.ConfigError(f"config.stage: unknown stage {stage!r}; one of "
                           f"{STAGES + ('pipeline',)}")


def run(config, workdir: str, devices=None) -> dict:
  """Runs `config.stage` (or every unfinished stage) on a mesh of `devices`."""
  mesh = make_mesh(config, devices)
  check_config(config, workdir, mesh)
  os.makedirs(workdir, exist_ok=True)
  if config.stage != "pipeline":
    return {config.stage: run_stage(config, workdir, config.stage, mesh)}
  results = {}
  for stage in STAGES:
    if stage != "eval" and common.is_done(workdir, stage):
      results[stage] = dict(common.read_info(workdir, stage), reused=True)
      print(f"[{stage}] already done in {common.stage_dir(workdir, stage)}; reusing")
      continue
    t0 = time.monotonic()
    results[stage] = run_stage(config, workdir, stage, mesh)
    print(f"[{stage}] done in {time.monotonic() - t0:.1f}s")
  results["eval"].pop("report", None)  # Printed above; in eval/report.json.
  print(summary_table(results))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(results, f, indent=1, default=float)
  return results


def summary_table(results: dict) -> str:
  rows = [("stage", "steps", "wall s", "best (step)", "final metrics")]
  for stage, info in results.items():
    best = info.get("best") or {}
    final = info.get("final") or {}
    keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy",
                        "val_heldout_group_accuracy", "score", "kl", "ptx_loss")
            if k in final]
    rows.append((stage, str(info.get("steps", "")), f"{info.get('wall_s', 0):.1f}",
                 f"{best.get('value', float('nan')):.4g} ({best.get('step')})"
                 if best.get("value") is not None else "-",
                 " ".join(f"{k}={final[k]:.4g}" for k in keys)))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
