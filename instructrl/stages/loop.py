"""The host loop every stage shares: restore, step, log, evaluate, save, export.

A stage owns `WORKDIR/<stage>/`: `ckpt/` (orbax: the latest checkpoints, plus
the one with the best validation metric when the stage evaluates) and
`export/` (the stage's result, read by later stages; `export/info.json`
marks it done).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Iterator

import jax
import orbax.checkpoint as ocp
from flax import nnx

from instructrl import checkpoint as ckpt_lib
from instructrl import state_format
from instructrl import mesh as mesh_lib
from instructrl import metrics as metrics_lib
from instructrl import paths
from instructrl import preemption
from instructrl.stages.errors import ConfigError


def stage_dir(workdir: str, stage: str) -> str:
  return paths.join(workdir, stage)


def _info_path(workdir: str, stage: str) -> str:
  return paths.join(stage_dir(workdir, stage), "export", "info.json")


def is_done(workdir: str, stage: str) -> bool:
  return paths.exists(_info_path(workdir, stage))


def read_info(workdir: str, stage: str) -> dict:
  return json.loads(paths.read_text(_info_path(workdir, stage)))


def save_params(path: str, params) -> None:
  """Writes params atomically: locally to a tmp dir renamed over the old one;
  on an object store in place (orbax commits it), before the done marker."""
  final = paths.path(path)
  local = paths.is_local(path)
  target = final.parent / (final.name + ".tmp") if local else final
  if jax.process_index() == 0:
    paths.rmtree(target)
  with ocp.StandardCheckpointer() as c:
    c.save(target, nnx.to_pure_dict(params))
    c.wait_until_finished()
  if local and jax.process_index() == 0:
    paths.rmtree(final)
    os.replace(target, final)


def load_params(path: str, abstract_params, shardings):
  """Reads params saved by `save_params` straight into their shardings."""
  if not paths.path(path).is_dir():
    raise ConfigError(f"no parameters at {path}")
  target = state_format.abstract_like(nnx.to_pure_dict(abstract_params),
                                  nnx.to_pure_dict(shardings))
  with ocp.StandardCheckpointer() as c:
    pure = c.restore(paths.path(path), target)
  params = jax.tree.map(lambda x: x, abstract_params)
  nnx.replace_by_pure_dict(params, pure)
  return params


def export(workdir: str, stage: str, params, info: dict) -> None:
  """The stage's result: params plus info.json (written last = done marker)."""
  bad = state_format.nonfinite_leaves(params)
  if bad:
    raise FloatingPointError(f"{stage}: refusing to export non-finite parameters "
                             f"({', '.join(bad[:3])})")
  out = paths.join(stage_dir(workdir, stage), "export")
  paths.makedirs(out)
  save_params(paths.join(out, "params"), params)
  if jax.process_index() == 0:
    paths.write_atomic(paths.join(out, "info.json"),
                       json.dumps(info, indent=1, default=float))


def load_export(workdir: str, stage: str, abstract_params, shardings):
  if not is_done(workdir, stage):
    raise ConfigError(f"stage {stage!r} has no finished result in "
                      f"{stage_dir(workdir, stage)} (run it first)")
  path = paths.join(stage_dir(workdir, stage), "export", "params")
  return load_params(path, abstract_params, shardings)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How `train_loop` runs one stage.

  `eval_key`/`eval_mode`: the validation metric (from `eval_fn`) whose best
  checkpoint is kept and whose params the loop returns (the paper keeps the
  best SFT model by validation).
  """
  stage: str
  num_steps: int
  seed: int
  log_every: int = 10
  save_every: int = 100
  keep: int = 2
  eval_every: int = 0
  eval_key: str = "loss"
  eval_mode: str = "min"
  tokens_per_step: int = 0

  @classmethod
  def of(cls, stage: str, section, num_steps: int, seed: int, **kw) -> LoopConfig:
    """From a stage's config section (its log_every/save_every/eval_every)."""
    return cls(stage=stage, num_steps=num_steps, seed=seed,
               log_every=section.log_every, save_every=section.save_every,
               eval_every=section.get("eval_every", 0), **kw)


def _better(value: float, best, mode: str) -> bool:
  # Strictly better: of equal values the earliest step stays the best.
  return best is None or (value < best if mode == "min" else value > best)


def train_loop(lc: LoopConfig, workdir: str, *, state, shardings, step_fn: Callable,
               batches: Iterator, mesh, eval_fn: Callable | None = None,
               config_json: str | None = None):
  """Runs `step_fn` to `lc.num_steps`, resuming from WORKDIR/<stage>/ckpt.

  `eval_fn(params) -> metrics` runs every `lc.eval_every` steps and at the
  end. A checkpoint that improves the validation metric is saved with it,
  and orbax keeps it beside the latest `lc.keep`. Returns (state,
  best_params, summary dict).

  On SIGTERM/SIGINT (instructrl.preemption) the loop finishes the step it
  is in, saves it (all processes agree on the step), and raises
  `preemption.Preempted`; the rerun resumes from that step.
  """
  with preemption.guard():
    return _train_loop(lc, workdir, state=state, shardings=shardings,
                       step_fn=step_fn, batches=batches, mesh=mesh,
                       eval_fn=eval_fn, config_json=config_json)


