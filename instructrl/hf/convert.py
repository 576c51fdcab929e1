"""Hugging Face checkpoints <-> instructrl params: language and reward models.

    pre = load_pretrained(DIR)           # *ForCausalLM -> LanguageModel
    save_pretrained(OUT, pre.cfg, pre.params, hf_config=pre.hf_config)
    rm = load_reward_model(DIR)          # *ForSequenceClassification (or a
    save_reward_model(OUT, cfg, params)  #  causal LM: head 0) -> ScalarModel

Families and their switches: `architectures`; tensor names: `layouts`; the file
format: `safetensors_io`. Every error is a DataError (a bad or unsupported
file: one line naming it and the field) or a FamilyError (a model config no
Hugging Face family represents).

Reward models. transformers' *ForSequenceClassification scores with a
bias-free `score` Linear on the final hidden state, read at the rightmost
token that is not `pad_token_id` (config.json). Our ScalarModel adds a scalar
bias (docs/design.md, "Reward-model bias"). GPT-2's final LayerNorm has a
bias, so ours is folded into it exactly (ln_f.bias += b * head / |head|^2);
RMSNorm families have no term a constant can be folded into, so the bias is
written as `instructrl_reward_bias` in config.json, read back by
`load_reward_model`, and transformers' score is ours minus it (differences
of scores, all that Eq. 1 and rankings use, are equal).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx

from instructrl import mesh as mesh_lib
from instructrl.data.common import DataError
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.hf import architectures, layouts
from instructrl.hf.safetensors_io import read_checkpoint, write_checkpoint

REWARD_BIAS_KEY = "instructrl_reward_bias"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json",
                    "merges.txt", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")


def read_hf_config(path: str) -> dict:
  where = os.path.join(path, "config.json")
  if not os.path.exists(where):
    raise DataError(where, "no such file (not a Hugging Face model directory)")
  try:
    with open(where) as f:
      hf = json.load(f)
  except ValueError as e:
    raise DataError(where, f"not JSON ({e})") from None
  if not isinstance(hf, dict):
    raise DataError(where, "not a JSON object")
  return hf


def model_config_from_hf(hf: dict, where: str = "config.json",
                         **overrides) -> ModelConfig:
  """The ModelConfig equivalent to a HF config.json (dtype etc. in overrides)."""
  return architectures.model_config_from_hf(hf, where, **overrides)


def hf_config_from_model(cfg: ModelConfig, extra: dict | None = None, *,
                         reward: bool = False) -> dict:
  """A config.json that `transformers` reads as the same architecture."""
  return architectures.hf_config_from_model(cfg, extra, reward=reward)


def _place(pure: dict, cfg: ModelConfig, model_cls, mesh, where: str):
  """(graphdef, nnx.State) holding `pure`, each leaf sharded by its axes."""
  graphdef, abs_state = abstract(model_cls, cfg)
  target = nnx.to_pure_dict(abs_state)
  dtype = cfg.weight_dtype
  if jax.tree.structure(pure) != jax.tree.structure(target):
    raise DataError(where, "tensors do not form the model config.json describes")

  def put(path, arr, want, sharding):
    if tuple(arr.shape) != tuple(want.shape):
      raise DataError(where, f"{jax.tree_util.keystr(path)} has shape "
                      f"{tuple(arr.shape)}, config.json implies {tuple(want.shape)}")
    if sharding is None:
      return jax.numpy.asarray(np.asarray(arr, dtype))
    # Each device reads (from the memory map) only the slice it holds.
    return jax.make_array_from_callback(
        tuple(want.shape), sharding, lambda idx: np.asarray(arr[idx], dtype))
  if mesh is None:
    values = jax.tree_util.tree_map_with_path(
        lambda p, a, w: put(p, a, w, None), pure, target)
  else:
    shards = nnx.to_pure_dict(mesh_lib.param_shardings(abs_state, mesh))
    values = jax.tree_util.tree_map_with_path(put, pure, target, shards)
  state = jax.tree.map(lambda x: x, abs_state)
  nnx.replace_by_pure_dict(state, values)
  return graphdef, state


@dataclasses.dataclass
class Pretrained:
  """An imported checkpoint: our config, module graph and parameters."""
  cfg: ModelConfig
  graphdef: Any
  params: nnx.State
  hf_config: dict
  path: str

  def model(self) -> LanguageModel | ScalarModel:
    return nnx.merge(self.graphdef, self.params)


def _read(path, overrides, reward: bool):
  """(config.json, ModelConfig, our pure params as views of the files,
  tensors' file): every name and shape checked, no weight read."""
  hf = read_hf_config(path)
  where_cfg = os.path.join(path, "config.json")
  fam, is_classifier = architectures.family_of(hf, where_cfg)
  if is_classifier and not reward:
    raise DataError(where_cfg, f"architectures[0] is {fam.seq_cls} (a reward model); "
                    "import it with load_reward_model")
  if is_classifier and hf.get("num_labels", len(hf.get("id2label") or [0])) != 1:
    raise DataError(where_cfg, f"num_labels={hf.get('num_labels')!r}; a reward model "
                    "has one label")
  cfg = architectures.model_config_from_hf(hf, where_cfg, **overrides)
  tensors, where = read_checkpoint(path)
  pure = layouts.ours_from_hf(tensors, cfg, where, reward=is_classifier)
  if reward:
    if not is_classifier:  # A causal LM as the RM's init: a fresh zero head.
      pure.pop("lm_head", None)
      pure["head"] = np.zeros((cfg.d_model,), np.float32)
    bias = hf.get(REWARD_BIAS_KEY, 0.0)
    if not isinstance(bias, (int, float)):
      raise DataError(where_cfg, f"{REWARD_BIAS_KEY}={bias!r} is not a number")
    pure["bias"] = np.asarray(bias, np.float32)
  return hf, cfg, pure, where


def check_pretrained(path: str, *, reward: bool = False, **overrides) -> ModelConfig:
  """The ModelConfig of a HF directory, after every check `load_pretrained`
  (`reward`: `load_reward_model`) makes, reading only config.json and the
  safetensors headers: what a run validates before it writes anything."""
  return _read(path, overrides, reward)[1]


def _load(path, mesh, overrides, reward: bool) -> Pretrained:
  hf, cfg, pure, where = _read(path, overrides, reward)
  model_cls = ScalarModel if reward else LanguageModel
  graphdef, params = _place(pure, cfg, model_cls, mesh, where)
  return Pretrained(cfg, graphdef, params, hf, path)


def load_pretrained(path: str, *, mesh=None, **overrides) -> Pretrained:
  """Imports a local HF *ForCausalLM directory as LanguageModel params.

  Args:
    path: a directory with config.json and model.safetensors (or shards).
    mesh: if given, parameters are created directly sharded over it.
    **overrides: ModelConfig fields (param_dtype, dtype, scan_layers, ...).

  Raises:
    DataError: one line naming the file and what is unsupported or missing.
  """
  return _load(path, mesh, overrides, reward=False)


def load_reward_model(path: str, *, mesh=None, **overrides) -> Pretrained:
  """Imports a HF *ForSequenceClassification (num_labels=1) as ScalarModel
  params, its `instructrl_reward_bias` as the bias; a *ForCausalLM gives the
  backbone with a zero head and bias (an RM initialised from an LM)."""
  return _load(path, mesh, overrides, reward=True)


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
  """HF-named tensors (*ForCausalLM layout) from our LanguageModel params."""
  return layouts.hf_from_ours(cfg, jax.tree.map(_host, nnx.to_pure_dict(params)))


def generation_config(hf: dict) -> dict:
  """generation_config.json from config.json's token ids (what `generate`
  stops and pads with), for a directory that had none."""
  return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
          if hf.get(k) is not None}


