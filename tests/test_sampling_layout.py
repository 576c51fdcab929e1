"""The decoding layout (`mesh.sampling_mesh`): same devices, weights whole per group."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from instructrl import mesh as mesh_lib
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
