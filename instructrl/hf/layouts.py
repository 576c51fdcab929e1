"""Tensor layouts: Hugging Face names and shapes <-> our parameter tree.

  GPT-2  Conv1D weights are already [in, out]; c_attn packs q, k, v along
         `out`; activation gelu_new == jax.nn.gelu(approximate=True).
  Others nn.Linear weights are [out, in] (transposed here); q/k rows are
         already in the rotate-half RoPE layout, so no permutation is needed.
         Gemma's post_attention_layernorm is the norm AFTER attention (our
         post_attn_norm); Llama's, of the same name, is the one before the
         MLP (our norm2; Gemma calls that pre_feedforward_layernorm).
One layout serves every llama-like family: the config's switches (qkv_bias,
qk_norm, post_norms) decide which tensors exist. A reward model is the same
backbone with `score.weight` [1, d] in place of the LM head.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from instructrl.data.common import DataError
from instructrl.model import ModelConfig

# Non-parameter buffers that old checkpoints carry; they hold no weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _gpt2_in(get: Callable, i: int, cfg: ModelConfig) -> dict:
  p, n, h = f"h.{i}.", cfg.num_heads, cfg.dim_per_head
  d, f = cfg.d_model, cfg.ff_dim
  w, b = get(p + "attn.c_attn.weight", d, 3 * d), get(p + "attn.c_attn.bias", 3 * d)
  return {
      ("norm1", "scale"): get(p + "ln_1.weight", d),
      ("norm1", "bias"): get(p + "ln_1.bias", d),
      ("norm2", "scale"): get(p + "ln_2.weight", d),
      ("norm2", "bias"): get(p + "ln_2.bias", d),
      ("attn", "wq"): w[:, :d].reshape(d, n, h), ("attn", "bq"): b[:d].reshape(n, h),
      ("attn", "wk"): w[:, d:2 * d].reshape(d, n, h),
      ("attn", "bk"): b[d:2 * d].reshape(n, h),
      ("attn", "wv"): w[:, 2 * d:].reshape(d, n, h), ("attn", "bv"): b[2 * d:].reshape(n, h),
      ("attn", "wo"): get(p + "attn.c_proj.weight", d, d).reshape(n, h, d),
      ("attn", "bo"): get(p + "attn.c_proj.bias", d),
      ("mlp", "wi"): get(p + "mlp.c_fc.weight", d, f),
      ("mlp", "bi"): get(p + "mlp.c_fc.bias", f),
      ("mlp", "wo"): get(p + "mlp.c_proj.weight", f, d),
      ("mlp", "bo"): get(p + "mlp.c_proj.bias", d),
  }


def _gpt2_out(layer: dict, i: int, cfg: ModelConfig) -> dict:
  p, d = f"h.{i}.", cfg.d_model
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


def _norm_names(cfg: ModelConfig) -> dict:
  """Our per-layer norm -> its HF name (the two layouts of the block)."""
  if cfg.post_norms:
    return {"norm1": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
            "norm2": "pre_feedforward_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm"}
  return {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}


def _llama_in(get: Callable, i: int, cfg: ModelConfig) -> dict:
  p, d, h, f = f"layers.{i}.", cfg.d_model, cfg.dim_per_head, cfg.ff_dim
  n, k = cfg.num_heads, cfg.kv_heads
  # [m*h, d] -> [d, m, h].
  heads = lambda name, m: get(p + name, m * h, d).T.reshape(d, m, h)
  out = {(ours, "scale"): get(f"{p}{theirs}.weight", d)
         for ours, theirs in _norm_names(cfg).items()}
  out.update({
      ("attn", "wq"): heads("self_attn.q_proj.weight", n),
      ("attn", "wk"): heads("self_attn.k_proj.weight", k),
      ("attn", "wv"): heads("self_attn.v_proj.weight", k),
      ("attn", "wo"): get(p + "self_attn.o_proj.weight", d, n * h).T.reshape(n, h, d),
      ("mlp", "wg"): get(p + "mlp.gate_proj.weight", f, d).T,
      ("mlp", "wi"): get(p + "mlp.up_proj.weight", f, d).T,
      ("mlp", "wo"): get(p + "mlp.down_proj.weight", d, f).T,
  })
  if cfg.qkv_bias:
    for x, m in (("q", n), ("k", k), ("v", k)):
      out[("attn", "b" + x)] = get(f"{p}self_attn.{x}_proj.bias", m * h).reshape(m, h)
  if cfg.qk_norm:
    out[("attn", "q_norm")] = get(p + "self_attn.q_norm.weight", h)
    out[("attn", "k_norm")] = get(p + "self_attn.k_norm.weight", h)
  return out


def _llama_out(layer: dict, i: int, cfg: ModelConfig) -> dict:
  p, d = f"layers.{i}.", cfg.d_model
  a, m = layer["attn"], layer["mlp"]
  out = {f"{p}{theirs}.weight": layer[ours]["scale"]
         for ours, theirs in _norm_names(cfg).items()}
  out.update({
      p + "self_attn.q_proj.weight": a["wq"].reshape(d, -1).T,
      p + "self_attn.k_proj.weight": a["wk"].reshape(d, -1).T,
      p + "self_attn.v_proj.weight": a["wv"].reshape(d, -1).T,
      p + "self_attn.o_proj.weight": a["wo"].reshape(-1, d).T,
      p + "mlp.gate_proj.weight": m["wg"].T, p + "mlp.up_proj.weight": m["wi"].T,
      p + "mlp.down_proj.weight": m["wo"].T,
  })
  if cfg.qkv_bias:
    for x in "qkv":
      out[f"{p}self_attn.{x}_proj.bias"] = a["b" + x].reshape(-1)
  if cfg.qk_norm:
    out[p + "self_attn.q_norm.weight"] = a["q_norm"]["scale"]
    out[p + "self_attn.k_norm.weight"] = a["k_norm"]["scale"]
  return out


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


def _nest(flat: dict) -> dict:
  """{(module, leaf): x} -> {module: {leaf: x}}; qk norms -> {"scale": x}."""
  out = {}
  for (a, b), x in flat.items():
    out.setdefault(a, {})[b] = {"scale": x} if b.endswith("_norm") else x
  return out


def ours_from_hf(tensors: dict, cfg: ModelConfig, where: str,
                 reward: bool = False) -> dict:
  """Our pure-dict params (numpy views) from HF tensors; checks every name.

  reward: a *ForSequenceClassification file -> ScalarModel params (the
  bias, which that format lacks, is left to the caller).
  """
  gpt = cfg.style == "gpt"
  prefix = "transformer." if gpt else "model."
  # Bare *Model files have no prefix; *ForCausalLM and classifier files do.
  names = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in tensors}
  used = set()

  def get(name, *shape):
    if name not in names:
      raise DataError(where, f"missing tensor {prefix + name!r}")
    used.add(name)
    x = tensors[names[name]]
    if shape and tuple(x.shape) != shape:
      raise DataError(where, f"tensor {names[name]!r} has shape {tuple(x.shape)}, "
                      f"config.json implies {shape}")
    return x
  layer_fn = _gpt2_in if gpt else _llama_in
  layers = [layer_fn(get, i, cfg) for i in range(cfg.num_layers)]
  d, v = cfg.d_model, cfg.vocab_size
  backbone = {"embed": get("wte.weight" if gpt else "embed_tokens.weight", v, d),
              "final_norm": {"scale": get("ln_f.weight" if gpt else "norm.weight", d)}}
  if gpt:
    backbone["final_norm"]["bias"] = get("ln_f.bias", d)
    backbone["pos_embed"] = get("wpe.weight", cfg.max_len, d)
  out = {"backbone": backbone}
  if reward:
    score = get("score.weight")
    if score.ndim != 2 or score.shape[0] != 1:
      raise DataError(where, f"score.weight has shape {tuple(score.shape)}; a reward "
                      "model has one label (num_labels=1)")
    get("score.weight", 1, d)
    out["head"] = score[0]
  elif not cfg.tie_embeddings:
    out["lm_head"] = get("lm_head.weight", v, d).T
  used.add("lm_head.weight")  # A tied head saved anyway is the embedding.
  extra = sorted(n for n in names if n not in used and not n.endswith(_BUFFERS))
  if extra:
    raise DataError(where, f"unexpected tensor {names[extra[0]]!r} (and "
                    f"{len(extra) - 1} more) for this config.json")
  if cfg.scan_layers:
    nested = [_nest(l) for l in layers]
    backbone["layers"] = jax.tree.map(lambda *xs: _Stacked(xs), *nested)
  else:
    backbone["layers"] = {i: _nest(l) for i, l in enumerate(layers)}
  return out


def hf_from_ours(cfg: ModelConfig, pure: dict, reward: bool = False) -> dict:
  """HF-named tensors from our host (numpy) params: LanguageModel ->
  *ForCausalLM, or ScalarModel -> *ForSequenceClassification (its scalar
  bias is the caller's: see convert.save_reward_model)."""
  bb, gpt = pure["backbone"], cfg.style == "gpt"
  prefix = "transformer." if gpt else "model."
  if cfg.scan_layers:
    layers = [jax.tree.map(lambda x, i=i: x[i], bb["layers"])
              for i in range(cfg.num_layers)]
  else:
    layers = [bb["layers"][i] for i in range(cfg.num_layers)]
  out = {}
  for i, layer in enumerate(layers):
    out.update((_gpt2_out if gpt else _llama_out)(layer, i, cfg))
  if gpt:
    out.update({"wte.weight": bb["embed"], "wpe.weight": bb["pos_embed"],
                "ln_f.weight": bb["final_norm"]["scale"],
                "ln_f.bias": bb["final_norm"]["bias"]})
  else:
    out.update({"embed_tokens.weight": bb["embed"],
                "norm.weight": bb["final_norm"]["scale"]})
  out = {prefix + k: v for k, v in out.items()}
  if reward:
    out["score.weight"] = pure["head"][None, :]
  elif not cfg.tie_embeddings:
    out["lm_head.weight"] = pure["lm_head"].T
  return out
