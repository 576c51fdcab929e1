"""Orbax checkpoints with exact resume, shared by every training stage.

One checkpoint is one step directory `<directory>/<step>/` holding three
orbax items, written together and committed atomically:

  state/  the train state: any pytree of arrays (nnx.State params, optax
          state, step counter, typed PRNG keys...), saved with
          `ocp.args.StandardSave` as a plain nested dict (see below).
  data/   the data iterator state, a small JSON dict (`ocp.args.JsonSave`).
  meta/   a JSON dict for everything else: config JSON text, stage name,
          RNG (`encode_rng`), best metric...

No pickle anywhere: arrays go to tensorstore/OCDBT, the rest is JSON.

Atomicity comes from orbax on POSIX: a step is written to
`<step>.orbax-checkpoint-tmp*` and renamed only once complete, so a process
killed mid-save (even SIGKILL) leaves a tmp directory that `latest_step`
never reports; the next `Checkpointer` on the directory deletes it.

API:
  ckpt = Checkpointer(directory, max_to_keep=3, save_every=100,
                      async_save=True)
  ckpt.latest_step() -> int | None
  ckpt.all_steps() -> list[int]
  ckpt.save(step, state, data_state=..., meta=None, force=False) -> bool
      True if a save started. Saves when step % save_every == 0 or `force`,
      never twice for one step; raises FloatingPointError (writing nothing)
      if a floating leaf of `state` is NaN/Inf.
  ckpt.restore(step=None, abstract_state=...) -> (state, data_state, meta)
      Latest step when `step` is None. Returns `state` with the exact tree
      structure (nnx Variables and their metadata included) and the
      shardings of `abstract_state`; orbax reads each shard straight onto
      its device, also into a mesh layout other than the saved one.
  ckpt.wait()    # pending async saves committed, leftover tmp dirs gone
  ckpt.close()   # wait() + release; also a context manager. Call it (or
                 # wait) before exiting, else the last async save is lost
                 # (cleanly: it never becomes a step).
  abstract_like(state, shardings=None, default_sharding=None)
      -> restore target: ShapeDtypeStructs carrying shardings
  encode_rng(key) -> dict;  decode_rng(dict) -> key   # JSON for `meta`
  nonfinite_leaves(state) -> list[str]   # paths of NaN/Inf floating leaves

On-disk state format: the tree is flattened with nnx Variables treated as
leaves, and stored as a nested dict keyed by the path names (dict keys,
attribute names, sequence indices), Variables replaced by their raw values and
typed PRNG keys by their uint32 key data. This keeps checkpoints independent
of how Flax/optax lay out their pytree nodes; `restore` maps values back by
path into the caller's target, so nothing depends on leaf order.

Multi-host: call everything on all processes. JSON items are written by the
primary process only, so `data_state` must be global (or hold every
process's part keyed by process index).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

_STATE, _DATA, _META = "state", "data", "meta"


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _entry_name(entry) -> str:
  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey.
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flatten(tree):
  """[(path names, leaf)] with nnx Variables as leaves, and the treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_variable)
  return [(tuple(_entry_name(e) for e in path), leaf)
          for path, leaf in flat], treedef


def _raw(leaf):
  return leaf.get_value() if _is_variable(leaf) else leaf


def _nest(pairs) -> dict:
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


def _lookup(tree: Mapping, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def _to_disk(x):
  if _is_key(x):
    return jax.random.key_data(x)
  if isinstance(x, jax.Array):
    return x
  return np.asarray(x)


def _abstract_to_disk(sds):
  """Restore target for one stored leaf (key data for typed PRNG keys)."""
  if not _is_key(sds):
    return sds
  data = jax.eval_shape(jax.random.key_data,
                        jax.ShapeDtypeStruct(sds.shape, sds.dtype))
  # Same NamedSharding works: the trailing key-data dimension is replicated.
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sds.sharding)


