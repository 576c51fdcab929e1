"""A Hugging Face checkpoint as a run's model, its tokenizer and its inits.

  config.hf_model = DIR     the policy's architecture from DIR/config.json;
                            config.model keeps only the numerics (`NUMERIC`:
                            dtype, param_dtype, scan_layers, remat_policy,
                            attention_impl); data.vocab "hf" (or "default")
                            is then DIR's tokenizer, "hf:DIR"
  config.hf_rm_model = DIR  the reward and value models' architecture ("":
                            hf_model's); numerics from config.rm_model if the
                            config has one, else config.model. Its vocabulary
                            must be the policy's (the RM reads its token ids)
  <section>.init = "hf"     the run's own checkpoint: hf_rm_model's (else
                            hf_model's) for the RM's inits (rm.init,
                            ppo.rm_init), hf_model's for the others
  <section>.init = "hf:DIR" any HF directory of the stage's architecture

"hf" is resolved when read, not when the config file is built: the command
line sets `config.hf_model` after `get_config` has run. Everything here is
checked by `check` before a run writes anything: config.json, the
architecture, every tensor's name and shape (the safetensors headers only),
the tokenizer and its EOS, and the RM's vocabulary against the policy's.
Every mistake is one ConfigError line naming the config key and the file.
"""
from __future__ import annotations

import dataclasses
import functools
import os

from instructrl import hf
from instructrl.data.common import DataError
from instructrl.model import ModelConfig
from instructrl.stages.errors import ConfigError

# What config.model (config.rm_model) still sets when the architecture comes
# from a checkpoint: how the numbers are computed and stored, not the shape.
NUMERIC = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
# Stages whose result is also written as W/<stage>/hf/.
LM_EXPORTS = ("pretrain", "sft", "ppo", "ppo_ptx")
HF_EXPORTS = LM_EXPORTS + ("rm",)


def rm_key(config) -> str:
  """The config key of the RM's (and value model's) shape: "rm_model" when
  the config has that section or `hf_rm_model`, else "model"."""
  if "rm_model" in config or config.get("hf_rm_model", ""):
    return "rm_model"
  return "model"


def model_dir(config, key: str = "model") -> str:
  """The HF directory of config.<key>'s architecture, or "" (none)."""
  policy = config.get("hf_model", "") or ""
  if key == "model":
    return policy
  return config.get("hf_rm_model", "") or policy


def source(config, key: str) -> str:
  """Where config.<key>'s shape comes from, for messages."""
  if not model_dir(config, key):
    return f"config.{key}"
  return "config.hf_rm_model" if key != "model" and config.get(
      "hf_rm_model", "") else "config.hf_model"


@functools.lru_cache(maxsize=16)
def _hf_fields(path: str, numeric: tuple) -> dict:
  where = os.path.join(path, "config.json")
  return dataclasses.asdict(hf.model_config_from_hf(hf.read_hf_config(path), where,
                                                    **dict(numeric)))


def model_fields(config, key: str = "model") -> dict:
  """ModelConfig fields of config.<key> ("model" or "rm_model"), from the
  checkpoint's config.json when there is one (module docstring)."""
  section = config[key] if key in config else config.model
  path = model_dir(config, key)
  if not path:
    return dict(section)
  numeric = tuple((k, section[k]) for k in NUMERIC if k in section)
  try:
    return dict(_hf_fields(path, numeric))
  except DataError as e:
    raise ConfigError(f"{source(config, key)}={path!r}: {e}") from None


def vocab_spec(config) -> str:
  """config.data.vocab, with "hf" (and, when hf_model is set, "default")
  meaning hf_model's tokenizer."""
  spec, path = config.data.vocab, config.get("hf_model", "")
  if spec == "hf" or (path and spec == "default"):
    if not path:
      raise ConfigError("config.data.vocab='hf' needs config.hf_model (a Hugging "
                        "Face model directory)")
    return "hf:" + path
  return spec


