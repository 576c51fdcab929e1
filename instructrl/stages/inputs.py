"""What every stage reads: model configs, data iterators, initial parameters."""
from __future__ import annotations

import jax
from flax import nnx

from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.stages import loop
from instructrl.stages import pretrained
from instructrl.stages.errors import ConfigError


def model_config(config, dropout: float = 0.0, **overrides) -> ModelConfig:
  """The policy's config: `config.model`, or with `config.hf_model` set that
  checkpoint's architecture with config.model's numerics (`pretrained`);
  `vocab_size = 0` means "the vocabulary's size"."""
  d = pretrained.model_fields(config, "model")
  if not d["vocab_size"]:
    d["vocab_size"] = int(vocabulary(config).vocab_size)
  d.update(dropout_rate=dropout, **overrides)
  return ModelConfig.from_dict(d)


def rm_model_config(config, dropout: float = 0.0) -> ModelConfig:
  """The reward and value models' config: `config.rm_model` or
  `config.hf_rm_model` if the config has one (one 6B RM for every policy
  size), else the policy's."""
  key = pretrained.rm_key(config)
  if key == "model":
    return model_config(config, dropout)
  d = dict(pretrained.model_fields(config, key), dropout_rate=dropout)
  vocab = model_config(config).vocab_size
  if d["vocab_size"] and d["vocab_size"] != vocab:
    # The RM reads the policy's token ids.
    raise ConfigError(f"{pretrained.source(config, key)}: vocab_size "
                      f"{d['vocab_size']} differs from the policy's vocabulary "
                      f"size {vocab}")
  d["vocab_size"] = vocab
  return ModelConfig.from_dict(d)


def vocabulary(config):
  """The data's vocabulary, `data.vocab.Vocabulary` (loaded once per spec;
  data.vocab "hf" is config.hf_model's tokenizer)."""
  return pretrained.vocabulary(config)


# Stages whose export an init may name.
STAGE_EXPORTS = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")


def special_ids(config) -> dict:
  """The vocabulary's stop and padding ids, as the sampler and the rollout
  take them: `SampleConfig(..., **special_ids(config))`."""
  v = vocabulary(config)
  return {"eos_ids": tuple(v.eos_ids), "pad_id": int(v.pad_id)}


def read_options(config):
  """How this run reads records (`data.pipeline.ReadOptions`)."""
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  d = config.data
  return pipeline.ReadOptions(vocab=vocabulary(config), world=dict(d.world),
                              on_error=d.on_error, cache_dir=d.cache_dir or None,
                              chat_template=bool(d.get("chat_template", False)))


def iterator(config, kind: str, spec: str, split: str, batch_size: int, seq_len: int,
             seed: int, *, infinite: bool = True, groups=None):
  """This process's resumable batches of `spec` (see `data.pipeline`)."""
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  batching = pipeline.Batching(batch_size=batch_size, seed=seed, infinite=infinite,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
  return pipeline.make_iterator(kind, spec, split, seq_len=seq_len, batching=batching,
                                read=read_options(config), groups=groups)


def load_model(workdir: str, stage: str, model_cls, cfg: ModelConfig, mesh):
  """(graphdef, params, param shardings) of a finished stage's export."""
  graphdef, abs_params = abstract(model_cls, cfg)
  shardings = mesh_lib.param_shardings(abs_params, mesh)
  return graphdef, loop.load_export(workdir, stage, abs_params, shardings), shardings


def init_params(config, workdir, stage: str, model_cls, cfg: ModelConfig, mesh,
                key: str = "init", default: str = "none"):
  """Params from config.<section>.<key>: a finished stage ("pretrain",
  "sft", "rm", ...), an orbax params path, a Hugging Face directory
  ("hf:DIR", or "hf" for the run's own `hf_model`/`hf_rm_model`), or
  "none" (None: fresh parameters).

  Its shape was checked by `validate` (`check_init_shape`, `pretrained.check`).
  """
  section = "ppo" if stage in ("ppo", "ppo_ptx") else stage
  reward = model_cls is ScalarModel
  init = pretrained.resolve_init(config, section, key, default, reward)
  if init in ("", "none"):
    return None
  if init.startswith("hf:"):
    return pretrained.load_init(f"{section}.{key}", init, cfg, mesh, reward)
  if init in STAGE_EXPORTS:
    src_cls = ScalarModel if init == "rm" else LanguageModel
    _, src, _ = load_model(workdir, init, src_cls, cfg, mesh)
  else:
    src_cls = model_cls
    _, abs_params = abstract(model_cls, cfg)
    src = loop.load_params(init, abs_params, mesh_lib.param_shardings(abs_params, mesh))
  if src_cls is model_cls:
    return src
  # LM -> scalar model: take the backbone, keep the fresh (zero) scalar head.
  return transplant_backbone(src, model_cls, cfg, mesh)


def transplant_backbone(src_params, model_cls, cfg, mesh, seed: int = 0):
  """New `model_cls` params whose backbone is copied from `src_params`."""
  _, abs_params = abstract(model_cls, cfg)
  shardings = mesh_lib.param_shardings(abs_params, mesh)

  def build(src, key):
    fresh = nnx.split(model_cls(cfg, nnx.Rngs(key)))[1]
    fresh["backbone"] = src["backbone"]
    return fresh
  return mesh_lib.jit(build, mesh, out_shardings=shardings)(
      src_params, jax.random.key(seed))
