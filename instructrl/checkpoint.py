"""Orbax checkpoints with exact resume, shared by every training stage.

One checkpoint is one step directory `<directory>/<step>/` holding three
orbax items, written together and committed atomically:

  state/  the train state: any pytree of arrays (nnx.State params, optax
          state, step counter, typed PRNG keys...), saved with
          `ocp.args.StandardSave` as a plain nested dict (see below).
  data/   the data iterator state, a small JSON dict (`ocp.args.JsonSave`).
  meta/   a JSON dict for everything else: config JSON text, stage name,
          RNG (`encode_rng`)...
and, for a step saved with `metrics`, orbax's own `metrics/` item (a JSON
dict of floats) that its preservation policy ranks checkpoints by.

No pickle anywhere: arrays go to tensorstore/OCDBT, the rest is JSON.

Atomicity comes from orbax on POSIX: a step is written to
`<step>.orbax-checkpoint-tmp*` and renamed only once complete, so a process
killed mid-save (even SIGKILL) leaves a tmp directory that `latest_step`
never reports; the next `Checkpointer` on the directory deletes it (before
its constructor returns).

Which steps are saved and which are kept is orbax's policy, not ours:
`save_decision_policy` = every `save_every` steps (`FixedIntervalPolicy`) or
at a jax preemption sync point (`PreemptionCheckpointingPolicy`); and
`preservation_policy` = the latest `max_to_keep` (`LatestN`) plus, with
`best_metric`, the one best checkpoint by that metric (`BestN`, n=1), either
one sufficing (`AnyPreservationPolicy`). Checkpoints saved without metrics
are kept by recency only.

API:
  ckpt = Checkpointer(directory, max_to_keep=3, save_every=100,
                      async_save=True, best_metric=None, best_mode="min")
      max_to_keep: None (keep all) or >= 1; save_every >= 1; best_mode
      "min" or "max" (else ValueError).
  ckpt.latest_step() -> int | None
  ckpt.all_steps() -> list[int]
  ckpt.best_step() -> int | None
      The kept step whose metrics[best_metric] is best (the latest one on a
      tie); None without best_metric or if no kept checkpoint carried it.
  ckpt.save(step, state, data_state=..., meta=None, metrics=None,
            force=False) -> bool
      True if a save started. Saves when the policy says so (step %
      save_every == 0, or a preemption sync point) or `force`, never twice
      for one step nor behind the latest one (a forced final save of a step
      just saved periodically returns False). `metrics` (str -> finite
      float) are stored with the checkpoint; with `best_metric` set they
      must contain it, and the best such checkpoint is kept besides the
      latest `max_to_keep`, whatever their order. Raises
      FloatingPointError (writing nothing) if a floating leaf of `state` is
      NaN/Inf.
  ckpt.restore(step=None, abstract_state=...) -> (state, data_state, meta)
      Latest step when `step` is None. Returns `state` with the exact tree
      structure (nnx Variables and their metadata included) and the
      shardings of `abstract_state`; orbax reads each shard straight onto
      its device, also into a mesh layout other than the saved one.
  ckpt.wait()    # pending async saves committed, pruned steps deleted
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


_policies = ocp.checkpoint_managers

# orbax logs this on every save without metrics once metrics are stored at
# all (its `best_fn` set); here such saves are the normal periodic ones.
_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."


class _DropNoMetricsWarning(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg != _NO_METRICS_WARNING


def _install_log_filter() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropNoMetricsWarning)
             for f in absl_logger.filters):
    absl_logger.addFilter(_DropNoMetricsWarning())


def _remove_tmp_dirs(directory: epath.Path) -> None:
  """Deletes what killed saves left (`<step>.orbax-checkpoint-tmp*`).

  orbax's own `cleanup_tmp_directories` runs in a background thread that only
  its save() awaits (wait_until_finished/close do not), so it is done here,
  synchronously, with orbax's public tmp-path finder; on the primary process
  only, like orbax: the manager's init barrier orders it before any save.
  """
  if jax.process_index() != 0 or not directory.exists():
    return
  for tmp in ocp.path.step.all_temporary_paths(directory):
    path = tmp.get()
    logging.info("checkpoint: removing unfinished save %s", path)
    path.rmtree()


class Checkpointer:
  """Checkpoints of one run, saved and kept by orbax policies; see module doc."""

  def __init__(self, directory, *, max_to_keep: int | None = 3,
               save_every: int = 100, async_save: bool = True,
               best_metric: str | None = None, best_mode: str = "min"):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self.save_every = int(save_every)
    self.best_metric = best_metric
    self.best_mode = best_mode
    keep = _policies.LatestN(n=max_to_keep)
    if best_metric is not None:
      keep = _policies.AnyPreservationPolicy([keep, _policies.BestN(
          get_metric_fn=self._metric_key,
          # BestN keeps the last n of sorted(..., reverse=reverse).
          reverse=best_mode == "min",
          n=1,
          # Else every checkpoint saved without metrics is kept forever.
          keep_checkpoints_without_metrics=False,
      )])
    _remove_tmp_dirs(self.directory)
    _install_log_filter()
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=_policies.AnySavePolicy([
            _policies.FixedIntervalPolicy(self.save_every),
            _policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=keep,
        # orbax writes `metrics` only when best_fn is set; it ranks nothing
        # (preservation_policy decides what is kept), but best_step() reads it.
        best_fn=self._metric_key,
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,  # done above, see _remove_tmp_dirs
        create=True,
    )
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _DATA, _META))

  def _metric_key(self, metrics) -> float:
    """BestN's and best_step's rank of a checkpoint's metrics (0 untracked)."""
    return 0.0 if self.best_metric is None else float(metrics[self.best_metric])

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best metrics[best_metric] (latest on a tie), as
    orbax ranks them; None without best_metric or if none carried it."""
    return None if self.best_metric is None else self._mngr.best_step()

  def save(self, step: int, state, *, data_state: Mapping[str, Any],
           meta: Mapping[str, Any] | None = None,
           metrics: Mapping[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts an (async) save of one checkpoint; True if it did.

    Saves the steps orbax's save decision policy picks (multiples of
    `save_every`, a preemption sync point), or any step with `force`; never
    a step at or before the latest checkpoint (e.g. the final forced save of
    a step that was just saved periodically). The blocking part copies
    arrays to host, so `state` may be donated or changed as soon as this
    returns.

    Raises:
      FloatingPointError: a floating leaf of `state` is NaN/Inf; nothing is
        written, so the latest checkpoint stays a good one to resume from.
      ValueError: `metrics` lack `best_metric`.
      TypeError: data_state, meta or metrics are not JSON (metrics: finite
        floats).
    """
    step = int(step)
    if force:
      latest = self.latest_step()
      if latest is not None and step <= latest:
        if step < latest:
          logging.warning("checkpoint: not saving step %d, before latest %d",
                          step, latest)
        return False
    elif not self._mngr.should_save(step):
      return False
    meta = dict(meta or {})
    data_state = dict(data_state)
    _check_json("data_state", data_state)
    _check_json("meta", meta)
    if metrics is not None:
      try:
        metrics = {str(k): float(v) for k, v in metrics.items()}
      except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint: metrics must map names to floats: {e}"
                        ) from e
      _check_json("metrics", metrics)
      if self.best_metric is not None and self.best_metric not in metrics:
        raise ValueError(f"checkpoint: metrics {sorted(metrics)} lack "
                         f"best_metric {self.best_metric!r}")
    bad = nonfinite_leaves(state)
    if bad:
      more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
      shown = ", ".join(bad[:5]) + more
      raise FloatingPointError(
          f"refusing to checkpoint step {step}: non-finite values in {shown}")
    flat, _ = _flatten(state)
    disk = _nest((path, _to_disk(_raw(leaf))) for path, leaf in flat)
    # The decision was made above (orbax's force=True skips a second
    # should_save; it never overwrites a step).
    return self._mngr.save(step, force=True, metrics=metrics,
                            args=ocp.args.Composite(**{
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
    """Blocks until pending saves are committed and old ones pruned.

    No tmp-dir cleanup to await: the constructor already did it.
    """
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
