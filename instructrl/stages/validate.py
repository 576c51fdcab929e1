"""Every config check, made once, before any stage starts or any file is written.

`validate(config, workdir, mesh)` is what the runner calls for the whole
pipeline: a pipeline should not stop at the RM's batch size after the SFT
ran. Each stage's `run` calls `check_stage` for itself (the same checks), so
a stage run from a notebook is checked too. Nothing here needs the data
layer's TensorFlow side or parameters; facts that need them (the vocabulary's
size, a record that is too long) are checked where they become known, and
raise `ConfigError` or `data.DataError` there.
"""
from __future__ import annotations

import math
import os

import jax

from instructrl import mesh as mesh_lib
from instructrl.data.labelers import NUM_GROUPS as NUM_LABELER_GROUPS
from instructrl.model import LanguageModel, ModelConfig
from instructrl.model.sharded import abstract
from instructrl.stages import loop
from instructrl.stages import sft_extras
from instructrl.stages.errors import ConfigError

STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "eval")
LM_STAGES = ("pretrain", "sft", "rm")


# Numeric keys per config section: (kind, lower bound, lower bound inclusive,
# upper bound or None). "int" values must be integers.
_POSITIVE_INT = ("int", 1, True, None)
_NONNEG_INT = ("int", 0, True, None)
_POSITIVE = ("float", 0.0, False, None)
_NONNEG = ("float", 0.0, True, None)
_FRACTION = ("float", 0.0, True, 1.0)  # [0, 1)
_LM_RULES = {
    "batch_size": _POSITIVE_INT, "seq_len": _POSITIVE_INT, "lr": _POSITIVE,
    "warmup_steps": _NONNEG_INT, "weight_decay": _NONNEG, "dropout": _FRACTION,
    "microbatches": _POSITIVE_INT, "log_every": _POSITIVE_INT,
    "save_every": _POSITIVE_INT, "eval_every": _NONNEG_INT,
    "eval_batches": _NONNEG_INT,
}
RULES = {
    "pretrain": dict(_LM_RULES, steps=_POSITIVE_INT),
    "sft": dict(_LM_RULES, epochs=_POSITIVE, ptx_frac=_FRACTION,
                select_prompt_len=_POSITIVE_INT, select_new_tokens=_POSITIVE_INT),
    "rm": dict(_LM_RULES, epochs=_POSITIVE, demo_batches=_NONNEG_INT,
               sample_temperature=_POSITIVE, sample_new_tokens=_POSITIVE_INT,
               sample_batch_size=_POSITIVE_INT),
    "ppo": {
        "iterations": _POSITIVE_INT, "batch_size": _POSITIVE_INT,
        "minibatch_size": _POSITIVE_INT, "epochs": _POSITIVE_INT, "lr": _POSITIVE,
        "value_lr": _POSITIVE, "warmup_iterations": _NONNEG_INT,
        "clip_eps": _POSITIVE, "value_clip_eps": _POSITIVE, "clip_norm": _NONNEG,
        "kl_coef": _NONNEG, "kl_target": _NONNEG, "kl_horizon": _POSITIVE_INT,
        "ptx_coef": _NONNEG, "ptx_ratio": _POSITIVE_INT, "ptx_seq_len": _POSITIVE_INT,
        "lam": ("float", 0.0, True, 1.000001), "ema_decay": _FRACTION,
        "prompt_len": _POSITIVE_INT, "max_new_tokens": _POSITIVE_INT,
        "log_every": _POSITIVE_INT, "save_every": _POSITIVE_INT,
    },
    "eval": {
        "num_prompts": _NONNEG_INT, "batch_size": _POSITIVE_INT,
        "max_new_tokens": _POSITIVE_INT, "fewshot": _NONNEG_INT,
        "fewshot_prompt_len": _POSITIVE_INT, "heldout_batches": _NONNEG_INT,
        "bootstrap_resamples": _POSITIVE_INT,
    },
}


