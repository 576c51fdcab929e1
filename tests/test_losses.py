"""Tests for instructrl.losses.

Three kinds of check per loss: hand-computed literals (the arithmetic is in
the comments), agreement with a naive float64 numpy loop on random inputs,
and behaviour under jit / grad / bad arguments.
"""

import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl import losses

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOL = dict(rtol=1e-5, atol=1e-5)

# Jitted entry points for the numeric tests: one XLA compile per shape
# (~0.2 s on CPU) instead of eager op-by-op dispatch (~1.5 s per new shape),
# which keeps this file fast. Argument checks are tested on the raw functions.
J = types.SimpleNamespace(
    token_logprobs=jax.jit(losses.token_logprobs),
    masked_lm_loss=jax.jit(losses.masked_lm_loss),
    ranking_loss=jax.jit(losses.ranking_loss),
    kl_penalty=jax.jit(losses.kl_penalty, static_argnames="kind"),
    gae=jax.jit(losses.gae),
    whiten=jax.jit(losses.whiten, static_argnames="shift_mean"),
    ppo_policy_loss=jax.jit(losses.ppo_policy_loss),
    value_loss=jax.jit(losses.value_loss),
    token_entropy=jax.jit(losses.token_entropy),
)


def _sp(x):
  """softplus(x) = log(1 + e^x); note −log σ(d) = softplus(−d)."""
  return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------
# token_logprobs / masked_lm_loss
# ----------------------------------------------------------------------------


def _lm_example():
  logits = np.array(
      [[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [50.0, -3.0, 7.0]]], np.float32
  )
  targets = np.array([[0, 2, 1]], np.int32)
  mask = np.array([[1, 1, 0]], np.float32)
  return logits, targets, mask


def test_masked_lm_loss_hand_computed():
  logits, targets, mask = _lm_example()
  loss, m = J.masked_lm_loss(logits, targets, mask)
  # Token 0: −log p = log(e² + 2) − 2 = 0.2395447662218846 (argmax right).
  # Token 1: −log p = log(2 + e) − 0 = 1.5514447139320509 (argmax wrong).
  # Token 2 is masked out. loss = (0.23954 + 1.55144) / 2.
  np.testing.assert_allclose(loss, 0.8954947400769677, **_TOL)
  np.testing.assert_allclose(m["loss"], loss)
  np.testing.assert_allclose(m["accuracy"], 0.5)
  np.testing.assert_allclose(m["num_tokens"], 2.0)


def test_masked_lm_loss_empty_mask_is_zero_with_zero_grad():
  logits, targets, _ = _lm_example()
  mask = np.zeros_like(targets, dtype=bool)
  f = lambda z: J.masked_lm_loss(z, targets, mask)[0]
  loss, grad = jax.value_and_grad(f)(jnp.asarray(logits))
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_token_logprobs_matches_numpy_and_is_stable():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
  logits[0, 0] += 1e4  # a naive exp would overflow
  targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
  x = logits.astype(np.float64)
  ref = np.take_along_axis(x, targets[..., None], -1)[..., 0] - (
      x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
  )
  out = J.token_logprobs(logits, targets)
  assert out.shape == (3, 5) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, **_TOL)


