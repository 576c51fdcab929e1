"""Create models with parameters already sharded over the mesh.

eval_shape gives the abstract parameters (no memory), their logical axes give
NamedShardings, and one jitted init writes each shard on its own device: no
full copy of the parameters ever sits on one device.
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from instructrl import mesh as mesh_lib
from instructrl.model.config import ModelConfig


def abstract(model_cls: Callable, cfg: ModelConfig):
  """(graphdef, abstract state) without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0))))


def init_sharded(model_cls: Callable, cfg: ModelConfig, mesh: Mesh, seed: int = 0):
  """Returns (graphdef, params state, shardings), params laid out on `mesh`."""
  graphdef, abstract_state = abstract(model_cls, cfg)
  shardings = mesh_lib.param_shardings(abstract_state, mesh)

  def init(key):
    return nnx.split(model_cls(cfg, nnx.Rngs(key)))[1]
  state = mesh_lib.jit(init, mesh, out_shardings=shardings)(jax.random.key(seed))
  return graphdef, state, shardings
