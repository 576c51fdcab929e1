"""GPT-2 and Llama-family Hugging Face checkpoints <-> instructrl params.

Layouts (ours <- HF):
  GPT-2  Conv1D weights are already [in, out]; c_attn packs q, k, v along
         `out`; activation gelu_new == jax.nn.gelu(approximate=True).
  Llama  nn.Linear weights are [out, in] (transposed here); q/k rows are
         already in the rotate-half RoPE layout, so no permutation is needed.
Anything else (another architecture, RoPE scaling, attention biases, MoE,
sliding windows, a missing or unexpected tensor) is a one-line ValueError
that names the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from instructrl import mesh as mesh_lib
from instructrl.tools.hf.safetensors_io import read_checkpoint, write_safetensors
from instructrl.model import LanguageModel, ModelConfig
from instructrl.model.sharded import abstract

_GPT2 = ("GPT2LMHeadModel", "GPT2Model")
_LLAMA = ("LlamaForCausalLM", "MistralForCausalLM")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Non-parameter buffers that old checkpoints carry; they hold no weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json")


def read_hf_config(path: str) -> dict:
  where = os.path.join(path, "config.json")
  if not os.path.exists(where):
    raise ValueError(f"{where}: no such file (not a Hugging Face model directory)")
  with open(where) as f:
    return json.load(f)


def _architecture(hf: dict, where: str) -> str:
  arch = (hf.get("architectures") or [None])[0]
  if arch is None:  # Old configs name only the model type.
    arch = {"gpt2": _GPT2[0], "llama": _LLAMA[0],
            "mistral": _LLAMA[1]}.get(hf.get("model_type"), hf.get("model_type"))
  if arch not in _GPT2 + _LLAMA:
    raise ValueError(f"{where}: unsupported architecture {arch!r}; supported: "
                     f"{', '.join(_GPT2 + _LLAMA)}")
  return arch


def _rope_theta(hf: dict, where: str) -> float:
  scaling = hf.get("rope_scaling")
  params = hf.get("rope_parameters") or {}
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
  kind = kind or params.get("rope_type", "default")
  if scaling or kind != "default" or hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{where}: unsupported RoPE scaling {scaling or params!r} "
                     "(only plain RoPE is implemented)")
  return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _unsupported(where: str, what: str):
  return ValueError(f"{where}: unsupported {what}")


def model_config_from_hf(hf: dict, where: str = "config.json",
                         **overrides) -> ModelConfig:
  """The ModelConfig equivalent to a HF config.json (dtype etc. in overrides)."""
  arch = _architecture(hf, where)
  if arch in _GPT2:
    if hf.get("activation_function", "gelu_new") not in _TANH_GELUS:
      raise _unsupported(where, f"activation {hf['activation_function']!r}")
    if not hf.get("scale_attn_weights", True) or hf.get(
        "scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
      raise _unsupported(where, "GPT-2 attention variant (scale_attn_weights="
                         "false, scale_attn_by_inverse_layer_idx or cross-attention)")
    d = dict(vocab_size=hf["vocab_size"], num_layers=hf["n_layer"],
             d_model=hf["n_embd"], num_heads=hf["n_head"],
             d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_len=hf["n_positions"],
             style="gpt", tie_embeddings=hf.get("tie_word_embeddings", True),
             norm_eps=hf.get("layer_norm_epsilon", 1e-5))
  else:
    if hf.get("hidden_act", "silu") != "silu":
      raise _unsupported(where, f"activation {hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise _unsupported(where, "attention/MLP biases in a Llama-style model")
    if hf.get("num_local_experts") or hf.get("num_experts"):
      raise _unsupported(where, "mixture of experts")
    if hf.get("sliding_window") and hf.get("use_sliding_window", True) and (
        hf["sliding_window"] < hf.get("max_position_embeddings", 0)):
      raise _unsupported(where, f"sliding-window attention ({hf['sliding_window']})")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    d = dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
             d_model=hf["hidden_size"], num_heads=heads,
             num_kv_heads=hf.get("num_key_value_heads") or heads,
             head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
             d_ff=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
             style="llama", tie_embeddings=hf.get("tie_word_embeddings", False),
             norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf, where))
  d.update(overrides)
  return ModelConfig(**d)


def hf_config_from_model(cfg: ModelConfig, extra: dict | None = None) -> dict:
  """A config.json that `transformers` reads as the same architecture."""
  if cfg.style == "gpt":
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
      raise ValueError("GPT-2 format needs num_kv_heads == num_heads and "
                       "head_dim == d_model / num_heads")
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len,
          "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
          "n_inner": cfg.ff_dim, "activation_function": "gelu_new",
          "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout_rate,
          "embd_pdrop": cfg.dropout_rate, "attn_pdrop": 0.0,
          "scale_attn_weights": True}
  else:
    theta = cfg.rope_theta
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
          "intermediate_size": cfg.ff_dim, "max_position_embeddings": cfg.max_len,
          "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False,
          "mlp_bias": False, "rope_theta": theta, "rope_scaling": None,
          # transformers >= 5 reads this; older versions read rope_theta.
          "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
  # Token ids default to instructrl's vocabularies (PAD 0, EOS 1).
  base = {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}
  arch_keys = set(hf)
  base.update({k: v for k, v in (extra or {}).items() if k not in arch_keys})
  hf.update(base, tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype,
            torch_dtype=cfg.param_dtype)
  hf.pop("transformers_version", None)
  return hf


# --- Tensor layouts -----------------------------------------------------------
# Each style maps one layer: HF tensors -> our per-layer arrays (`_in`), and
# back (`_out`). Shapes are checked against the abstract model afterwards.


def _gpt2_in(get: Callable, i: int, cfg: ModelConfig) -> dict:
  p, n, h = f"h.{i}.", cfg.num_heads, cfg.dim_per_head
  d = cfg.d_model
  w, b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")
  return {
      ("norm1", "scale"): get(p + "ln_1.weight"), ("norm1", "bias"): get(p + "ln_1.bias"),
      ("norm2", "scale"): get(p + "ln_2.weight"), ("norm2", "bias"): get(p + "ln_2.bias"),
      ("attn", "wq"): w[:, :d].reshape(d, n, h), ("attn", "bq"): b[:d].reshape(n, h),
      ("attn", "wk"): w[:, d:2 * d].reshape(d, n, h),
      ("attn", "bk"): b[d:2 * d].reshape(n, h),
      ("attn", "wv"): w[:, 2 * d:].reshape(d, n, h), ("attn", "bv"): b[2 * d:].reshape(n, h),
      ("attn", "wo"): get(p + "attn.c_proj.weight").reshape(n, h, d),
      ("attn", "bo"): get(p + "attn.c_proj.bias"),
      ("mlp", "wi"): get(p + "mlp.c_fc.weight"), ("mlp", "bi"): get(p + "mlp.c_fc.bias"),
      ("mlp", "wo"): get(p + "mlp.c_proj.weight"), ("mlp", "bo"): get(p + "mlp.c_proj.bias"),
  }


def _gpt2_out(layer: dict, i: int, cfg: ModelConfig) -> dict:
  p, d = f"transformer.h.{i}.", cfg.d_model
  a, m = layer["attn"], layer["mlp"]
  flat = lambda x: x.reshape(d, -1)
  return {
      p + "ln_1.weight": layer["norm1"]["scale"], p + "ln_1.bias": layer["norm1"]["bias"],
      p + "ln_2.weight": layer["norm2"]["scale"], p + "ln_2.bias": layer["norm2"]["bias"],
      p + "attn.c_attn.weight": np.concatenate(
          [flat(a["wq"]), flat(a["wk"]), flat(a["wv"])], axis=1),
      p + "attn.c_attn.bias": np.concatenate(
          [a["bq"].reshape(-1), a["bk"].reshape(-1), a["bv"].reshape(-1)]),
      p + "attn.c_proj.weight": a["wo"].reshape(-1, d), p + "attn.c_proj.bias": a["bo"],
      p + "mlp.c_fc.weight": m["wi"], p + "mlp.c_fc.bias": m["bi"],
      p + "mlp.c_proj.weight": m["wo"], p + "mlp.c_proj.bias": m["bo"],
  }


def _llama_in(get: Callable, i: int, cfg: ModelConfig) -> dict:
  p, d, h = f"layers.{i}.", cfg.d_model, cfg.dim_per_head
  heads = lambda name, n: get(p + name).T.reshape(d, n, h)  # [n*h, d] -> [d, n, h]
  return {
      ("norm1", "scale"): get(p + "input_layernorm.weight"),
      ("norm2", "scale"): get(p + "post_attention_layernorm.weight"),
      ("attn", "wq"): heads("self_attn.q_proj.weight", cfg.num_heads),
      ("attn", "wk"): heads("self_attn.k_proj.weight", cfg.kv_heads),
      ("attn", "wv"): heads("self_attn.v_proj.weight", cfg.kv_heads),
      ("attn", "wo"): get(p + "self_attn.o_proj.weight").T.reshape(cfg.num_heads, h, d),
      ("mlp", "wg"): get(p + "mlp.gate_proj.weight").T,
      ("mlp", "wi"): get(p + "mlp.up_proj.weight").T,
      ("mlp", "wo"): get(p + "mlp.down_proj.weight").T,
  }


def _llama_out(layer: dict, i: int, cfg: ModelConfig) -> dict:
  p, d = f"model.layers.{i}.", cfg.d_model
  a, m = layer["attn"], layer["mlp"]
  return {
      p + "input_layernorm.weight": layer["norm1"]["scale"],
      p + "post_attention_layernorm.weight": layer["norm2"]["scale"],
      p + "self_attn.q_proj.weight": a["wq"].reshape(d, -1).T,
      p + "self_attn.k_proj.weight": a["wk"].reshape(d, -1).T,
      p + "self_attn.v_proj.weight": a["wv"].reshape(d, -1).T,
      p + "self_attn.o_proj.weight": a["wo"].reshape(-1, d).T,
      p + "mlp.gate_proj.weight": m["wg"].T, p + "mlp.up_proj.weight": m["wi"].T,
      p + "mlp.down_proj.weight": m["wo"].T,
  }


class _Stacked:
  """Per-layer arrays seen as one [layers, ...] array, stacked only on read.

  Every converted tensor is a view of the memory-mapped file (splitting an
  axis never copies), so a shard callback reads just its own rows.
  """

  def __init__(self, parts):
    self.parts = parts
    self.shape = (len(parts),) + tuple(parts[0].shape)

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    layers = range(len(self.parts))[idx[0]]
    return np.stack([np.asarray(self.parts[i][idx[1:]]) for i in layers])

  def __array__(self, dtype=None, copy=None):
    del copy  # Always a new array.
    return np.stack(self.parts).astype(dtype or self.parts[0].dtype)


def _ours_from_hf(tensors: dict, cfg: ModelConfig, where: str) -> dict:
  """Our pure-dict params (numpy views) from HF tensors; checks names."""
  gpt = cfg.style == "gpt"
  prefix = "transformer." if gpt else "model."
  # GPT2Model / LlamaModel files have no prefix; ForCausalLM files do.
  names = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in tensors}
  used = set()

  def get(name):
    if name not in names:
      raise ValueError(f"{where}: missing tensor {prefix + name!r}")
    used.add(name)
    return tensors[names[name]]
  layer_fn = _gpt2_in if gpt else _llama_in
  try:
    layers = [layer_fn(get, i, cfg) for i in range(cfg.num_layers)]
  except ValueError as e:  # A reshape that does not fit config.json.
    if str(e).startswith(where):
      raise
    raise ValueError(f"{where}: tensor shapes disagree with config.json "
                     f"({e})") from None
  backbone = {"embed": get("wte.weight" if gpt else "embed_tokens.weight"),
              "final_norm": {"scale": get("ln_f.weight" if gpt else "norm.weight")}}
  if gpt:
    backbone["final_norm"]["bias"] = get("ln_f.bias")
    backbone["pos_embed"] = get("wpe.weight")
  out = {"backbone": backbone}
  if not cfg.tie_embeddings:
    out["lm_head"] = get("lm_head.weight").T
  used.add("lm_head.weight")  # A tied head saved anyway is the embedding.
  extra = sorted(n for n in names if n not in used and not n.endswith(_BUFFERS))
  if extra:
    raise ValueError(f"{where}: unsupported tensor {names[extra[0]]!r} (and "
                     f"{len(extra) - 1} more) for {cfg.style}-style models")
  nest = lambda d: {a: {b: d[(a, b)] for (a2, b) in d if a2 == a} for (a, _) in d}
  if cfg.scan_layers:
    nested = [nest(l) for l in layers]
    backbone["layers"] = jax.tree.map(lambda *xs: _Stacked(xs), *nested)
  else:
    backbone["layers"] = {i: nest(l) for i, l in enumerate(layers)}
  return out


def _place(pure: dict, cfg: ModelConfig, mesh, where: str):
  """(graphdef, nnx.State) holding `pure`, each leaf sharded by its axes."""
  graphdef, abs_state = abstract(LanguageModel, cfg)
  target = nnx.to_pure_dict(abs_state)
  dtype = cfg.weight_dtype
  if jax.tree.structure(pure) != jax.tree.structure(target):
    raise ValueError(f"{where}: tensors do not form a {cfg.style}-style model")

  def put(path, arr, want, sharding):
    if tuple(arr.shape) != tuple(want.shape):
      raise ValueError(f"{where}: {jax.tree_util.keystr(path)} has shape "
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

  def model(self) -> LanguageModel:
    return nnx.merge(self.graphdef, self.params)


def load_pretrained(path: str, *, mesh=None, **overrides) -> Pretrained:
  """Imports a local HF GPT-2/Llama directory as LanguageModel params.

  Args:
    path: a directory with config.json and model.safetensors (or shards).
    mesh: if given, parameters are created directly sharded over it.
    **overrides: ModelConfig fields (param_dtype, dtype, scan_layers, ...).

  Raises:
    ValueError: one line naming the file and what is unsupported or missing.
  """
  hf = read_hf_config(path)
  cfg = model_config_from_hf(hf, os.path.join(path, "config.json"), **overrides)
  tensors, where = read_checkpoint(path)
  graphdef, params = _place(_ours_from_hf(tensors, cfg, where), cfg, mesh, where)
  return Pretrained(cfg, graphdef, params, hf, path)


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
  """HF-named tensors (ForCausalLM layout) from our LanguageModel params."""
  pure = jax.tree.map(_host, nnx.to_pure_dict(params))
  bb, gpt = pure["backbone"], cfg.style == "gpt"
  if cfg.scan_layers:
    layers = [jax.tree.map(lambda x, i=i: x[i], bb["layers"])
              for i in range(cfg.num_layers)]
  else:
    layers = [bb["layers"][i] for i in range(cfg.num_layers)]
  out = {}
  for i, layer in enumerate(layers):
    out.update((_gpt2_out if gpt else _llama_out)(layer, i, cfg))
  if gpt:
    out.update({"transformer.wte.weight": bb["embed"],
                "transformer.wpe.weight": bb["pos_embed"],
                "transformer.ln_f.weight": bb["final_norm"]["scale"],
                "transformer.ln_f.bias": bb["final_norm"]["bias"]})
  else:
    out.update({"model.embed_tokens.weight": bb["embed"],
                "model.norm.weight": bb["final_norm"]["scale"]})
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = pure["lm_head"].T
  return out


def save_pretrained(path: str, cfg: ModelConfig, params, *,
                    hf_config: dict | None = None,
                    tokenizer_dir: str | None = None) -> None:
  """Writes config.json + model.safetensors that `transformers` loads.

  `hf_config` (e.g. `Pretrained.hf_config`) supplies the non-architectural
  keys (token ids, ...); `tokenizer_dir` is where tokenizer files are copied
  from. Only process 0 writes.
  """
  hf = hf_config_from_model(cfg, hf_config)
  tensors = hf_tensors(cfg, params)
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  write_safetensors(os.path.join(path, "model.safetensors"), tensors,
                    {"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  for name in _TOKENIZER_FILES if tokenizer_dir else ():
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(
        os.path.join(path, name)):
      shutil.copyfile(src, os.path.join(path, name))
