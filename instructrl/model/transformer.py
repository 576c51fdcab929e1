"""Decoder-only transformer with an LM head and a scalar (reward/value) head.

Two layer layouts, one switch (`scan_layers`): a list of blocks, or one block
whose parameters carry a leading "layers" axis and run under `lax.scan` (one
compiled block, constant compile time in depth). Both are created from the
same per-layer keys, so they hold identical numbers.

The KV cache is a plain pytree threaded through the call, not module state,
so the sampler's decode loop stays a pure `lax.while_loop`:
  cache = {"k", "v": L arrays [B, K, S, H], "valid": bool [B, S]}
and `cache_index` is the slot where the current chunk is written (prompts are
left-padded, so every row writes at the same slot). One buffer per layer lets
each decode step update its rows in place; a stacked array would be sliced
and re-stacked, i.e. copied whole, every token. So calls with a cache run
the layers as a Python loop even with scan_layers (over slices of the
stacked parameters): decoding compiles per layer, training still scans.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instructrl.mesh import constrain
from instructrl.model.config import ModelConfig
from instructrl.model.layers import ACT, Block, Norm, dropout, make_param, pick


def _stack_blocks(cfg: ModelConfig, keys) -> Block:
  """One Block whose every parameter has a leading [num_layers] axis."""
  def make(key):
    return nnx.split(Block(cfg, nnx.Rngs(key)))[1]
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
  states = jax.vmap(make)(keys)
  states = jax.tree.map(
      lambda v: v.replace(logical_axes=("layers",) + tuple(v.logical_axes)),
      states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, states)


def attention_mask(segment_ids, cache_valid=None, cache_index=None, window=None):
  """Boolean attention mask [B, 1, T, S].

  Without a cache: causal, within the same packed segment, never to padding
  (segment 0). With a cache: causal over cache slots and never to an empty or
  padded slot. A query may always see its own slot, so padded queries get a
  well-defined (ignored) output instead of attending to nothing.

  `window` (sliding-window attention): only keys fewer than `window` slots
  back, as transformers' `sliding_window_overlay` (kv > q - window). Slots
  count positions: a segment's tokens are contiguous, and so are a
  left-padded row's in the cache (prompt, then one slot per new token).
  """
  t = segment_ids.shape[1]
  q_slot = jnp.arange(t)
  if cache_valid is None:
    k_slot = q_slot
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    ok = same & (segment_ids[:, None, :] != 0)
  else:
    q_slot = q_slot + cache_index
    k_slot = jnp.arange(cache_valid.shape[1])
    ok = jnp.broadcast_to(cache_valid[:, None, :], (cache_valid.shape[0], t,
                                                    cache_valid.shape[1]))
  causal = k_slot[None, :] <= q_slot[:, None]
  if window is not None:
    causal = causal & (q_slot[:, None] - k_slot[None, :] < window)
  own = k_slot[None, :] == q_slot[:, None]
  return ((ok & causal[None]) | own[None])[:, None]


class Transformer(nnx.Module):
  """Embeddings, blocks and the final norm; returns hidden states [B,T,D]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    self.embed = make_param(rngs.params(), (cfg.vocab_size, d), ("vocab", "embed"), cfg)
    if cfg.style == "gpt":
      self.pos_embed = make_param(rngs.params(), (cfg.max_len, d), ("pos", "embed"),
                                  cfg, 0.01)
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    if cfg.scan_layers:
      self.layers = _stack_blocks(cfg, keys)
    else:
      self.layers = nnx.List([Block(cfg, nnx.Rngs(k)) for k in keys])
    self.final_norm = Norm(cfg)

  def _block_fn(self):
    """A pure per-layer function (optionally rematerialised)."""
    def fn(graphdef, state, x, positions, mask, kv, cache_index, key, sliding):
      return nnx.merge(graphdef, state)(x, positions, mask, kv, cache_index, key,
                                        sliding)
    if self.cfg.remat_policy != "none":
      policy = getattr(jax.checkpoint_policies, self.cfg.remat_policy)
      fn = jax.checkpoint(fn, policy=policy, static_argnums=(0,))
    return fn

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None,
               cache_index=None, dropout_key=None):
    """Returns (hidden [B,T,D], new_cache or None)."""
    cfg = self.cfg
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      if cache is not None:
        raise ValueError("positions are required when decoding with a cache")
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    new_valid = None
    if cache is not None:
      new_valid = jax.lax.dynamic_update_slice(cache["valid"], segment_ids != 0,
                                               (0, cache_index))
      masks = lambda w: attention_mask(segment_ids, new_valid, cache_index, w)
    else:
      masks = lambda w: attention_mask(segment_ids, window=w)
    sliding = cfg.sliding_layers
    mask = masks(None) if not all(sliding) else None
    local_mask = masks(cfg.sliding_window) if any(sliding) else None
    layer_mask = lambda flag: pick(flag, local_mask, mask)

    x = jnp.take(self.embed[...], tokens, axis=0)
    if cfg.embed_scale:  # Gemma: times sqrt(d), rounded to the weights' dtype.
      x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
    x = x.astype(cfg.compute_dtype)
    if cfg.style == "gpt":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
    keys = None if dropout_key is None else jax.random.split(dropout_key,
                                                             cfg.num_layers + 1)
    if keys is not None:
      x = dropout(x, cfg.dropout_rate, keys[-1])
    x = constrain(x, ACT)

    kvs = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    layer_keys = None if keys is None else keys[:-1]
    block = self._block_fn()
    if cfg.scan_layers and kvs is None:
      graphdef, state = nnx.split(self.layers)
      # Mixed layer types (Gemma's local/global) ride along as a scanned
      # per-layer flag; a uniform stack keeps a static one.
      mixed = len(set(sliding)) > 1
      flags = np.asarray(sliding) if mixed else None

      def body(h, xs):
        layer_state, key, flag = xs
        flag = sliding[0] if flag is None else flag
        return block(graphdef, layer_state, h, positions, layer_mask(flag), None,
                     None, key, flag)
      x, _ = jax.lax.scan(body, x, (state, layer_keys, flags))
    else:
      # With a cache, scanned layers are unrolled too: under `lax.scan` the
      # cache is a scanned input and output, so every decode step copies it
      # whole (3.6x slower decoding at 1.3B on an H200, bench/gpu_sweep.py).
      outs = []
      if cfg.scan_layers:
        graphdef, stacked = nnx.split(self.layers)
      for i in range(cfg.num_layers):
        if cfg.scan_layers:
          state = jax.tree.map(lambda a, i=i: a[i], stacked)
        else:
          graphdef, state = nnx.split(self.layers[i])
        kv = None if kvs is None else {"k": kvs["k"][i], "v": kvs["v"][i]}
        key = None if layer_keys is None else layer_keys[i]
        x, new_kv = block(graphdef, state, x, positions, layer_mask(sliding[i]), kv,
                          cache_index, key, sliding[i])
        outs.append(new_kv)
      new_kvs = None if kvs is None else {
          "k": tuple(o["k"] for o in outs), "v": tuple(o["v"] for o in outs)}
    x = self.final_norm(x)
    new_cache = None
    if cache is not None:
      new_cache = {"k": new_kvs["k"], "v": new_kvs["v"], "valid": new_valid}
    return x, new_cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
  """An empty KV cache for `length` slots."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
  kv = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return {"k": kv(), "v": kv(), "valid": jnp.zeros((batch, length), bool)}


class LanguageModel(nnx.Module):
  """Transformer + LM head (tied to the token embedding, or its own matrix)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Transformer(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = make_param(rngs.params(), (cfg.d_model, cfg.vocab_size),
                                ("embed", "vocab"), cfg)

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None,
               cache_index=None, dropout_key=None):
    """Returns (logits [B,T,V] in fp32, new_cache)."""
    h, new_cache = self.backbone(tokens, positions, segment_ids, cache,
                                 cache_index, dropout_key)
    if self.cfg.tie_embeddings:
      w = self.backbone.embed[...].astype(h.dtype)
      logits = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
    else:
      w = self.lm_head[...].astype(h.dtype)
      logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    if self.cfg.final_softcap is not None:  # Gemma 2.
      cap = self.cfg.final_softcap
      logits = jnp.tanh(logits / cap) * cap
    return constrain(logits, ("act_batch", "act_len", "act_vocab")), new_cache


