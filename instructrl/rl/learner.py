"""The PPO-ptx learner: epochs x minibatches inside one jitted function.

Objective (the paper's Eq. 2), maximised over the policy pi:

  E_{x~D_RL, y~pi}[ r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) ]
      + gamma * E_{x~D_pretrain}[ log pi(x) ]

The first term is optimised with PPO's clipped surrogate on GAE advantages of
the KL-shaped per-token rewards (`rl/rollout.py`); the second is the masked LM
loss on pretraining batches with coefficient `ptx_coef` (gamma). Each term's
gradient is taken on its own (for its norm) and the two are summed into one
update -- the paper computes them in consecutive steps into the same
buffer, which is the same sum. The value function is a separate model
(initialised from the RM) with its own optimizer and learning rate, as in
the paper.

Metrics beyond the losses' own: `entropy` (the policy's mean entropy per
response token, nats), `rl_grad_norm` and `ptx_grad_norm` (global norms of
the PPO term's gradient and of gamma * the ptx term's, each on its own;
`grad_norm` is their sum's, before clipping) and `logp_gap` (`learn`).

State (a dict pytree, checkpointed as is):
  params, opt_state            the policy and its optimizer
  value_params, value_opt_state
  ema                          EMA of the policy params (or the params if off)
  kl_coef                      beta (adaptive if kl_target > 0)
  step                         PPO iterations done
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from instructrl import losses
from instructrl import steps
from instructrl.rl.rollout import Experience, response_logits, response_values


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  epochs: int = 1
  minibatch_size: int = 64
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  ptx_coef: float = 27.8  # gamma; 0 = plain PPO.
  ema_decay: float = 0.0  # 0.992 in the paper; 0 = off.
  kl_target: float = 0.0  # > 0: adaptive KL controller (Ziegler et al. 2019).
  kl_horizon: int = 10000


def init_state(policy_params, value_params, policy_tx, value_tx, kl_coef: float):
  return {"params": policy_params, "opt_state": policy_tx.init(policy_params),
          "value_params": value_params,
          "value_opt_state": value_tx.init(value_params),
          "ema": jax.tree.map(jnp.copy, policy_params),
          "kl_coef": jnp.asarray(kl_coef, jnp.float32),
          "step": jnp.zeros((), jnp.int32)}


def _rl_loss(params, mb: Experience, graphdef, cfg: PPOConfig):
  """PPO's clipped surrogate on this minibatch, and the policy's metrics."""
  logits = response_logits(graphdef, params, mb.seq, mb.seq_mask, mb.response.shape[1])
  logp = losses.token_logprobs(logits, mb.response)
  loss, metrics = losses.ppo_policy_loss(logp, mb.logp, mb.advantages, mb.mask,
                                         cfg.clip_eps)
  metrics = {"policy_loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}
  entropy = losses.token_entropy(jax.lax.stop_gradient(logits))
  metrics["entropy"] = jnp.sum(jnp.where(mb.mask, entropy, 0.0)) / jnp.maximum(
      jnp.sum(mb.mask), 1)
  # Before any update this is log pi_learner - log pi_sampler on the same
  # params: 0 unless the two programs compute different numbers.
  metrics["logp_gap"] = jax.lax.stop_gradient(jnp.max(jnp.where(
      mb.mask, jnp.abs(logp - mb.logp), 0.0)))
  return loss, metrics


def _ptx_loss(params, ptx, graphdef, cfg: PPOConfig):
  """gamma * the masked LM loss on the pretraining rows (Eq. 2's 2nd term)."""
  logits, _ = nnx.merge(graphdef, params)(ptx["tokens"], ptx["positions"],
                                          ptx["segment_ids"])
  ptx_loss, _ = losses.masked_lm_loss(logits, ptx["targets"], ptx["loss_mask"])
  return cfg.ptx_coef * ptx_loss, {"ptx_loss": ptx_loss}


def _policy_grads(params, mb: Experience, ptx, graphdef, cfg: PPOConfig):
  """The policy gradient and metrics, with each term's global norm.

  The two terms read disjoint inputs (episodes, pretraining rows), so one
  backward pass each is the same work as one pass through their sum; the
  cost is one more parameter-sized buffer while both are alive.
  """
  (_, metrics), g = jax.value_and_grad(_rl_loss, has_aux=True)(params, mb, graphdef,
                                                               cfg)
  metrics["rl_grad_norm"] = optax.tree.norm(g)
  if ptx is not None and cfg.ptx_coef:
    (_, pm), gp = jax.value_and_grad(_ptx_loss, has_aux=True)(params, ptx, graphdef,
                                                              cfg)
    metrics.update(pm, ptx_grad_norm=optax.tree.norm(gp))
    g = jax.tree.map(jnp.add, g, gp)
  return g, metrics


def _value_loss(params, mb: Experience, graphdef, cfg: PPOConfig):
  values = response_values(graphdef, params, mb.seq, mb.seq_mask, mb.response.shape[1])
  loss, metrics = losses.value_loss(values, mb.values, mb.returns, mb.mask,
                                    cfg.value_clip_eps)
  return loss, {"value_loss": loss, "value_clip_fraction": metrics["value_clip_fraction"]}


def _minibatch_update(state, xs, *, graphdefs, txs, cfg: PPOConfig):
  mb, ptx = xs
  g, pm = _policy_grads(state["params"], mb, ptx, graphdefs["policy"], cfg)
  updates, opt_state = txs["policy"].update(g, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  (_, vm), vg = jax.value_and_grad(_value_loss, has_aux=True)(
      state["value_params"], mb, graphdefs["value"], cfg)
  vupdates, vopt = txs["value"].update(vg, state["value_opt_state"],
                                       state["value_params"])
  value_params = optax.apply_updates(state["value_params"], vupdates)
  d = cfg.ema_decay
  ema = (jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
         if d else params)
  new = dict(state, params=params, opt_state=opt_state, value_params=value_params,
             value_opt_state=vopt, ema=ema)
  return new, {**pm, **vm, "grad_norm": optax.tree.norm(g),
               "value_grad_norm": optax.tree.norm(vg)}


def _minibatches(tree, n: int, perm=None):
  def one(x):
    if perm is not None:
      x = x[perm]
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(one, tree)


# Purposes folded into each iteration's key: the sampler folds token indices
# 0..N-1 into its key and the learner folds epochs into its own, so one key
# per iteration for both would give epoch e's shuffle token e's draw.
ROLLOUT_KEY, LEARN_KEY = 0, 1


def iteration_keys(rng, step):
  """(rollout key, learner key) of PPO iteration `step` from the run's `rng`."""
  k = jax.random.fold_in(rng, step)
  return jax.random.fold_in(k, ROLLOUT_KEY), jax.random.fold_in(k, LEARN_KEY)


def epoch_keys(key, epochs: int):
  """The learner's per-epoch shuffle keys: [epochs] from its iteration key."""
  return jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(epochs))


def learn(state, exp: Experience, ptx, rng, rollout_kl, *, graphdefs, txs,
          cfg: PPOConfig):
  """One PPO iteration's updates: `epochs` passes over shuffled minibatches.

  `ptx` holds this iteration's pretraining rows (split evenly over the
  minibatches), or None. `rng` is the run's key: the shuffles draw from
  `iteration_keys(rng, step)[1]`, never from the rollout's key. `rollout_kl`
  is the mean sequence KL of the rollout, used by the adaptive controller.
  Returns (state, metrics): means over all minibatches, except `logp_gap`
  (the first minibatch's, before any update: 0 when the learner's log-probs
  equal the sampler's).
  """
  b = exp.seq.shape[0]
  if b % cfg.minibatch_size:
    raise ValueError(f"ppo batch {b} does not split into minibatches of "
                     f"{cfg.minibatch_size}")
  n = b // cfg.minibatch_size
  ptx_mb = None if ptx is None else _minibatches(ptx, n)
  update = lambda s, xs: _minibatch_update(s, xs, graphdefs=graphdefs, txs=txs,
                                           cfg=cfg)

  def epoch(s, k):
    mbs = _minibatches(exp, n, jax.random.permutation(k, b))
    return jax.lax.scan(update, s, (mbs, ptx_mb))
  keys = epoch_keys(iteration_keys(rng, state["step"])[1], cfg.epochs)
  state, metrics = jax.lax.scan(epoch, state, keys)
  gap = metrics.pop("logp_gap")[0, 0]
  metrics = dict(jax.tree.map(jnp.mean, metrics), logp_gap=gap)
  kl_coef = state["kl_coef"]
  if cfg.kl_target > 0:
    err = jnp.clip(rollout_kl / cfg.kl_target - 1.0, -0.2, 0.2)
    kl_coef = kl_coef * (1.0 + err * b / cfg.kl_horizon)
  state = dict(state, kl_coef=kl_coef, step=state["step"] + 1)
  return state, dict(metrics, lr=steps.current_lr(state["opt_state"]))
