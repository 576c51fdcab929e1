"""Dispatch on `config.stage`; "pipeline" runs every stage not yet done.

Each stage module exposes `build(config, mesh, stage)` (its compiled
programs, shardings and abstract arguments; what `tools.aot` compiles) and
`run(config, workdir, mesh, stage)`. After a stage, `export_hf` writes its
result as a Hugging Face directory too, where the config asks for one.
"""
from __future__ import annotations

import json
import os
import time

import jax

from instructrl import hf
from instructrl import paths
from instructrl.model import LanguageModel, ScalarModel
from instructrl.stages import evaluate
from instructrl.stages import inputs
from instructrl.stages import lm
from instructrl.stages import loop
from instructrl.stages import ppo
from instructrl.stages import pretrained
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
  return (ConfigError, DataError, hf.FamilyError)


def run_stage(config, workdir: str, stage: str, mesh) -> dict:
  if stage not in MODULES:
    raise ConfigError(f"config.stage: unknown stage {stage!r}; one of {STAGES}")
  info = MODULES[stage].run(config, workdir, mesh, stage)
  out = export_hf(config, workdir, stage, mesh)
  return dict(info, hf_export=out) if out else info


def export_hf(config, workdir: str, stage: str, mesh) -> str | None:
  """W/<stage>/hf/ from the stage's export, where `pretrained.wants_export`:
  a *ForCausalLM directory (the RM: *ForSequenceClassification, num_labels=1)
  with the vocabulary's tokenizer files, that transformers loads.

  Written into hf.tmp/ and renamed when whole, so a killed export leaves no
  hf/ and the next run (a pipeline reusing the stage) writes it again. Host
  0 writes; it gathers each tensor, so it needs the whole model in memory.
  """
  if not pretrained.wants_export(config, stage):
    return None
  out = paths.join(loop.stage_dir(workdir, stage), "hf")
  if paths.exists(out):
    return out
  write_hf(config, workdir, stage, mesh, out)
  print(f"[{stage}] Hugging Face export in {out}")
  return out


def write_hf(config, workdir: str, stage: str, mesh, out: str) -> None:
  """Writes `stage`'s finished export of `workdir` as the HF directory `out`
  (`export_hf`; also `python -m instructrl.tools.hf_convert`)."""
  if not paths.is_local(out):
    raise ConfigError(f"config.{stage}: a Hugging Face export is written to a "
                      f"local directory, not {out}")
  reward = stage == "rm"
  cfg = inputs.rm_model_config(config) if reward else inputs.model_config(config)
  _, params, _ = inputs.load_model(workdir, stage, ScalarModel if reward
                                   else LanguageModel, cfg, mesh)
  src = pretrained.model_dir(config, "rm_model" if reward else "model")
  extra = hf.read_hf_config(src) if src else {}
  vocab = inputs.vocabulary(config)
  eos = list(vocab.eos_ids)
  for k, v in (("bos_token_id", vocab.bos_id), ("pad_token_id", vocab.pad_id),
               ("eos_token_id", eos[0] if len(eos) == 1 else eos)):
    if extra.get(k) is None:
      extra[k] = v
  if reward:  # transformers scores the last token that is not this PAD.
    extra["pad_token_id"] = vocab.pad_id
  save = hf.save_reward_model if reward else hf.save_pretrained
  tmp = out + ".tmp"
  if jax.process_index() == 0:
    paths.rmtree(tmp)
  save(tmp, cfg, params, hf_config=extra, tokenizer_dir=pretrained.vocab_dir(config))
  if jax.process_index() == 0:
    paths.rmtree(out)
    os.replace(tmp, out)


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
  for stage in validate.pipeline_stages(config):
    if stage != "eval" and loop.is_done(workdir, stage):
      results[stage] = dict(loop.read_info(workdir, stage), reused=True)
      print(f"[{stage}] already done in {loop.stage_dir(workdir, stage)}; reusing")
      export_hf(config, workdir, stage, mesh)  # Redone if it was killed.
      continue
    t0 = time.monotonic()
    results[stage] = run_stage(config, workdir, stage, mesh)
    print(f"[{stage}] done in {time.monotonic() - t0:.1f}s")
  results.get("eval", {}).pop("report", None)  # Printed; in eval/report.json.
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
