"""PPO experience as one XLA program: sample -> score -> reference/value -> GAE.

For a batch of prompts (left-padded, [B, L]) the policy samples N new tokens
at temperature 1 with the compiled sampler. The old policy's log-probs are
the sampler's own raw ones, or (`recompute_logp`, the stage's default) a
policy forward with the learner's function and minibatch shape, so that at
iteration 0 the KL is 0 and PPO's ratio 1 exactly (docs/design.md). Then,
in the same program:

  ref_logp_t  = log pi_SFT(y_t | x, y_<t)            (frozen SFT reference)
  kl_t        = logp_t - ref_logp_t                   (k1, per token)
  r_t         = -beta * kl_t + [t = last] * s(x, y)
  s(x, y)     = RM(x, y) (its bias puts demonstrations at ~0), or
                missing_eos_penalty if y never emitted EOS (RM untrained there)
  V_t         = value model at the state before y_t   (init from the RM)
  A, R        = GAE(r, V, gamma=1, lambda)            (the paper: no discount)

All shapes: responses [B, N] with `mask` marking generated tokens (EOS
included). The full sequence is [B, L + N]; its real-token mask is the prompt
mask followed by the response mask, and positions count real tokens only.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from instructrl import losses
from instructrl.model.transformer import last_token_values
from instructrl.sampling import SampleConfig, is_eos, sample


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """`eos_ids` and `pad_id` are the vocabulary's (required keywords)."""
  max_new_tokens: int = 32
  temperature: float = 1.0
  eos_ids: tuple[int, ...] = dataclasses.field(kw_only=True)
  pad_id: int = dataclasses.field(kw_only=True)
  gamma: float = 1.0
  lam: float = 0.95
  kl_kind: str = "k1"
  whiten_advantages: bool = True
  # The reward of a response that never emits EOS (it ran into
  # max_new_tokens): it REPLACES the RM score, as lm-human-preferences'
  # penalty_reward_value (-1 there), since the RM head was trained only at
  # EOS and its reading at a cut-off token means nothing. None = keep the
  # RM score (off). TRL's missing_eos_penalty subtracts instead.
  missing_eos_penalty: float | None = None
  # The old policy's log-probs from a policy forward (the learner's function)
  # instead of the sampler's: a decode step and the full forward round apart
  # (bf16: up to 3e-2 in log-prob, so PPO's first ratio is not 1); one more
  # forward per iteration.
  recompute_logp: bool = False
  # Rows per reference/policy forward: the learner's minibatch size gives
  # these forwards the learner's shapes, where XLA rounds alike (bf16 results
  # depend on the batch shape); 0 = the whole batch at once.
  forward_rows: int = 0


class Experience(NamedTuple):
  seq: jax.Array  # [B, L+N] int32 prompt then response.
  seq_mask: jax.Array  # [B, L+N] bool real tokens.
  response: jax.Array  # [B, N] int32.
  mask: jax.Array  # [B, N] bool generated tokens.
  logp: jax.Array  # [B, N] old policy log-probs (sampler's, or recomputed).
  ref_logp: jax.Array  # [B, N] SFT log-probs.
  values: jax.Array  # [B, N] old values.
  rewards: jax.Array  # [B, N] per-token rewards.
  advantages: jax.Array  # [B, N].
  returns: jax.Array  # [B, N].
  score: jax.Array  # [B] s(x, y): RM score, or the missing-EOS penalty.


def sequence_inputs(seq_mask):
  """Positions and segment ids for a left-padded [B, L+N] sequence."""
  positions = jnp.maximum(jnp.cumsum(seq_mask, axis=1) - 1, 0).astype(jnp.int32)
  return positions, seq_mask.astype(jnp.int32)


def response_logits(graphdef, params, seq, seq_mask, n: int, dropout_key=None):
  """The logits that predict the N response tokens of a [B, L+N] sequence:
  [B, N, V] (position t of the response is read at the token before it)."""
  positions, seg = sequence_inputs(seq_mask)
  logits, _ = nnx.merge(graphdef, params)(seq, positions, seg,
                                          dropout_key=dropout_key)
  return logits[:, -n - 1:-1]


def response_logprobs(graphdef, params, seq, seq_mask, response, dropout_key=None):
  """log pi(y_t | ...) for the N response tokens of a [B, L+N] sequence."""
  logits = response_logits(graphdef, params, seq, seq_mask, response.shape[1],
                           dropout_key)
  return losses.token_logprobs(logits, response)


