"""Device mesh, the logical-axis rules, and sharding helpers.

Every parameter and main activation carries logical axis names (e.g.
("embed", "mlp")). `RULES` maps each name to mesh axes. The mesh has three
named axes: `data` (pure data parallelism), `fsdp` (data parallelism with
parameters and optimizer state sharded over it) and `tensor` (Megatron-style
sharding of heads, MLP width and vocabulary).

Axis types are `Auto` on purpose: in jax >= 0.10 `jax.make_mesh` defaults to
`Explicit` (sharding in types), which makes every op check shardings. We keep
GSPMD propagation and pin the main activations with `with_sharding_constraint`
instead, as maxtext and t5x do (see docs/design.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # Mesh axes a batch dimension is split over.

# Logical name -> mesh axis (or axes, or None = replicated). The one table.
RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("pos", None),
    # Activations.
    ("act_batch", BATCH),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
_RULES = dict(RULES)


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh.

  Args:
    shape: sizes per axis; missing axes are 1, and one axis may be -1 to take
      the remaining devices (default: everything on fsdp).
    devices: defaults to all devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError("mesh: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide "
                       f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, but there are {len(devices)}")
  # Topology-aware device order on real hardware; plain order on CPU.
  if devices[0].platform == "cpu":
    dev = np.asarray(devices).reshape(sizes)
  else:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    dev = mesh_utils.create_device_mesh(sizes, devices)
  return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def sampling_mesh(mesh: Mesh, tensor: int) -> Mesh:
  """The same devices laid out for decoding: `tensor` x more tensor parallelism.

  Training splits weights over `fsdp`, so a decode step that used that layout
  would all-gather every weight once per generated token. Here groups of
  `tensor` neighbouring fsdp devices join the tensor axis (weights split over
  heads/MLP/vocabulary within a group, whole per group) and the rest of fsdp
  becomes data parallelism: the result has fsdp=1, tensor = tensor * the
  training tensor size, data = data * fsdp / tensor; `tensor=1` replicates
  the weights over what was fsdp (pure data-parallel decoding, for models
  that fit a chip). `tensor=0` returns the training mesh (decode in the
  training layout). The rules table is the same: with fsdp=1 the "embed"
  rule shards nothing.
  """
  shape = dict(mesh.shape)
  if tensor == 0:
    return mesh
  if tensor < 1 or shape["fsdp"] % tensor:
    raise ValueError(f"sampling tensor={tensor} must divide the mesh's "
                     f"fsdp={shape['fsdp']}")
  d, f, t = (shape[a] for a in MESH_AXES)
  # (data, fsdp, tensor) -> (data, fsdp/k, k, tensor) -> (data*fsdp/k, 1, k*tensor):
  # a group's k fsdp neighbours sit next to each other in the device order.
  dev = np.asarray(mesh.devices).reshape(d, f // tensor, tensor, t)
  dev = dev.reshape(d * f // tensor, 1, tensor * t)
  return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# The training and the sampling mesh as one 4-axis view of the same devices:
# training fsdp = (fsdp, group), sampling tensor = (group, tensor), sampling
# data = (data, fsdp). Reshards between the two are planned on this view.
VIEW_AXES = ("data", "fsdp", "group", "tensor")
_TO_VIEW = ({"data": ("data",), "fsdp": ("fsdp", "group"), "tensor": ("tensor",)},
            {"data": ("data", "fsdp"), "fsdp": (), "tensor": ("group", "tensor")})


def sampling_view(mesh: Mesh, tensor: int) -> Mesh:
  """`mesh`'s devices as (data, fsdp / tensor, tensor, training tensor)."""
  d, f, t = (dict(mesh.shape)[a] for a in MESH_AXES)
  dev = np.asarray(mesh.devices).reshape(d, f // tensor, tensor, t)
  return Mesh(dev, VIEW_AXES, axis_types=(AxisType.Auto,) * len(VIEW_AXES))


def _axes(e) -> tuple[str, ...]:
  return () if e is None else (e,) if isinstance(e, str) else tuple(e)


def view_spec(spec: P, sampling: bool) -> P:
  """A PartitionSpec of the training (or `sampling`) mesh as one of the view."""
  return P(*(tuple(b for a in _axes(e) for b in _TO_VIEW[sampling][a]) or None
             for e in spec))


def reshard_steps(train: P, sampling: P, ndim: int) -> tuple[P, ...]:
  """View specs that take an array from its training spec to its sampling one.

  XLA's partitioner has no cheap path between two unrelated tilings (it
  replicates the whole array, then slices), so we go in steps it does have:
  gather `group` out of the fsdp-split dimension (an all-gather within each
  tensor group), split the sampling tensor dimension over `group` (a local
  slice), then gather the rest of fsdp (an all-gather across groups).
  """
  pad = lambda spec: [_axes(e) for e in spec] + [()] * (ndim - len(spec))
  tr, sa = pad(view_spec(train, False)), pad(view_spec(sampling, True))
  grouped = [i for i, e in enumerate(sa) if "group" in e]
  gathered = [tuple(a for a in e if a != "group") for e in tr]
  split = [sa[i] if i in grouped else
           tuple(a for a in e if not (grouped and a == "tensor"))
           for i, e in enumerate(gathered)]
  steps = []
  for s in (tr, gathered, split, sa):
    s = P(*(e or None for e in s))
    if not steps or s != steps[-1]:
      steps.append(s)
  return tuple(steps)


def to_sampling(x: jax.Array, train: P, sampling: P, view: Mesh,
                back: bool = False) -> jax.Array:
  """Inside a jit: `x` moved along `reshard_steps(train, sampling)` (or back)."""
  steps = reshard_steps(train, sampling, x.ndim)
  for spec in reversed(steps) if back else steps:
    x = jax.lax.with_sharding_constraint(x, NamedSharding(view, spec))
  return x


def _axis_size(mesh_shape: Mapping[str, int], axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh_shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None,
                    mesh_shape: Mapping[str, int]) -> P:
  """PartitionSpec for one array from its logical axis names.

  A mesh axis is used at most once per array (the first name that asks for it
  gets it) and only where it divides the dimension, otherwise that dimension
  stays replicated: e.g. 2 kv-heads on tensor=4 are replicated, not an error.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is not None and name not in _RULES:
      raise KeyError(f"logical axis {name!r} has no rule in instructrl.mesh.RULES")
    axes = _RULES.get(name) if name is not None else None
    if isinstance(axes, str):
      axes = (axes,)
    if axes is not None:
      axes = tuple(a for a in axes if a in mesh_shape and mesh_shape[a] > 1
                   and a not in used)
      if shape is not None and axes and shape[i] % _axis_size(mesh_shape, axes):
        axes = ()
    if not axes:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names, if a mesh is set.

  Outside `jax.set_mesh(...)` (e.g. plain single-device use) this is a no-op.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_spec(names, x.shape, dict(mesh.shape)))


def _is_variable(x) -> bool:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return isinstance(x, nnx.Variable)


def param_shardings(state, mesh: Mesh):
  """NamedShardings for an (abstract) nnx.State, from its `logical_axes`."""
  mesh_shape = dict(mesh.shape)

  def one(v):
    value = v.get_value()
    axes = getattr(v, "logical_axes", None) or (None,) * len(value.shape)
    if len(axes) != len(value.shape):
      raise ValueError(f"logical axes {axes} do not match shape {value.shape}")
    return v.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape,
                                                         mesh_shape)))
  return jax.tree.map(one, state, is_leaf=_is_variable)


class Jitted:
  """`jax.jit(fn, **jit_kwargs)` that runs, and lowers, under `jax.set_mesh`.

  The model's `constrain` calls only take effect with a mesh set, so every
  program that runs a model is jitted through `jit` below: calling it runs
  the compiled program, `lower(*abstract_args)` is what the AOT planner
  compiles, and `jitted` is the underlying `jax.jit` object.
  """

  def __init__(self, fn: Callable, mesh: Mesh, **jit_kwargs):
    self.fn, self.mesh = fn, mesh
    self.jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def jit(fn: Callable, mesh: Mesh, **jit_kwargs) -> Jitted:
  """The one way this project jits a program under a mesh (see `Jitted`)."""
  return Jitted(fn, mesh, **jit_kwargs)


class Program(NamedTuple):
  """A jitted program and abstract arguments it can be lowered with.

  `args` are `jax.ShapeDtypeStruct` pytrees carrying the shardings a real
  call passes: `fn.lower(*args).compile()` is the program a stage runs,
  compiled without any parameters in memory (the AOT planner).
  """
  fn: Jitted
  args: tuple

  def lower(self):
    return self.fn.lower(*self.args)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Splits dimension `batch_axis` over (data, fsdp); other dims replicated."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH
  return NamedSharding(mesh, P(*spec))


def batch_size_multiple(mesh: Mesh) -> int:
  """Batch sizes must be multiples of this (the data axes' total size)."""
  return _axis_size(dict(mesh.shape), BATCH)


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "batch") -> None:
  n = _axis_size(dict(mesh.shape), BATCH)
  if batch_size % n:
    raise ValueError(f"{what} size {batch_size} does not divide over the data "
                     f"axes data*fsdp={n}")


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays split over (data, fsdp).

  Each process passes only its own rows; `make_array_from_process_local_data`
  assembles the global array, so the same code serves one host or many.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = jax.device_put(v, replicated(mesh))
      continue
    out[k] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, v.ndim), v)
  return out