def _write(path: str, hf: dict, tensors: dict, tokenizer_dir: str | None,
           max_shard_bytes: int | None):
  os.makedirs(path, exist_ok=True)
  write_checkpoint(path, tensors, max_shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  for name in _TOKENIZER_FILES if tokenizer_dir else ():
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(
        os.path.join(path, name)):
      shutil.copyfile(src, os.path.join(path, name))
  gen = os.path.join(path, "generation_config.json")
  if not os.path.exists(gen):
    with open(gen, "w") as f:
      json.dump(generation_config(hf), f, indent=2, sort_keys=True)


def save_pretrained(path: str, cfg: ModelConfig, params, *,
                    hf_config: dict | None = None,
                    tokenizer_dir: str | None = None,
                    max_shard_bytes: int | None = None) -> None:
  """Writes config.json + safetensors that `AutoModelForCausalLM` loads.

  `hf_config` (e.g. `Pretrained.hf_config`) supplies the non-architectural
  keys (token ids, ...) and the preferred family; `tokenizer_dir` is where
  tokenizer files are copied from; past `max_shard_bytes` the weights are
  sharded with an index. Gathers every tensor to process 0, which alone
  writes: host 0 needs the whole model in memory, in its param dtype.
  """
  hf = hf_config_from_model(cfg, hf_config)
  tensors = hf_tensors(cfg, params)
  if jax.process_index() == 0:
    _write(path, hf, tensors, tokenizer_dir, max_shard_bytes)


def save_reward_model(path: str, cfg: ModelConfig, params, *,
                      hf_config: dict | None = None,
                      tokenizer_dir: str | None = None,
                      max_shard_bytes: int | None = None) -> None:
  """Writes a ScalarModel as <Family>ForSequenceClassification, num_labels=1
  (the format of TRL's RewardTrainer); the bias as in the module docstring.

  `hf_config["pad_token_id"]` must be the vocabulary's PAD: transformers
  reads the score at the last token that is not PAD.
  """
  pure = jax.tree.map(_host, nnx.to_pure_dict(params))
  bias = float(pure["bias"])
  hf = hf_config_from_model(cfg, hf_config, reward=True)
  head = pure["head"].astype(np.float64)
  if cfg.style == "gpt" and bias != 0.0 and np.dot(head, head) > 0:
    fold = pure["backbone"]["final_norm"]["bias"].astype(np.float64)
    fold = fold + bias * head / np.dot(head, head)
    dtype = pure["backbone"]["final_norm"]["bias"].dtype
    pure["backbone"]["final_norm"]["bias"] = fold.astype(dtype)
  elif bias != 0.0:
    hf[REWARD_BIAS_KEY] = bias
  tensors = layouts.hf_from_ours(cfg, pure, reward=True)
  if jax.process_index() == 0:
    _write(path, hf, tensors, tokenizer_dir, max_shard_bytes)
