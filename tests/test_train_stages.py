"""The stage loops end to end: mesh independence and exact kill-and-resume.

Two fixtures train pretrain -> SFT -> RM in this process: on one device and
on the 8 fake devices as (data=2, fsdp=2, tensor=2). The loss curves must
agree. The 8-device run is also the uninterrupted reference for the
kill-and-resume tests: they drive the CLI in subprocesses on the same 8 fake
devices (same XLA flags, so the same programs and bitwise the same numbers),
SIGKILL it mid-step and mid-save, restart it until it finishes, and compare
the result bit for bit.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from instructrl import config_files
from instructrl import metrics as metrics_lib
from instructrl.stages import loop
from instructrl.stages import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOOP_STAGES = ("pretrain", "sft", "rm")
MESH1 = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
MESH8 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
# The tiny variant, smaller still: 4 pretrain, about 12 SFT (dropout 0.1) and
# 13 RM steps; a checkpoint every 2 steps and evaluations that pick the best
# params. Batch sizes (8, 8, 4) divide data * fsdp = 4. SFT's pretraining
# rows: 1/3 gives 4 rows on one device and on four (rows are rounded to the
# data-parallel size, so 0.1 would give 1 and 4). The RM learns from the
# world's candidates: sampled ones would differ with float rounding.
OVERRIDES = {
    "sft.ptx_frac": 1 / 3, "rm.candidates": "world",
    "pretrain.steps": 4, "pretrain.log_every": 1, "pretrain.save_every": 2,
    "pretrain.eval_every": 2, "pretrain.eval_batches": 1,
    "sft.epochs": 1.5, "sft.log_every": 1, "sft.save_every": 2,
    "sft.eval_every": 4, "sft.eval_batches": 1,
    "rm.epochs": 2.0, "rm.log_every": 1, "rm.save_every": 2,
    "rm.eval_every": 4, "rm.demo_batches": 1,
}
CURVE_KEYS = ("loss", "accuracy", "grad_norm", "val_loss", "val_accuracy")


def load_config(overrides: dict):
  """configs/default.py:tiny with dotted-key overrides, as the CLI builds it."""
  config = config_files.get_config(ROOT / "configs" / "default.py", "tiny")
  config.update_from_flattened_dict(overrides)
  return config


def cli_args(workdir, stage: str, overrides: dict) -> list[str]:
  return [sys.executable, "-m", "instructrl.main",
          "--config=configs/default.py:tiny", f"--workdir={workdir}",
          f"--config.stage={stage}"] + [
              f"--config.{k}={v}" for k, v in overrides.items()]


def cli_env(cache_dir) -> dict:
  # XLA_FLAGS stays conftest's (8 fake devices), as in this process: the
  # same compiled programs give the same bits. The persistent compilation
  # cache spares each restart its compiles.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  assert "xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
  return env


def _train_all(workdir, mesh: dict, devices) -> None:
  for stage in LOOP_STAGES:
    config = load_config({**OVERRIDES, **mesh, "stage": stage})
    runner.run(config, str(workdir), devices=devices)


@contextlib.contextmanager
def _compilation_cache(path: pathlib.Path):
  """Also writes this process's compiles to `path`, for the CLI runs below."""
  options = {"jax_compilation_cache_dir": str(path),
             "jax_persistent_cache_min_compile_time_secs": 0.0,
             "jax_persistent_cache_min_entry_size_bytes": -1}
  old = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # Set up once, at the first compile.
  try:
    yield
  finally:
    for name, value in old.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def _shared_dir(tmp_path_factory) -> pathlib.Path:
  """A directory all pytest-xdist workers of this session share."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  root = base / "instructrl_stage_runs"
  root.mkdir(exist_ok=True)
  return root


def _trained_once(root: pathlib.Path, name: str, train) -> pathlib.Path:
  """root/name, made by `train(path)` in the first worker that asks.

  Every xdist worker that gets one of these tests asks for the fixture; a
  lock file makes the first train and the others reuse its result (the
  xdist docs' recipe). Two fixtures, so that two workers can each train one.
  """
  out = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (root / f"{name}.done").exists():
        shutil.rmtree(out, ignore_errors=True)
        train(out)
        (root / f"{name}.done").touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return out


@pytest.fixture(scope="session")
def one_device(tmp_path_factory) -> pathlib.Path:
  """A workdir with pretrain, SFT and RM done on jax.devices()[:1]."""
  return _trained_once(_shared_dir(tmp_path_factory), "one_device",
                       lambda out: _train_all(out, MESH1, jax.devices()[:1]))


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, compilation cache): the stages done on 8 devices (2, 2, 2).

  The cache gets this run's compiles, so that the CLI runs of the same
  programs start without compiling.
  """
  cache = _shared_dir(tmp_path_factory) / "jax_cache"

  def train(out):
    with _compilation_cache(cache):
      _train_all(out, MESH8, jax.devices())
  return _trained_once(_shared_dir(tmp_path_factory), "eight_devices",
                       train), cache


def _records(workdir, stage: str) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [r for r in metrics_lib.read_metrics(path) if r["stage"] == stage]


def test_one_device_and_eight_devices_give_the_same_curves(one_device,
                                                           eight_devices):
  assert len(jax.devices()) == 8
  eight_devices, _ = eight_devices
  for stage in LOOP_STAGES:
    one, eight = _records(one_device, stage), _records(eight_devices, stage)
    assert [r["step"] for r in one] == [r["step"] for r in eight], stage
    assert len(one) >= 4, stage
    assert loop.read_info(one_device, stage)["best"]["step"] == (
        loop.read_info(eight_devices, stage)["best"]["step"]), stage
    for key in CURVE_KEYS:
      a = [r.get(key) for r in one]
      b = [r.get(key) for r in eight]
      assert [x is None for x in a] == [x is None for x in b], (stage, key)
      a, b = [x for x in a if x is not None], [x for x in b if x is not None]
      if key in ("loss", "val_loss"):
        assert a, (stage, key)
      # Accuracies count argmax hits: allow a near-tie to flip one token.
      atol = 0.01 if "accuracy" in key else 0.0
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol,
                                 err_msg=f"{stage} {key}")


