"""PPO tests: a bandit with a known optimum, reward shaping, ptx term, values."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from instructrl import config_files
from instructrl import losses
from instructrl import mesh as mesh_lib
from instructrl.rl import learner as ppo_lib
from instructrl.rl import rollout as rollout_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.sampling import SampleConfig, SampleOutput, sample
from instructrl.stages import validate
from instructrl.stages.errors import ConfigError
from instructrl.stages.ppo import rollout_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

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
  sc = SampleConfig(max_new_tokens=1, temperature=1.0, eos_ids=(), pad_id=0)
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
  # Jitted (one compile each) rather than op by op: this test runs in seconds.
  sc = SampleConfig(max_new_tokens=2, eos_ids=(), pad_id=0)
  out = jax.jit(lambda p, k: sample(g, p, prompt, pmask, k, sc))(params,
                                                                jax.random.key(0))
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
  learn = jax.jit(functools.partial(ppo_lib.learn, graphdefs={"policy": g, "value": vg},
                                    txs=txs, cfg=cfg))
  new, m = learn(state, exp, ptx, jax.random.key(0), 0.0)
  lm = steps.lm_loss_fn(g)
  grads = jax.jit(jax.grad(lambda p: gamma * lm.fn(p, ptx, None)[0]))(params)
  expected = jax.tree.map(lambda p, gr: p - 0.1 * gr, params, grads)
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(m["ptx_loss"], lm.fn(params, ptx, None)[0], rtol=1e-6)
  # Per-term norms: the RL term gives nothing here, so the total is gamma * ptx's.
  np.testing.assert_allclose(m["ptx_grad_norm"], optax.tree.norm(grads), rtol=1e-5)
  assert float(m["rl_grad_norm"]) == 0.0
  np.testing.assert_allclose(m["grad_norm"], m["ptx_grad_norm"], rtol=1e-6)
  # Entropy: the mean over response tokens of -sum p log p, from the logits.
  pos, seg = rollout_lib.sequence_inputs(seq_mask)
  logits = nnx.merge(g, params)(out.tokens, pos, seg)[0]
  logits = np.asarray(logits[:, -3:-1], np.float64)
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  h = -(prob * np.log(prob)).sum(-1)
  np.testing.assert_allclose(m["entropy"], h[np.asarray(out.response_mask)].mean(),
                             rtol=1e-5)


def test_adaptive_kl_controller_and_ema():
  g, params, prompt, pmask = _bandit_setup(batch=4)
  vg, vparams = nnx.split(ScalarModel(CFG, nnx.Rngs(1)))
  txs = {"policy": optax.sgd(0.5), "value": optax.sgd(0.0)}
  state = ppo_lib.init_state(params, vparams, txs["policy"], txs["value"], 0.1)
  out = sample(g, params, prompt, pmask, jax.random.key(0),
               SampleConfig(max_new_tokens=2, eos_ids=(), pad_id=0))
  seq_mask = jnp.concatenate([pmask, out.response_mask], axis=1)
  adv = jnp.ones_like(out.logp)
  exp = rollout_lib.Experience(out.tokens, seq_mask, out.response, out.response_mask,
                               out.logp_raw, out.logp_raw, adv * 0, adv * 0, adv,
                               adv * 0, adv[:, 0])
  cfg = ppo_lib.PPOConfig(minibatch_size=4, ptx_coef=0.0, kl_target=1.0,
                          kl_horizon=40, ema_decay=0.9)
  learn = functools.partial(ppo_lib.learn, graphdefs={"policy": g, "value": vg},
                            txs=txs, cfg=cfg)
  new, m = learn(state, exp, None, jax.random.key(0), 3.0)  # KL above target.
  assert float(m["rl_grad_norm"]) > 0 and "ptx_grad_norm" not in m
  np.testing.assert_allclose(m["rl_grad_norm"], m["grad_norm"], rtol=1e-6)
  # beta * (1 + clip(3/1 - 1, -0.2, 0.2) * batch / horizon) = 0.1 * 1.02.
  np.testing.assert_allclose(new["kl_coef"], 0.1 * (1 + 0.2 * 4 / 40), rtol=1e-6)
  low, _ = learn(state, exp, None, jax.random.key(0), 0.5)
  np.testing.assert_allclose(low["kl_coef"], 0.1 * (1 - 0.2 * 4 / 40), rtol=1e-6)
  for e, p0, p1 in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(params),
                       jax.tree.leaves(new["params"])):
    np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, atol=1e-6)
  assert int(new["step"]) == 1


def _left_padded_prompts(batch, length, vocab, seed=0):
  rng = np.random.RandomState(seed)
  lens = rng.randint(1, length + 1, batch)
  mask = np.arange(length)[None] >= (length - lens)[:, None]
  tokens = np.where(mask, rng.randint(2, vocab, (batch, length)), 0)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


@pytest.mark.parametrize("dtype,style,scan", [("float32", "gpt", False),
                                              ("bfloat16", "llama", True)])
def test_iteration_zero_ratio_is_one_and_kl_is_zero(dtype, style, scan):
  """Before any update the policy is the SFT model and the learner's params
  are the rollout's: the rollout's KL to SFT and the learner's log-ratio are
  exactly 0 in bf16 as in fp32. That needs the old log-probs from the
  learner's own forward at its minibatch shape: the sampler's decode steps
  round apart from it (in bf16 by ~1e-2, `sampler_logp_gap`)."""
  cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=64, num_heads=4,
                    num_kv_heads=2 if style == "llama" else None, max_len=24,
                    style=style, dtype=dtype, scan_layers=scan)
  g, params = nnx.split(LanguageModel(cfg, nnx.Rngs(0)))
  # Sharper than at init (logits ~ 0.02): a real spread of log-probs.
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)
  vg, vparams = nnx.split(ScalarModel(cfg, nnx.Rngs(1)))
  prompt, pmask = _left_padded_prompts(8, 8, 64)
  rc = rollout_lib.RolloutConfig(max_new_tokens=12, eos_ids=(1,), pad_id=0,
                                 recompute_logp=True, forward_rows=4)
  models = {"policy": g, "ref": g, "rm": vg, "value": vg}
  txs = {"policy": optax.sgd(0.0), "value": optax.sgd(0.0)}  # No update.
  state = ppo_lib.init_state(params, vparams, txs["policy"], txs["value"], 0.1)
  cfg_ppo = ppo_lib.PPOConfig(minibatch_size=4, ptx_coef=0.0)

  @jax.jit
  def iteration(state, key):
    p = {"policy": state["params"], "ref": params, "rm": vparams,
         "value": state["value_params"]}
    exp, rm = rollout_lib.make_experience(models, p, prompt, pmask, key,
                                          state["kl_coef"], rc)
    _, m = ppo_lib.learn(state, exp, None, key, rm["kl"],
                         graphdefs=models, txs=txs, cfg=cfg_ppo)
    return exp, rm, m
  exp, rm, m = iteration(state, jax.random.key(3))
  # The sampler's own log-probs (what PPO used before): f32 rounding apart in
  # fp32, bf16 rounding apart in bf16 (measured 1.4e-6 and 1.6e-2).
  assert float(rm["sampler_logp_gap"]) < (1e-5 if dtype == "float32" else 0.1)
  if dtype == "bfloat16":
    assert float(rm["sampler_logp_gap"]) > 1e-3
  assert float(jnp.sum(exp.mask)) > 40  # Most rows sample several tokens.
  assert float(jnp.std(jnp.where(exp.mask, exp.logp, 0.0))) > 0.3
  np.testing.assert_array_equal(exp.ref_logp, exp.logp)
  assert float(rm["kl"]) == 0.0
  assert float(m["logp_gap"]) == 0.0
  assert float(m["ratio_mean"]) == 1.0 and float(m["approx_kl"]) == 0.0
  assert float(m["clip_fraction"]) == 0.0


def test_a_response_without_eos_gets_the_missing_eos_penalty_as_its_reward():
  """Row 0 ends with EOS (id 1) and keeps its RM score 2; row 1 runs into
  max_new_tokens and its score 3 is replaced by the penalty -1 (not -1 added:
  3 - 1 = 2 would be TRL's subtraction). With beta = 0, zero values and no
  discount (lambda 1), the returns are the final reward on every token."""
  g, params = nnx.split(LanguageModel(CFG, nnx.Rngs(0)))
  vg, vparams = nnx.split(ScalarModel(CFG, nnx.Rngs(1)))  # Head 0: V = 0.
  response = jnp.array([[4, 1, 0], [4, 5, 6]], jnp.int32)
  mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  prompt = jnp.full((2, 2), 3, jnp.int32)
  z = jnp.zeros((2, 3))
  out = SampleOutput(jnp.concatenate([prompt, response], 1), response, z, z, mask,
                     jnp.int32(3))
  seq_mask = jnp.concatenate([jnp.ones((2, 2), bool), mask], 1)
  models, ps = {"ref": g, "value": vg}, {"ref": params, "value": vparams}
  score = jnp.array([2.0, 3.0])

  def run(penalty):
    rc = rollout_lib.RolloutConfig(max_new_tokens=3, eos_ids=(1,), pad_id=0,
                                   lam=1.0, whiten_advantages=False,
                                   missing_eos_penalty=penalty)
    return rollout_lib.experience_from_sample(models, ps, out, seq_mask, score,
                                              0.0, rc)
  exp, m = run(-1.0)
  np.testing.assert_allclose(exp.score, [2.0, -1.0])
  np.testing.assert_allclose(exp.rewards, [[0, 2, 0], [0, 0, -1]], atol=1e-6)
  np.testing.assert_allclose(exp.returns, [[2, 2, 0], [-1, -1, -1]], atol=1e-6)
  assert float(m["eos_rate"]) == 0.5 and float(m["score"]) == 0.5
  exp, _ = run(None)  # Off: the RM's reading stands.
  np.testing.assert_allclose(exp.score, [2.0, 3.0])


def test_the_ppo_stage_checks_the_missing_eos_penalty(tmp_path):
  c = config_files.get_config(ROOT / "configs" / "default.py", "tiny")
  mesh = mesh_lib.make_mesh({}, jax.devices()[:1])
  assert rollout_config(c).missing_eos_penalty == -1.0
  c.ppo.missing_eos_penalty = None
  validate.check_stage(c, "ppo", mesh)
  for bad in (float("nan"), float("-inf")):
    c.ppo.missing_eos_penalty = bad
    with pytest.raises(ConfigError, match="config.ppo.missing_eos_penalty"):
      validate.check_stage(c, "ppo", mesh)


def test_the_learners_keys_never_repeat_the_rollouts():
  """The sampler draws token i from fold_in(key, i) and the learner shuffles
  epoch e with its own epoch_keys: over several iterations no key is used by
  both (with one key per iteration for both, epoch e reused token e's)."""
  data = lambda k: tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())
  rng, tokens, epochs, iters = jax.random.key(0), 24, 4, 6
  rollout, learn = set(), set()
  for step in range(iters):
    rk, lk = ppo_lib.iteration_keys(rng, step)
    rollout |= {data(jax.random.fold_in(rk, i)) for i in range(tokens)}
    learn |= {data(k) for k in ppo_lib.epoch_keys(lk, epochs)}
  assert len(rollout) == iters * tokens and len(learn) == iters * epochs
  assert not rollout & learn
  one = jax.random.fold_in(rng, 0)  # What a shared key would have done.
  assert data(ppo_lib.epoch_keys(one, 1)[0]) == data(jax.random.fold_in(one, 0))
  # The sampler does draw token i from fold_in(key, i).
  g, params, prompt, pmask = _bandit_setup(batch=4)
  key = jax.random.key(7)
  out = sample(g, params, prompt, pmask, key,
               SampleConfig(max_new_tokens=1, eos_ids=(), pad_id=0))
  logits, _ = nnx.merge(g, params)(prompt)
  np.testing.assert_array_equal(
      out.response[:, 0], jax.random.categorical(jax.random.fold_in(key, 0),
                                                 logits[:, -1]))
