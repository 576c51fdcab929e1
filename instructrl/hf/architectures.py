"""config.json <-> ModelConfig for each supported Hugging Face family.

A family is a `model_type` with its class names and the ModelConfig switches
it implies (docs/hf.md has the table). Reading accepts both the
transformers-5 layout (`rope_parameters`, `layer_types`) and the older one
(`rope_theta` + `rope_scaling`, `sliding_window_pattern`,
`rope_local_base_freq`); writing emits both, so either version loads it.
Anything we do not implement is one line naming the file and the field.
"""
from __future__ import annotations

import dataclasses

from instructrl.data.common import DataError
from instructrl.model import ModelConfig


class FamilyError(ValueError):
  """A model config that no Hugging Face family represents (an export's
  mistake, not the file's: the stages report it as one line, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  causal_lm: str  # The *ForCausalLM class (GPT-2: *LMHeadModel).
  seq_cls: str  # The *ForSequenceClassification class (reward models).
  base: str  # The bare backbone class (checkpoints without a head).
  tied_default: bool  # tie_word_embeddings when config.json omits it.


FAMILIES = {f.model_type: f for f in (
    Family("gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2Model", True),
    Family("llama", "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel",
           False),
    Family("mistral", "MistralForCausalLM", "MistralForSequenceClassification",
           "MistralModel", False),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Model",
           False),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "Qwen3Model",
           False),
    Family("gemma2", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
           "Gemma2Model", True),
    Family("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification",
           "Gemma3TextModel", True),
)}
_BY_CLASS = {c: f for f in FAMILIES.values() for c in (f.causal_lm, f.seq_cls, f.base)}
_GEMMA = ("gemma2", "gemma3_text")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def family_of(hf: dict, where: str) -> tuple[Family, bool]:
  """(family, is a *ForSequenceClassification) named by config.json."""
  arch = (hf.get("architectures") or [None])[0]
  if arch is not None:
    if arch not in _BY_CLASS:
      raise DataError(where, f"unsupported architectures[0] {arch!r}; supported: "
                      f"{', '.join(sorted(_BY_CLASS))}")
    fam = _BY_CLASS[arch]
    return fam, arch == fam.seq_cls
  kind = hf.get("model_type")
  if kind not in FAMILIES:
    hint = " (use the text model, gemma3_text)" if kind == "gemma3" else ""
    raise DataError(where, f"unsupported model_type {kind!r}{hint}; supported: "
                    f"{', '.join(FAMILIES)}")
  return FAMILIES[kind], False


def _refuse(where, field, value, what="unsupported"):
  return DataError(where, f"{what} {field}={value!r}")


def _one_rope(p: dict, hf: dict, where: str, field: str) -> dict:
  """ModelConfig rope fields from one rope dict (rope_parameters or rope_scaling)."""
  kind = p.get("rope_type", p.get("type", "default"))
  out = {}
  if p.get("rope_theta") is not None:
    out["rope_theta"] = float(p["rope_theta"])
  if p.get("partial_rotary_factor", 1.0) != 1.0:
    raise _refuse(where, f"{field}.partial_rotary_factor", p["partial_rotary_factor"])
  if kind == "default":
    return out
  if kind not in ("linear", "llama3"):
    raise DataError(where, f"unsupported {field}.rope_type {kind!r} (supported: "
                    "default, linear, llama3)")
  out.update(rope_scaling=kind, rope_factor=float(p["factor"]))
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(p["low_freq_factor"]),
               rope_high_freq_factor=float(p["high_freq_factor"]),
               rope_original_max_len=int(p.get("original_max_position_embeddings")
                                         or hf["max_position_embeddings"]))
  return out


def _rope(hf: dict, fam: Family, where: str) -> dict:
  params = hf.get("rope_parameters") or {}
  theta = {"rope_theta": float(hf.get("rope_theta") or 10000.0)}
  if fam.model_type == "gemma3_text":
    if "full_attention" in params:  # transformers >= 5: one dict per layer type.
      out = dict(theta, **_one_rope(params["full_attention"], hf, where,
                                    "rope_parameters.full_attention"))
      local = _one_rope(params.get("sliding_attention") or {}, hf, where,
                        "rope_parameters.sliding_attention")
      if local.keys() - {"rope_theta"}:
        raise _refuse(where, "rope_parameters.sliding_attention.rope_type", "scaled")
      return dict(out, rope_local_theta=local.get("rope_theta", out["rope_theta"]))
    out = dict(theta, **_one_rope(hf.get("rope_scaling") or params, hf, where,
                                  "rope_scaling"))
    return dict(out, rope_local_theta=float(hf.get("rope_local_base_freq", 10000.0)))
  if any(isinstance(v, dict) for v in params.values()):
    raise _refuse(where, "rope_parameters", "per layer type")
  if hf.get("rope_scaling"):
    return dict(theta, **_one_rope(hf["rope_scaling"], hf, where, "rope_scaling"))
  return dict(theta, **_one_rope(params, hf, where, "rope_parameters"))


def _layer_types(hf: dict, fam: Family, n: int, where: str) -> dict:
  """sliding_window and per-layer types, with each family's defaults."""
  window = hf.get("sliding_window")
  if fam.model_type == "mistral":  # Every layer, when set (Mistral ignores layer_types).
    return {"sliding_window": window} if window else {}
  if fam.model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
    window = None  # What Qwen2Config.__post_init__ does.
  if fam.model_type in _GEMMA:
    window = window or 4096
  types = hf.get("layer_types")
  if types is None:
    if fam.model_type in ("qwen2", "qwen3"):
      first = hf.get("max_window_layers", 28)
      types = ["sliding_attention" if window and i >= first else "full_attention"
               for i in range(n)]
    elif fam.model_type in _GEMMA:
      every = 2 if fam.model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
      types = ["sliding_attention" if (i + 1) % every else "full_attention"
               for i in range(n)]
    else:
      types = ["full_attention"] * n
  bad = [t for t in types if t not in _LAYER_TYPES]
  if bad or len(types) != n:
    raise _refuse(where, "layer_types", bad[0] if bad else f"{len(types)} entries")
  ours = tuple(_LAYER_TYPES[t] for t in types)
  if "sliding" not in ours or not window:
    return {}
  return {"sliding_window": int(window), "layer_types": ours}