def test_token_logprobs_bf16_computes_in_float32():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 7, size=(2, 3)), jnp.int32)
  out = J.token_logprobs(logits, targets)
  assert out.dtype == jnp.float32
  ref = J.token_logprobs(logits.astype(jnp.float32), targets)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_token_entropy_hand_computed_stable_and_bf16():
  # Uniform over 4: log 4. One-hot (the others -inf): 0, not NaN. Two equal
  # logits and a -inf: log 2. A 1e4 offset changes nothing.
  logits = np.array([[[0.0, 0.0, 0.0, 0.0], [5.0, -np.inf, -np.inf, -np.inf],
                      [1e4 + 1.0, 1e4 + 1.0, -np.inf, 1e4 + 1.0 - 50.0]]], np.float32)
  out = J.token_entropy(logits)
  assert out.shape == (1, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, :2], [math.log(4), 0.0], atol=1e-6)
  p = np.array([1.0, 1.0, math.exp(-50.0)])
  p /= p.sum()
  np.testing.assert_allclose(out[0, 2], -(p * np.log(p)).sum(), atol=1e-6)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 9)) * 3
  q = np.exp(x - x.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  np.testing.assert_allclose(J.token_entropy(x.astype(np.float32)),
                             -(q * np.log(q)).sum(-1), **_TOL)
  xb = jnp.asarray(x, jnp.bfloat16)
  np.testing.assert_allclose(J.token_entropy(xb),
                             J.token_entropy(xb.astype(jnp.float32)), rtol=1e-6)
  with pytest.raises(TypeError, match="token_entropy"):
    losses.token_entropy(jnp.ones((2, 3), jnp.int32))


def test_masked_lm_loss_random_vs_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 6, 9)).astype(np.float32)
  targets = rng.integers(0, 9, size=(4, 6)).astype(np.int32)
  mask = rng.random((4, 6)) < 0.6
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  ref = (nll * mask).sum() / mask.sum()
  acc = ((x.argmax(-1) == targets) * mask).sum() / mask.sum()
  loss, m = J.masked_lm_loss(logits, targets, mask)
  np.testing.assert_allclose(loss, ref, **_TOL)
  np.testing.assert_allclose(m["accuracy"], acc, **_TOL)
  np.testing.assert_allclose(m["num_tokens"], mask.sum())


# ----------------------------------------------------------------------------
# ranking_loss
# ----------------------------------------------------------------------------


def _ranking_example():
  nan = np.nan
  scores = np.array(
      [
          [1.0, 2.0, 0.0, -1.0],  # A: K=4, strict ranking 0 < 1 < 2 < 3.
          [0.5, 1.5, nan, 9.0],  # B: K=2 (ragged), second is preferred.
          [3.0, 1.0, 2.0, nan],  # C: K=3, all tied -> no pairs.
          [0.0, 1.0, 0.0, 5.0],  # D: K=3, items 0 and 1 tied.
      ],
      np.float32,
  )
  ranks = np.array(
      [[0, 1, 2, 3], [1, 0, 0, 0], [2, 2, 2, 0], [0, 0, 1, 0]], np.int32
  )
  valid = np.array(
      [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]], bool
  )
  return scores, ranks, valid


def test_ranking_loss_hand_computed():
  loss, m = J.ranking_loss(*_ranking_example())
  # A: pairs (i<j by rank) and d = s_i − s_j: (0,1) −1, (0,2) 1, (0,3) 2,
  #    (1,2) 2, (1,3) 3, (2,3) 1; L_A = mean softplus(−d) over C(4,2) = 6.
  l_a = (_sp(1) + _sp(-1) + _sp(-2) + _sp(-2) + _sp(-3) + _sp(-1)) / 6
  np.testing.assert_allclose(l_a, 0.3737047393690593)
  # B: one pair (1,0), d = 1.5 − 0.5 = 1; L_B = softplus(−1).
  l_b = _sp(-1)
  np.testing.assert_allclose(l_b, 0.31326168751822286)
  # C: all ties -> 0 pairs, excluded from the average over prompts.
  # D: pairs (0,2) d = 0 and (1,2) d = 1; L_D = (log 2 + softplus(−1)) / 2.
  l_d = (math.log(2) + _sp(-1)) / 2
  np.testing.assert_allclose(l_d, 0.5032044340390841)
  # loss = (L_A + L_B + L_D) / 3, not / 4.
  np.testing.assert_allclose(loss, 0.39672362030878877, **_TOL)
  assert float(m["num_pairs"]) == 9.0  # 6 + 1 + 0 + 2
  assert float(m["num_prompts"]) == 3.0
  # Pooled accuracy: A 5/6 right, B 1/1, D 1/2 (d = 0 is not a win) -> 7/9.
  np.testing.assert_allclose(m["accuracy"], 7 / 9, **_TOL)
  # Pooled margin: (8 + 1 + 1) / 9.
  np.testing.assert_allclose(m["margin"], 10 / 9, **_TOL)


