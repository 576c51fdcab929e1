"""Losses for the InstructGPT pipeline: SFT, reward model and PPO-ptx.

Every function here is pure and jittable. Argument checks look only at
static shapes and dtypes, so they run once at trace time and cost nothing
under `jax.jit`; they raise `ValueError` (shapes, ranks, unknown options) or
`TypeError` (dtypes) naming the argument and what was seen. They live in
`instructrl.loss_checks`, so this module is the math.

Conventions:
  * Masks may be bool or numeric {0, 1}; a position counts when mask != 0.
    Masked means use `_masked_mean`, which returns 0 for an empty mask.
  * Per-token inputs outside a mask (scores, rewards, values, log-probs,
    advantages) are never trusted: they are replaced with zeros via
    `jnp.where` before any arithmetic, so NaN/inf padding leaks neither into
    the forward value nor into gradients. (The exception is `logits` in
    `masked_lm_loss`: the loss is still finite, but a NaN logit row would
    give a NaN gradient for that row; model outputs are finite anyway.)
  * All arithmetic is done in float32, whatever the input float dtype, since
    bf16 sums over tokens, pairs or time lose too many bits.

This module imports only jax and the standard library on purpose: the model,
sampler and training steps import it, and they must not pull in TensorFlow or
seqio (those live in `instructrl.data`).
"""

import jax
import jax.numpy as jnp

from instructrl import loss_checks

Array = jax.Array
Metrics = dict[str, Array]


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _where0(mask: Array, x: Array) -> Array:
  """x where mask, else exactly 0 (unlike `mask * x`, NaN/inf do not leak)."""
  return jnp.where(mask, x, jnp.zeros_like(x))


def _masked_mean(x: Array, mask: Array) -> Array:
  """Σ mask·x / Σ mask over all axes, and 0 when Σ mask = 0.

  Args:
    x: values, any float dtype; entries outside the mask may be NaN/inf.
    mask: same shape; bool or numeric weights (a position counts iff != 0).

  Returns:
    A float32 scalar. The guard uses `where` on the denominator rather than
    `max(Σ mask, 1)` so that fractional weights summing below 1 are still
    normalised correctly, and so the gradient of the empty case is 0, not NaN.
  """
  w = _f32(mask)
  num = jnp.sum(_where0(w != 0, _f32(x) * w))
  den = jnp.sum(w)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# ----------------------------------------------------------------------------
# Supervised fine-tuning.
# ----------------------------------------------------------------------------


def token_logprobs(logits: Array, targets: Array) -> Array:
  """Log-probability of each target token under softmax(logits).

    log p(y_t) = z_{t, y_t} − logsumexp_v z_{t, v}

  Only [B, T] reductions (row max, log-normaliser, gathered logit) are built;
  the full [B, T, V] log-softmax is never materialised (the float32 cast and
  exp(z − m) fuse into the reduction under jit). The sum runs in float32 even
  for bf16 logits, since a bf16 sum over a 32k+ vocabulary is badly rounded.

  Args:
    logits: [B, T, V] floating.
    targets: [B, T] integer token ids in [0, V).

  Returns:
    [B, T] float32 log-probabilities.
  """
  logits, targets = loss_checks.token_logprobs_args(logits, targets)
  logits = logits.astype(jnp.float32)
  # Shift by the row max m and return (z_y − m) − log Σ exp(z − m) rather
  # than z_y − logsumexp(z): both terms of the latter are ~m, so for large
  # logits it cancels catastrophically in float32, while z_y − m is exact.
  # m is a constant for the gradient (it cancels analytically); a non-finite
  # max (a row of −inf) is replaced by 0 so it cannot produce inf − inf.
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  log_norm = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
  return (target_logit - m)[..., 0] - log_norm


def token_entropy(logits: Array) -> Array:
  """Entropy of softmax(logits) at each position, in nats.

    H_t = −Σ_v p_v log p_v = log Σ_v exp(z_v − m) − Σ_v p_v (z_v − m),
    p = softmax(z), m = max_v z_v

  The shift by the row max keeps both terms finite for large logits; p·(z − m)
  is 0 where p underflows to 0, so a −inf logit contributes nothing (not NaN).
  Float32 throughout, as `token_logprobs`.

  Args:
    logits: [..., V] floating.

  Returns:
    [...] float32 entropies, in [0, log V].
  """
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating) or logits.ndim < 1:
    raise TypeError(f"token_entropy: `logits` must be floating with a vocabulary "
                    f"axis; got {logits.dtype} {tuple(logits.shape)}.")
  z = logits.astype(jnp.float32)
  m = jnp.max(z, axis=-1, keepdims=True)
  z = z - jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(z)
  total = jnp.sum(e, axis=-1)
  weighted = jnp.sum(_where0(e > 0, e * z), axis=-1)
  return jnp.log(total) - weighted / total