def make_mesh(config, devices=None):
  """The config's mesh over `devices` (default: all; tests pass a subset)."""
  try:
    return mesh_lib.make_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def check_numbers(config, section: str) -> None:
  """Each numeric key of `config.<section>` within its bounds (`RULES`)."""
  sc = config[section]
  for key, (kind, lo, lo_incl, hi) in RULES[section].items():
    if key not in sc:
      continue
    v = sc[key]
    name = f"config.{section}.{key}={v!r}"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ConfigError(f"{name}: expected a number")
    if kind == "int" and v != int(v):
      raise ConfigError(f"{name}: expected an integer")
    if v < lo or (v == lo and not lo_incl):
      raise ConfigError(f"{name}: must be {'>=' if lo_incl else '>'} {lo}")
    if hi is not None and v >= hi:
      raise ConfigError(f"{name}: must be < {hi:g}")


def _batch_divides(batch_size: int, mesh, key: str) -> None:
  n = mesh_lib.batch_size_multiple(mesh)
  if batch_size % n:
    raise ConfigError(f"config.{key}={batch_size} does not divide over the data "
                      f"axes data*fsdp={n}")


def _fits(config, length: int, what: str) -> None:
  """`length` tokens fit the policy's and the RM's position tables."""
  for model_key in dict.fromkeys(("model", rm_key(config))):
    max_len = config[model_key].max_len
    if length > max_len:
      raise ConfigError(f"{what} exceeds config.{model_key}.max_len={max_len}")


def rm_key(config) -> str:
  """The config key of the RM's (and value model's) shape."""
  return "rm_model" if "rm_model" in config else "model"


def _param_shapes(d: dict) -> list:
  _, abs_params = abstract(LanguageModel, ModelConfig.from_dict(d))
  return [(jax.tree_util.keystr(p), x.shape, x.dtype)
          for p, x in jax.tree_util.tree_leaves_with_path(abs_params)]


def check_init_shape(config, stage: str, init: str) -> None:
  """A stage-name `init` must have the shape of the model `stage` trains.

  Only `config.rm_model` makes them differ: the pretrain and SFT exports have
  `config.model`'s shape, the RM export `config.rm_model`'s.
  """
  if "rm_model" not in config or init not in ("pretrain", "sft", "rm"):
    return
  want = "rm_model" if stage == "rm" else "model"
  have = "rm_model" if init == "rm" else "model"
  if want == have:
    return
  lm, rm = dict(config.model), dict(config.rm_model)
  lm["vocab_size"] = lm["vocab_size"] or rm["vocab_size"] or 1
  rm["vocab_size"] = rm["vocab_size"] or lm["vocab_size"]
  if _param_shapes(lm) != _param_shapes(rm):
    raise ConfigError(
        f"config.{stage}.init={init!r}: that export has config.{have}'s shape, "
        f"but {stage} trains config.{want}'s; set config.{stage}.init to a "
        f"params path of that shape, or 'none'")


def rows_per_step(config, mesh, stage: str) -> int:
  """Rows of one LM/RM step: SFT's demonstrations plus its pretraining rows."""
  sc = config[stage]
  if stage == "sft" and sc.ptx_frac > 0:
    return sc.batch_size + sft_extras.ptx_rows(sc.batch_size, sc.ptx_frac,
                                               mesh_lib.batch_size_multiple(mesh))
  return sc.batch_size


def check_models(config) -> None:
  """`config.model` (and `config.rm_model`) make a ModelConfig; the RM reads
  the policy's token ids, so set vocabulary sizes must agree."""
  for key in dict.fromkeys(("model", rm_key(config))):
    d = dict(config[key])
    d["vocab_size"] = d["vocab_size"] or 1  # 0: the data's vocabulary.
    try:
      ModelConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
      raise ConfigError(f"config.{key}: {e}") from None
  lm, rm = config.model.vocab_size, config[rm_key(config)].vocab_size
  if lm and rm and lm != rm:
    raise ConfigError(f"config.rm_model.vocab_size={rm} differs from "
                      f"config.model.vocab_size={lm}")


