"""Checkpointed state as orbax stores it: a nested dict of plain arrays.

The on-disk format of `instructrl.checkpoint`, and the helpers a caller
needs around it:

  abstract_like(state, shardings=None, default_sharding=None)
      -> restore target: ShapeDtypeStructs carrying shardings
  encode_rng(key) -> dict;  decode_rng(dict) -> key   # JSON for `meta`
  nonfinite_leaves(state) -> list[str]   # paths of NaN/Inf floating leaves
  fingerprint(state) -> dict[str, int]   # per-leaf checksum of the bits

The format: the tree is flattened with nnx Variables treated as
leaves, and stored as a nested dict keyed by the path names (dict keys,
attribute names, sequence indices), Variables replaced by their raw values and
typed PRNG keys by their uint32 key data. This keeps checkpoints independent
of how Flax/optax lay out their pytree nodes; `restore` maps values back by
path into the caller's target, so nothing depends on leaf order.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _entry_name(entry) -> str:
  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey.
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten(tree):
  """[(path names, leaf)] with nnx Variables as leaves, and the treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_variable)
  return [(tuple(_entry_name(e) for e in path), leaf)
          for path, leaf in flat], treedef


def raw(leaf):
  return leaf.get_value() if is_variable(leaf) else leaf


def nest(pairs) -> dict:
  """Nested dict from [(path names, value)]."""
  out: dict = {}
  for path, value in pairs:
    if not path:
      raise ValueError("checkpoint: state must be a container, not an array")
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(
            f"checkpoint: path {'/'.join(path)} collides with a leaf")
    if path[-1] in node:
      raise ValueError(f"checkpoint: duplicate path {'/'.join(path)}")
    node[path[-1]] = value
  return out


def lookup(tree: Mapping, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def to_disk(x):
  if is_key(x):
    return jax.random.key_data(x)
  if isinstance(x, jax.Array):
    return x
  return np.asarray(x)


def abstract_to_disk(sds):
  """Restore target for one stored leaf (key data for typed PRNG keys)."""
  if not is_key(sds):
    return sds
  data = jax.eval_shape(jax.random.key_data,
                        jax.ShapeDtypeStruct(sds.shape, sds.dtype))
  # Same NamedSharding works: the trailing key-data dimension is replicated.
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sds.sharding)


def from_disk(arr, sds):
  if is_key(sds):
    # jax.random.key_impl() rejects abstract values; the key dtype has it.
    impl = sds.dtype._impl  # pylint: disable=protected-access
    return jax.random.wrap_key_data(arr, impl=impl)
  return arr


@jax.jit
def _all_finite(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(state) -> list[str]:
  """Paths ('params/w') of floating leaves holding NaN or Inf.

  One fused on-device reduction per device set (one jit cannot mix arrays
  committed to different devices) and one small transfer, not a host copy.
  """
  bad, groups = [], {}
  for path, leaf in flatten(state)[0]:
    value, name = raw(leaf), "/".join(path)
    if is_key(value) or not jnp.issubdtype(
        getattr(value, "dtype", np.float32), jnp.inexact):
      continue
    if isinstance(value, jax.Array):
      devices = frozenset(value.sharding.device_set)
      groups.setdefault(devices, []).append((name, value))
    elif not np.all(np.isfinite(np.asarray(value))):
      bad.append(name)
  for members in groups.values():
    ok = np.asarray(jax.device_get(_all_finite([v for _, v in members])))
    bad.extend(n for (n, _), good in zip(members, ok) if not good)
  return bad


def _words(x):
  """The bits of `x` as uint32 words (a 16- or 8-bit value per word)."""
  if is_key(x):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):  # 8 bytes -> (..., 2) words.
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksums(leaves):
  # Wrapping uint32 sums: any single flipped bit changes the sum.
  return jnp.stack([jnp.sum(_words(x), dtype=jnp.uint32) for x in leaves])


def fingerprint(state) -> dict[str, int]:
  """{'params/w': checksum of its bits} for every array leaf.

  Stored with a checkpoint and recomputed after a restore, it tells a
  damaged file (a flipped bit, a zeroed block) from a good one: orbax
  checks completeness, not content. One fused reduction per device set.
  """
  out, groups = {}, {}
  for path, leaf in flatten(state)[0]:
    value, name = raw(leaf), "/".join(path)
    if isinstance(value, jax.Array):
      groups.setdefault(frozenset(value.sharding.device_set), []).append(
          (name, value))
    else:
      value = np.asarray(value)
      out[name] = int(np.asarray(_checksums([jnp.asarray(value)]))[0])
  for members in groups.values():
    sums = np.asarray(jax.device_get(_checksums([v for _, v in members])))
    out.update((n, int(c)) for (n, _), c in zip(members, sums))
  return out


def abstract_like(state, shardings=None, default_sharding=None):
  """ShapeDtypeStructs with shardings, a restore target for `state`.

  Args:
    state: live arrays or an eval_shape'd tree (nnx Variables are kept, with
      their metadata, so the restored tree has the same structure).
    shardings: optional tree of the same structure with a Sharding per leaf
      (e.g. `mesh.param_shardings(...)`); else each leaf's own `.sharding`.
    default_sharding: for leaves without one (numpy arrays, Python scalars,
      eval_shape without shardings); defaults to the first local device.
  """
  default = default_sharding or jax.sharding.SingleDeviceSharding(
      jax.local_devices()[0])

  def one(x, sharding=None):
    if sharding is None:
      sharding = getattr(x, "sharding", None) or default
    if isinstance(x, jax.ShapeDtypeStruct) or isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  if shardings is None:
    return jax.tree.map(one, state)
  return jax.tree.map(one, state, shardings)


def encode_rng(key) -> dict:
  """A PRNG key (typed or legacy uint32) as JSON: impl name + key data."""
  if is_key(key):
    return {"impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}
  return {"impl": None, "data": np.asarray(key).tolist()}


def decode_rng(obj: Mapping):
  """Inverse of `encode_rng`: a typed key, or a raw uint32 array if legacy."""
  data = jnp.asarray(np.asarray(obj["data"], dtype=np.uint32))
  if obj.get("impl") is None:
    return data
  return jax.random.wrap_key_data(data, impl=obj["impl"])
