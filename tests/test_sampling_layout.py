"""The decoding layout (`mesh.sampling_mesh`): same devices, weights whole per group."""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from instructrl import config_files
from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel, ScalarModel
from instructrl.model.sharded import init_sharded
from instructrl.stages import ppo
from instructrl.stages import validate
from instructrl.stages.errors import ConfigError
from instructrl.tools import aot
from instructrl.tools import hlo_comm


def test_groups_of_fsdp_neighbours_join_the_tensor_axis():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  s = mesh_lib.sampling_mesh(mesh, 2)
  assert dict(s.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  train = np.asarray(mesh.devices)
  # A tensor group = 2 fsdp neighbours x the training tensor pair.
  np.testing.assert_array_equal(s.devices[0, 0], train[0, :2].reshape(-1))
  assert sorted(d.id for d in s.devices.reshape(-1)) == sorted(
      d.id for d in train.reshape(-1))
  assert mesh_lib.sampling_mesh(mesh, 0) is mesh
  assert dict(mesh_lib.sampling_mesh(mesh, 1).shape) == {
      "data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="divide"):
    mesh_lib.sampling_mesh(mesh, 3)


def _decode_bytes(mesh) -> float:
  """Per-device collective bytes of 6 'decode steps' of x @ w under `mesh`'s rules."""
  w_spec = mesh_lib.logical_to_spec(("embed", "mlp"), (64, 128), dict(mesh.shape))
  x_spec = mesh_lib.logical_to_spec(("act_batch", None), (8, 64), dict(mesh.shape))
  w = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, w_spec))
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, x_spec))

  def fn(x, w):
    def body(y, _):
      return jnp.tanh(y @ w)[:, :64] + y, None
    return jax.lax.scan(body, x, None, length=6)[0]

  text = jax.jit(fn).lower(x, w).compile().as_text()
  return hlo_comm.collective_bytes(text, 8)["total"]


def test_decoding_in_the_sampling_layout_gathers_no_weights():
  """FSDP layout: the weight's 7/8 arrive every step (or once, if XLA hoists
  the gather out of the loop, as it may for a loop-invariant weight); the
  replicated-weight layout moves nothing."""
  mesh = mesh_lib.make_mesh({"fsdp": 8})
  train = _decode_bytes(mesh)
  assert train >= 64 * 128 * 4 * 7 / 8
  assert _decode_bytes(mesh_lib.sampling_mesh(mesh, 1)) == 0


# The rollout in the sampling layout against the training layout's: tiny
# GPT (8 heads of 4, vocabulary 264 = 8 x 33, so heads, MLP, vocabulary and
# the KV cache all split over tensor=8), 8 prompts of 16, 8 new tokens.
# LOGP_TOL: fp32, the tensor-parallel sums add in another order (seen: ~1e-6).
LOGP_TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ppo_config(k: int):
  config = config_files.get_config(ROOT / "configs" / "default.py", "tiny")
  config.update_from_flattened_dict({
      "model.vocab_size": 264, "model.num_heads": 8, "model.max_len": 32,
      "ppo.prompt_len": 16, "ppo.max_new_tokens": 8, "ppo.batch_size": 8,
      "ppo.minibatch_size": 4, "ppo.recompute_logp": False,
      "ppo.sampling_layout": k})
  return config


@pytest.fixture(scope="module")
def rollouts():
  """{k: (Experience, metrics, Programs)} on mesh fsdp=8 for k = 0, 2, 8."""
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  out, state = {}, None
  rng = np.random.default_rng(0)
  b, l = 8, 16
  lengths = rng.integers(3, l + 1, size=b)
  mask = np.arange(l)[None, :] >= l - lengths[:, None]  # Left-padded.
  prompts = mesh_lib.put_batch({
      "prompt_tokens": np.where(mask, rng.integers(3, 259, (b, l)), 0).astype(np.int32),
      "prompt_mask": mask, "prompt_id": np.arange(b, dtype=np.int32)}, mesh)
  key = jax.device_put(jax.random.key(7), mesh_lib.replicated(mesh))
  for k in (0, 2, 8):
    p = ppo.build(_ppo_config(k), mesh, "ppo_ptx")
    if state is None:
      frozen = {"ref": init_sharded(LanguageModel, p.cfg, mesh, 1)[1],
                "rm": init_sharded(ScalarModel, p.rm_cfg, mesh, 2)[1]}
      state = p.init(frozen["ref"], frozen["rm"])
    if k == 8:  # The score program does not depend on k: spare a compile.
      p = dataclasses.replace(p, sampling=dict(p.sampling,
                                               score=out[2][2].sampling["score"]))
    exp, metrics = p.rollout_fn()(frozen, state, prompts, key)
    out[k] = (jax.device_get(exp), jax.device_get(metrics), p)
  return out


