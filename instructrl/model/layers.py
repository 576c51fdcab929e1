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
  """LayerNorm (gpt) or RMSNorm (llama), computed in fp32."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    self.scale = make_param(None, (cfg.d_model,), ("norm",), cfg, None, 1.0)
    if cfg.style == "gpt":
      self.bias = make_param(None, (cfg.d_model,), ("norm",), cfg, None, 0.0)

  def __call__(self, x):
    cfg = self.cfg
    x32 = x.astype(jnp.float32)
    if cfg.style == "gpt":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + cfg.norm_eps) * self.scale[...].astype(jnp.float32)
    if cfg.style == "gpt":
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(cfg.compute_dtype)


def rope(x, positions, theta: float):
  """Rotary embedding, rotate-half layout. x: [B,T,N,H], positions: [B,T]."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
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
    if cfg.style == "gpt":
      self.bq = make_param(None, (n, h), ("heads", "head_dim"), cfg, None)
      self.bk = make_param(None, (k, h), ("kv_heads", "head_dim"), cfg, None)
      self.bv = make_param(None, (k, h), ("kv_heads", "head_dim"), cfg, None)
      self.bo = make_param(None, (d,), ("embed",), cfg, None)

  def _proj(self, x, w, b):
    y = jnp.einsum("btd,dnh->btnh", x, w[...].astype(x.dtype))
    if b is not None:
      y = y + b[...].astype(x.dtype)
    return y

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
    h = q.shape[-1]
    # Query heads in groups that share one KV head (GQA).
    qg = einops.rearrange(q, "b t (k g) h -> b t k g h", k=self.cfg.kv_heads)
    s = jnp.einsum("btkgh,bksh->bkgts", qg, ck.astype(q.dtype),
                   preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(h))
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", p, cv.astype(q.dtype))
    return einops.rearrange(out, "b t k g h -> b t (k g) h"), {"k": ck, "v": cv}

  def __call__(self, x, positions, mask, kv=None, cache_index=None):
    """x: [B,T,D]; mask: bool [B,1,T,S]; kv: {"k","v"} [B,K,S,H] or None."""
    cfg = self.cfg
    gpt = cfg.style == "gpt"
    q = self._proj(x, self.wq, self.bq if gpt else None)
    k = self._proj(x, self.wk, self.bk if gpt else None)
    v = self._proj(x, self.wv, self.bv if gpt else None)
    if not gpt:
      q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))
    if kv is not None:
      out, new_kv = self._cached_attention(q, k, v, mask, kv, cache_index)
    else:
      new_kv = None
      k = constrain(k, ("act_batch", "act_len", "act_kv_heads", None))
      v = constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
      out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                         implementation=cfg.attention_impl)
    out = constrain(out, ("act_batch", "act_len", "act_heads", None))
    y = jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(out.dtype))
    if gpt:
      y = y + self.bo[...].astype(y.dtype)
    return y, new_kv


class Mlp(nnx.Module):
  """GELU MLP (gpt) or SwiGLU (llama)."""

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
      h = jax.nn.silu(g) * h
    h = constrain(h, ("act_batch", "act_len", "act_mlp"))
    y = jnp.einsum("btf,fd->btd", h, self.wo[...].astype(dt))
    if self.cfg.style == "gpt":
      y = y + self.bo[...].astype(dt)
    return y


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.norm1 = Norm(cfg)
    self.attn = Attention(cfg, rngs)
    self.norm2 = Norm(cfg)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x, positions, mask, kv=None, cache_index=None,
               dropout_key=None):
    rate = self.cfg.dropout_rate
    k1 = k2 = None
    if dropout_key is not None:
      k1, k2 = jax.random.split(dropout_key)
    h, new_kv = self.attn(self.norm1(x), positions, mask, kv, cache_index)
    x = x + dropout(h, rate, k1)
    x = x + dropout(self.mlp(self.norm2(x)), rate, k2)
    return constrain(x, ACT), new_kv