def test_ranking_loss_two_completions_is_bradley_terry():
  # K = 2: −log σ(s_w − s_l) = softplus(−(3 − 1)) = 0.12692801104297263.
  loss, _ = J.ranking_loss(
      np.array([[1.0, 3.0]], np.float32),
      np.array([[1, 0]], np.int32),
      np.array([[True, True]]),
  )
  np.testing.assert_allclose(loss, 0.12692801104297263, **_TOL)


def test_ranking_loss_no_pairs_anywhere_is_zero():
  loss, m = J.ranking_loss(
      np.ones((2, 3), np.float32),
      np.zeros((2, 3), np.int32),
      np.ones((2, 3), bool),
  )
  assert float(loss) == 0.0 and float(m["num_prompts"]) == 0.0


def _ranking_ref(scores, ranks, valid):
  """Naive loops in float64: per-prompt mean over pairs, mean over prompts."""
  prompt_losses, wins, margins = [], [], []
  s = scores.astype(np.float64)
  for p in range(scores.shape[0]):
    pair_losses = []
    for i in range(scores.shape[1]):
      for j in range(scores.shape[1]):
        if valid[p, i] and valid[p, j] and ranks[p, i] < ranks[p, j]:
          d = s[p, i] - s[p, j]
          pair_losses.append(np.logaddexp(0.0, -d))
          wins.append(d > 0)
          margins.append(d)
    if pair_losses:
      prompt_losses.append(np.mean(pair_losses))
  loss = np.mean(prompt_losses) if prompt_losses else 0.0
  acc = np.mean(wins) if wins else 0.0
  return loss, acc, len(wins), len(prompt_losses), margins


def _ranking_grad_ref(scores, ranks, valid):
  """Analytic dL/ds: pair (i, j) adds g = −σ(−d)/(n_p·N) to s_i, −g to s_j.

  n_p = pairs of prompt p, N = prompts with a pair, d = s_i − s_j.
  """
  s = scores.astype(np.float64)
  pairs = [
      [
          (i, j)
          for i in range(s.shape[1])
          for j in range(s.shape[1])
          if valid[p, i] and valid[p, j] and ranks[p, i] < ranks[p, j]
      ]
      for p in range(s.shape[0])
  ]
  num_prompts = sum(1 for pp in pairs if pp)
  grad = np.zeros_like(s)
  for p, pp in enumerate(pairs):
    for i, j in pp:
      g = -1.0 / (1.0 + np.exp(s[p, i] - s[p, j])) / (len(pp) * num_prompts)
      grad[p, i] += g
      grad[p, j] -= g
  return grad


def _random_ranking(rng, p_max=6, k_max=9):
  """Random P ≤ p_max, K ≤ k_max, padded into one [p_max, k_max] shape.

  Padding via `valid` (rows/columns beyond P, K invalid) is exactly the ragged
  case, and one fixed shape means one jit compile for all trials.
  """
  p, k = rng.integers(1, p_max + 1), rng.integers(1, k_max + 1)
  scores = rng.normal(size=(p_max, k_max)).astype(np.float32) * 2
  ranks = rng.integers(0, k // 2 + 1, size=(p_max, k_max)).astype(np.int32)
  valid = rng.random((p_max, k_max)) < 0.75
  valid[p:] = False
  valid[:, k:] = False
  scores[~valid] = np.nan  # padding must not leak
  return scores, ranks, valid


@jax.jit
def _ranking_value_and_grad(scores, ranks, valid):
  f = lambda s: losses.ranking_loss(s, ranks, valid)
  return jax.value_and_grad(f, has_aux=True)(scores)


def test_ranking_loss_random_vs_loop_and_grad():
  rng = np.random.default_rng(3)
  for _ in range(30):
    scores, ranks, valid = _random_ranking(rng)
    (loss, m), grad = _ranking_value_and_grad(scores, ranks, valid)
    ref, acc, n_pairs, n_prompts, margins = _ranking_ref(scores, ranks, valid)
    np.testing.assert_allclose(loss, ref, **_TOL)
    np.testing.assert_allclose(m["accuracy"], acc, **_TOL)
    np.testing.assert_allclose(m["margin"], np.mean(margins or [0.0]), **_TOL)
    assert float(m["num_pairs"]) == n_pairs
    assert float(m["num_prompts"]) == n_prompts
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[~valid] == 0.0)
    expected = _ranking_grad_ref(np.nan_to_num(scores), ranks, valid)
    np.testing.assert_allclose(grad, expected, **_TOL)