def _tree_files(workdir) -> dict[str, bytes]:
  root = pathlib.Path(workdir)
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_pipeline_reuses_finished_stages(one_device, monkeypatch, capsys,
                                         tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(one_device, workdir)
  before = _tree_files(workdir)
  called = []

  class Stop(Exception):
    pass

  def run_stage(config, workdir, stage, mesh):
    del config, workdir, mesh
    called.append(stage)
    raise Stop  # A stage after RM (PPO...): not what this test is about.

  monkeypatch.setattr(runner, "run_stage", run_stage)
  config = load_config({**OVERRIDES, **MESH1, "stage": "pipeline"})
  later = [s for s in runner.STAGES if s not in LOOP_STAGES]
  with pytest.raises(Stop) if later else contextlib.nullcontext():
    runner.run(config, str(workdir), devices=jax.devices()[:1])
  out = capsys.readouterr().out
  for stage in LOOP_STAGES:
    assert f"[{stage}] already done" in out and "reusing" in out, out
  assert called == later[:1]  # Never a finished stage.
  assert _tree_files(workdir) == before  # Nothing retrained or rewritten.


# --- Kill and resume. -------------------------------------------------------


def _steps(ckpt_dir) -> list[int]:
  """Committed checkpoint steps."""
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return sorted(int(n) for n in names if n.isdigit())


def _pending(ckpt_dir) -> list[int]:
  """Steps being saved: orbax writes <step>.orbax-checkpoint-tmp*, renamed
  to <step> once complete."""
  paths = glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*"))
  return sorted(int(os.path.basename(p).split(".")[0]) for p in paths)


def _saving(ckpt_dir, min_step: int = 0) -> bool:
  return any(s >= min_step for s in _pending(ckpt_dir))


def _kill_when(kind: str, ckpt_dir, min_step: int):
  """A trigger: during a save of step >= min_step ("save"), or at a
  (seeded) random moment after step min_step was committed ("step")."""
  delay = random.Random(min_step).uniform(0.0, 0.4)
  since = []

  def trigger() -> bool:
    if kind == "save":
      return _saving(ckpt_dir, min_step)
    if not since and _steps(ckpt_dir) and _steps(ckpt_dir)[-1] >= min_step:
      since.append(time.monotonic())
    return bool(since) and time.monotonic() - since[0] >= delay
  return trigger


def _run(args, env, log, trigger=None, timeout: float = 240.0) -> int:
  """Runs the CLI; SIGKILLs it once `trigger()` holds. Returns the exit code."""
  with open(log, "ab") as err:
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=err, stderr=err)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
      if trigger is not None and trigger():
        proc.send_signal(signal.SIGKILL)
        return proc.wait()
      if time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f"{args} ran over {timeout}s")
      time.sleep(0.002)
    return proc.returncode


def _restore_numpy(path):
  with ocp.StandardCheckpointer() as c:
    return jax.tree.map(np.asarray, c.restore(os.path.abspath(path)))


