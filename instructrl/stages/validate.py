"""Every config check, made once, before any stage starts or any file is written.

`validate(config, workdir, mesh)` is what the runner calls for the whole
pipeline: a pipeline should not stop at the RM's batch size after the SFT
ran. Each stage's `run` calls `check_stage` for itself (the same checks), so
a stage run from a notebook is checked too. Nothing here needs the data
layer's TensorFlow side or parameters; facts that need them (the vocabulary's
size, a record that is too long) are checked where they become known, and
raise `ConfigError` or `data.DataError` there.

The range of each numeric key is one row of `limits.LIMITS`.
"""
from __future__ import annotations

import os

import jax

from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel, ModelConfig
from instructrl.model.sharded import abstract
from instructrl.stages import limits
from instructrl.stages import loop
from instructrl.stages import pretrained
from instructrl.stages import sft_extras
from instructrl.stages.errors import ConfigError

STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "eval")
LM_STAGES = ("pretrain", "sft", "rm")


def make_mesh(config, devices=None):
  """The config's mesh over `devices` (default: all; tests pass a subset)."""
  limits.check(config, ("mesh",))
  try:
    return mesh_lib.make_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def _batch_divides(batch_size: int, mesh, key: str) -> None:
  n = mesh_lib.batch_size_multiple(mesh)
  if batch_size % n:
    raise ConfigError(f"config.{key}={batch_size} does not divide over the data "
                      f"axes data*fsdp={n}")


def _fits(config, length: int, what: str) -> None:
  """`length` tokens fit the policy's and the RM's position tables."""
  for model_key in dict.fromkeys(("model", rm_key(config))):
    max_len = pretrained.model_fields(config, model_key)["max_len"]
    if length > max_len:
      raise ConfigError(f"{what} exceeds {pretrained.source(config, model_key)}'s "
                        f"max_len={max_len}")


def rm_key(config) -> str:
  """The config key of the RM's (and value model's) shape (`config.rm_model`
  or `config.hf_rm_model`: "rm_model")."""
  return pretrained.rm_key(config)


def _param_shapes(d: dict) -> list:
  _, abs_params = abstract(LanguageModel, ModelConfig.from_dict(d))
  return [(jax.tree_util.keystr(p), x.shape, x.dtype)
          for p, x in jax.tree_util.tree_leaves_with_path(abs_params)]


def check_init_shape(config, stage: str, init: str) -> None:
  """A stage-name `init` must have the shape of the model `stage` trains.

  Only `config.rm_model` makes them differ: the pretrain and SFT exports have
  `config.model`'s shape, the RM export `config.rm_model`'s.
  """
  if rm_key(config) == "model" or init not in ("pretrain", "sft", "rm"):
    return
  want = "rm_model" if stage == "rm" else "model"
  have = "rm_model" if init == "rm" else "model"
  if want == have:
    return
  lm = pretrained.model_fields(config, "model")
  rm = pretrained.model_fields(config, "rm_model")
  lm["vocab_size"] = lm["vocab_size"] or rm["vocab_size"] or 1
  rm["vocab_size"] = rm["vocab_size"] or lm["vocab_size"]
  if _param_shapes(lm) != _param_shapes(rm):
    raise ConfigError(
        f"config.{stage}.init={init!r}: that export has "
        f"{pretrained.source(config, have)}'s shape, but {stage} trains "
        f"{pretrained.source(config, want)}'s; set config.{stage}.init to a "
        f"params path of that shape, 'hf' or 'none'")


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
  fields = {}
  for key in dict.fromkeys(("model", rm_key(config))):
    d = fields[key] = pretrained.model_fields(config, key)
    try:
      ModelConfig.from_dict(dict(d, vocab_size=d["vocab_size"] or 1))  # 0: the data's.
    except (TypeError, ValueError, KeyError) as e:
      raise ConfigError(f"config.{key}: {e}") from None
  lm, rm = fields["model"]["vocab_size"], fields[rm_key(config)]["vocab_size"]
  if lm and rm and lm != rm:
    raise ConfigError(f"{pretrained.source(config, 'rm_model')}.vocab_size={rm} "
                      f"differs from {pretrained.source(config, 'model')}."
                      f"vocab_size={lm}")


