"""Sampler tests: KV-cache decoding against full re-forwards, stops, filters, sharding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instructrl import losses
from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel, ModelConfig
from instructrl.model.sharded import init_sharded
from instructrl.sampling import SampleConfig, filter_logits, make_sampler, sample

GPT = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, max_len=40)
LLAMA = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4,
                    num_kv_heads=2, max_len=40, style="llama", tie_embeddings=False,
                    d_ff=64, scan_layers=True)
LENGTHS = [7, 3, 5, 1]  # Mixed prompt lengths in one batch.
PLEN, NEW = 8, 10


def _prompts(seed=0, lengths=LENGTHS, plen=PLEN, vocab=64):
  rng = np.random.RandomState(seed)
  tokens = np.zeros((len(lengths), plen), np.int32)
  mask = np.zeros((len(lengths), plen), bool)
  for i, n in enumerate(lengths):
    tokens[i, plen - n:] = rng.randint(2, vocab, size=n)
    mask[i, plen - n:] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


@jax.jit
def _positions(mask):
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def _full_logits(g, p, tokens, mask):
  """Teacher-forced forward over the whole padded sequence, no cache."""
  fwd = jax.jit(lambda p, t, s: nnx.merge(g, p)(t, _positions(s), s)[0])
  return fwd(p, tokens, mask.astype(jnp.int32))


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama-scan"])
def test_greedy_cache_equals_full_reforward(cfg):
  g, p = nnx.split(LanguageModel(cfg, nnx.Rngs(0)))
  tokens, mask = _prompts()
  sc = SampleConfig(max_new_tokens=NEW, temperature=0.0, eos_ids=(), pad_id=0)
  out = jax.jit(lambda p, t, m, k: sample(g, p, t, m, k, sc))(
      p, tokens, mask, jax.random.key(0))
  assert out.response.shape == (4, NEW) and bool(out.response_mask.all())
  full_mask = jnp.concatenate([mask, out.response_mask], axis=1)
  logits = _full_logits(g, p, out.tokens, full_mask)
  # The token chosen at step i must be the argmax of the re-forward at the
  # position just before it, for every row and every step.
  pred = jnp.argmax(logits[:, PLEN - 1:-1], axis=-1)
  np.testing.assert_array_equal(pred, out.response)
  raw = jax.nn.log_softmax(logits[:, PLEN - 1:-1], -1)
  lp = jnp.take_along_axis(raw, out.response[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logp_raw, lp, atol=1e-5)
  # A short prompt alone (no padding) gives the same continuation.
  alone = sample(g, p, tokens[1:2, -3:], mask[1:2, -3:], jax.random.key(0), sc)
  np.testing.assert_array_equal(alone.response[0], out.response[1])


def test_sampled_logprobs_match_teacher_forcing():
  """At temperature 1 the sampler's own log-probs are PPO's old log-probs."""
  g, p = nnx.split(LanguageModel(GPT, nnx.Rngs(1)))
  tokens, mask = _prompts(seed=3)
  sc = SampleConfig(max_new_tokens=NEW, temperature=1.0, eos_ids=(), pad_id=0)
  out = jax.jit(lambda p, k: sample(g, p, tokens, mask, k, sc))(p, jax.random.key(5))
  logits = _full_logits(g, p, out.tokens, jnp.concatenate([mask, out.response_mask], 1))
  lp = losses.token_logprobs(logits[:, PLEN - 1:-1], out.response)
  np.testing.assert_allclose(out.logp_raw, lp, atol=1e-5)
  np.testing.assert_allclose(out.logp, out.logp_raw, atol=1e-6)
  # Different keys give different samples; the same key the same ones.
  again = jax.jit(lambda p, k: sample(g, p, tokens, mask, k, sc))(p, jax.random.key(5))
  other = jax.jit(lambda p, k: sample(g, p, tokens, mask, k, sc))(p, jax.random.key(6))
  np.testing.assert_array_equal(again.response, out.response)
  assert not np.array_equal(other.response, out.response)


def test_eos_stops_rows_and_loop_exits_early():
  cfg = dataclasses.replace(GPT, tie_embeddings=False)
  g, p = nnx.split(LanguageModel(cfg, nnx.Rngs(0)))
  tokens, mask = _prompts()
  greedy = SampleConfig(max_new_tokens=NEW, temperature=0.0, eos_ids=(), pad_id=0)
  run = jax.jit(lambda p, sc: sample(g, p, tokens, mask, jax.random.key(0), sc),
                static_argnums=1)
  free = run(p, greedy)
  eos = int(free.response[0, 2])  # Row 0 emits this token at step 2.
  out = run(p, dataclasses.replace(greedy, eos_ids=(eos,)))
  for row in range(4):
    hits = np.nonzero(np.asarray(free.response[row]) == eos)[0]
    stop = hits[0] if len(hits) else NEW - 1
    np.testing.assert_array_equal(out.response_mask[row],
                                  np.arange(NEW) <= stop)
    np.testing.assert_array_equal(out.response[row, :stop + 1],
                                  free.response[row, :stop + 1])
    assert np.all(np.asarray(out.response[row, stop + 1:]) == 0)
    assert np.all(np.asarray(out.logp_raw[row, stop + 1:]) == 0)
  # Make EOS every row's argmax: all rows stop at once, so one step runs.
  params = jax.tree.map(lambda x: x, p)
  hidden = jnp.ones((cfg.d_model,))
  params["backbone"]["final_norm"]["scale"].set_value(jnp.zeros((cfg.d_model,)))
  params["backbone"]["final_norm"]["bias"].set_value(hidden)
  params["lm_head"].set_value(params["lm_head"].get_value().at[:, 7].set(10.0))
  out = run(params, dataclasses.replace(greedy, eos_ids=(7,)))
  assert int(out.num_steps) == 1
  np.testing.assert_array_equal(out.response[:, 0], 7)
  np.testing.assert_array_equal(out.response_mask.sum(1), 1)


def test_any_of_several_eos_ids_stops_a_row():
  """Llama 3 stops on <|eot_id|> or <|end_of_text|>: each row stops at the
  first of either (a naive scan of the free run), and the rest is the
  vocabulary's PAD, whatever its id."""
  cfg = dataclasses.replace(GPT, tie_embeddings=False)
  g, p = nnx.split(LanguageModel(cfg, nnx.Rngs(0)))
  tokens, mask = _prompts()
  run = jax.jit(lambda p, sc: sample(g, p, tokens, mask, jax.random.key(0), sc),
                static_argnums=1)
  free = np.asarray(run(p, SampleConfig(max_new_tokens=NEW, temperature=0.0,
                                        eos_ids=(), pad_id=0)).response)
  eos = (int(free[0, 3]), int(free[1, 1]))
  out = run(p, SampleConfig(max_new_tokens=NEW, temperature=0.0, eos_ids=list(eos),
                            pad_id=cfg.vocab_size - 1))
  for row in range(len(free)):
    hits = [t for t in range(NEW) if free[row, t] in eos]
    stop = hits[0] if hits else NEW - 1
    np.testing.assert_array_equal(out.response_mask[row], np.arange(NEW) <= stop)
    np.testing.assert_array_equal(out.response[row, :stop + 1], free[row, :stop + 1])
    assert np.all(np.asarray(out.response[row, stop + 1:]) == cfg.vocab_size - 1)


