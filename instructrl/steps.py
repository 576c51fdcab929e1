"""Pure training and evaluation steps: `(state, batch, rng) -> (state, metrics)`.

Steps are module-level functions; their static parts (graphdef, optimizer,
microbatch count) are bound with `functools.partial`, and `jit_step` compiles
them once (through `mesh.jit`) with explicit in/out shardings and the state
donated. The state is
a plain dict pytree {"params", "opt_state", "step"}, so orbax saves it as is.

The RNG passed to a step is folded with the step number inside, so a resumed
run draws exactly the dropout masks an uninterrupted run would have.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from instructrl import losses
from instructrl import mesh as mesh_lib
from instructrl.model.sharded import abstract

State = dict[str, Any]


def make_optimizer(lr: float, total_steps: int, warmup_steps: int = 0,
                   end_lr_frac: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   weight_decay: float = 0.0, clip_norm: float = 1.0,
                   schedule: str = "cosine") -> optax.GradientTransformation:
  """AdamW behind global-norm clipping.

  schedule "cosine": linear warmup, then cosine decay to end_lr_frac * lr
  (the paper's SFT and RM, Appendix C). "constant": warmup from lr/10, then
  constant (the paper's PPO: warmup over the first 10 iterations).
  """
  if schedule == "cosine":
    sched = optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else lr, lr, max(warmup_steps, 0),
        max(total_steps, warmup_steps + 1), end_value=lr * end_lr_frac)
  elif schedule == "constant":
    sched = optax.join_schedules(
        [optax.linear_schedule(lr / 10, lr, max(warmup_steps, 1)),
         optax.constant_schedule(lr)], [max(warmup_steps, 1)])
  else:
    raise ValueError(f"unknown schedule {schedule!r}: use 'cosine' or 'constant'")
  return optax.chain(
      optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
      optax.inject_hyperparams(optax.adamw)(learning_rate=sched, b1=b1, b2=b2,
                                            weight_decay=weight_decay))


def current_lr(opt_state) -> jax.Array:
  """The learning rate the last update used (from inject_hyperparams), or NaN
  for an optimizer that does not expose it."""
  for s in opt_state if isinstance(opt_state, tuple) else (opt_state,):
    if hasattr(s, "hyperparams"):
      return s.hyperparams["learning_rate"]
  return jnp.float32(jnp.nan)


def init_state(params, tx: optax.GradientTransformation) -> State:
  return {"params": params, "opt_state": tx.init(params),
          "step": jnp.zeros((), jnp.int32)}


def _split_micro(batch, n: int):
  """[B, ...] -> [n, B/n, ...] for every leaf."""
  def one(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} "
                       "microbatches")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(one, batch)


class LossFn(NamedTuple):
  """A loss and how much one batch weighs in it.

  `fn(params, batch, rng) -> (loss, metrics)`; `weight(batch)` is the
  batch's share of the full-batch loss (tokens for the LM loss, prompts for
  Eq. 1), by which `accumulate_grads` combines microbatches. Without a
  weight, microbatches count equally.
  """
  fn: Callable
  weight: Callable | None = None


def accumulate_grads(loss: LossFn, params, batch, rng, num_micro: int):
  """Mean loss/grads over `num_micro` microbatches with `lax.scan`.

  With equal-weight microbatches this equals the full-batch gradient of a
  loss that is itself a mean over rows; the LM loss weights by token count,
  so each microbatch's loss is scaled by its share of the tokens
  (`loss.weight`).
  """
  grad_fn = jax.value_and_grad(loss.fn, has_aux=True)
  if num_micro == 1:
    (_, metrics), grads = grad_fn(params, batch, rng)
    return grads, metrics
  micro = _split_micro(batch, num_micro)
  total_w = (None if loss.weight is None
             else jnp.sum(jax.vmap(loss.weight)(micro)))

  def body(carry, xs):
    mb, i = xs
    key = None if rng is None else jax.random.fold_in(rng, i)
    (_, m), g = grad_fn(params, mb, key)
    w = (loss.weight(mb) / total_w) if total_w is not None else 1.0 / num_micro
    acc_g, acc_m = carry
    acc_g = jax.tree.map(lambda a, b: a + w * b, acc_g, g)
    acc_m = jax.tree.map(lambda a, b: a + w * b, acc_m, m)
    return (acc_g, acc_m), None

  zeros_g = jax.tree.map(jnp.zeros_like, params)
  _, m_shape = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                              rng)[0])
  zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
  (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m),
                                     (micro, jnp.arange(num_micro)))
  return grads, metrics


def lm_loss_fn(graphdef) -> LossFn:
  """Masked next-token loss (pretraining, SFT, and PPO-ptx's pretraining term)."""
  def fn(params, batch, rng):
    logits, _ = nnx.merge(graphdef, params)(
        batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key=rng)
    return losses.masked_lm_loss(logits, batch["targets"], batch["loss_mask"])
  return LossFn(fn, lambda batch: jnp.sum(batch["loss_mask"]))


def rm_scores(graphdef, params, batch, rng=None):
  """One reward per completion: [P, K] from tokens [P, K, T] (one forward each)."""
  p, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape(p * k, t)
  model = nnx.merge(graphdef, params)
  # Eq. 1 only sees score differences, so the bias gets a zero gradient; stop
  # it exactly, or Adam would turn float noise into full-size steps. The bias
  # is set after training so that demonstrations score 0 (the paper, 3.5).
  model.bias.set_value(jax.lax.stop_gradient(model.bias[...]))
  r = model.reward(flat(batch["tokens"]), flat(batch["positions"]),
                   flat(batch["segment_ids"]), dropout_key=rng)
  return r.reshape(p, k)


def rm_loss_fn(graphdef) -> LossFn:
  """The paper's Eq. 1 over all pairs of each prompt in the batch."""
  def fn(params, batch, rng):
    scores = rm_scores(graphdef, params, batch, rng)
    return losses.ranking_loss(scores, batch["ranks"], batch["valid"])
  return LossFn(fn, lambda batch: jnp.sum(jnp.any(batch["valid"], axis=1)))


def train_step(state: State, batch, rng, *, loss_fn: LossFn, tx, num_micro: int = 1,
               use_dropout: bool = True):
  """One optimizer update; grads accumulated over microbatches inside."""
  key = jax.random.fold_in(rng, state["step"]) if use_dropout else None
  grads, metrics = accumulate_grads(loss_fn, state["params"], batch, key, num_micro)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                 lr=current_lr(state["opt_state"]))
  return {"params": params, "opt_state": opt_state,
          "step": state["step"] + 1}, metrics


def batch_shardings(mesh, batch_ndims: dict[str, int]) -> dict:
  """Rows split over the data axes, for each named batch leaf of that rank."""
  return {k: mesh_lib.batch_sharding(mesh, n) for k, n in batch_ndims.items()}


def jit_step(step_fn: Callable, state_shardings, mesh,
             batch_ndims: dict[str, int]) -> mesh_lib.Jitted:
  """`mesh_lib.jit` of a step with explicit shardings and the state donated.

  `batch_ndims` names each batch leaf and its rank; rows split over the data
  axes.
  """
  rep = mesh_lib.replicated(mesh)
  return mesh_lib.jit(step_fn, mesh,
                      in_shardings=(state_shardings, batch_shardings(mesh, batch_ndims),
                                    rep),
                      out_shardings=(state_shardings, rep), donate_argnums=(0,))


def opt_state_shardings(param_shardings, tx, abstract_params, mesh):
  """Shardings of `tx.init(params)`.

  Optimizer leaves shaped like a parameter (Adam's mu and nu) take that
  parameter's sharding, matched by key-path suffix; scalars (counts, the
  injected learning rate) are replicated.
  """
  rep = mesh_lib.replicated(mesh)
  by_path = {jax.tree_util.keystr(k): (v, s) for (k, v), s in zip(
      jax.tree.leaves_with_path(abstract_params), jax.tree.leaves(param_shardings))}

  def one(path, leaf):
    key = jax.tree_util.keystr(path)
    for p, (v, sh) in by_path.items():
      if key.endswith(p) and v.shape == leaf.shape:
        return sh
    if leaf.ndim:
      raise ValueError(f"optimizer leaf {key} {leaf.shape} matches no parameter")
    return rep
  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, abstract_params))