def _assert_trees_equal(a, b, what: str) -> None:
  (la, ta), (lb, tb) = (jax.tree_util.tree_flatten_with_path(t) for t in (a, b))
  assert ta == tb, what
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(
        x, y, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _assert_same_result(ref, got, stage: str) -> None:
  """Export, final checkpoint (state, data, meta) and info: bit for bit."""
  _assert_trees_equal(_restore_numpy(ref / stage / "export" / "params"),
                      _restore_numpy(got / stage / "export" / "params"),
                      f"{stage} export")
  last = _steps(ref / stage / "ckpt")[-1]
  assert _steps(got / stage / "ckpt")[-1] == last
  ref_ckpt = ref / stage / "ckpt" / str(last)
  got_ckpt = got / stage / "ckpt" / str(last)
  _assert_trees_equal(_restore_numpy(ref_ckpt / "state"),
                      _restore_numpy(got_ckpt / "state"), f"{stage} state")
  for item in ("data", "meta"):  # Iterator position; best step and value.
    assert (json.loads((ref_ckpt / item / "metadata").read_text()) ==
            json.loads((got_ckpt / item / "metadata").read_text())), item
  for key in ("steps", "best"):
    assert (loop.read_info(got, stage)[key] ==
            loop.read_info(ref, stage)[key]), key
  # Every step the interrupted runs logged, replays included, has the
  # uninterrupted run's loss exactly.
  losses = {r["step"]: r["loss"] for r in _records(ref, stage)}
  for r in _records(got, stage):
    assert r["loss"] == losses[r["step"]], (stage, r["step"])


# (stage, the stage its init comes from, kill plan): "save" kills while a
# checkpoint of step >= n is being written, "step" at a random moment after
# step n was committed; the last run goes to the end.
KILL_PLANS = {
    "sft": ("pretrain", [("save", 2), ("step", 6)]),
    "rm": ("sft", [("save", 8)]),
}


@pytest.mark.parametrize("stage", sorted(KILL_PLANS))
def test_kill_and_resume_is_bitwise_exact(eight_devices, tmp_path, stage):
  reference, cache = eight_devices  # The uninterrupted run.
  source, plan = KILL_PLANS[stage]
  workdir, log = tmp_path / "w", tmp_path / "stderr.txt"
  workdir.mkdir()
  for s in LOOP_STAGES[:LOOP_STAGES.index(source) + 1]:
    shutil.copytree(reference / s, workdir / s)
  args = cli_args(workdir, stage, {**OVERRIDES, **MESH8})
  env = cli_env(cache)
  ckpt_dir = workdir / stage / "ckpt"
  total = loop.read_info(reference, stage)["steps"]
  assert all(n + 3 <= total for _, n in plan), f"{stage}: {total} steps only"
  for kind, n in plan:
    for _ in range(3):
      code = _run(args, env, log, _kill_when(kind, ckpt_dir, n))
      assert code == -signal.SIGKILL, (kind, n, code, log.read_text()[-3000:])
      assert not loop.is_done(workdir, stage)
      # A save cut short stays a tmp dir, never a step.
      assert not set(_pending(ckpt_dir)) & set(_steps(ckpt_dir))
      if kind == "step" or _saving(ckpt_dir, n):
        break
      # The save committed between our look and the kill (a loaded machine):
      # that was a kill mid-step; wait for the next save.
    else:
      pytest.fail(f"{stage}: no kill landed during a save")
  code = _run(args, env, log)
  assert code == 0, log.read_text()[-3000:]
  _assert_same_result(reference, workdir, stage)


PPO_OVERRIDES = {"ppo.iterations": 4, "ppo.save_every": 2, "ppo.log_every": 1}


def _copy_stages(src, dst) -> pathlib.Path:
  for stage in LOOP_STAGES:
    shutil.copytree(pathlib.Path(src) / stage, pathlib.Path(dst) / stage)
  return pathlib.Path(dst)


def _pure_export(workdir, stage):
  with ocp.StandardCheckpointer() as c:
    return c.restore(str(pathlib.Path(workdir) / stage / "export" / "params"))


class _Interrupt(Exception):
  pass


def test_ppo_ptx_resumes_exactly_at_iteration_boundaries(one_device, tmp_path,
                                                          monkeypatch):
  """Stopped after iteration 3 (checkpoint at 2) and restarted, PPO-ptx ends
  with the parameters of an uninterrupted run, bit for bit."""
  config = load_config({**OVERRIDES, **MESH1, **PPO_OVERRIDES, "stage": "ppo_ptx"})
  ref = _copy_stages(one_device, tmp_path / "ref")
  runner.run(config, str(ref), devices=jax.devices()[:1])
  work = _copy_stages(one_device, tmp_path / "work")
  real_next = loop.JointBatches.__next__  # PPO's prompts + ptx rows.
  calls = {"n": 0}

  def flaky_next(self):
    calls["n"] += 1
    if calls["n"] == 4:  # Iterations 1-3 ran; the checkpoint holds step 2.
      raise _Interrupt()
    return real_next(self)
  monkeypatch.setattr(loop.JointBatches, "__next__", flaky_next)
  with pytest.raises(_Interrupt):
    runner.run(config, str(work), devices=jax.devices()[:1])
  assert not loop.is_done(str(work), "ppo_ptx")
  monkeypatch.setattr(loop.JointBatches, "__next__", real_next)
  runner.run(config, str(work), devices=jax.devices()[:1])
  a, b = _pure_export(ref, "ppo_ptx"), _pure_export(work, "ppo_ptx")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  ref_log = [(r["step"], r["ptx_loss"]) for r in _records(ref, "ppo_ptx")]
  assert [s for s, _ in ref_log] == [1, 2, 3, 4]
  assert all(r["ptx_loss"] is not None for r in _records(work, "ppo_ptx"))


def test_ppo_starts_from_sft_policy_and_rm_value(one_device):
  """The value model is initialised from the RM and the policy from SFT."""
  from instructrl import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from instructrl.model import LanguageModel, ScalarModel  # pylint: disable=g-import-not-at-top
  from instructrl.stages import ppo as ppo_stage  # pylint: disable=g-import-not-at-top
  from instructrl.stages import inputs  # pylint: disable=g-import-not-at-top
  config = load_config({**OVERRIDES, **MESH1})
  mesh = mesh_lib.make_mesh({}, jax.devices()[:1])
  p = ppo_stage.build(config, mesh, "ppo_ptx")
  _, ref, _ = inputs.load_model(str(one_device), "sft", LanguageModel, p.cfg, mesh)
  _, rm_params, _ = inputs.load_model(str(one_device), "rm", ScalarModel, p.rm_cfg,
                                      mesh)
  state = p.init(ref, rm_params)
  rm = _pure_export(one_device, "rm")
  sft = _pure_export(one_device, "sft")
  from flax import nnx  # pylint: disable=g-import-not-at-top
  def by_path(tree):  # orbax gives list indices back as string keys.
    return {jax.tree_util.keystr(k).replace("'", ""): v
            for k, v in jax.tree.leaves_with_path(tree)}
  for got, want in ((state["value_params"], rm), (state["params"], sft)):
    got, want = by_path(nnx.to_pure_dict(got)), by_path(want)
    assert sorted(got) == sorted(want)
    for k in got:
      np.testing.assert_array_equal(got[k], want[k])
  # The RM's bias (demonstrations score 0) is part of what the value starts from.
  assert float(np.asarray(rm["bias"])) != 0.0


def test_probe_best_of_n_on_the_tiny_workdir(one_device):
  """Best-of-N over real samples: n=1 collapses every figure to the samples'
  mean; with n=3 the oracle bounds the RM's pick and the samples' mean."""
  from instructrl import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from instructrl.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  from instructrl.model import LanguageModel, ScalarModel  # pylint: disable=g-import-not-at-top
  from instructrl.stages import evaluate  # pylint: disable=g-import-not-at-top
  from instructrl.stages import inputs  # pylint: disable=g-import-not-at-top
  from instructrl.tools import probe  # pylint: disable=g-import-not-at-top
  config = load_config({**OVERRIDES, **MESH1})
  mesh = mesh_lib.make_mesh({}, jax.devices()[:1])
  progs = evaluate.build(config, mesh)
  _, params, _ = inputs.load_model(str(one_device), "sft", LanguageModel, progs.cfg,
                                   mesh)
  _, rm, _ = inputs.load_model(str(one_device), "rm", ScalarModel, progs.rm_cfg, mesh)
  prompts = data_pipeline.get_prompts("world", "validation",
                                      world=dict(config.data.world))[:10]
  vocab = data_pipeline.resolve_vocab(config.data.vocab)
  one = probe.best_of_n(config, progs, params, rm, prompts, mesh, 1, vocab)
  assert one["sample"] == one["oracle"] == one["by_rm"]
  three = probe.best_of_n(config, progs, params, rm, prompts, mesh, 3, vocab)
  assert three["oracle"] >= max(three["by_rm"], three["sample"])
  again = probe.best_of_n(config, progs, params, rm, prompts, mesh, 3, vocab)
  assert again == three or np.isnan(three["corr"]) and {
      k: v for k, v in again.items() if k != "corr"} == {
          k: v for k, v in three.items() if k != "corr"}