class ScalarModel(nnx.Module):
  """Transformer + a scalar head: a value per position, or a reward per row.

  The reward model and the PPO value function share this class; the value
  function is initialised from the reward model's weights (the paper, 3.5).
  `bias` is the scalar the paper sets so that demonstrations score 0.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Transformer(cfg, rngs)
    self.head = make_param(rngs.params(), (cfg.d_model,), ("embed",), cfg, 0.0)
    self.bias = make_param(None, (), (), cfg, None, 0.0)

  def __call__(self, tokens, positions=None, segment_ids=None, dropout_key=None):
    """Returns values [B,T] in fp32: the head applied at every position."""
    h, _ = self.backbone(tokens, positions, segment_ids, dropout_key=dropout_key)
    v = jnp.einsum("btd,d->bt", h, self.head[...].astype(h.dtype),
                   preferred_element_type=jnp.float32)
    return v + self.bias[...].astype(jnp.float32)

  def reward(self, tokens, positions=None, segment_ids=None, dropout_key=None):
    """Returns [B]: the head read at the last real token of each row."""
    values = self(tokens, positions, segment_ids, dropout_key)
    if segment_ids is None:
      return values[:, -1]
    return last_token_values(values, segment_ids != 0)


def last_token_values(values, mask):
  """values[b, last t with mask[b, t]]; rows with no real token give 0."""
  t = jnp.arange(mask.shape[1])
  last = jnp.max(jnp.where(mask, t, -1), axis=1)
  picked = jnp.take_along_axis(values, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
  return jnp.where(last >= 0, picked, 0.0)