def check_stage(config, stage: str, mesh) -> None:
  """The checks of one stage that need neither the workdir nor the data."""
  section = "ppo" if stage in ("ppo", "ppo_ptx") else stage
  limits.check(config, (section,) + limits.SHARED)
  check_models(config)
  sc = config[section]
  if stage in LM_STAGES:
    _batch_divides(sc.batch_size, mesh, f"{stage}.batch_size")
    key = rm_key(config) if stage == "rm" else "model"
    max_len = pretrained.model_fields(config, key)["max_len"]
    if sc.seq_len > max_len:
      raise ConfigError(f"config.{stage}.seq_len={sc.seq_len} exceeds "
                        f"{pretrained.source(config, key)}'s max_len={max_len}")
    rows = rows_per_step(config, mesh, stage)
    if rows % sc.microbatches:
      raise ConfigError(f"config.{stage}.microbatches={sc.microbatches} does not "
                        f"split the step's {rows} rows (config.{stage}.batch_size "
                        f"{sc.batch_size}" + (", plus pretraining rows)" if
                                              rows > sc.batch_size else ")"))
    check_init_shape(config, stage, sc.get("init", "none"))
  if stage == "rm" and sc.get("candidates", "world") == "sft":
    _batch_divides(sc.sample_batch_size, mesh, "rm.sample_batch_size")
  if stage == "rm" and sc.get("candidates", "world") not in ("world", "sft"):
    raise ConfigError(f"config.rm.candidates={sc.candidates!r}: 'world' or 'sft'")
  if stage in ("ppo", "ppo_ptx"):
    _batch_divides(sc.batch_size, mesh, "ppo.batch_size")
    if sc.batch_size % sc.minibatch_size:
      raise ConfigError(f"config.ppo.batch_size={sc.batch_size} does not split "
                        f"into config.ppo.minibatch_size={sc.minibatch_size}")
    _fits(config, sc.prompt_len + sc.max_new_tokens,
          "config.ppo.prompt_len + config.ppo.max_new_tokens")
    if not isinstance(sc.get("recompute_logp", False), bool):
      raise ConfigError(f"config.ppo.recompute_logp={sc.recompute_logp!r}: "
                        "True or False")
    k, fsdp = sc.get("sampling_layout", 0), dict(mesh.shape)["fsdp"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (k and fsdp % k):
      raise ConfigError(f"config.ppo.sampling_layout={k!r}: 0 (the training layout) "
                        f"or a tensor group size that divides the mesh's fsdp={fsdp}")
  if stage == "eval":
    _batch_divides(sc.batch_size, mesh, "eval.batch_size")
    # The RM scores the base model's answers after the few-shot prompt too.
    _fits(config, sc.fewshot_prompt_len + sc.max_new_tokens,
          "config.eval.fewshot_prompt_len + config.eval.max_new_tokens")


def _data_keys(config, stage: str) -> list[str]:
  """The data specs `stage` reads, as "section.key"."""
  if stage in LM_STAGES:
    extra = ["sft.ptx_data"] if stage == "sft" and config.sft.ptx_frac > 0 else []
    return [f"{stage}.data"] + extra
  if stage in ("ppo", "ppo_ptx"):
    return ["ppo.data"] + (["ppo.ptx_data"] if stage == "ppo_ptx" else [])
  return []


def check_data(config, stage: str) -> None:
  """Each data spec `stage` reads parses, and names files that exist."""
  from instructrl.data import jsonl  # pylint: disable=g-import-not-at-top
  from instructrl.data import sources  # pylint: disable=g-import-not-at-top
  from instructrl.data.common import DataError  # pylint: disable=g-import-not-at-top
  for key in _data_keys(config, stage):
    section, name = key.split(".")
    spec = config[section].get(name, "world")
    try:
      scheme, arg = sources.parse_spec(spec)
      if scheme in ("jsonl", "parquet", "text"):
        jsonl.expand(arg.replace("{split}", "train"))
    except DataError as e:
      raise ConfigError(f"config.{key}={spec!r}: {e.what}") from None


def stages_to_run(config, workdir: str) -> list[str]:
  """`config.stage`, or for "pipeline" every stage without a finished result."""
  if config.stage == "pipeline":
    return [s for s in pipeline_stages(config) if not loop.is_done(workdir, s)]
  return [config.stage]


def pipeline_stages(config) -> tuple[str, ...]:
  """The stages of a "pipeline" run, in order: `config.pipeline_stages`
  (configs/hf.py: no pretraining and no gold-judged eval), else all."""
  stages = tuple(config.get("pipeline_stages", STAGES))
  bad = [s for s in stages if s not in STAGES]
  if bad or list(stages) != sorted(stages, key=STAGES.index):
    raise ConfigError(f"config.pipeline_stages={stages!r}: stages of {STAGES}, "
                      "in that order")
  return stages


def validate(config, workdir: str, mesh) -> list[str]:
  """All config checks for the stages this run will do; returns those stages."""
  if config.stage not in STAGES + ("pipeline",):
    raise ConfigError(f"config.stage: unknown stage {config.stage!r}; "
                      f"one of {STAGES + ('pipeline',)}")
  limits.check(config, limits.SHARED)  # Before the world's own checks.
  if "data" in config and "world" in config.data:
    from instructrl.data import world  # pylint: disable=g-import-not-at-top
    try:
      world.WorldConfig.from_dict(dict(config.data.world))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.data.world: {e}") from None
  todo = stages_to_run(config, workdir)
  for stage in todo:
    if ("ppo" if stage == "ppo_ptx" else stage) not in config:
      raise ConfigError(f"config.stage={stage!r}: this config has no config."
                        f"{stage} section")
    check_stage(config, stage, mesh)
    check_data(config, stage)
  pretrained.check(config, todo)  # HF directories: config, tensors, tokenizer.
  for stage in todo:
    for section, key, default, reward in pretrained.init_keys(stage):
      init = pretrained.resolve_init(config, section, key, default, reward)
      name = f"config.{section}.{key}"
      if section == "ppo" and init in ("", "none"):
        raise ConfigError(f"{name}={init!r}: PPO starts from a model (a stage, "
                          "a params path or 'hf:DIR')")
      if init in STAGES and init not in todo and not loop.is_done(workdir, init):
        raise ConfigError(
            f"{name}={init!r}: stage {init!r} has no finished result "
            f"in {loop.stage_dir(workdir, init)} (run it first)")
      if (init not in STAGES + ("", "none") and not init.startswith("hf:")
          and not os.path.isdir(init)):
        raise ConfigError(f"{name}: no parameters at {init}")
  return todo