def _from_disk(arr, sds):
  if _is_key(sds):
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
  for path, leaf in _flatten(state)[0]:
    value, name = _raw(leaf), "/".join(path)
    if _is_key(value) or not jnp.issubdtype(
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


def abstract_like(state, shardings=None, default_sharding=None):
  """ShapeDtypeStructs with shardings, a restore target for `state`.

  Args:
    state: live arrays or an eval_shape'd tree (nnx Variables are kept, with
      their metadata, so the restored tree has the same structure).
    shardings: optional tree of the same structure with a Sharding per leaf
      (e.g. `mesh.state_shardings(...)`); else each leaf's own `.sharding`.
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
  if _is_key(key):
    return {"impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}
  return {"impl": None, "data": np.asarray(key).tolist()}


def decode_rng(obj: Mapping):
  """Inverse of `encode_rng`: a typed key, or a raw uint32 array if legacy."""
  data = jnp.asarray(np.asarray(obj["data"], dtype=np.uint32))
  if obj.get("impl") is None:
    return data
  return jax.random.wrap_key_data(data, impl=obj["impl"])


def _check_json(name: str, obj) -> None:
  # Fail here, in the caller's thread, not later in orbax's writer thread.
  try:
    json.dumps(obj, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint: {name} must be a JSON dict: {e}") from e


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of one run; see module doc."""

  def __init__(self, directory, *, max_to_keep: int | None = 3,
               save_every: int = 100, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # Leftovers of a killed save are never read; free their space.
        cleanup_tmp_directories=True,
        create=True,
    )
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _DATA, _META))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, *, data_state: Mapping[str, Any],
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an (async) save of one checkpoint; True if it did.

    Skips steps that are not multiples of `save_every` (unless `force`) and
    steps at or before the latest checkpoint (e.g. the final forced save of a
    step that was just saved periodically). The blocking part copies arrays
    to host, so `state` may be donated or changed as soon as this returns.

    Raises:
      FloatingPointError: a floating leaf of `state` is NaN/Inf; nothing is
        written, so the latest checkpoint stays a good one to resume from.
    """
    step = int(step)
    if not force and step % self.save_every:
      return False
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if force and step < latest:
        logging.warning("checkpoint: not saving step %d, before latest %d",
                        step, latest)
      return False
    meta = dict(meta or {})
    data_state = dict(data_state)
    _check_json("data_state", data_state)
    _check_json("meta", meta)
    bad = nonfinite_leaves(state)
    if bad:
      more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
      shown = ", ".join(bad[:5]) + more
      raise FloatingPointError(
          f"refusing to checkpoint step {step}: non-finite values in {shown}")
    flat, _ = _flatten(state)
    disk = _nest((path, _to_disk(_raw(leaf))) for path, leaf in flat)
    return self._mngr.save(step, force=True, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(disk),
        _DATA: ocp.args.JsonSave(data_state),
        _META: ocp.args.JsonSave(meta),
    }))

  def restore(self, step: int | None = None, *, abstract_state):
    """Returns (state, data_state, meta) of `step` (default: the latest).

    `abstract_state` (see `abstract_like`) fixes the tree structure, dtypes
    (values are cast, e.g. float32 -> bfloat16) and shardings of the
    returned state. Paths or shapes that differ from the stored ones raise
    ValueError (a missing or extra entry, a changed shape).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    flat, treedef = _flatten(abstract_state)
    for path, leaf in flat:
      if getattr(_raw(leaf), "sharding", None) is None:
        raise ValueError(f"checkpoint: restore target {'/'.join(path)} has no "
                         "sharding; build it with abstract_like(...)")
    target = _nest((path, _abstract_to_disk(_raw(leaf))) for path, leaf in flat)
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target),
        _DATA: ocp.args.JsonRestore(),
        _META: ocp.args.JsonRestore(),
    }))
    leaves = []
    for path, leaf in flat:
      value = _from_disk(_lookup(out[_STATE], path), _raw(leaf))
      leaves.append(leaf.replace(value) if _is_variable(leaf) else value)
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    return state, dict(out[_DATA] or {}), dict(out[_META] or {})

  def wait(self) -> None:
    """Blocks until pending saves are committed and old ones pruned."""
    self._mngr.wait_until_finished()
    # orbax removes leftover tmp dirs in a background thread that only its
    # save() awaits; wait for it too so a restart leaves a tidy directory.
    await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory",
                            None)
    if await_cleanup is not None:
      await_cleanup()

  def close(self) -> None:
    self.wait()
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
