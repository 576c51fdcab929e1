"""Compiled autoregressive sampling: prefill, then a `lax.while_loop` decode.

One XLA program per (batch, prompt length, max new tokens): the prompt is run
once to fill a preallocated KV cache, then each loop iteration feeds one token
per row. Nothing per token happens in Python.

Prompts are LEFT-padded, so every row writes its next token into the same
cache slot; each row's positions count only its real tokens, so a short
prompt sees the same positions as it would alone. A row stops after any of
the vocabulary's EOS ids (Llama 3 has two; its later tokens are PAD with
mask 0) and the loop exits early when all rows have stopped. The ids come
from the caller's vocabulary: the sampler knows none of its own.

Returned log-probabilities: `logp` under the distribution actually sampled
from (temperature, top-k, top-p applied) and `logp_raw` under the raw model at
temperature 1 -- the latter is what PPO uses as the old policy's log-probs.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from instructrl import mesh as mesh_lib
from instructrl.model.config import ModelConfig
from instructrl.model.transformer import init_cache


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """How to sample; `eos_ids` and `pad_id` are the vocabulary's (required:
  `eos_ids=vocab.eos_ids, pad_id=vocab.pad_id`; `eos_ids=()` never stops)."""
  max_new_tokens: int = 32
  temperature: float = 1.0  # 0 = greedy.
  top_k: int = 0  # 0 = off.
  top_p: float = 1.0  # 1 = off.
  eos_ids: tuple[int, ...] = dataclasses.field(kw_only=True)
  pad_id: int = dataclasses.field(kw_only=True)

  def __post_init__(self):  # A list (e.g. from a config) must still hash.
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


def is_eos(tokens, eos_ids) -> jax.Array:
  """tokens == any of `eos_ids` (a static tuple), elementwise."""
  hit = jnp.zeros(jnp.shape(tokens), bool)
  for e in eos_ids:
    hit = hit | (tokens == e)
  return hit


class SampleOutput(NamedTuple):
  tokens: jax.Array  # [B, L+N] int32: left-padded prompt, then the response.
  response: jax.Array  # [B, N] int32: PAD after EOS.
  logp: jax.Array  # [B, N] f32: log-prob under the sampling distribution.
  logp_raw: jax.Array  # [B, N] f32: log-prob under the model at temperature 1.
  response_mask: jax.Array  # [B, N] bool: generated tokens, EOS included.
  num_steps: jax.Array  # [] int32: decode iterations actually run.


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
  """Applies temperature, top-k and top-p (nucleus) to logits [B, V]."""
  logits = logits / temperature
  neg = jnp.finfo(logits.dtype).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first always).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def _choose(logits, key, sc: SampleConfig):
  """Picks one token per row; returns (token, logp_sampling, logp_raw)."""
  raw = jax.nn.log_softmax(logits, axis=-1)
  if sc.temperature == 0.0:
    tok = jnp.argmax(logits, axis=-1)
    lp = jnp.zeros(tok.shape, jnp.float32)  # A point mass.
  else:
    filt = filter_logits(logits, sc.temperature, sc.top_k, sc.top_p)
    tok = jax.random.categorical(key, filt, axis=-1)
    lp = jnp.take_along_axis(jax.nn.log_softmax(filt, -1), tok[:, None], -1)[:, 0]
  lp_raw = jnp.take_along_axis(raw, tok[:, None], -1)[:, 0]
  return tok.astype(jnp.int32), lp, lp_raw


def sample(graphdef, params, prompt_tokens, prompt_mask, key,
           sc: SampleConfig) -> SampleOutput:
  """Pure sampling function (jit it, or use `make_sampler`)."""
  model = nnx.merge(graphdef, params)
  cfg: ModelConfig = model.cfg
  b, plen = prompt_tokens.shape
  n = sc.max_new_tokens
  if plen + n > cfg.max_len and cfg.style == "gpt":
    raise ValueError(f"prompt length {plen} + max_new_tokens {n} exceeds the "
                     f"model's max_len {cfg.max_len}")
  prompt_mask = prompt_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
  cache = init_cache(cfg, b, plen + n)
  cache = _constrain_cache(cache)
  logits, cache = model(prompt_tokens, positions, prompt_mask.astype(jnp.int32),
                        cache=cache, cache_index=0)
  next_pos = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)

  def cond(s):
    return (s["i"] < n) & ~jnp.all(s["done"])

  def body(s):
    i = s["i"]
    tok, lp, lp_raw = _choose(s["logits"], jax.random.fold_in(key, i), sc)
    alive = ~s["done"]
    tok = jnp.where(alive, tok, sc.pad_id)
    upd = lambda a, x: jax.lax.dynamic_update_slice(a, x[:, None], (0, i))
    out = {
        "response": upd(s["response"], tok),
        "logp": upd(s["logp"], jnp.where(alive, lp, 0.0)),
        "logp_raw": upd(s["logp_raw"], jnp.where(alive, lp_raw, 0.0)),
        "mask": upd(s["mask"], alive),
    }
    done = s["done"] | is_eos(tok, sc.eos_ids)
    # Feed the token; finished rows feed PAD marked invalid in the cache.
    logits, cache = model(tok[:, None], s["pos"][:, None],
                          alive.astype(jnp.int32)[:, None], cache=s["cache"],
                          cache_index=plen + i)
    return dict(out, i=i + 1, done=done, pos=s["pos"] + 1, cache=cache,
                logits=logits[:, -1])

  state = {
      "i": jnp.int32(0),
      "done": jnp.zeros((b,), bool),
      "pos": next_pos,
      "cache": cache,
      "logits": logits[:, -1],
      "response": jnp.full((b, n), sc.pad_id, jnp.int32),
      "logp": jnp.zeros((b, n), jnp.float32),
      "logp_raw": jnp.zeros((b, n), jnp.float32),
      "mask": jnp.zeros((b, n), bool),
  }
  s = jax.lax.while_loop(cond, body, state)
  tokens = jnp.concatenate([prompt_tokens.astype(jnp.int32), s["response"]], axis=1)
  return SampleOutput(tokens, s["response"], s["logp"], s["logp_raw"], s["mask"],
                      s["i"])


def _constrain_cache(cache):
  """Cache rows follow the batch sharding, cache heads the tensor axis."""
  kv_names = ("act_batch", "act_kv_heads", "act_len", None)
  one = lambda a: mesh_lib.constrain(a, kv_names)
  return {"k": jax.tree.map(one, cache["k"]), "v": jax.tree.map(one, cache["v"]),
          "valid": mesh_lib.constrain(cache["valid"], ("act_batch", "act_len"))}


def make_sampler(graphdef, param_shardings, sc: SampleConfig,
                 mesh: Mesh) -> mesh_lib.Jitted:
  """A jitted `fn(params, prompt_tokens, prompt_mask, key) -> SampleOutput`.

  Sharded like the model: rows over (data, fsdp), heads over tensor. jax
  caches one executable per input shape, i.e. per (batch, prompt length);
  `max_new_tokens` is fixed by `sc`.
  """
  rows = mesh_lib.batch_sharding(mesh, 2)
  rep = NamedSharding(mesh, P())
  out_shardings = SampleOutput(rows, rows, rows, rows, rows, rep)

  def fn(params, prompt_tokens, prompt_mask, key):
    return sample(graphdef, params, prompt_tokens, prompt_mask, key, sc)
  return mesh_lib.jit(fn, mesh, in_shardings=(param_shardings, rows, rows, rep),
                      out_shardings=out_shardings)
