"""Static argument checks for `instructrl.losses`.

They look only at static shapes and dtypes, so they run once at trace time
and cost nothing under `jax.jit`. They raise `ValueError` (shapes, ranks,
unknown options) or `TypeError` (dtypes) naming the loss, the argument and
what was seen. The per-loss checks return their arguments as jax arrays, so
a loss converts and checks in one line and its body is only the math.

Like `instructrl.losses`, this imports only jax and the standard library.
"""

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

KL_KINDS = ("k1", "k2", "k3")


def _shapes(**arrays: Any) -> str:
  return ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())


def _check_rank(fn: str, name: str, x: Array, rank: int, dims: str) -> None:
  if x.ndim != rank:
    raise ValueError(
        f"{fn}: `{name}` must have rank {rank} ({dims}); got shape"
        f" {tuple(x.shape)}."
    )


def _check_same_shape(fn: str, **arrays: Array) -> None:
  shapes = {tuple(v.shape) for v in arrays.values()}
  if len(shapes) != 1:
    names = ", ".join(f"`{k}`" for k in arrays)
    raise ValueError(
        f"{fn}: {names} must all have the same shape; got"
        f" {_shapes(**arrays)}."
    )


def _check_float(fn: str, name: str, x: Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: `{name}` must be floating point; got {x.dtype}.")


def _check_int(fn: str, name: str, x: Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{fn}: `{name}` must be an integer dtype; got {x.dtype}.")


def _check_bool(fn: str, name: str, x: Array) -> None:
  if x.dtype != jnp.bool_:
    raise TypeError(f"{fn}: `{name}` must be bool; got {x.dtype}.")


def _check_mask(fn: str, name: str, x: Array) -> None:
  # Masks are bool or real numeric weights; anything else (complex, strings)
  # is a caller bug worth failing loudly on.
  real = jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(
      x.dtype, jnp.floating
  )
  if not (x.dtype == jnp.bool_ or real):
    raise TypeError(f"{fn}: `{name}` must be bool or real; got {x.dtype}.")


# ----------------------------------------------------------------------------
# One check per loss, in the order the loss reads its arguments, so the first
# mistake reported is the same whichever way a loss is called.
# ----------------------------------------------------------------------------


def token_logprobs_args(logits: Array, targets: Array) -> tuple[Array, Array]:
  fn = "token_logprobs"
  logits, targets = jnp.asarray(logits), jnp.asarray(targets)
  _check_rank(fn, "logits", logits, 3, "[B, T, V]")
  _check_rank(fn, "targets", targets, 2, "[B, T]")
  if logits.shape[:2] != targets.shape:
    raise ValueError(
        f"{fn}: `logits` [B, T, V] and `targets` [B, T] must agree on B, T;"
        f" got {_shapes(logits=logits, targets=targets)}."
    )
  _check_float(fn, "logits", logits)
  _check_int(fn, "targets", targets)
  return logits, targets


def masked_lm_args(targets: Array, mask: Array) -> tuple[Array, Array]:
  """The mask against the targets; `token_logprobs_args` checks the rest."""
  fn = "masked_lm_loss"
  mask = jnp.asarray(mask)
  _check_mask(fn, "mask", mask)
  targets = jnp.asarray(targets)
  if mask.shape != targets.shape:
    raise ValueError(
        f"{fn}: `mask` must have the shape of `targets` [B, T]; got"
        f" {_shapes(targets=targets, mask=mask)}."
    )
  return targets, mask


def ranking_args(scores: Array, ranks: Array,
                 valid: Array) -> tuple[Array, Array, Array]:
  fn = "ranking_loss"
  scores, ranks, valid = map(jnp.asarray, (scores, ranks, valid))
  _check_rank(fn, "scores", scores, 2, "[P, K]")
  _check_rank(fn, "ranks", ranks, 2, "[P, K]")
  _check_rank(fn, "valid", valid, 2, "[P, K]")
  _check_same_shape(fn, scores=scores, ranks=ranks, valid=valid)
  _check_float(fn, "scores", scores)
  _check_int(fn, "ranks", ranks)
  _check_bool(fn, "valid", valid)
  return scores, ranks, valid


def kl_args(logp: Array, ref_logp: Array, kind: str) -> tuple[Array, Array]:
  fn = "kl_penalty"
  if kind not in KL_KINDS:
    raise ValueError(
        f"{fn}: unknown kind {kind!r}; allowed kinds are"
        f" {', '.join(KL_KINDS)}."
    )
  logp, ref_logp = jnp.asarray(logp), jnp.asarray(ref_logp)
  _check_same_shape(fn, logp=logp, ref_logp=ref_logp)
  _check_float(fn, "logp", logp)
  _check_float(fn, "ref_logp", ref_logp)
  return logp, ref_logp


def gae_args(rewards: Array, values: Array, mask: Array) -> list[Array]:
  rewards, values, mask = map(jnp.asarray, (rewards, values, mask))
  _check_rank("gae", "rewards", rewards, 2, "[B, T]")
  return token_args("gae", rewards=rewards, values=values, mask=mask)


def token_args(fn: str, **arrays: Array) -> list[Array]:
  """Per-token arrays (GAE, whiten, PPO): one shape, mask last, others float."""
  arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
  *floats, (mask_name, mask) = arrays.items()
  _check_same_shape(fn, **arrays)
  for name, x in floats:
    _check_float(fn, name, x)
  _check_mask(fn, mask_name, mask)
  return list(arrays.values())