def rowwise_logprobs(graphdef, params, seq, seq_mask, response, rows: int):
  """`response_logprobs` over `rows` rows at a time (lax.map), so the forward
  has the shape of a learner minibatch; all at once if rows is 0 or does not
  divide the batch."""
  b = seq.shape[0]
  if not rows or rows >= b or b % rows:
    return response_logprobs(graphdef, params, seq, seq_mask, response)
  split = lambda x: x.reshape((b // rows, rows) + x.shape[1:])
  out = jax.lax.map(lambda xs: response_logprobs(graphdef, params, *xs),
                    (split(seq), split(seq_mask), split(response)))
  return out.reshape((b,) + out.shape[2:])


def response_values(graphdef, params, seq, seq_mask, n: int):
  """V at the state before each response token: [B, N]."""
  positions, seg = sequence_inputs(seq_mask)
  values = nnx.merge(graphdef, params)(seq, positions, seg)
  return values[:, -n - 1:-1]


def sequence_scores(graphdef, params, seq, seq_mask):
  """The reward model read at each row's last real token: [B]."""
  positions, seg = sequence_inputs(seq_mask)
  values = nnx.merge(graphdef, params)(seq, positions, seg)
  return last_token_values(values, seq_mask)


def shape_rewards(score, logp, ref_logp, mask, kl_coef, kl_kind: str = "k1"):
  """Per-token reward: -beta * KL_t everywhere, plus the score on the last token.

  Returns (rewards [B, N], kl [B, N]); both zero outside the mask.
  """
  kl = jnp.where(mask, losses.kl_penalty(logp, ref_logp, kl_kind), 0.0)
  t = jnp.arange(mask.shape[1])
  last = jnp.max(jnp.where(mask, t, -1), axis=1)
  final = (t[None, :] == last[:, None]) & mask
  rewards = -kl_coef * kl + jnp.where(final, score[:, None], 0.0)
  return jnp.where(mask, rewards, 0.0), kl


def make_experience(models: dict, params: dict, prompt_tokens, prompt_mask, key,
                    kl_coef, rc: RolloutConfig) -> tuple[Experience, dict]:
  """The whole rollout phase; `models`/`params` keyed policy, ref, rm, value.

  = `score_sample` of `sample` in one program; the sampling layout
  (`stages.ppo`) runs the two as separate programs on their own meshes.
  """
  out = sample(models["policy"], params["policy"], prompt_tokens, prompt_mask, key,
               sample_config(rc))
  return score_sample(models, params, out, prompt_mask, kl_coef, rc)


def sample_config(rc: RolloutConfig) -> SampleConfig:
  """The sampler's settings of the rollout."""
  return SampleConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                      eos_ids=rc.eos_ids, pad_id=rc.pad_id)


def score_sample(models: dict, params: dict, out, prompt_mask, kl_coef,
                 rc: RolloutConfig) -> tuple[Experience, dict]:
  """Everything after sampling: the RM's score of the sampler's output `out`
  (a `SampleOutput` of prompts with `prompt_mask`), then
  `experience_from_sample`."""
  seq_mask = jnp.concatenate([prompt_mask.astype(bool), out.response_mask], axis=1)
  score = sequence_scores(models["rm"], params["rm"], out.tokens, seq_mask)
  return experience_from_sample(models, params, out, seq_mask, score, kl_coef, rc)


def experience_from_sample(models: dict, params: dict, out, seq_mask, score, kl_coef,
                           rc: RolloutConfig) -> tuple[Experience, dict]:
  """What follows sampling and RM scoring: reference log-probs, values, shaped
  rewards and GAE for the sampler's output `out` (its own log-probs serve as
  the old policy's unless `rc.recompute_logp`). `params` needs the "ref" and
  "value" entries (and "policy" to recompute)."""
  mask = out.response_mask
  seq, n = out.tokens, rc.max_new_tokens
  logprobs = lambda name: jnp.where(mask, rowwise_logprobs(
      models[name], params[name], seq, seq_mask, out.response, rc.forward_rows), 0.0)
  ref_logp = logprobs("ref")
  ended = jnp.any(mask & is_eos(out.response, rc.eos_ids), axis=1)
  if rc.missing_eos_penalty is not None:
    score = jnp.where(ended, score, jnp.float32(rc.missing_eos_penalty))
  values = jnp.where(mask, response_values(models["value"], params["value"], seq,
                                           seq_mask, n), 0.0)
  logp = jnp.where(mask, out.logp_raw, 0.0)
  extra = {}
  if rc.recompute_logp:  # How far the sampler's log-probs are from the forward's.
    logp, sampled = logprobs("policy"), logp
    extra["sampler_logp_gap"] = jnp.max(jnp.abs(logp - sampled))
  rewards, kl = shape_rewards(score, logp, ref_logp, mask, kl_coef, rc.kl_kind)
  adv, ret = losses.gae(rewards, values, mask, rc.gamma, rc.lam)
  if rc.whiten_advantages:
    adv = losses.whiten(adv, mask)
  exp = Experience(seq, seq_mask, out.response, mask, logp, ref_logp, values,
                   rewards, adv, ret, score)
  lengths = jnp.sum(mask, axis=1)
  metrics = {
      "score": jnp.mean(score),
      "kl": jnp.mean(jnp.sum(kl, axis=1)),  # Sequence KL to SFT, per episode.
      "kl_coef": kl_coef,
      "reward": jnp.mean(jnp.sum(rewards, axis=1)),
      "response_len": jnp.mean(lengths),
      "eos_rate": jnp.mean(ended),
      "value_mean": jnp.sum(values) / jnp.maximum(jnp.sum(mask), 1),
      **extra,
  }
  return exp, metrics