@pytest.mark.parametrize("k", [2, 8])
def test_sampling_layout_rollout_equals_the_training_layout(rollouts, k):
  ref, ref_m, _ = rollouts[0]
  exp, m, p = rollouts[k]
  assert p.rollout is None and list(p.rollout_programs()) == ["reshard", "sample",
                                                              "score"]
  assert dict(p.sampling["sample"].fn.mesh.shape) == {"data": 8 // k, "fsdp": 1,
                                                      "tensor": k}
  assert ref.mask.sum() > 8 and not ref.mask.all()  # Some rows stop early.
  for name in ("seq", "seq_mask", "response", "mask"):
    np.testing.assert_array_equal(getattr(exp, name), getattr(ref, name), name)
  for name in ("logp", "ref_logp", "values", "rewards", "advantages", "returns",
               "score"):
    np.testing.assert_allclose(getattr(exp, name), getattr(ref, name), rtol=0,
                               atol=LOGP_TOL, err_msg=name)
  assert m.keys() == ref_m.keys()


def test_sampling_layout_reshards_the_policy_once_not_per_token(rollouts):
  """The training layout's decode loop gathers the policy every token; the
  sampling layout's (tensor=8) moves only activations: far fewer bytes."""
  per_token = {}
  for k in (0, 8):
    p = rollouts[k][2]
    prog = p.rollout if k == 0 else p.sampling["sample"]
    comm = hlo_comm.collective_bytes(prog.lower().compile().as_text(), 8)
    per_token[k] = max(comm["loops"])[1]
  policy = 4 * rollouts[0][2].cfg.num_params()  # fp32 bytes.
  assert per_token[0] >= policy * 7 / 8 * 0.9
  # What is left: all-reduces of [8, 32] activations (2 per layer, 1.75 KB
  # each) and the vocabulary-split softmax; ~7% of this tiny policy.
  assert per_token[8] < per_token[0] / 8
  resh = rollouts[8][2].sampling["reshard"].lower().compile().as_text()
  assert 0 < hlo_comm.collective_bytes(resh, 8)["total"] <= 2 * policy


def test_sampling_layout_must_divide_fsdp():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  validate.check_stage(_ppo_config(4), "ppo_ptx", mesh)
  for bad in (3, -1):
    with pytest.raises(ConfigError, match="config.ppo.sampling_layout"):
      validate.check_stage(_ppo_config(bad), "ppo_ptx", mesh)


def test_reshard_steps_gather_within_groups_then_across():
  """A [L, embed, mlp] weight: fsdp-split embed, tensor-split mlp (training)
  -> whole embed, mlp over (group, tensor) (sampling), in single-axis moves."""
  steps = mesh_lib.reshard_steps(P(None, "fsdp", "tensor"), P(None, None, "tensor"), 3)
  assert steps == (P(None, ("fsdp", "group"), "tensor"),  # Training, on the view.
                   P(None, "fsdp", "tensor"),  # All-gather within each group.
                   P(None, "fsdp", ("group", "tensor")),  # Local slice.
                   P(None, None, ("group", "tensor")))  # All-gather across groups.
  # Rows: gather the group's rows (each group decodes its own rows).
  assert mesh_lib.reshard_steps(P(("data", "fsdp")), P(("data", "fsdp")), 1) == (
      P(("data", "fsdp", "group")), P(("data", "fsdp")))


def test_planner_compiles_each_program_of_the_sampling_layout():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  planned = aot.build_programs(_ppo_config(4), mesh, ["rollout"])
  assert [q.name for q in planned] == ["rollout:reshard", "rollout:sample",
                                       "rollout:score"]
  sample = planned[1]
  cfg = _ppo_config(4)
  assert sample.decode_tokens == cfg.ppo.max_new_tokens
  assert sample.args_resident == 0.0 and planned[2].args_resident is None
  # Decode floor: bf16 weights split over the sampling tensor axis (4).
  policy = ppo.build(cfg, mesh, "ppo_ptx").cfg.num_params()
  assert sample.decode_bytes > policy * 2 / 4 > sample.decode_bytes - 1e6