def test_ranking_loss_grad_matches_finite_differences():
  scores, ranks, valid = _ranking_example()
  scores = np.nan_to_num(scores)
  f = lambda s: J.ranking_loss(s, ranks, valid)[0]
  grad = np.asarray(jax.grad(f)(jnp.asarray(scores)))
  eps = 1e-2
  fd = np.zeros_like(grad)
  for idx in np.ndindex(*scores.shape):
    up, dn = scores.copy(), scores.copy()
    up[idx] += eps
    dn[idx] -= eps
    # Central differences of the float64 loop reference: O(eps²) error.
    fd[idx] = (_ranking_ref(up, ranks, valid)[0]
               - _ranking_ref(dn, ranks, valid)[0]) / (2 * eps)
  np.testing.assert_allclose(grad, fd, atol=1e-4)


# ----------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------


def test_kl_penalty_kinds_hand_computed():
  logp = np.log(np.array([0.5, 0.3], np.float32))
  ref = np.log(np.array([0.25, 0.3], np.float32))
  # log r = ref − logp = log(0.25/0.5) = −log 2 (and 0 for the second token).
  k1 = J.kl_penalty(logp, ref, "k1")
  k2 = J.kl_penalty(logp, ref, "k2")
  k3 = J.kl_penalty(logp, ref, "k3")
  np.testing.assert_allclose(k1, [0.6931471805599453, 0.0], **_TOL)  # log 2
  np.testing.assert_allclose(k2, [0.2402265069591007, 0.0], **_TOL)  # ½log²2
  np.testing.assert_allclose(k3, [0.1931471805599453, 0.0], **_TOL)  # −½+log2


def test_kl_penalty_k3_is_nonnegative_and_unbiased():
  # Sampling tokens from π over a small vocab, mean k1 and k3 → KL(π || π_ref).
  rng = np.random.default_rng(4)
  p = np.array([0.5, 0.3, 0.2])
  q = np.array([0.2, 0.2, 0.6])
  toks = rng.choice(3, size=200_000, p=p)
  logp, ref = np.log(p[toks]), np.log(q[toks])
  kl = float(np.sum(p * np.log(p / q)))
  for kind in ("k1", "k3"):
    est = J.kl_penalty(logp.astype(np.float32), ref.astype(np.float32),
                            kind)
    np.testing.assert_allclose(float(jnp.mean(est)), kl, atol=1e-2)
  k3 = J.kl_penalty(logp.astype(np.float32), ref.astype(np.float32), "k3")
  assert float(jnp.min(k3)) >= 0.0


def test_kl_penalty_unknown_kind():
  with pytest.raises(ValueError, match=r"'k4'.*k1, k2, k3"):
    losses.kl_penalty(np.zeros(2, np.float32), np.zeros(2, np.float32), "k4")


# ----------------------------------------------------------------------------
# gae
# ----------------------------------------------------------------------------