def vocab_dir(config) -> str | None:
  """The directory of an hf: vocabulary (whose tokenizer files exports copy)."""
  spec = vocab_spec(config)
  return os.path.expanduser(spec[3:]) if spec.startswith("hf:") else None


_VOCABS = {}


def vocabulary(config):
  """The data's vocabulary, `data.vocab.Vocabulary` (loaded once per spec)."""
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  key = (vocab_spec(config), config.data.cache_dir or None)
  if key not in _VOCABS:
    _VOCABS[key] = pipeline.resolve_vocab(*key)
  return _VOCABS[key]


def init_keys(stage: str) -> list[tuple[str, str, str, bool]]:
  """(section, key, default, is the RM's) of each init `stage` reads. PPO's
  policy and frozen reference start from ppo.init, its RM and value model
  from ppo.rm_init (the paper: the SFT model and the RM)."""
  if stage in ("pretrain", "sft", "rm"):
    return [(stage, "init", "none", stage == "rm")]
  if stage in ("ppo", "ppo_ptx"):
    return [("ppo", "init", "sft", False), ("ppo", "rm_init", "rm", True)]
  return []


def resolve_init(config, section: str, key: str = "init", default: str = "none",
                 reward: bool = False) -> str:
  """config.<section>.<key>, with "hf" made "hf:<the run's checkpoint>"."""
  init = config[section].get(key, default) if section in config else default
  if init != "hf":
    return init
  path = model_dir(config, "rm_model" if reward else "model")
  if not path:
    raise ConfigError(f"config.{section}.{key}='hf' needs config.hf_model (a "
                      "Hugging Face model directory)")
  return "hf:" + path


def _numeric(cfg: ModelConfig) -> dict:
  return {k: getattr(cfg, k) for k in NUMERIC + ("dropout_rate",)}


def _canonical(fields: dict) -> dict:
  """ModelConfig fields with the defaults that imply a value made explicit
  (d_ff None = 4d, ...), so that two spellings of one model compare equal."""
  cfg = ModelConfig.from_dict(dict(fields, vocab_size=fields["vocab_size"] or 1))
  out = dataclasses.asdict(cfg)
  out.update(d_ff=cfg.ff_dim, head_dim=cfg.dim_per_head, num_kv_heads=cfg.kv_heads,
             vocab_size=fields["vocab_size"], layer_types=tuple(cfg.sliding_layers))
  if cfg.style == "gpt":
    out.pop("rope_theta")  # No RoPE.
  return out


def _first_difference(there: dict, here: dict) -> str | None:
  """The first field in which two models differ (vocab_size 0: any)."""
  a, b = _canonical(there), _canonical(here)
  for k in a:
    if k in ("dropout_rate", "vocab_size") + NUMERIC:
      continue
    if a[k] != b.get(k):
      return f"{k}={a[k]!r} there, {b.get(k)!r} here"
  if a["vocab_size"] and b["vocab_size"] and a["vocab_size"] != b["vocab_size"]:
    return f"vocab_size={a['vocab_size']} there, {b['vocab_size']} here"
  return None


def check_init(name: str, spec: str, want: dict, reward: bool) -> None:
  """An "hf:DIR" init is a readable checkpoint of the architecture `want`
  (ModelConfig fields of the model the stage trains)."""
  path = os.path.expanduser(spec[3:])
  if not path:
    raise ConfigError(f"config.{name}={spec!r}: no directory after 'hf:'")
  numeric = {k: want[k] for k in NUMERIC if k in want}
  try:
    cfg = hf.check_pretrained(path, reward=reward, **numeric)
  except DataError as e:
    raise ConfigError(f"config.{name}={spec!r}: {e}") from None
  diff = _first_difference(dataclasses.asdict(cfg), want)
  if diff:
    raise ConfigError(f"config.{name}={spec!r}: {path}/config.json describes "
                      f"another model than this stage trains ({diff})")


