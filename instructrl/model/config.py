"""Model configuration: one frozen dataclass, built from an ml_collections dict."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_STYLES = ("gpt", "llama")
_LAYER_TYPES = ("full", "sliding")
_ROPE_SCALINGS = ("none", "linear", "llama3")
_MLP_ACTS = ("silu", "gelu_tanh")


_FAMILY_FIELDS = ("qkv_bias", "qk_norm", "norm_plus_one", "embed_scale", "mlp_act",
                  "post_norms", "attn_softcap", "final_softcap", "query_scale",
                  "sliding_window", "layer_types", "rope_scaling",
                  "rope_local_theta")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and switches of the decoder-only transformer.

  style "gpt": GPT-3 (pre-LayerNorm with biases, learned positions, GELU MLP).
  style "llama": RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, no biases.
  The switches below the line widen "llama" to the open-weight families
  (Llama 3, Mistral, Qwen2/3, Gemma 2/3; see docs/hf.md); their defaults
  leave the model, its parameters and its numbers exactly as without them.
  """
  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int | None = None  # None = num_heads (plain multi-head).
  head_dim: int | None = None  # None = d_model // num_heads.
  d_ff: int | None = None  # None = 4 * d_model (gpt) or 8/3 * d_model (llama).
  max_len: int = 128
  style: str = "gpt"
  tie_embeddings: bool = True
  dropout_rate: float = 0.0  # Residual dropout (the paper's SFT used 0.2).
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  dtype: str = "float32"  # Compute dtype.
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"  # "none", or a name in jax.checkpoint_policies.
  attention_impl: str | None = None  # None lets XLA pick; "cudnn" forces it.
  # --- Open-weight families (style "llama" only). --------------------------
  qkv_bias: bool = False  # Qwen2: biases on q, k and v (not on the output).
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k.
  norm_plus_one: bool = False  # Gemma: RMSNorm scale is (1 + w), w init 0.
  embed_scale: bool = False  # Gemma: token embeddings times sqrt(d_model).
  mlp_act: str = "silu"  # Gate activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU).
  post_norms: bool = False  # Gemma 2/3: also norm each sublayer's output.
  attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(s / cap).
  final_softcap: float | None = None  # Gemma 2: the same on the LM logits.
  query_scale: float | None = None  # Scores times query_scale**-0.5 (None: head_dim).
  sliding_window: int | None = None  # Keys within this many slots of the query.
  layer_types: tuple[str, ...] = ()  # "full"/"sliding" per layer; () = all
                                     # sliding if sliding_window, else all full.
  rope_scaling: str = "none"  # "none", "linear" (Gemma 3), "llama3" (Llama 3.1+).
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only.
  rope_high_freq_factor: float = 4.0  # llama3 only.
  rope_original_max_len: int = 8192  # llama3 only.
  rope_local_theta: float | None = None  # Gemma 3: sliding layers' theta (unscaled).

  def __post_init__(self):
    if self.style not in _STYLES:
      raise ValueError(f"model.style must be one of {_STYLES}, got {self.style!r}")
    # A list (from a config file) must still hash: the config is static.
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    self._check_families()
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"model.{name} must be one of {sorted(_DTYPES)}, got "
                         f"{getattr(self, name)!r}")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.kv_heads}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must divide by "
                       f"model.num_heads={self.num_heads} (or set model.head_dim)")
    if self.remat_policy != "none":
      import jax  # pylint: disable=g-import-not-at-top
      if not hasattr(jax.checkpoint_policies, self.remat_policy):
        raise ValueError(f"model.remat_policy={self.remat_policy!r} is not a name in "
                         "jax.checkpoint_policies (or 'none')")

  def _check_families(self):
    for name, allowed in (("rope_scaling", _ROPE_SCALINGS), ("mlp_act", _MLP_ACTS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name} must be one of {allowed}, got "
                         f"{getattr(self, name)!r}")
    if self.layer_types:
      if len(self.layer_types) != self.num_layers or not set(
          self.layer_types) <= set(_LAYER_TYPES):
        raise ValueError(f"model.layer_types must be {self.num_layers} of "
                         f"{_LAYER_TYPES}, got {self.layer_types!r}")
      if "sliding" in self.layer_types and not self.sliding_window:
        raise ValueError("model.layer_types has sliding layers but "
                         "model.sliding_window is not set")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"model.sliding_window must be >= 1, got {self.sliding_window}")
    if self.style == "gpt":
      on = [f.name for f in dataclasses.fields(self)
            if f.name in _FAMILY_FIELDS and getattr(self, f.name) != f.default]
      if on:
        raise ValueError(f"model.{on[0]} needs model.style='llama'")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend within the sliding window only?"""
    if self.layer_types:
      return tuple(t == "sliding" for t in self.layer_types)
    return (self.sliding_window is not None,) * self.num_layers

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.style == "gpt":
      return 4 * self.d_model
    return 256 * ((8 * self.d_model // 3 + 255) // 256)  # Llama's rounding.

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a (possibly ml_collections) mapping; unknown keys are errors."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model config key(s): {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(names))}")
    return cls(**d)

  def num_params(self, include_embeddings: bool = True) -> int:
    """Parameter count (matches the module; tested)."""
    d, h, f = self.d_model, self.dim_per_head, self.ff_dim
    attn = d * h * (self.num_heads * 2 + self.kv_heads * 2)
    if self.style == "gpt":
      attn += h * (self.num_heads + 2 * self.kv_heads) + d  # Biases.
      mlp = 2 * d * f + f + d
      norms = 4 * d
    else:
      attn += h * (self.num_heads + 2 * self.kv_heads) if self.qkv_bias else 0
      attn += 2 * h if self.qk_norm else 0
      mlp = 3 * d * f
      norms = 4 * d if self.post_norms else 2 * d
    n = self.num_layers * (attn + mlp + norms)
    n += 2 * d if self.style == "gpt" else d  # Final norm.
    if include_embeddings:
      n += self.vocab_size * d
      if self.style == "gpt":
        n += self.max_len * d
      if not self.tie_embeddings:
        n += d * self.vocab_size
    return n