def test_gae_hand_computed_prompt_offset_and_padding():
  # Row: 1 prompt token, 3 response tokens, 2 padding tokens. Off-mask
  # rewards/values are garbage (incl. NaN) and must not enter the recursion.
  rewards = np.array([[9.0, 0.0, 0.0, 1.0, 7.0, np.nan]], np.float32)
  values = np.array([[5.0, 0.5, 0.4, 0.3, 8.0, np.nan]], np.float32)
  mask = np.array([[0, 1, 1, 1, 0, 0]], bool)
  adv, ret = J.gae(rewards, values, mask, gamma=0.9, lam=0.5)
  # γλ = 0.45; bootstrap V' = A' = 0 after t = 3.
  # t=3: δ = 1 + 0 − 0.3 = 0.7;          A = 0.7
  # t=2: δ = 0 + 0.9·0.3 − 0.4 = −0.13;  A = −0.13 + 0.45·0.7 = 0.185
  # t=1: δ = 0 + 0.9·0.4 − 0.5 = −0.14;  A = −0.14 + 0.45·0.185 = −0.05675
  np.testing.assert_allclose(
      adv, [[0.0, -0.05675, 0.185, 0.7, 0.0, 0.0]], **_TOL
  )
  # R = A + V: 0.44325, 0.585, 1.0.
  np.testing.assert_allclose(
      ret, [[0.0, 0.44325, 0.585, 1.0, 0.0, 0.0]], **_TOL
  )


def test_gae_gamma_lam_one_gives_reward_to_go():
  # γ = λ = 1: R_t = Σ_{t' ≥ t} r_t' = 1 everywhere; A = R − V.
  rewards = np.array([[0.0, 0.0, 1.0, 0.0]], np.float32)
  values = np.array([[0.2, 0.5, 0.1, 3.0]], np.float32)
  mask = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)  # numeric mask
  adv, ret = J.gae(rewards, values, mask, 1.0, 1.0)
  np.testing.assert_allclose(adv, [[0.8, 0.5, 0.9, 0.0]], **_TOL)
  np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], **_TOL)


def _gae_ref(rewards, values, mask, gamma, lam):
  """Closed form per contiguous run [s, e): A_t = Σ_l (γλ)^l δ_{t+l}."""
  r, v = rewards.astype(np.float64), values.astype(np.float64)
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    idx = np.flatnonzero(mask[b])
    if idx.size == 0:
      continue
    s, e = idx[0], idx[-1] + 1
    next_v = lambda t: v[b, t + 1] if t + 1 < e else 0.0
    delta = [r[b, t] + gamma * next_v(t) - v[b, t] for t in range(s, e)]
    for t in range(s, e):
      adv[b, t] = sum(
          (gamma * lam) ** l * delta[t - s + l] for l in range(e - t)
      )
  return adv, np.where(mask, adv + v, 0.0)


def test_gae_random_vs_closed_form():
  rng = np.random.default_rng(5)
  b, t = 6, 9
  for _ in range(5):
    starts = rng.integers(0, t + 1, size=b)
    lens = [rng.integers(0, t - s + 1) for s in starts]
    mask = np.zeros((b, t), bool)
    for i, (s, n) in enumerate(zip(starts, lens)):
      mask[i, s : s + n] = True
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    rewards[~mask] = 1e6  # garbage off-mask
    gamma, lam = float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.5, 1.0))
    adv, ret = J.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_ref(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, **_TOL)
    np.testing.assert_allclose(ret, ref_ret, **_TOL)


def test_gae_outputs_are_stop_gradient():
  rewards = jnp.ones((2, 3))
  values = jnp.full((2, 3), 0.5)
  mask = jnp.ones((2, 3), bool)
  f = lambda v: jnp.sum(sum(J.gae(rewards, v, mask, 0.9, 0.9)))
  assert np.all(np.asarray(jax.grad(f)(values)) == 0.0)


# ----------------------------------------------------------------------------
# whiten
# ----------------------------------------------------------------------------


