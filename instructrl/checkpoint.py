"""Orbax checkpoints with exact resume, shared by every training stage.

One checkpoint is one step directory `<directory>/<step>/` holding three
orbax items, written together and committed atomically:

  state/  the train state: any pytree of arrays (nnx.State params, optax
          state, step counter, typed PRNG keys...), saved with
          `ocp.args.StandardSave` as a plain nested dict (see below).
  data/   the data iterator state, a small JSON dict (`ocp.args.JsonSave`).
  meta/   a JSON dict for everything else: config JSON text, stage name,
          RNG (`state_format.encode_rng`).
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
      Latest good step when `step` is None. Returns `state` with the exact
      tree structure (nnx Variables and their metadata included) and the
      shardings of `abstract_state`; orbax reads each shard straight onto
      its device, also into a mesh layout other than the saved one. The
      restored state is checked (finite; the bits' per-leaf checksums
      stored in meta at save time); a latest step that fails to read or
      check is renamed `damaged.<step>` with a one-line warning and the
      previous kept step restored (DamagedCheckpoint when `step` is given).
  ckpt.wait()    # pending async saves committed, pruned steps deleted;
                 # SaveFailed (one line) if one failed, e.g. a full disk:
                 # that step stays a tmp dir, never a step
  ckpt.close()   # wait() + release; also a context manager. Call it (or
                 # wait) before exiting, else the last async save is lost
                 # (cleanly: it never becomes a step).
  (instructrl.state_format: the on-disk tree format, `abstract_like` for
  restore targets, `encode_rng`/`decode_rng`, `nonfinite_leaves`.)

Multi-host: call everything on all processes. JSON items are written by the
primary process only, so `data_state` must be global (or hold every
process's part keyed by process index).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from instructrl import state_format as sf

_STATE, _DATA, _META = "state", "data", "meta"
# meta's entry for state_format.fingerprint(state), checked on restore.
_FINGERPRINT = "state_fingerprint"


class DamagedCheckpoint(ValueError):
  """A committed checkpoint whose content is not what was saved."""


class SaveFailed(OSError):
  """A save did not commit (disk full, storage error); one line says why."""


def _check_json(name: str, obj) -> None:
  # Fail here, in the caller's thread, not later in orbax's writer thread.
  try:
    json.dumps(obj, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint: {name} must be a JSON dict: {e}") from e


_policies = ocp.checkpoint_managers


def _one_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

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
    bad = sf.nonfinite_leaves(state)
    if bad:
      more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
      shown = ", ".join(bad[:5]) + more
      raise FloatingPointError(
          f"refusing to checkpoint step {step}: non-finite values in {shown}")
    flat, _ = sf.flatten(state)
    dtypes = {"/".join(p): str(getattr(sf.raw(x), "dtype", "")) for p, x in flat}
    meta[_FINGERPRINT] = {k: [v, dtypes[k]] for k, v in
                          sf.fingerprint(state).items()}
    disk = sf.nest((path, sf.to_disk(sf.raw(leaf))) for path, leaf in flat)
    # The decision was made above (orbax's force=True skips a second
    # should_save; it never overwrites a step).
    with self._save_errors(step):
      return self._mngr.save(step, force=True, metrics=metrics,
                              args=ocp.args.Composite(**{
                                  _STATE: ocp.args.StandardSave(disk),
                                  _DATA: ocp.args.JsonSave(data_state),
                                  _META: ocp.args.JsonSave(meta),
                              }))

  @contextlib.contextmanager
  def _save_errors(self, step: int | None):
    """An error of orbax's writer (raised by the next save or wait) as one
    `SaveFailed` line; the step it hit stays an uncommitted tmp dir."""
    try:
      yield
    except SaveFailed:
      raise
    except (OSError, ValueError, RuntimeError) as e:
      first = _one_line(e)
      if "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
        first = "no space left on device"
      where = f"step {step}" if step is not None else "a pending save"
      raise SaveFailed(
          f"checkpoint: saving {where} to {self.directory} failed: "
          f"{first}; not committed (latest complete step: "
          f"{self._committed_step()})") from e

  def _committed_step(self) -> int | None:
    self._mngr.reload()
    return self._mngr.latest_step()

  def restore(self, step: int | None = None, *, abstract_state):
    """Returns (state, data_state, meta) of `step` (default: the latest good).

    `abstract_state` (see `state_format.abstract_like`) fixes the tree structure, dtypes
    (values are cast, e.g. float32 -> bfloat16) and shardings of the
    returned state. Paths or shapes that differ from the stored ones raise
    ValueError (a missing or extra entry, a changed shape).

    A restored state is checked: finite, and (for checkpoints that carry
    one) the same bits as saved (`state_format.fingerprint`). Without
    `step`, a latest checkpoint that fails to read or check is moved aside
    to `damaged.<step>` with a one-line warning and the previous kept one
    is tried; if none restores, the latest's error is raised and nothing is
    moved (a config that no longer matches any checkpoint is the user's).
    """
    if step is not None:
      return self._restore_checked(int(step), abstract_state)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for s in steps:
      try:
        out = self._restore_checked(s, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((s, e))
        continue
      for bad, e in failures:
        logging.warning(
            "checkpoint: step %d in %s is damaged (%s); resuming from step %d",
            bad, self.directory, _one_line(e), s)
      self._set_aside([bad for bad, _ in failures])
      return out
    raise failures[0][1]

  def _restore_checked(self, step: int, abstract_state):
    flat, treedef = sf.flatten(abstract_state)
    for path, leaf in flat:
      if getattr(sf.raw(leaf), "sharding", None) is None:
        raise ValueError(f"checkpoint: restore target {'/'.join(path)} has no "
                         "sharding; build it with state_format.abstract_like(...)")
    target = sf.nest((path, sf.abstract_to_disk(sf.raw(leaf)))
                     for path, leaf in flat)
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target),
        _DATA: ocp.args.JsonRestore(),
        _META: ocp.args.JsonRestore(),
    }))
    leaves = []
    for path, leaf in flat:
      value = sf.from_disk(sf.lookup(out[_STATE], path), sf.raw(leaf))
      leaves.append(leaf.replace(value) if sf.is_variable(leaf) else value)
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    meta = dict(out[_META] or {})
    saved = meta.pop(_FINGERPRINT, None)
    bad = sf.nonfinite_leaves(state)
    if bad:
      raise DamagedCheckpoint(f"non-finite values in {', '.join(bad[:3])}")
    if saved is not None:
      now = sf.fingerprint(state)
      dtypes = {"/".join(p): str(sf.raw(x).dtype) for p, x in sf.flatten(state)[0]}
      # A cast (restored in another dtype than saved) changes the bits:
      # only leaves restored as saved are compared.
      differ = [k for k, (v, dtype) in saved.items()
                if k in now and dtypes[k] == dtype and now[k] != v]
      if differ:
        raise DamagedCheckpoint(f"checksum mismatch in {', '.join(differ[:3])}")
    return state, dict(out[_DATA] or {}), meta

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged step dirs to `damaged.<step>` (orbax ignores them)."""
    if not steps:
      return
    if jax.process_index() == 0:
      for s in steps:
        src = self.directory / str(s)
        dst = self.directory / f"damaged.{s}"
        if dst.exists():
          dst.rmtree()
        src.rename(dst)
    ocp.multihost.sync_global_processes("instructrl_checkpoint_set_aside")
    self._mngr.reload()

  def wait(self) -> None:
    """Blocks until pending saves are committed and old ones pruned.

    No tmp-dir cleanup to await: the constructor already did it. Raises
    SaveFailed if a pending save failed.
    """
    with self._save_errors(None):
      self._mngr.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