def _train_loop(lc: LoopConfig, workdir: str, *, state, shardings, step_fn,
                batches, mesh, eval_fn, config_json):
  sdir = stage_dir(workdir, lc.stage)
  best_metric = f"val_{lc.eval_key}" if eval_fn is not None else None
  ckpt = ckpt_lib.Checkpointer(paths.join(sdir, "ckpt"), max_to_keep=lc.keep,
                               save_every=lc.save_every, best_metric=best_metric,
                               best_mode=lc.eval_mode)
  best = {"value": None, "step": None}
  target = state_format.abstract_like(state, shardings)  # Restore target.
  if ckpt.latest_step() is not None:
    state, data_state, saved_meta = ckpt.restore(abstract_state=target)
    batches.set_state(data_state)
    best = saved_meta.get("best", best)
  writer = metrics_lib.MetricsWriter(workdir, lc.stage)
  if config_json is not None:
    writer.write_config(config_json)
  progress = metrics_lib.Progress(lc.num_steps, lc.stage)
  rng = jax.random.key(lc.seed)
  step = int(jax.device_get(state["step"]))
  start, start_step = time.monotonic(), step
  last, stop, peer_lost = {}, None, False
  try:
    while step < lc.num_steps and stop is None:
      batch = mesh_lib.put_batch(next(batches), mesh)
      state, metrics = step_fn(state, batch, rng)
      preemption.arm()  # Compiled, a step computed: worth saving from now on.
      step += 1
      final = step == lc.num_steps
      stop = None if final else preemption.should_stop(step)
      do_eval = eval_fn is not None and (
          final or (lc.eval_every and step % lc.eval_every == 0))
      improved = None
      if (step % lc.log_every == 0 or final or step % lc.save_every == 0
          or do_eval or stop is not None):
        host = metrics_lib.to_host(metrics)
        metrics_lib.check_finite(host, step)  # Before any save of this state.
        rate = (step - start_step) / max(time.monotonic() - start, 1e-9)
        host.update(steps_per_s=rate, tokens_per_s=rate * lc.tokens_per_step)
        if do_eval:
          ev = {f"val_{k}": v for k, v in metrics_lib.to_host(
              eval_fn(state["params"])).items()}
          host.update(ev)
          if _better(float(ev[best_metric]), best["value"], lc.eval_mode):
            best = {"value": float(ev[best_metric]), "step": step}
            improved = {best_metric: best["value"]}
        writer.write(step, host)
        last = host
      progress.update(step, tokens=lc.tokens_per_step)
      ckpt.save(step, state, data_state=batches.get_state(),
                meta={"best": best, "stage": lc.stage}, metrics=improved,
                force=final or improved is not None or stop is not None)
    if stop is None:
      best_params = state["params"]
      best_step = ckpt.best_step()
      if best_step is not None and best_step != step:
        ckpt.wait()
        best_params = ckpt.restore(best_step, abstract_state=target)[0]["params"]
  except jax.errors.JaxRuntimeError:
    # A collective failed in a multi-process run: a peer is gone, and
    # orbax's commit of pending saves waits for it until jax's heartbeat
    # timeout aborts this process, so main could not say which was lost.
    peer_lost = jax.process_count() > 1
    raise
  finally:
    # Also when halting on a NaN loss: the pending async saves hold good
    # states; without this wait the interpreter exits mid-save and the
    # latest good checkpoint is lost (left as a tmp dir).
    if not peer_lost:
      ckpt.close()
    writer.close()
    progress.close()
  if stop is not None:
    preemption.disarm()  # Acted on: not to be delivered again.
    raise preemption.Preempted(lc.stage, step, stop, paths.join(sdir, "ckpt"))
  summary = {"steps": step, "best": best, "last": last}
  return state, best_params, summary


def batch_eval(eval_step, params, it, mesh, max_batches=None) -> dict:
  """Means of `eval_step` metrics over a one-pass iterator (weights: 'weight')."""
  totals, weight = {}, 0.0
  it.step = 0  # One-pass iterators are reused for every evaluation.
  for i, batch in enumerate(it):
    if max_batches and i >= max_batches:
      break
    m = jax.device_get(eval_step(params, mesh_lib.put_batch(batch, mesh)))
    w = float(m.pop("weight"))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v) * w
    weight += w
  return {k: v / max(weight, 1e-9) for k, v in totals.items()}


class JointBatches:
  """Two batch iterators stepped together, with one resumable state.

  `combine(a, b)` makes the batch from one batch of each; without `extra`
  (None) the batch is `main`'s. `names` are the keys of the two states in
  the saved iterator state, fixed per caller so that checkpoints resume.
  """

  def __init__(self, main, extra, combine: Callable, names: tuple[str, str]):
    self.main, self.extra, self.combine, self.names = main, extra, combine, names

  def __next__(self):
    batch = next(self.main)
    return batch if self.extra is None else self.combine(batch, next(self.extra))

  def get_state(self):
    main, extra = self.names
    return {main: self.main.get_state(),
            extra: None if self.extra is None else self.extra.get_state()}

  def set_state(self, state):
    main, extra = self.names
    self.main.set_state(state[main])
    if self.extra is not None:
      self.extra.set_state(state[extra])