def test_whiten_hand_computed():
  x = np.array([1.0, 2.0, 3.0, 100.0], np.float32)
  mask = np.array([True, True, True, False])
  # μ = 2, σ² = (1 + 0 + 1)/3 = 2/3, 1/√(2/3 + 1e-8) = 1.2247448622060026.
  s = 1.2247448622060026
  np.testing.assert_allclose(J.whiten(x, mask), [-s, 0, s, 0], **_TOL)
  np.testing.assert_allclose(
      J.whiten(x, mask, shift_mean=False), [2 - s, 2, 2 + s, 0], **_TOL
  )


def test_whiten_random_stats():
  rng = np.random.default_rng(6)
  x = rng.normal(3.0, 5.0, size=(4, 7)).astype(np.float32)
  mask = rng.random((4, 7)) < 0.7
  y = np.asarray(J.whiten(x, mask))
  xm = x[mask].astype(np.float64)
  np.testing.assert_allclose(y[mask], (xm - xm.mean()) / xm.std(), **_TOL)
  np.testing.assert_allclose(y[mask].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(y[mask].std(), 1.0, atol=1e-5)
  assert np.all(y[~mask] == 0.0)
  y2 = np.asarray(J.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(y2[mask].mean(), xm.mean(), rtol=1e-5)


# ----------------------------------------------------------------------------
# ppo_policy_loss / value_loss
# ----------------------------------------------------------------------------


def _ppo_example():
  ratio = np.array([1.1, 1.5, 0.5, 0.5, 1.5, 0.9, 7.0], np.float32)
  adv = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -2.0, 5.0], np.float32)
  mask = np.array([1, 1, 1, 1, 1, 1, 0], bool)
  old_logp = np.full(7, -1.0, np.float32)
  return old_logp + np.log(ratio), old_logp, adv, mask


def test_ppo_policy_loss_hand_computed():
  logp, old_logp, adv, mask = _ppo_example()
  loss, m = J.ppo_policy_loss(logp, old_logp, adv, mask, 0.2)
  # min(ρA, clip(ρ, 0.8, 1.2)A) per valid token:
  #   A>0, ρ=1.1 inside:          1.1            (unclipped)
  #   A>0, ρ=1.5 above:     min(1.5, 1.2) =  1.2 (clipped)
  #   A>0, ρ=0.5 below:     min(0.5, 0.8) =  0.5 (unclipped: min keeps it)
  #   A<0, ρ=0.5 below:   min(−0.5, −0.8) = −0.8 (clipped)
  #   A<0, ρ=1.5 above:   min(−1.5, −1.2) = −1.5 (unclipped)
  #   A=−2, ρ=0.9 inside:        −1.8            (unclipped)
  # loss = −(1.1 + 1.2 + 0.5 − 0.8 − 1.5 − 1.8)/6 = 1.3/6.
  np.testing.assert_allclose(loss, 1.3 / 6, **_TOL)
  np.testing.assert_allclose(m["clip_fraction"], 2 / 6, **_TOL)
  # (1.1 + 1.5 + 0.5 + 0.5 + 1.5 + 0.9)/6 = 1.
  np.testing.assert_allclose(m["ratio_mean"], 1.0, **_TOL)
  # k3: mean of ρ − 1 − log ρ over the six ratios.
  np.testing.assert_allclose(m["approx_kl"], 0.0975690801261772, **_TOL)


def test_ppo_policy_loss_grad_zero_exactly_where_clipped():
  logp, old_logp, adv, mask = _ppo_example()
  f = lambda lp: J.ppo_policy_loss(lp, old_logp, adv, mask, 0.2)[0]
  grad = np.asarray(jax.grad(f)(jnp.asarray(logp)))
  # d/dlogp of −ρA/6 is −ρA/6 on unclipped tokens; 0 where clipped/masked.
  ratio = np.exp(logp - old_logp)
  clipped = np.array([0, 1, 0, 1, 0, 0, 1], bool)
  expected = np.where(clipped, 0.0, -ratio * adv / 6)
  np.testing.assert_allclose(grad, expected, **_TOL)