def train_state_shardings(param_shardings, tx, abstract_params, mesh) -> State:
  """Shardings for the train state {"params", "opt_state", "step"}."""
  return {"params": param_shardings,
          "opt_state": opt_state_shardings(param_shardings, tx, abstract_params, mesh),
          "step": mesh_lib.replicated(mesh)}


def create_train_state(model_cls, cfg, tx, mesh, seed: int = 0, params=None):
  """(graphdef, state, shardings) with everything created already sharded.

  With `params` (e.g. restored SFT weights) only the optimizer state is new.
  """
  graphdef, abstract_params = abstract(model_cls, cfg)
  p_sh = mesh_lib.param_shardings(abstract_params, mesh)
  s_sh = train_state_shardings(p_sh, tx, abstract_params, mesh)
  if params is None:
    init = mesh_lib.jit(lambda key: init_state(
        nnx.split(model_cls(cfg, nnx.Rngs(key)))[1], tx), mesh, out_shardings=s_sh)
    state = init(jax.random.key(seed))
  else:
    init = mesh_lib.jit(lambda p: init_state(p, tx), mesh, in_shardings=(p_sh,),
                        out_shardings=s_sh)
    state = init(params)
  return graphdef, state, s_sh


def abstract_train_state(abstract_params, tx, shardings: State) -> State:
  """The train state as `jax.ShapeDtypeStruct`s carrying `shardings`: what
  a step is lowered with when no parameters exist (the AOT planner)."""
  state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
  return with_shardings(state, shardings)


def with_shardings(tree, shardings):
  """Abstract arrays of `tree`'s shapes and dtypes with `shardings`."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