def _gpt2_config(hf: dict, where: str) -> dict:
  act = hf.get("activation_function", "gelu_new")
  if act not in _TANH_GELUS:
    raise _refuse(where, "activation_function", act)
  for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx",
                                                   False),
                    ("add_cross_attention", False), ("reorder_and_upcast_attn", False)):
    if bool(hf.get(field, ok)) != ok:
      raise _refuse(where, field, hf[field])
  return dict(vocab_size=hf["vocab_size"], num_layers=hf["n_layer"],
              d_model=hf["n_embd"], num_heads=hf["n_head"],
              d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_len=hf["n_positions"],
              style="gpt", tie_embeddings=hf.get("tie_word_embeddings", True),
              norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _llama_like_config(hf: dict, fam: Family, where: str) -> dict:
  kind = fam.model_type
  gemma = kind in _GEMMA
  act_field = "hidden_activation" if gemma and "hidden_activation" in hf else "hidden_act"
  act = hf.get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
  if act != "silu" and not (gemma and act in _TANH_GELUS):
    raise _refuse(where, act_field, act)
  for field in ("attention_bias", "mlp_bias", "num_local_experts", "num_experts",
                "use_bidirectional_attention"):
    if hf.get(field):
      raise _refuse(where, field, hf[field])
  heads, d = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim") or d // heads
  out = dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
             d_model=d, num_heads=heads,
             num_kv_heads=hf.get("num_key_value_heads") or heads,
             head_dim=None if head_dim * heads == d else head_dim,
             d_ff=hf["intermediate_size"],
             max_len=hf.get("max_position_embeddings", 2048), style="llama",
             tie_embeddings=hf.get("tie_word_embeddings", fam.tied_default),
             norm_eps=hf.get("rms_norm_eps", 1e-6))
  out.update(_rope(hf, fam, where))
  out.update(_layer_types(hf, fam, out["num_layers"], where))
  out["qkv_bias"] = kind == "qwen2"  # Qwen2's q/k/v always carry biases.
  out["qk_norm"] = kind in ("qwen3", "gemma3_text")
  if gemma:
    scalar = hf.get("query_pre_attn_scalar", 256)
    out.update(norm_plus_one=True, embed_scale=True, mlp_act="gelu_tanh",
               post_norms=True, query_scale=None if scalar == head_dim else scalar,
               attn_softcap=hf.get("attn_logit_softcapping",
                                   50.0 if kind == "gemma2" else None),
               final_softcap=hf.get("final_logit_softcapping",
                                    30.0 if kind == "gemma2" else None))
  return out


