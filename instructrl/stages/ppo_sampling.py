"""PPO's rollout in a sampling layout of its own (`config.ppo.sampling_layout`).

Training shards every weight over `fsdp` (ZeRO-3), so a decode step in the
training layout all-gathers the whole policy into every chip once per
generated token: 2.4 GB per chip per token at 1.3B on v5p-64 (docs/scale.md).
With `sampling_layout = k >= 1` the rollout is three programs over the same
devices instead of one:

  reshard  the policy's params (and the prompts, the key), training
           shardings -> those of `mesh.sampling_mesh(mesh, k)`:
           tensor-parallel within each group of k fsdp neighbours (x the
           training tensor axis), whole per group; once per iteration, in
           single-axis steps (`mesh.reshard_steps`).
  sample   the sampler on the sampling mesh: rows split over its data axis
           (data * fsdp / k groups), heads, MLP, vocabulary and the KV
           cache's heads over its tensor axis (k * tensor). The
           `SampleOutput` goes back to the training mesh's rows (a local
           slice: each group already holds its rows whole).
  score    RM, reference and value passes, GAE (`rl.rollout.score_sample`)
           on the training mesh, as in the one-program rollout.

The same rng key gives the same tokens: the sampler's random bits do not
depend on the sharding (jax's partitionable threefry), and the logits differ
only by the order of the tensor-parallel sums (fp32: ~1e-6).
"""
from __future__ import annotations

import jax

from instructrl import mesh as mesh_lib
from instructrl.rl import rollout as rollout_lib
from instructrl.sampling import SampleOutput, sample


def _specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings)


def move(tree, train_sh, sample_sh, mesh, k: int, back: bool = False):
  """Inside a jit: `tree` from its training shardings to the sampling mesh's
  (or `back`), leaf by leaf along `mesh_lib.reshard_steps`."""
  view = mesh_lib.sampling_view(mesh, k)
  return jax.tree.map(lambda x, t, s: mesh_lib.to_sampling(x, t, s, view, back),
                      tree, _specs(train_sh), _specs(sample_sh))


def jit_reshard(train_sh, sample_sh, mesh, k: int) -> mesh_lib.Jitted:
  """`(policy params, prompts, key) -> the same in the sampling layout` (a
  copy: the training params stay). `train_sh`/`sample_sh`: their shardings,
  as (params, prompts, key) tuples."""
  def fn(params, prompts, key):
    return move((params, prompts), train_sh[:2], sample_sh[:2], mesh, k) + (key,)
  return mesh_lib.jit(fn, mesh, in_shardings=train_sh, out_shardings=sample_sh)


def jit_sample(graphdef, rc: rollout_lib.RolloutConfig, sample_sh, mesh, k: int,
               sampling) -> mesh_lib.Jitted:
  """`(params, prompts, key) -> SampleOutput`, all three in the sampling layout,
  under the sampling mesh (the model's activation constraints and the KV
  cache follow its axes); the output goes back to the training mesh's rows."""
  rows = lambda m: mesh_lib.batch_sharding(m, 2)
  out_train = SampleOutput(*[rows(mesh)] * 5, mesh_lib.replicated(mesh))
  out_sample = SampleOutput(*[rows(sampling)] * 5, mesh_lib.replicated(sampling))

  def fn(params, batch, key):
    out = sample(graphdef, params, batch["prompt_tokens"], batch["prompt_mask"],
                 key, rollout_lib.sample_config(rc))
    return move(out, out_train, out_sample, mesh, k, back=True)
  return mesh_lib.jit(fn, sampling, in_shardings=sample_sh, out_shardings=out_train)


def jit_score(graphdefs, rc: rollout_lib.RolloutConfig, frozen_sh, state_sh,
              prompt_sh, mesh) -> mesh_lib.Jitted:
  """`(frozen, state, prompts, SampleOutput) -> (Experience, metrics)`."""
  rows = mesh_lib.batch_sharding(mesh, 2)
  rep = mesh_lib.replicated(mesh)
  out_sh = SampleOutput(rows, rows, rows, rows, rows, rep)

  def fn(frozen, state, batch, out):
    params = {"policy": state["params"], "value": state["value_params"], **frozen}
    return rollout_lib.score_sample(graphdefs, params, out, batch["prompt_mask"],
                                    state["kl_coef"], rc)
  return mesh_lib.jit(fn, mesh, in_shardings=(frozen_sh, state_sh, prompt_sh, out_sh))


def abstract_sample(mesh, b: int, l: int, n: int) -> SampleOutput:
  """The sample program's output as abstract arrays (the score program's input)."""
  rows = lambda shape, dt: jax.ShapeDtypeStruct(
      shape, dt, sharding=mesh_lib.batch_sharding(mesh, len(shape)))
  f32 = jax.numpy.float32
  return SampleOutput(rows((b, l + n), jax.numpy.int32), rows((b, n), jax.numpy.int32),
                      rows((b, n), f32), rows((b, n), f32), rows((b, n), bool),
                      jax.ShapeDtypeStruct((), jax.numpy.int32,
                                           sharding=mesh_lib.replicated(mesh)))


def programs(graphdefs, rc, abs_policy, frozen, state, prompts, key, mesh,
             k: int) -> dict:
  """The three programs (`mesh_lib.Program`s with abstract arguments), keyed
  reshard, sample, score. `frozen`, `state`, `prompts`, `key` are the
  abstract arguments of the one-program rollout; `abs_policy` the policy's
  abstract params."""
  sampling = mesh_lib.sampling_mesh(mesh, k)
  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  moved = (state["params"], prompts, key)
  train_sh = shardings(moved)
  sample_sh = (mesh_lib.param_shardings(abs_policy, sampling),
               jax.tree.map(lambda a: mesh_lib.batch_sharding(sampling, a.ndim),
                            prompts),
               mesh_lib.replicated(sampling))
  sample_args = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), moved,
      sample_sh)
  b, l = prompts["prompt_tokens"].shape
  out = abstract_sample(mesh, b, l, rc.max_new_tokens)
  score = jit_score(graphdefs, rc, shardings(frozen), shardings(state),
                    shardings(prompts), mesh)
  return {
      "reshard": mesh_lib.Program(jit_reshard(train_sh, sample_sh, mesh, k), moved),
      "sample": mesh_lib.Program(
          jit_sample(graphdefs["policy"], rc, sample_sh, mesh, k, sampling),
          sample_args),
      "score": mesh_lib.Program(score, (frozen, state, prompts, out)),
  }


def chain(reshard, sample_fn, score):
  """`(frozen, state, prompts, key) -> (Experience, metrics)` from the three
  jitted programs; the sampling copy of the policy lives only while the
  sample program runs."""
  def fn(frozen, state, prompts, key):
    out = sample_fn(*reshard(state["params"], prompts, key))
    return score(frozen, state, prompts, out)
  return fn
