"""Collective bytes read from compiled HLO, against hand counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from instructrl.tools import hlo_comm

D, F, ROWS = 64, 96, 16


def _mesh():
  return jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))


def _compiled_text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def _args(mesh, f=F, x_spec=P("fsdp", None)):
  x = jax.ShapeDtypeStruct((ROWS, D), jnp.float32, sharding=NamedSharding(mesh, x_spec))
  w = jax.ShapeDtypeStruct((D, f), jnp.float32,
                           sharding=NamedSharding(mesh, P("fsdp", None)))
  return x, w


def test_fsdp_all_gather_of_a_known_weight():
  """x @ w with w split over 8 devices: each receives 7/8 of w's bytes."""
  mesh = _mesh()

  def fn(x, w):
    full = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
    return x @ full

  comm = hlo_comm.collective_bytes(_compiled_text(fn, *_args(mesh)), 8)
  assert comm["by_kind"] == {"all-gather": D * F * 4 * 7 / 8}
  assert comm["total"] == D * F * 4 * 7 / 8 and comm["unknown_trips"] == 0


def test_a_loop_multiplies_by_its_trip_count():
  """The gather inside a 5-step scan (w changes each step: not hoisted)."""
  mesh = _mesh()

  def fn(x, w):
    def body(carry, _):
      y, w = carry
      w = w * 1.01
      full = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
      return (jnp.tanh(y @ full), w), None
    (y, _), _ = jax.lax.scan(body, (x, w), None, length=5)
    return y

  comm = hlo_comm.collective_bytes(_compiled_text(fn, *_args(mesh, f=D)), 8)
  per_step = D * D * 4 * 7 / 8
  assert comm["loops"] == [(5, per_step)]
  assert comm["total"] == pytest.approx(5 * per_step)


def test_all_reduce_of_a_contracted_sharding():
  """w split on its input dim: the partial products are all-reduced (ring)."""
  mesh = _mesh()

  def fn(x, w):
    return jax.lax.with_sharding_constraint(x @ w, NamedSharding(mesh, P()))

  args = _args(mesh, x_spec=P(None, "fsdp"))
  comm = hlo_comm.collective_bytes(_compiled_text(fn, *args), 8)
  assert comm["by_kind"] == {"all-reduce": 2 * ROWS * F * 4 * 7 / 8}


@pytest.mark.parametrize("attrs,want", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 4),
    ("replica_groups=[2,4]<=[8], dimensions={0}", 4),
    ("replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}", 4),
    ("replica_groups=mesh['a'=2,'b'=4] {'a','b'}", 8),
    ("replica_groups={}, to_apply=%add", 8),
])
def test_group_sizes(attrs, want):
  assert hlo_comm.group_size(attrs, 8) == want


def test_ring_fractions_and_shapes():
  assert hlo_comm.shape_bytes("(bf16[4,8]{1,0}, f32[2])") == 4 * 8 * 2 + 2 * 4
  assert hlo_comm.moved_bytes("reduce-scatter", 100, 4) == 300
  assert hlo_comm.moved_bytes("all-reduce", 100, 4) == 150
  assert hlo_comm.moved_bytes("all-gather", 100, 1) == 0


def test_known_trip_count_annotation():
  """TPU's form of the trip count, on a hand-written module."""
  text = """HloModule m

%body (p: (s32[], bf16[8,4])) -> (s32[], bf16[8,4]) {
  %p = (s32[], bf16[8,4]) parameter(0)
  %g = bf16[2,4]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[8,4]{1,0} all-gather(%g), replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %t = (s32[], bf16[8,4]) tuple(%i, %ag)
}

%cond (p: (s32[], bf16[8,4])) -> pred[] {
  %p = (s32[], bf16[8,4]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[8,4]) -> bf16[8,4] {
  %a = bf16[8,4]{1,0} parameter(0)
  %w = (s32[], bf16[8,4]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %ar = bf16[8,4]{1,0} all-reduce-done(%s)
  ROOT %r = bf16[8,4]{1,0} get-tuple-element(%w), index=1
}
"""
  comm = hlo_comm.collective_bytes(text, 4)
  ag = 8 * 4 * 2 * 3 / 4
  assert comm["loops"] == [(7, ag)]
  assert comm["by_kind"] == {"all-gather": 7 * ag, "all-reduce": 2 * 64 * 3 / 4}
