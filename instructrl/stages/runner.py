"""Dispatch on `config.stage`; "pipeline" runs every stage not yet done.

Each stage module exposes `build(config, mesh, stage)` (its compiled
programs, shardings and abstract arguments; what `tools.aot` compiles) and
`run(config, workdir, mesh, stage)`.
"""
from __future__ import annotations

import json
import time

import jax

from instructrl import paths
from instructrl.stages import evaluate
from instructrl.stages import lm
from instructrl.stages import loop
from instructrl.stages import ppo
from instructrl.stages import rm
from instructrl.stages import validate
from instructrl.stages.errors import ConfigError
from instructrl.stages.validate import STAGES

# The module that builds and runs each stage.
MODULES = {"pretrain": lm, "sft": lm, "rm": rm, "ppo": ppo, "ppo_ptx": ppo,
           "eval": evaluate}


def user_errors() -> tuple[type[Exception], ...]:
  """Exceptions that are the user's mistake: one line, exit 2 (main.py)."""
  from instructrl.data.common import DataError  # pylint: disable=g-import-not-at-top
  return (ConfigError, DataError)


def run_stage(config, workdir: str, stage: str, mesh) -> dict:
  if stage not in MODULES:
    raise ConfigError(f"config.stage: unknown stage {stage!r}; one of {STAGES}")
  return MODULES[stage].run(config, workdir, mesh, stage)


def run(config, workdir: str, devices=None) -> dict:
  """Runs `config.stage` (or every unfinished stage) on a mesh of `devices`.

  A SIGTERM/SIGINT during a training loop stops it at a step boundary with
  a checkpoint (`preemption.Preempted`); elsewhere it kills at once.
  """
  mesh = validate.make_mesh(config, devices)
  validate.validate(config, workdir, mesh)
  paths.makedirs(workdir)
  if config.stage != "pipeline":
    return {config.stage: run_stage(config, workdir, config.stage, mesh)}
  results = {}
  for stage in STAGES:
    if stage != "eval" and loop.is_done(workdir, stage):
      results[stage] = dict(loop.read_info(workdir, stage), reused=True)
      print(f"[{stage}] already done in {loop.stage_dir(workdir, stage)}; reusing")
      continue
    t0 = time.monotonic()
    results[stage] = run_stage(config, workdir, stage, mesh)
    print(f"[{stage}] done in {time.monotonic() - t0:.1f}s")
  results["eval"].pop("report", None)  # Printed above; in eval/report.json.
  print(summary_table(results))
  if jax.process_index() == 0:
    paths.write_atomic(paths.join(workdir, "summary.json"),
                       json.dumps(results, indent=1, default=float))
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
