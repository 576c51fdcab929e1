"""Transformer building blocks (Flax NNX).

Every parameter is an `nnx.Param` with a `logical_axes` tuple; `instructrl.mesh`
turns those names into shardings. We keep the names in our own metadata key
rather than Flax's eager-sharding annotations so that creating a module never
needs a mesh (tests, eval_shape and single-device use stay plain).

Weights are stored in `param_dtype` and cast to the compute `dtype` at use, so
bf16 compute with fp32 master weights works. Norms and softmax run in fp32.
"""
from __future__ import annotations

import math

import einops
import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from instructrl.mesh import constrain
from instructrl.model.config import ModelConfig

ACT = ("act_batch", "act_len", "act_embed")


def make_param(key, shape, axes, cfg: ModelConfig, std: float | None = 0.02,
               fill: float = 0.0) -> nnx.Param:
  """A parameter with logical axes; normal(std) init, or constant `fill`."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  dtype = cfg.weight_dtype
  if std is None:
    value = jnp.full(shape, fill, dtype)
  else:
    value = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


def dropout(x, rate: float, key):
  """Inverted dropout; identity when `key` is None (evaluation) or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Norm(nnx.Module):
  """LayerNorm (gpt) or RMSNorm (llama), computed in fp32.

  `dim` defaults to d_model (the q/k norms of Qwen3 and Gemma 3 use head_dim).
  With `norm_plus_one` (Gemma) the scale is (1 + w) and w starts at 0.
  """

  def __init__(self, cfg: ModelConfig, dim: int | None = None):
    self.cfg = cfg
    dim = dim or cfg.d_model
    self.scale = make_param(None, (dim,), ("norm",), cfg, None,
                            0.0 if cfg.norm_plus_one else 1.0)
    if cfg.style == "gpt":
      self.bias = make_param(None, (dim,), ("norm",), cfg, None, 0.0)

  def __call__(self, x):
    cfg = self.cfg
    x32 = x.astype(jnp.float32)
    if cfg.style == "gpt":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    scale = self.scale[...].astype(jnp.float32)
    if cfg.norm_plus_one:
      scale = 1.0 + scale
    y = x32 * jax.lax.rsqrt(var + cfg.norm_eps) * scale
    if cfg.style == "gpt":
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(cfg.compute_dtype)


def pick(flag, if_true, if_false):
  """`flag ? a : b` for a Python bool (static) or a traced one (scanned layers)."""
  if isinstance(flag, (bool, np.bool_)):
    return if_true if flag else if_false
  return jnp.where(flag, if_true, if_false)


def rope_frequencies(cfg: ModelConfig, local: bool = False):
  """RoPE inverse frequencies [head_dim/2] (fp32) of a global or local layer.

  "linear" divides them by the factor (position interpolation); "llama3"
  divides only the long wavelengths, blending in between (Llama 3.1's
  `apply_scaling`; transformers' `_compute_llama3_parameters`). Gemma 3's
  sliding layers use their own theta, unscaled (`rope_local_theta`).
  """
  half = cfg.dim_per_head // 2
  own = local and cfg.rope_local_theta is not None
  theta = cfg.rope_local_theta if own else cfg.rope_theta
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if own or cfg.rope_scaling == "none":
    return freq
  factor = cfg.rope_factor
  if cfg.rope_scaling == "linear":
    return freq / factor
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old = cfg.rope_original_max_len
  wavelen = 2 * math.pi / freq
  scaled = jnp.where(wavelen > old / low, freq / factor, freq)
  smooth = (old / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old / high) & (wavelen <= old / low)
  return jnp.where(medium, blended, scaled)


