"""PPO tests: a bandit with a known optimum, reward shaping, ptx term, values."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from instructrl import losses
from instructrl.rl import learner as ppo_lib
from instructrl.rl import rollout as rollout_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.sampling import SampleConfig, sample

CFG = ModelConfig(vocab_size=8, num_layers=1, d_model=16, num_heads=2, max_len=8)


def test_reward_shaping_is_kl_per_token_plus_final_score():
  logp = jnp.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
  ref = jnp.array([[-1.5, -1.0, -0.5, -9.0], [-0.5, -3.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  score = jnp.array([2.0, -1.0])
  rewards, kl = rollout_lib.shape_rewards(score, logp, ref, mask, 0.1)
  # k1: logp - ref = [0.5, -1, 0] and [-0.5, 2]; reward = -0.1 * kl, plus the
  # score on the last valid token; zero on padding.
  np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0], [-0.5, 2.0, 0.0, 0.0]])
  np.testing.assert_allclose(rewards, [[-0.05, 0.1, 2.0, 0.0],
                                       [0.05, -0.2 - 1.0, 0.0, 0.0]], atol=1e-6)


def _bandit_setup(batch=64, seed=0):
  g, p = nnx.split(LanguageModel(CFG, nnx.Rngs(seed)))
  prompt = jnp.full((batch, 1), 5, jnp.int32)
  return g, p, prompt, jnp.ones((batch, 1), bool)


def test_ppo_solves_a_bandit_with_a_known_optimum():
  """One-token responses; token 3 pays 1, everything else 0. pi(3) -> 1."""
  g, params, prompt, pmask = _bandit_setup()
  vg, vparams = nnx.split(ScalarModel(CFG, nnx.Rngs(1)))
  tx = steps.make_optimizer(1e-2, 100, 0, schedule="constant")
  vtx = steps.make_optimizer(1e-2, 100, 0, schedule="constant")
  cfg = ppo_lib.PPOConfig(epochs=2, minibatch_size=16, ptx_coef=0.0)
  state = ppo_lib.init_state(params, vparams, tx, vtx, kl_coef=0.0)
  sc = SampleConfig(max_new_tokens=1, temperature=1.0, eos_id=-1)
  graphdefs = {"policy": g, "value": vg}

  @jax.jit
  def iteration(state, key):
    out = sample(g, state["params"], prompt, pmask, key, sc)
    seq_mask = jnp.concatenate([pmask, out.response_mask], axis=1)
    score = (out.response[:, 0] == 3).astype(jnp.float32)
    values = rollout_lib.response_values(vg, state["value_params"], out.tokens,
                                         seq_mask, 1)
    rewards, _ = rollout_lib.shape_rewards(score, out.logp_raw, out.logp_raw,
                                           out.response_mask, 0.0)
    adv, ret = losses.gae(rewards, values, out.response_mask, 1.0, 0.95)
    exp = rollout_lib.Experience(out.tokens, seq_mask, out.response, out.response_mask,
                                 out.logp_raw, out.logp_raw, values, rewards,
                                 losses.whiten(adv, out.response_mask), ret, score)
    state, m = ppo_lib.learn(state, exp, None, key, 0.0, graphdefs=graphdefs,
                             txs={"policy": tx, "value": vtx}, cfg=cfg)
    return state, jnp.mean(score), m

  def p_opt(params):
    logits, _ = nnx.merge(g, params)(prompt[:1])
    return float(jax.nn.softmax(logits[0, -1])[3])
  start = p_opt(state["params"])
  for i in range(15):
    state, mean_score, m = iteration(state, jax.random.key(i))
  assert start < 0.3
  assert p_opt(state["params"]) > 0.9, p_opt(state["params"])
  assert float(m["policy_loss"]) == float(m["policy_loss"])  # Finite.
  # The value of the (only) state approaches the expected reward, ~1.
  v = rollout_lib.response_values(vg, state["value_params"],
                                  jnp.array([[5, 3]]), jnp.ones((1, 2), bool), 1)
  assert abs(float(v[0, 0]) - 1.0) < 0.3


def test_ptx_term_adds_gamma_times_the_lm_gradient():
  """With zero advantages PPO gives no gradient; the update is then exactly an
  optimizer step on gamma * LM loss (the paper's Eq. 2 second term)."""
  g, params, prompt, pmask = _bandit_setup(batch=4)
  vg, vparams = nnx.split(ScalarModel(CFG, nnx.Rngs(1)))
  tx = optax.sgd(0.1)
  txs = {"policy": tx, "value": optax.sgd(0.0)}
  state = ppo_lib.init_state(params, vparams, tx, txs["value"], 0.0)
  out = sample(g, params, prompt, pmask, jax.random.key(0),
               SampleConfig(max_new_tokens=2, eos_id=-1))
  seq_mask = jnp.concatenate([pmask, out.response_mask], axis=1)
  z = jnp.zeros_like(out.logp)
  exp = rollout_lib.Experience(out.tokens, seq_mask, out.response, out.response_mask,
                               out.logp_raw, out.logp_raw, z, z, z, z, z[:, 0])
  rng = np.random.RandomState(0)
  ptx = {"tokens": jnp.asarray(rng.randint(0, 8, (8, 6)), jnp.int32),
         "targets": jnp.asarray(rng.randint(0, 8, (8, 6)), jnp.int32),
         "loss_mask": jnp.ones((8, 6)), "segment_ids": jnp.ones((8, 6), jnp.int32),
         "positions": jnp.tile(jnp.arange(6, dtype=jnp.int32), (8, 1))}
  gamma = 2.5
  cfg = ppo_lib.PPOConfig(epochs=1, minibatch_size=4, ptx_coef=gamma)
  new, m = ppo_lib.learn(state, exp, ptx, jax.random.key(0), 0.0,
                         graphdefs={"policy": g, "value": vg}, txs=txs, cfg=cfg)
  lm = steps.lm_loss_fn(g)
  grads = jax.grad(lambda p: gamma * lm.fn(p, ptx, None)[0])(params)
  expected = jax.tree.map(lambda p, gr: p - 0.1 * gr, params, grads)
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(m["ptx_loss"], lm.fn(params, ptx, None)[0], rtol=1e-6)


def test_adaptive_kl_controller_and_ema():
  g, params, prompt, pmask = _bandit_setup(batch=4)
  vg, vparams = nnx.split(ScalarModel(CFG, nnx.Rngs(1)))
  txs = {"policy": optax.sgd(0.5), "value": optax.sgd(0.0)}
  state = ppo_lib.init_state(params, vparams, txs["policy"], txs["value"], 0.1)
  out = sample(g, params, prompt, pmask, jax.random.key(0),
               SampleConfig(max_new_tokens=2, eos_id=-1))
  seq_mask = jnp.concatenate([pmask, out.response_mask], axis=1)
  adv = jnp.ones_like(out.logp)
  exp = rollout_lib.Experience(out.tokens, seq_mask, out.response, out.response_mask,
                               out.logp_raw, out.logp_raw, adv * 0, adv * 0, adv,
                               adv * 0, adv[:, 0])
  cfg = ppo_lib.PPOConfig(minibatch_size=4, ptx_coef=0.0, kl_target=1.0,
                          kl_horizon=40, ema_decay=0.9)
  learn = functools.partial(ppo_lib.learn, graphdefs={"policy": g, "value": vg},
                            txs=txs, cfg=cfg)
  new, _ = learn(state, exp, None, jax.random.key(0), 3.0)  # KL above target.
  # beta * (1 + clip(3/1 - 1, -0.2, 0.2) * batch / horizon) = 0.1 * 1.02.
  np.testing.assert_allclose(new["kl_coef"], 0.1 * (1 + 0.2 * 4 / 40), rtol=1e-6)
  low, _ = learn(state, exp, None, jax.random.key(0), 0.5)
  np.testing.assert_allclose(low["kl_coef"], 0.1 * (1 - 0.2 * 4 / 40), rtol=1e-6)
  for e, p0, p1 in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(params),
                       jax.tree.leaves(new["params"])):
    np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, atol=1e-6)
  assert int(new["step"]) == 1
