"""The host loop every stage shares: restore, step, log, evaluate, save, export.

A stage owns `WORKDIR/<stage>/`: `ckpt/` (orbax, resumable), `best/` (the
parameters with the best validation metric so far) and `export/` (the
stage's result, read by later stages; `export/info.json` marks it done).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Iterator

import jax
import orbax.checkpoint as ocp
from flax import nnx

from instructrl import checkpoint as ckpt_lib
from instructrl import mesh as mesh_lib
from instructrl import metrics as metrics_lib


class ConfigError(ValueError):
  """A user mistake in the config: main prints one line and exits non-zero."""


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(workdir: str, stage: str) -> bool:
  return os.path.exists(os.path.join(stage_dir(workdir, stage), "export", "info.json"))


def read_info(workdir: str, stage: str) -> dict:
  with open(os.path.join(stage_dir(workdir, stage), "export", "info.json")) as f:
    return json.load(f)


def _save_params(path: str, params) -> None:
  """Writes params atomically: to a temp dir, then rename over the old one."""
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  with ocp.StandardCheckpointer() as c:
    c.save(os.path.abspath(tmp), nnx.to_pure_dict(params))
    c.wait_until_finished()
  if jax.process_index() == 0:
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_params(path: str, abstract_params, shardings):
  """Reads params saved by `_save_params` straight into their shardings."""
  if not os.path.isdir(path):
    raise ConfigError(f"no parameters at {path}")
  target = ckpt_lib.abstract_like(nnx.to_pure_dict(abstract_params),
                                  nnx.to_pure_dict(shardings))
  with ocp.StandardCheckpointer() as c:
    pure = c.restore(os.path.abspath(path), target)
  params = jax.tree.map(lambda x: x, abstract_params)
  nnx.replace_by_pure_dict(params, pure)
  return params


def export(workdir: str, stage: str, params, info: dict) -> None:
  """The stage's result: params plus info.json (written last = done marker)."""
  bad = ckpt_lib.nonfinite_leaves(params)
  if bad:
    raise FloatingPointError(f"{stage}: refusing to export non-finite parameters "
                             f"({', '.join(bad[:3])})")
  out = os.path.join(stage_dir(workdir, stage), "export")
  os.makedirs(out, exist_ok=True)
  _save_params(os.path.join(out, "params"), params)
  if jax.process_index() == 0:
    tmp = os.path.join(out, "info.json.tmp")
    with open(tmp, "w") as f:
      json.dump(info, f, indent=1, default=float)
    os.replace(tmp, os.path.join(out, "info.json"))


def load_export(workdir: str, stage: str, abstract_params, shardings):
  if not is_done(workdir, stage):
    raise ConfigError(f"stage {stage!r} has no finished result in "
                      f"{stage_dir(workdir, stage)} (run it first)")
  path = os.path.join(stage_dir(workdir, stage), "export", "params")
  return load_params(path, abstract_params, shardings)


def train_loop(*, stage: str, workdir: str, state, shardings, step_fn: Callable,
               batches: Iterator, mesh, num_steps: int, seed: int,
               log_every: int = 10, save_every: int = 100, keep: int = 2,
               eval_every: int = 0, eval_fn: Callable | None = None,
               eval_key: str = "loss", eval_mode: str = "min",
               tokens_per_step: int = 0, meta: dict | None = None):
  """Runs `step_fn` to `num_steps`, resuming from WORKDIR/<stage>/ckpt.

  `eval_fn(params) -> metrics` runs every `eval_every` steps and at the end;
  the params with the best `eval_key` are kept in `best/` and returned (the
  paper keeps the best SFT model by validation). Returns (state, best_params,
  summary dict).
  """
  sdir = stage_dir(workdir, stage)
  ckpt = ckpt_lib.Checkpointer(os.path.join(sdir, "ckpt"), max_to_keep=keep,
                               save_every=save_every)
  best = {"value": None, "step": None}
  if ckpt.latest_step() is not None:
    target = ckpt_lib.abstract_like(state, shardings)
    state, data_state, saved_meta = ckpt.restore(abstract_state=target)
    batches.set_state(data_state)
    best = saved_meta.get("best", best)
  writer = metrics_lib.MetricsWriter(workdir, stage)
  if meta:
    writer.write_config(meta.get("config", {}))
  progress = metrics_lib.Progress(num_steps, stage)
  rng = jax.random.key(seed)
  step = int(jax.device_get(state["step"]))
  start, start_step = time.monotonic(), step
  last = {}
  try:
    while step < num_steps:
      batch = mesh_lib.put_batch(next(batches), mesh)
      state, metrics = step_fn(state, batch, rng)
      step += 1
      final = step == num_steps
      do_eval = eval_fn is not None and (final or (eval_every and step % eval_every == 0))
      if step % log_every == 0 or final or step % save_every == 0 or do_eval:
        host = metrics_lib.to_host(metrics)
        metrics_lib.check_finite(host, step)  # Before any save of this state.
        rate = (step - start_step) / max(time.monotonic() - start, 1e-9)
        host.update(steps_per_s=rate, tokens_per_s=rate * tokens_per_step)
        if do_eval:
          ev = {f"val_{k}": v for k, v in metrics_lib.to_host(
              eval_fn(state["params"])).items()}
          host.update(ev)
          value = float(ev[f"val_{eval_key}"])
          better = best["value"] is None or (value < best["value"] if eval_mode == "min"
                                             else value > best["value"])
          if better:
            best = {"value": value, "step": step}
            _save_params(os.path.join(sdir, "best"), state["params"])
        writer.write(step, host)
        last = host
      progress.update(step, tokens=tokens_per_step)
      ckpt.save(step, state, data_state=batches.get_state(),
                meta={"best": best, "stage": stage}, force=final)
  finally:
    # Also when halting on a NaN loss: the pending async saves hold good
    # states; without this wait the interpreter exits mid-save and the
    # latest good checkpoint is lost (left as a tmp dir).
    ckpt.close()
    writer.close()
    progress.close()
  best_params = state["params"]
  if best["step"] is not None and best["step"] != step:
    best_params = load_params(os.path.join(sdir, "best"),
                              jax.tree.map(lambda x: x, state["params"]),
                              shardings["params"])
  summary = {"steps": step, "best": best, "last": last}
  return state, best_params, summary


def mesh_jit(fn: Callable, mesh, **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)`, called under `jax.set_mesh(mesh)`.

  The model's `mesh.constrain` calls only take effect with a mesh set, so
  every program that runs a model is called this way.
  """
  jitted = jax.jit(fn, **jit_kwargs)

  def run(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)
  run.jitted = jitted
  return run


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