def check_stage(config, stage: str, mesh) -> None:
  """The checks of one stage that need neither the workdir nor the data."""
  section = "ppo" if stage in ("ppo", "ppo_ptx") else stage
  check_numbers(config, section)
  check_models(config)
  sc = config[section]
  if stage in LM_STAGES:
    _batch_divides(sc.batch_size, mesh, f"{stage}.batch_size")
    key = rm_key(config) if stage == "rm" else "model"
    if sc.seq_len > config[key].max_len:
      raise ConfigError(f"config.{stage}.seq_len={sc.seq_len} exceeds "
                        f"config.{key}.max_len={config[key].max_len}")
    rows = rows_per_step(config, mesh, stage)
    if rows % sc.microbatches:
      raise ConfigError(f"config.{stage}.microbatches={sc.microbatches} does not "
                        f"split the step's {rows} rows (config.{stage}.batch_size "
                        f"{sc.batch_size}" + (", plus pretraining rows)" if
                                              rows > sc.batch_size else ")"))
    check_init_shape(config, stage, sc.get("init", "none"))
  if stage == "rm" and sc.get("candidates", "world") == "sft":
    _batch_divides(sc.sample_batch_size, mesh, "rm.sample_batch_size")
  if stage == "rm" and not -1 <= sc.heldout_group < NUM_LABELER_GROUPS:
    raise ConfigError(f"config.rm.heldout_group={sc.heldout_group}: a labeler group "
                      f"in [0, {NUM_LABELER_GROUPS}) or -1 (none held out)")
  if stage == "rm" and sc.get("candidates", "world") not in ("world", "sft"):
    raise ConfigError(f"config.rm.candidates={sc.candidates!r}: 'world' or 'sft'")
  if stage in ("ppo", "ppo_ptx"):
    _batch_divides(sc.batch_size, mesh, "ppo.batch_size")
    if sc.batch_size % sc.minibatch_size:
      raise ConfigError(f"config.ppo.batch_size={sc.batch_size} does not split "
                        f"into config.ppo.minibatch_size={sc.minibatch_size}")
    _fits(config, sc.prompt_len + sc.max_new_tokens,
          "config.ppo.prompt_len + config.ppo.max_new_tokens")
    pen = sc.get("missing_eos_penalty")
    if pen is not None and (isinstance(pen, bool) or not isinstance(pen, (int, float))
                            or not math.isfinite(pen)):
      raise ConfigError(f"config.ppo.missing_eos_penalty={pen!r}: a finite reward "
                        "for responses without EOS, or None (the RM's score)")
    if not isinstance(sc.get("recompute_logp", False), bool):
      raise ConfigError(f"config.ppo.recompute_logp={sc.recompute_logp!r}: "
                        "True or False")
  if stage == "eval":
    _batch_divides(sc.batch_size, mesh, "eval.batch_size")
    # The RM scores the base model's answers after the few-shot prompt too.
    _fits(config, sc.fewshot_prompt_len + sc.max_new_tokens,
          "config.eval.fewshot_prompt_len + config.eval.max_new_tokens")


def stages_to_run(config, workdir: str) -> list[str]:
  """`config.stage`, or for "pipeline" every stage without a finished result."""
  if config.stage == "pipeline":
    return [s for s in STAGES if not loop.is_done(workdir, s)]
  return [config.stage]


def validate(config, workdir: str, mesh) -> list[str]:
  """All config checks for the stages this run will do; returns those stages."""
  if config.stage not in STAGES + ("pipeline",):
    raise ConfigError(f"config.stage: unknown stage {config.stage!r}; "
                      f"one of {STAGES + ('pipeline',)}")
  if "data" in config and "world" in config.data:
    from instructrl.data import world  # pylint: disable=g-import-not-at-top
    try:
      world.WorldConfig.from_dict(dict(config.data.world))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.data.world: {e}") from None
  todo = stages_to_run(config, workdir)
  for stage in todo:
    check_stage(config, stage, mesh)
  for stage in (s for s in todo if s in LM_STAGES):
    init = config[stage].get("init", "none")
    if init in STAGES and init not in todo and not loop.is_done(workdir, init):
      raise ConfigError(
          f"config.{stage}.init={init!r}: stage {init!r} has no finished result "
          f"in {loop.stage_dir(workdir, init)} (run it first)")
    if init not in STAGES + ("", "none") and not os.path.isdir(init):
      raise ConfigError(f"config.{stage}.init: no parameters at {init}")
  return todo