def rope(x, positions, freq):
  """Rotary embedding, rotate-half layout. x: [B,T,N,H], positions: [B,T]."""
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B,T,H/2]
  cos = jnp.cos(angle)[:, :, None, :]
  sin = jnp.sin(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head / grouped-query attention with an optional KV cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2's residual scaling.
    self.wq = make_param(rngs.params(), (d, n, h), ("embed", "heads", "head_dim"), cfg)
    self.wk = make_param(rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
    self.wv = make_param(rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
    self.wo = make_param(rngs.params(), (n, h, d), ("heads", "head_dim", "embed"), cfg,
                         out_std)
    if cfg.style == "gpt" or cfg.qkv_bias:
      self.bq = make_param(None, (n, h), ("heads", "head_dim"), cfg, None)
      self.bk = make_param(None, (k, h), ("kv_heads", "head_dim"), cfg, None)
      self.bv = make_param(None, (k, h), ("kv_heads", "head_dim"), cfg, None)
    if cfg.style == "gpt":
      self.bo = make_param(None, (d,), ("embed",), cfg, None)
    if cfg.qk_norm:
      self.q_norm = Norm(cfg, h)
      self.k_norm = Norm(cfg, h)

  def _proj(self, x, w, b):
    y = jnp.einsum("btd,dnh->btnh", x, w[...].astype(x.dtype))
    if b is not None:
      y = y + b[...].astype(x.dtype)
    return y

  def _attend(self, q, k, v, mask):
    """Attention with keys and values heads-major [B, K, S, H]; scores fp32.

    Query heads go in groups that share one KV head (GQA). Used with a KV
    cache, and whenever scores are soft-capped (which the fused
    dot_product_attention cannot do).
    """
    cfg = self.cfg
    qg = einops.rearrange(q, "b t (k g) h -> b t k g h", k=cfg.kv_heads)
    s = jnp.einsum("btkgh,bksh->bkgts", qg, k.astype(q.dtype),
                   preferred_element_type=jnp.float32)
    if cfg.query_scale is None:
      s = s / jnp.sqrt(jnp.float32(q.shape[-1]))
    else:
      s = s * jnp.float32(cfg.query_scale ** -0.5)
    if cfg.attn_softcap is not None:  # Gemma 2: before the mask, as theirs.
      s = jnp.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", p, v.astype(q.dtype))
    return einops.rearrange(out, "b t k g h -> b t (k g) h")

  def _cached_attention(self, q, k, v, mask, kv, cache_index):
    """Attention over the KV cache, kept heads-major: [B, K, S, H].

    Only the T new rows are written (in place inside the decode loop), and
    the scores read the cache in the layout it is stored in: the
    dot_product_attention path would transpose the whole cache to [B,S,K,H]
    (a copy per token), which made decoding memory-bound on the copies.
    """
    put = lambda c, x: jax.lax.dynamic_update_slice(
        c, einops.rearrange(x, "b t k h -> b k t h").astype(c.dtype),
        (0, 0, cache_index, 0))
    ck, cv = put(kv["k"], k), put(kv["v"], v)
    return self._attend(q, ck, cv, mask), {"k": ck, "v": cv}

  def __call__(self, x, positions, mask, kv=None, cache_index=None, sliding=False):
    """x: [B,T,D]; mask: bool [B,1,T,S]; kv: {"k","v"} [B,K,S,H] or None.

    `sliding` (a bool, traced under scan) picks the local RoPE theta.
    """
    cfg = self.cfg
    gpt = cfg.style == "gpt"
    biased = gpt or cfg.qkv_bias
    q = self._proj(x, self.wq, self.bq if biased else None)
    k = self._proj(x, self.wk, self.bk if biased else None)
    v = self._proj(x, self.wv, self.bv if biased else None)
    if cfg.qk_norm:  # Per head, before RoPE (Qwen3, Gemma 3).
      q, k = self.q_norm(q), self.k_norm(k)
    if not gpt:
      freq = rope_frequencies(cfg)
      if cfg.rope_local_theta is not None:
        freq = pick(sliding, rope_frequencies(cfg, local=True), freq)
      q, k = rope(q, positions, freq), rope(k, positions, freq)
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))
    if kv is not None:
      out, new_kv = self._cached_attention(q, k, v, mask, kv, cache_index)
    else:
      new_kv = None
      k = constrain(k, ("act_batch", "act_len", "act_kv_heads", None))
      v = constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
      if cfg.attn_softcap is not None:
        heads_major = lambda a: einops.rearrange(a, "b s k h -> b k s h")
        out = self._attend(q, heads_major(k), heads_major(v), mask)
      else:
        scale = None if cfg.query_scale is None else cfg.query_scale ** -0.5
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                           implementation=cfg.attention_impl)
    out = constrain(out, ("act_batch", "act_len", "act_heads", None))
    y = jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(out.dtype))
    if gpt:
      y = y + self.bo[...].astype(y.dtype)
    return y, new_kv


class Mlp(nnx.Module):
  """GELU MLP (gpt), or a gated one (llama): SwiGLU, or GeGLU for Gemma."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.d_model, cfg.ff_dim
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.wi = make_param(rngs.params(), (d, f), ("embed", "mlp"), cfg)
    self.wo = make_param(rngs.params(), (f, d), ("mlp", "embed"), cfg, out_std)
    if cfg.style == "gpt":
      self.bi = make_param(None, (f,), ("mlp",), cfg, None)
      self.bo = make_param(None, (d,), ("embed",), cfg, None)
    else:
      self.wg = make_param(rngs.params(), (d, f), ("embed", "mlp"), cfg)

  def __call__(self, x):
    dt = x.dtype
    h = jnp.einsum("btd,df->btf", x, self.wi[...].astype(dt))
    if self.cfg.style == "gpt":
      h = jax.nn.gelu(h + self.bi[...].astype(dt), approximate=True)
    else:
      g = jnp.einsum("btd,df->btf", x, self.wg[...].astype(dt))
      if self.cfg.mlp_act == "gelu_tanh":  # == torch's gelu(approximate="tanh").
        g = jax.nn.gelu(g, approximate=True)
      else:
        g = jax.nn.silu(g)
      h = g * h
    h = constrain(h, ("act_batch", "act_len", "act_mlp"))
    y = jnp.einsum("btf,fd->btd", h, self.wo[...].astype(dt))
    if self.cfg.style == "gpt":
      y = y + self.bo[...].astype(dt)
    return y


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

  With `post_norms` (Gemma 2/3) each sublayer's output is normed as well
  before it joins the residual: x + norm(attn(norm(x))).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.norm1 = Norm(cfg)
    self.attn = Attention(cfg, rngs)
    self.norm2 = Norm(cfg)
    self.mlp = Mlp(cfg, rngs)
    if cfg.post_norms:
      self.post_attn_norm = Norm(cfg)
      self.post_mlp_norm = Norm(cfg)

  def __call__(self, x, positions, mask, kv=None, cache_index=None,
               dropout_key=None, sliding=False):
    rate = self.cfg.dropout_rate
    k1 = k2 = None
    if dropout_key is not None:
      k1, k2 = jax.random.split(dropout_key)
    h, new_kv = self.attn(self.norm1(x), positions, mask, kv, cache_index, sliding)
    if self.cfg.post_norms:
      h = self.post_attn_norm(h)
    x = x + dropout(h, rate, k1)
    m = self.mlp(self.norm2(x))
    if self.cfg.post_norms:
      m = self.post_mlp_norm(m)
    x = x + dropout(m, rate, k2)
    return constrain(x, ACT), new_kv