def test_ppo_policy_loss_random_vs_numpy():
  rng = np.random.default_rng(7)
  logp = rng.normal(-2, 1, size=(3, 8)).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, size=(3, 8))).astype(np.float32)
  adv = rng.normal(size=(3, 8)).astype(np.float32)
  mask = rng.random((3, 8)) < 0.7
  eps = 0.2
  lr = logp.astype(np.float64) - old
  r = np.exp(lr)
  obj = np.minimum(r * adv, np.clip(r, 1 - eps, 1 + eps) * adv)
  clipped = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))
  loss, m = J.ppo_policy_loss(logp, old, adv, mask, eps)
  np.testing.assert_allclose(loss, -obj[mask].mean(), **_TOL)
  np.testing.assert_allclose(m["clip_fraction"], clipped[mask].mean(), **_TOL)
  np.testing.assert_allclose(
      m["approx_kl"], (r - 1 - lr)[mask].mean(), **_TOL
  )
  np.testing.assert_allclose(m["ratio_mean"], r[mask].mean(), **_TOL)


def test_value_loss_hand_computed():
  values = np.array([0.1, 0.5, 0.5, -0.5, 4.0], np.float32)
  old = np.zeros(5, np.float32)
  returns = np.array([1.0, 1.0, 0.0, 0.3, -9.0], np.float32)
  mask = np.array([1, 1, 1, 1, 0], np.int32)
  loss, m = J.value_loss(values, old, returns, mask, 0.2)
  # V_clip = clip(V, −0.2, 0.2) = 0.1, 0.2, 0.2, −0.2.
  #   (V−R)², (V_clip−R)²: 0.81 0.81 | 0.25 0.64* | 0.25 0.04 | 0.64 0.25
  # (* = clipped term strictly larger). max: 0.81, 0.64, 0.25, 0.64.
  # loss = ½·(0.81 + 0.64 + 0.25 + 0.64)/4 = ½·2.34/4 = 0.2925.
  np.testing.assert_allclose(loss, 0.2925, **_TOL)
  np.testing.assert_allclose(m["value_clip_fraction"], 0.25, **_TOL)
  np.testing.assert_allclose(m["value_mean"], 0.15, **_TOL)  # 0.6/4
  np.testing.assert_allclose(m["return_mean"], 0.575, **_TOL)  # 2.3/4
  np.testing.assert_allclose(m["value_error"], 1.95 / 4, **_TOL)


def test_value_loss_random_vs_numpy():
  rng = np.random.default_rng(8)
  v = rng.normal(size=(3, 8)).astype(np.float32)
  old = (v + rng.normal(0, 0.5, size=v.shape)).astype(np.float32)
  ret = rng.normal(size=v.shape).astype(np.float32)
  mask = rng.random(v.shape) < 0.7
  eps = 0.3
  v64 = v.astype(np.float64)
  vc = old + np.clip(v64 - old, -eps, eps)
  e, ec = (v64 - ret) ** 2, (vc - ret) ** 2
  loss, m = J.value_loss(v, old, ret, mask, eps)
  np.testing.assert_allclose(loss, 0.5 * np.maximum(e, ec)[mask].mean(), **_TOL)
  np.testing.assert_allclose(
      m["value_clip_fraction"], (ec > e)[mask].mean(), **_TOL
  )


# ----------------------------------------------------------------------------
# jit and argument checks
# ----------------------------------------------------------------------------