def _filter_reference(logits, temperature, top_k, top_p):
  out = []
  for row in np.asarray(logits, np.float64) / temperature:
    keep = np.ones_like(row, bool)
    if top_k:
      keep &= row >= np.sort(row)[::-1][top_k - 1]
    if top_p < 1.0:
      # Nucleus over what top-k kept (the filters apply in sequence, as in HF).
      order = np.argsort(-np.where(keep, row, -np.inf))
      probs = np.where(keep[order], np.exp(row[order] - row.max()), 0.0)
      probs /= probs.sum()
      n, mass = 0, 0.0
      while mass < top_p and n < len(row):  # Smallest prefix reaching top_p.
        mass += probs[n]
        n += 1
      nucleus = np.zeros_like(keep)
      nucleus[order[:n]] = True
      keep &= nucleus
    out.append(keep)
  return np.stack(out)


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (1.0, 0, 0.05)])
def test_filter_logits_matches_reference(temperature, top_k, top_p):
  logits = jax.random.normal(jax.random.key(2), (6, 40)) * 3
  got = filter_logits(logits, temperature, top_k, top_p)
  keep = np.asarray(got) > np.finfo(np.float32).min
  np.testing.assert_array_equal(keep, _filter_reference(logits, temperature, top_k, top_p))
  np.testing.assert_allclose(np.asarray(got)[keep],
                             (np.asarray(logits) / temperature)[keep], rtol=1e-6)


def test_top_k_one_is_greedy_and_logp_is_renormalised():
  g, p = nnx.split(LanguageModel(GPT, nnx.Rngs(0)))
  tokens, mask = _prompts()
  greedy = sample(g, p, tokens, mask, jax.random.key(0),
                  SampleConfig(max_new_tokens=4, temperature=0.0, eos_ids=(), pad_id=0))
  top1 = sample(g, p, tokens, mask, jax.random.key(9),
                SampleConfig(max_new_tokens=4, temperature=1.0, top_k=1, eos_ids=(), pad_id=0))
  np.testing.assert_array_equal(top1.response, greedy.response)
  np.testing.assert_allclose(top1.logp, 0.0, atol=1e-6)  # Point mass after top-k=1.
  assert np.all(np.asarray(top1.logp_raw) < 0)


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}],
                         ids=["2x2x2", "4x2"])
def test_sharded_sampler_equals_single_device(shape):
  cfg = LLAMA
  tokens, mask = _prompts(lengths=[7, 3, 5, 1, 8, 2, 4, 6])
  sc = SampleConfig(max_new_tokens=NEW, temperature=1.0, eos_ids=(5,), pad_id=0)
  one = mesh_lib.make_mesh({}, jax.devices()[:1])
  g, p1, sh1 = init_sharded(LanguageModel, cfg, one, seed=4)
  ref = make_sampler(g, sh1, sc, one)(p1, tokens, mask, jax.random.key(3))
  mesh = mesh_lib.make_mesh(shape)
  g, p8, sh8 = init_sharded(LanguageModel, cfg, mesh, seed=4)
  run = make_sampler(g, sh8, sc, mesh)
  out = run(p8, tokens, mask, jax.random.key(3))
  assert len(out.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.response_mask, ref.response_mask)
  np.testing.assert_allclose(out.logp_raw, ref.logp_raw, atol=1e-5)
  # Same shapes again: no new compilation.
  run(p8, tokens, mask, jax.random.key(4))
  assert run.jitted._cache_size() == 1