def model_config_from_hf(hf: dict, where: str = "config.json",
                         **overrides) -> ModelConfig:
  """The ModelConfig equivalent to a HF config.json (dtype etc. in overrides)."""
  fam, _ = family_of(hf, where)
  try:
    d = (_gpt2_config(hf, where) if fam.model_type == "gpt2"
         else _llama_like_config(hf, fam, where))
  except KeyError as e:
    raise DataError(where, f"missing field {e.args[0]!r}") from None
  d.update(overrides)
  try:
    return ModelConfig(**d)
  except (TypeError, ValueError) as e:
    raise DataError(where, f"does not describe a model we build ({e})") from None


# --- Writing ------------------------------------------------------------------


def _needs(cfg: ModelConfig) -> dict:
  """The switches that decide which families can carry `cfg`."""
  sliding = cfg.sliding_layers
  return dict(
      gemma=(cfg.norm_plus_one, cfg.embed_scale, cfg.post_norms,
             cfg.mlp_act == "gelu_tanh"),
      softcap=cfg.attn_softcap is not None or cfg.final_softcap is not None
      or cfg.query_scale is not None,
      all_sliding=all(sliding), any_sliding=any(sliding),
      # Qwen's max_window_layers: sliding layers form a suffix of the stack.
      suffix=list(sliding) == sorted(sliding))


def family_for(cfg: ModelConfig, hint: str | None = None) -> Family:
  """The family that represents `cfg` exactly (`hint`, e.g. the imported
  checkpoint's model_type, when it can)."""
  if cfg.style == "gpt":
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
      raise FamilyError("GPT-2 format needs num_kv_heads == num_heads and "
                        "head_dim == d_model / num_heads")
    return FAMILIES["gpt2"]
  n = _needs(cfg)
  gemma = any(n["gemma"])
  if gemma and not all(n["gemma"]):
    raise FamilyError("model: no Hugging Face family has only some of norm_plus_one, "
                      "embed_scale, post_norms and mlp_act='gelu_tanh'")
  local = cfg.rope_local_theta is not None
  fits = {
      "llama": not (gemma or cfg.qkv_bias or cfg.qk_norm or n["any_sliding"]
                    or n["softcap"] or local),
      "mistral": not (gemma or cfg.qkv_bias or cfg.qk_norm or n["softcap"] or local)
                 and (n["all_sliding"] or not n["any_sliding"]),
      "qwen2": cfg.qkv_bias and not (gemma or cfg.qk_norm or n["softcap"] or local)
               and n["suffix"],
      "qwen3": cfg.qk_norm and not (gemma or cfg.qkv_bias or n["softcap"] or local)
               and n["suffix"],
      "gemma2": gemma and not (cfg.qk_norm or cfg.qkv_bias or local),
      "gemma3_text": gemma and cfg.qk_norm and not cfg.qkv_bias,
  }
  names = [k for k, ok in fits.items() if ok]
  if not names:
    raise FamilyError("model: no supported Hugging Face family represents this "
                      f"model config ({cfg})")
  return FAMILIES[hint if hint in names else names[0]]