def test_everything_matches_under_jit():
  logits, targets, lm_mask = _lm_example()
  logp, old_logp, adv, mask = _ppo_example()
  cases = [
      (losses.token_logprobs, (logits, targets)),
      (losses.masked_lm_loss, (logits, targets, lm_mask)),
      (losses.ranking_loss, _ranking_example()),
      (lambda a, b: losses.kl_penalty(a, b, "k3"), (logp, old_logp)),
      (losses.gae, (adv[None], adv[None], mask[None], 0.9, 0.95)),
      (losses.whiten, (adv, mask)),
      (losses.ppo_policy_loss, (logp, old_logp, adv, mask, 0.2)),
      (losses.value_loss, (logp, old_logp, adv, mask, 0.2)),
  ]
  for fn, args in cases:
    eager, jitted = fn(*args), jax.jit(fn)(*args)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        eager, jitted,
    )


def test_token_logprobs_errors():
  z = np.zeros((2, 3, 5), np.float32)
  t = np.zeros((2, 3), np.int32)
  with pytest.raises(ValueError, match=r"`logits` must have rank 3.*\(2, 3\)"):
    losses.token_logprobs(z[..., 0], t)
  with pytest.raises(ValueError, match=r"`targets` must have rank 2"):
    losses.token_logprobs(z, t[0])
  with pytest.raises(ValueError, match=r"logits \(2, 3, 5\), targets \(2, 4\)"):
    losses.token_logprobs(z, np.zeros((2, 4), np.int32))
  with pytest.raises(TypeError, match=r"`targets` must be an integer.*float"):
    losses.token_logprobs(z, t.astype(np.float32))
  with pytest.raises(ValueError, match=r"`mask` must have the shape"):
    losses.masked_lm_loss(z, t, np.ones((2, 2)))


def test_ranking_loss_errors():
  s = np.zeros((2, 4), np.float32)
  r = np.zeros((2, 4), np.int32)
  v = np.ones((2, 4), bool)
  with pytest.raises(ValueError, match=r"`scores` must have rank 2.*\(8,\)"):
    losses.ranking_loss(s.reshape(-1), r, v)
  with pytest.raises(
      ValueError, match=r"scores \(2, 4\), ranks \(2, 3\), valid \(2, 4\)"
  ):
    losses.ranking_loss(s, r[:, :3], v)
  with pytest.raises(TypeError, match=r"`ranks` must be an integer.*float32"):
    losses.ranking_loss(s, r.astype(np.float32), v)
  with pytest.raises(TypeError, match=r"`valid` must be bool.*int32"):
    losses.ranking_loss(s, r, v.astype(np.int32))
  with pytest.raises(TypeError, match=r"`scores` must be floating"):
    losses.ranking_loss(r, r, v)
  # Same checks fire at trace time under jit.
  with pytest.raises(TypeError, match=r"`ranks`"):
    jax.jit(losses.ranking_loss)(s, r.astype(np.float32), v)


def test_ppo_gae_whiten_errors():
  a = np.zeros((2, 3), np.float32)
  m = np.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"rewards \(2, 3\), values \(2, 4\)"):
    losses.gae(a, np.zeros((2, 4), np.float32), m, 0.9, 0.9)
  with pytest.raises(ValueError, match=r"`rewards` must have rank 2"):
    losses.gae(a[0], a[0], m[0], 0.9, 0.9)
  with pytest.raises(ValueError, match=r"old_logp \(3,\)"):
    losses.ppo_policy_loss(a, np.zeros(3, np.float32), a, m, 0.2)
  with pytest.raises(ValueError, match=r"mask \(2, 2\)"):
    losses.value_loss(a, a, a, m[:, :2], 0.2)
  with pytest.raises(ValueError, match=r"x \(2, 3\), mask \(3,\)"):
    losses.whiten(a, m[0])
  with pytest.raises(TypeError, match=r"`logp` must be floating"):
    losses.kl_penalty(np.zeros(3, np.int32), np.zeros(3, np.float32))


def test_import_does_not_pull_in_tensorflow_or_seqio():
  code = (
      "import sys, instructrl.losses; "
      "print([m for m in ('tensorflow', 'seqio') if m in sys.modules])"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (_REPO, env.get("PYTHONPATH")) if p
  )
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=_REPO, env=env, capture_output=True,
      text=True, check=True, timeout=120,
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
