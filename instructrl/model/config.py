"""Model configuration: one frozen dataclass, built from an ml_collections dict."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_STYLES = ("gpt", "llama")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and switches of the decoder-only transformer.

  style "gpt": GPT-3 (pre-LayerNorm with biases, learned positions, GELU MLP).
  style "llama": RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, no biases.
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

  def __post_init__(self):
    if self.style not in _STYLES:
      raise ValueError(f"model.style must be one of {_STYLES}, got {self.style!r}")
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
      mlp = 3 * d * f
      norms = 2 * d
    n = self.num_layers * (attn + mlp + norms)
    n += 2 * d if self.style == "gpt" else d  # Final norm.
    if include_embeddings:
      n += self.vocab_size * d
      if self.style == "gpt":
        n += self.max_len * d
      if not self.tie_embeddings:
        n += d * self.vocab_size
    return n