def masked_lm_loss(logits: Array, targets: Array,
                   mask: Array) -> tuple[Array, Metrics]:
  """Token-averaged cross-entropy over the masked (response) tokens.

    loss = Σ_{b,t} m_{bt} · (−log p(y_{bt})) / Σ_{b,t} m_{bt}   (0 if Σ m = 0)

  Args:
    logits: [B, T, V] floating.
    targets: [B, T] integer.
    mask: [B, T] bool or numeric weights.

  Returns:
    (loss, metrics) with metrics "loss", "accuracy" (masked mean of
    argmax(logits) == target), "num_tokens" (Σ mask) and "perplexity"
    (exp(loss)).
  """
  targets, mask = loss_checks.masked_lm_args(targets, mask)
  logp = token_logprobs(logits, targets)
  loss = _masked_mean(-logp, mask)
  correct = jnp.argmax(logits, axis=-1) == targets
  metrics = {
      "loss": loss,
      "accuracy": _masked_mean(correct, mask),
      "num_tokens": jnp.sum(_f32(mask)),
      "perplexity": jnp.exp(loss),
  }
  return loss, jax.lax.stop_gradient(metrics)


# ----------------------------------------------------------------------------
# Reward model.
# ----------------------------------------------------------------------------


def ranking_loss(scores: Array, ranks: Array,
                 valid: Array) -> tuple[Array, Metrics]:
  """Reward-model pairwise ranking loss, InstructGPT (Ouyang et al. 2022) Eq. 1.

  For prompt p, the counted pairs are
    S_p = {(i, j) : valid_i ∧ valid_j ∧ rank_i < rank_j}
  (lower rank = preferred; equal ranks are ties and give no pair). Then
    L_p  = (1 / |S_p|) Σ_{(i,j) ∈ S_p} −log σ(s_i − s_j)
    loss = (1 / |Q|) Σ_{p ∈ Q} L_p,   Q = {p : |S_p| ≥ 1}
  so with K ranked completions and no ties each pair weighs 1 / C(K, 2), as in
  the paper, and prompts with no pair (one completion, all ties) are excluded
  from the average rather than dragging it towards 0. loss = 0 if Q is empty.

  Taking one score per completion (not per pair) is the point of Eq. 1: the
  reward model runs K forward passes per prompt, not C(K, 2) × 2; the [P, K, K]
  pair mask is built here by broadcasting.

  Args:
    scores: [P, K] floating reward-model scores; invalid entries may hold
      anything (even NaN), they are zeroed before use.
    ranks: [P, K] integer ranks, 0 = best.
    valid: [P, K] bool, which completions exist (ragged K per prompt).

  Returns:
    (loss, metrics): "loss"; "accuracy" = fraction of all counted pairs (pooled
    over prompts) with s_i > s_j; "margin" = mean of s_i − s_j over counted
    pairs (pooled); "num_pairs" = Σ_p |S_p|; "num_prompts" = |Q|.
  """
  scores, ranks, valid = loss_checks.ranking_args(scores, ranks, valid)
  s = _where0(valid, scores.astype(jnp.float32))
  # pair[p, i, j]: completion i is preferred over completion j.
  pair = (
      valid[:, :, None] & valid[:, None, :]
      & (ranks[:, :, None] < ranks[:, None, :])
  )
  diff = _where0(pair, s[:, :, None] - s[:, None, :])
  pair_nll = _where0(pair, -jax.nn.log_sigmoid(diff))
  n_pairs = jnp.sum(pair, axis=(1, 2)).astype(jnp.float32)  # [P]
  has_pair = n_pairs > 0
  prompt_loss = jnp.sum(pair_nll, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
  loss = _masked_mean(prompt_loss, has_pair)
  metrics = {
      "loss": loss,
      "accuracy": _masked_mean(diff > 0, pair),
      "margin": _masked_mean(diff, pair),
      "num_pairs": jnp.sum(n_pairs),
      "num_prompts": jnp.sum(has_pair.astype(jnp.float32)),
  }
  return loss, jax.lax.stop_gradient(metrics)


# ----------------------------------------------------------------------------
# PPO.
# ----------------------------------------------------------------------------


def kl_penalty(logp: Array, ref_logp: Array, kind: str = "k1") -> Array:
  """Per-token estimator of KL(π || π_ref) from tokens sampled from π.

  With log r = ref_logp − logp (so E_π[r] = 1), Schulman's estimators are
    k1 = −log r = logp − ref_logp      unbiased, high variance, can be < 0
    k2 = ½ (log r)²                    biased, low variance, ≥ 0
    k3 = (r − 1) − log r               unbiased, low variance, ≥ 0
  k3 uses expm1 so it stays accurate (and ≥ 0) when r ≈ 1.

  Args:
    logp: [...] log π(token) of the sampled tokens.
    ref_logp: same shape, log π_ref(token).
    kind: one of "k1", "k2", "k3" (static).

  Returns:
    float32 array of the shape of `logp`.
  """
  logp, ref_logp = loss_checks.kl_args(logp, ref_logp, kind)
  log_r = _f32(ref_logp) - _f32(logp)
  if kind == "k1":
    return -log_r
  if kind == "k2":
    return 0.5 * jnp.square(log_r)
  return jnp.expm1(log_r) - log_r


def gae(rewards: Array, values: Array, mask: Array, gamma: float | Array,
        lam: float | Array) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over the response.

  Scanning t = T−1 … 0 with carry (V', A') = value and advantage of the next
  valid token:
    δ_t = r_t + γ V' − V_t
    A_t = δ_t + γ λ A'
    R_t = A_t + V_t
  and V' = A' = 0 after the last valid token (the episode ends there, so there
  is nothing to bootstrap from). Positions with mask = 0 output 0 and pass a
  zero carry, so the trailing padding cannot leak into the last valid token
  and prompt tokens never enter the recursion; their rewards/values are
  replaced by 0 with `where`, so even NaN there is harmless. The mask is meant
  to be one contiguous run per row; if it had a gap, the recursion would
  restart after the gap (as if it were two episodes).

  Advantages and returns are regression/PPO *targets*: they are wrapped in
  `stop_gradient` so no gradient flows into `values` or `rewards` through
  them, even if a caller computes them inside the differentiated loss.

  Args:
    rewards: [B, T] per-token rewards (e.g. −β·KL plus the RM score on the
      last response token).
    values: [B, T] value estimates V(s_t).
    mask: [B, T] response mask (bool or {0, 1}).
    gamma: discount γ (python float or traced scalar).
    lam: GAE λ.

  Returns:
    (advantages, returns), both [B, T] float32, zero outside the mask.
  """
  rewards, values, mask = loss_checks.gae_args(rewards, values, mask)
  m = mask != 0
  r = _where0(m, _f32(rewards))
  v = _where0(m, _f32(values))
  gamma, lam = _f32(gamma), _f32(lam)

  def step(carry, xs):
    next_v, next_a = carry
    r_t, v_t, m_t = xs
    delta = r_t + gamma * next_v - v_t
    a_t = _where0(m_t, delta + gamma * lam * next_a)
    # v_t is already 0 off-mask, so the carry is 0 there too.
    return (v_t, a_t), a_t

  zeros = jnp.zeros(r.shape[:1], jnp.float32)
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
  advantages = adv_tb.T
  returns = _where0(m, advantages + v)
  return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
  """Masked whitening, as applied to PPO advantages.

    μ  = Σ m x / Σ m
    σ² = Σ m (x − μ)² / Σ m          (population variance, no Bessel term)
    y  = (x − μ) / √(σ² + 1e-8)      [+ μ if not shift_mean]

  The population variance keeps the masked output exactly unit-variance and
  avoids a divide-by-zero for a single valid token. `shift_mean=False` keeps
  the original mean (only rescales), e.g. for rewards whose sign matters.

  Args:
    x: [...] floating.
    mask: same shape, bool or {0, 1}.
    shift_mean: whether to leave the output zero-mean.

  Returns:
    float32 array like `x`, zero outside the mask.
  """
  x, mask = loss_checks.token_args("whiten", x=x, mask=mask)
  m = mask != 0
  x = _where0(m, _f32(x))
  mean = _masked_mean(x, m)
  var = _masked_mean(jnp.square(x - mean), m)
  y = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    y = y + mean
  return _where0(m, y)


def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array,
                    mask: Array,
                    clip_eps: float | Array) -> tuple[Array, Metrics]:
  """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), per response token.

  With ρ = exp(logp − old_logp) and the masked mean ⟨·⟩ over tokens,
    loss = −⟨ min(ρ A, clip(ρ, 1 − ε, 1 + ε) A) ⟩.

  Metrics:
    clip_fraction: ⟨ clip(ρ) A < ρ A ⟩, i.e. the tokens where the clipped term
      is *strictly* the min, which is exactly (A > 0 ∧ ρ > 1 + ε) or
      (A < 0 ∧ ρ < 1 − ε). These are the tokens whose gradient is zero, which
      is what the metric is for; |ρ − 1| > ε alone would also count tokens the
      min leaves unclipped (and A = 0 tokens), overstating clipping.
    approx_kl: ⟨ (ρ − 1) − log ρ ⟩, the k3 estimator of KL(π_old || π_θ) from
      the tokens sampled under π_old: unbiased and ≥ 0 (the ½(log ρ)² k2 form
      is biased).
    ratio_mean: ⟨ ρ ⟩ (≈ 1 on the first epoch over a batch).

  `old_logp` and `advantages` are data: they are stop_gradient'ed here.

  Args:
    logp: [B, T] log π_θ of the sampled tokens (differentiated).
    old_logp: [B, T] log π_old from rollout time.
    advantages: [B, T] (usually whitened GAE advantages).
    mask: [B, T] response mask.
    clip_eps: ε.

  Returns:
    (loss, metrics).
  """
  logp, old_logp, advantages, mask = loss_checks.token_args(
      "ppo_policy_loss", logp=logp, old_logp=old_logp, advantages=advantages,
      mask=mask)
  m = mask != 0
  old_logp = jax.lax.stop_gradient(_f32(old_logp))
  adv = jax.lax.stop_gradient(_where0(m, _f32(advantages)))
  log_ratio = _where0(m, _f32(logp) - old_logp)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
  loss = -_masked_mean(jnp.minimum(unclipped, clipped), mask)
  metrics = {
      "loss": loss,
      "clip_fraction": _masked_mean(clipped < unclipped, mask),
      "approx_kl": _masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
      "ratio_mean": _masked_mean(ratio, mask),
  }
  return loss, jax.lax.stop_gradient(metrics)


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
               clip_eps: float | Array) -> tuple[Array, Metrics]:
  """PPO2-style clipped value loss.

    V_clip = V_old + clip(V − V_old, −ε, ε)
    loss   = ½ ⟨ max((V − R)², (V_clip − R)²) ⟩

  The max is pessimistic: the value head cannot cut its error by moving more
  than ε from the rollout-time estimate in one update.

  Metrics:
    value_clip_fraction: ⟨ (V_clip − R)² > (V − R)² ⟩, the tokens where the
      clipped term is strictly the max, i.e. where the gradient is zero
      (same convention as `clip_fraction` in `ppo_policy_loss`).
    value_mean, return_mean: ⟨V⟩, ⟨R⟩.
    value_error: ⟨ (V − R)² ⟩, the unclipped squared error.

  `old_values` and `returns` are data: they are stop_gradient'ed here.

  Args:
    values: [B, T] current value predictions (differentiated).
    old_values: [B, T] value predictions from rollout time.
    returns: [B, T] targets (from `gae`).
    mask: [B, T] response mask.
    clip_eps: ε, in the units of the value.

  Returns:
    (loss, metrics).
  """
  values, old_values, returns, mask = loss_checks.token_args(
      "value_loss", values=values, old_values=old_values, returns=returns,
      mask=mask)
  m = mask != 0
  v = _where0(m, _f32(values))
  v_old = jax.lax.stop_gradient(_where0(m, _f32(old_values)))
  ret = jax.lax.stop_gradient(_where0(m, _f32(returns)))
  v_clip = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
  err = jnp.square(v - ret)
  err_clip = jnp.square(v_clip - ret)
  loss = 0.5 * _masked_mean(jnp.maximum(err, err_clip), mask)
  metrics = {
      "loss": loss,
      "value_clip_fraction": _masked_mean(err_clip > err, mask),
      "value_mean": _masked_mean(v, mask),
      "return_mean": _masked_mean(ret, mask),
      "value_error": _masked_mean(err, mask),
  }
  return loss, jax.lax.stop_gradient(metrics)