def _rope_dict(cfg: ModelConfig, theta: float, scaled: bool = True) -> dict:
  d = {"rope_type": "default", "rope_theta": theta}
  if scaled and cfg.rope_scaling != "none":
    d.update(rope_type=cfg.rope_scaling, factor=cfg.rope_factor)
  if scaled and cfg.rope_scaling == "llama3":
    d.update(low_freq_factor=cfg.rope_low_freq_factor,
             high_freq_factor=cfg.rope_high_freq_factor,
             original_max_position_embeddings=cfg.rope_original_max_len)
  return d


def _llama_like_json(cfg: ModelConfig, fam: Family) -> dict:
  kind, h = fam.model_type, cfg.dim_per_head
  hf = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": h,
        "intermediate_size": cfg.ff_dim, "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps, "attention_bias": False,
        "rope_theta": cfg.rope_theta}
  rope = _rope_dict(cfg, cfg.rope_theta)
  if kind == "gemma3_text":
    local = cfg.rope_local_theta
    hf["rope_parameters"] = {
        "full_attention": rope,
        "sliding_attention": _rope_dict(cfg, local or cfg.rope_theta, local is None)}
    hf["rope_local_base_freq"] = local or cfg.rope_theta
  else:
    hf["rope_parameters"] = rope
  # transformers < 5 read rope_scaling (the type, without the theta).
  hf["rope_scaling"] = ({k: v for k, v in rope.items() if k != "rope_theta"}
                        if cfg.rope_scaling != "none" else None)
  sliding = cfg.sliding_layers
  types = ["sliding_attention" if s else "full_attention" for s in sliding]
  if kind in _GEMMA:
    hf.update(hidden_activation="gelu_pytorch_tanh", layer_types=types,
              sliding_window=cfg.sliding_window or cfg.max_len,
              query_pre_attn_scalar=cfg.query_scale or h,
              attn_logit_softcapping=cfg.attn_softcap,
              final_logit_softcapping=cfg.final_softcap)
  else:
    hf.update(hidden_act="silu", sliding_window=cfg.sliding_window)
  if kind == "llama":
    hf.update(mlp_bias=False)
  if kind in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=any(sliding), layer_types=types,
              max_window_layers=sliding.index(True) if any(sliding) else cfg.num_layers)
  return hf


def hf_config_from_model(cfg: ModelConfig, extra: dict | None = None, *,
                         reward: bool = False) -> dict:
  """A config.json that `transformers` reads as the same architecture.

  `extra` (e.g. the imported config.json) supplies the non-architectural
  keys (token ids, ...) and, as its model_type, the preferred family.
  `reward`: a *ForSequenceClassification with one label (a reward model).
  """
  extra = dict(extra or {})
  fam = family_for(cfg, extra.get("model_type"))
  if fam.model_type == "gpt2":
    hf = {"vocab_size": cfg.vocab_size, "n_positions": cfg.max_len,
          "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
          "n_inner": cfg.ff_dim, "activation_function": "gelu_new",
          "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout_rate,
          "embd_pdrop": cfg.dropout_rate, "attn_pdrop": 0.0,
          "scale_attn_weights": True}
  else:
    hf = _llama_like_json(cfg, fam)
  hf.update(architectures=[fam.seq_cls if reward else fam.causal_lm],
            model_type=fam.model_type)
  # Token ids default to instructrl's vocabularies (PAD 0, EOS 1).
  base = {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}
  dropped = set(hf) | {"architectures", "id2label", "label2id", "num_labels",
                       "problem_type", "layer_types", "rope_parameters",
                       "sliding_window_pattern", "use_sliding_window",
                       "max_window_layers", "instructrl_reward_bias"}
  base.update({k: v for k, v in extra.items() if k not in dropped})
  hf.update(base, tie_word_embeddings=cfg.tie_embeddings, dtype=cfg.param_dtype,
            torch_dtype=cfg.param_dtype)
  if reward:
    hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  hf.pop("transformers_version", None)
  return hf