def load_init(name: str, spec: str, cfg: ModelConfig, mesh, reward: bool):
  """The params of an "hf:DIR" init, created sharded over `mesh` from the
  memory-mapped file. An LM into a reward model: its backbone, with a zero
  head and bias (`hf.load_reward_model`)."""
  load = hf.load_reward_model if reward else hf.load_pretrained
  try:
    pre = load(os.path.expanduser(spec[3:]), mesh=mesh, **_numeric(cfg))
  except DataError as e:
    raise ConfigError(f"config.{name}={spec!r}: {e}") from None
  diff = _first_difference(dataclasses.asdict(pre.cfg), dataclasses.asdict(cfg))
  if diff:
    raise ConfigError(f"config.{name}={spec!r}: not the model this stage trains "
                      f"({diff})")
  return pre.params


def _check_vocabularies(config) -> None:
  """The tokenizer loads (with an EOS), fits the policy's embedding, and is
  the RM's: the RM and value model read the policy's token ids."""
  vocab = vocabulary(config)
  policy = model_fields(config, "model")
  size = policy["vocab_size"] or vocab.vocab_size
  if vocab.vocab_size > size:
    raise ConfigError(f"config.data.vocab={vocab_spec(config)!r} has "
                      f"{vocab.vocab_size} ids, more than the policy's vocab_size "
                      f"{size} ({source(config, 'model')})")
  rm_dir = config.get("hf_rm_model", "")
  if not rm_dir:
    return
  rm = model_fields(config, "rm_model")
  if rm["vocab_size"] != size:
    raise ConfigError(f"config.hf_rm_model={rm_dir!r}: vocab_size {rm['vocab_size']} "
                      f"differs from the policy's {size} ({source(config, 'model')}); "
                      "the RM reads the policy's token ids")
  if any(os.path.exists(os.path.join(rm_dir, f))
         for f in ("tokenizer.json", "tokenizer.model")):
    from instructrl.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    try:
      theirs = vocab_lib.get_vocabulary("hf:" + rm_dir)
    except DataError as e:
      raise ConfigError(f"config.hf_rm_model={rm_dir!r}: {e}") from None
    ours_fp, theirs_fp = (vocab_lib.vocab_fingerprint(v) for v in (vocab, theirs))
    if ours_fp != theirs_fp or tuple(theirs.eos_ids) != tuple(vocab.eos_ids):
      raise ConfigError(f"config.hf_rm_model={rm_dir!r}: its tokenizer differs from "
                        f"the policy's ({vocab_spec(config)}); the RM reads the "
                        "policy's token ids")


def check(config, stages) -> None:
  """Everything about HF checkpoints that a run of `stages` reads, before it
  writes anything (module docstring)."""
  for key, name in (("model", "hf_model"), ("rm_model", "hf_rm_model")):
    path = config.get(name, "")
    if not path:
      continue
    model_fields(config, key)  # config.json and the architecture.
    try:
      hf.check_pretrained(path, reward=key != "model")
    except DataError as e:
      raise ConfigError(f"config.{name}={path!r}: {e}") from None
  spec = vocab_spec(config)
  if config.get("hf_model", "") or spec.startswith("hf:"):
    try:
      _check_vocabularies(config)
    except DataError as e:
      raise ConfigError(f"config.data.vocab={spec!r}: {e}") from None
  for stage in stages:
    for section, key, default, reward in init_keys(stage):
      spec = resolve_init(config, section, key, default, reward)
      if spec.startswith("hf:"):
        want = model_fields(config, rm_key(config) if reward else "model")
        check_init(f"{section}.{key}", spec, want, reward)


def wants_export(config, stage: str) -> bool:
  """Is `stage`'s result also written as W/<stage>/hf/? With hf_model set,
  or the stage's section saying export_hf=True."""
  if stage not in HF_EXPORTS:
    return False
  section = "ppo" if stage in ("ppo", "ppo_ptx") else stage
  flag = config[section].get("export_hf", False) if section in config else False
  return bool(config.get("hf_model", "")) or bool(flag)
