"""Faults the users' clusters produce: preemption, damaged checkpoints, full
disks, workdirs on another storage backend.

The SIGTERM tests drive the CLI on the 8 fake devices against the
uninterrupted runs of tests/test_train_stages.py (the same fixtures, so the
same programs and bitwise the same numbers), as its SIGKILL tests do.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import time

import fsspec
import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

import test_train_stages as tts
from test_train_stages import eight_devices  # noqa: F401  pylint: disable=unused-import
from instructrl import preemption
from instructrl.stages import loop
from instructrl.stages import runner

GRACE_S = 30.0  # GCE spot VMs and SLURM's default KillWait give 30 s.
TIMING_KEYS = ("time", "elapsed", "steps_per_s", "tokens_per_s")
PPO = {**tts.PPO_OVERRIDES, "ppo.iterations": 5}


def _overrides(stage: str) -> dict:
  return {**tts.OVERRIDES, **tts.MESH8, **(PPO if "ppo" in stage else {})}


@pytest.fixture(scope="session")
def ppo_reference(eight_devices):  # pylint: disable=redefined-outer-name
  """eight_devices' workdir plus an uninterrupted PPO-ptx run on 8 devices."""
  reference, cache = eight_devices

  def train(out):
    shutil.copytree(reference, out)
    shutil.rmtree(out / "ppo_ptx", ignore_errors=True)
    with tts._compilation_cache(cache):  # pylint: disable=protected-access
      config = tts.load_config({**_overrides("ppo_ptx"), "stage": "ppo_ptx"})
      runner.run(config, str(out), devices=jax.devices())
  root = pathlib.Path(reference).parent  # tts._shared_dir's.
  return tts._trained_once(root, "ppo_ptx_ref", train), cache  # pylint: disable=protected-access


def _logged_steps(workdir, stage) -> list[int]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [r["step"] for r in tts._records(workdir, stage)]  # pylint: disable=protected-access


def _sigterm_run(args, env, log, workdir, stage, after_step: int, delay: float):
  """Runs the CLI; SIGTERMs it `delay` s after it logged `after_step`.

  Returns (exit code, seconds from SIGTERM to exit, last logged step then).
  """
  with open(log, "ab") as err:
    proc = subprocess.Popen(args, cwd=tts.ROOT, env=env, stdout=err, stderr=err)
    deadline, seen = time.monotonic() + 240, None
    try:
      while proc.poll() is None and time.monotonic() < deadline:
        steps = _logged_steps(workdir, stage)
        if seen is None and steps and steps[-1] >= after_step:
          seen = time.monotonic()
        if seen is not None and time.monotonic() - seen >= delay:
          proc.send_signal(signal.SIGTERM)
          t0 = time.monotonic()
          code = proc.wait(timeout=GRACE_S * 4)
          return code, time.monotonic() - t0, max(_logged_steps(workdir, stage))
        time.sleep(0.005)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  pytest.fail(f"{stage}: no SIGTERM landed before the run ended ({proc.returncode})")


def _assert_equal_finish(ref, got, stage: str, all_steps: bool = True) -> None:
  """Export, last checkpoint, info and every logged metric: bit for bit."""
  tts._assert_trees_equal(  # pylint: disable=protected-access
      tts._restore_numpy(ref / stage / "export" / "params"),  # pylint: disable=protected-access
      tts._restore_numpy(got / stage / "export" / "params"),  # pylint: disable=protected-access
      f"{stage} export")
  last = tts._steps(ref / stage / "ckpt")[-1]  # pylint: disable=protected-access
  assert tts._steps(got / stage / "ckpt")[-1] == last  # pylint: disable=protected-access
  tts._assert_trees_equal(  # pylint: disable=protected-access
      tts._restore_numpy(ref / stage / "ckpt" / str(last) / "state"),  # pylint: disable=protected-access
      tts._restore_numpy(got / stage / "ckpt" / str(last) / "state"),  # pylint: disable=protected-access
      f"{stage} state")
  for key in ("steps", "best"):  # PPO has no best.
    assert (loop.read_info(got, stage).get(key) ==
            loop.read_info(ref, stage).get(key)), key
  want = {r["step"]: r for r in tts._records(ref, stage)}  # pylint: disable=protected-access
  got_records = tts._records(got, stage)  # pylint: disable=protected-access
  assert {r["step"] for r in got_records} <= set(want)
  if all_steps:
    assert {r["step"] for r in got_records} == set(want)
  for r in got_records:
    for k, v in r.items():
      if k not in TIMING_KEYS:
        assert v == want[r["step"]][k], (stage, r["step"], k)


# stage -> (stage its init comes from, SIGTERM after this step was logged).
SIGTERM_PLANS = {"pretrain": (None, 1), "sft": ("pretrain", 5),
                 "rm": ("sft", 5), "ppo_ptx": ("rm", 2)}


@pytest.mark.parametrize("stage", sorted(SIGTERM_PLANS))
def test_sigterm_saves_the_current_step_and_resumes_bitwise(
    eight_devices, ppo_reference, tmp_path, stage):  # pylint: disable=redefined-outer-name
  reference, cache = ppo_reference if "ppo" in stage else eight_devices
  source, after = SIGTERM_PLANS[stage]
  workdir, log = tmp_path / "w", tmp_path / "log.txt"
  workdir.mkdir()
  for s in tts.LOOP_STAGES[:tts.LOOP_STAGES.index(source) + 1] if source else ():
    shutil.copytree(reference / s, workdir / s)
  args = tts.cli_args(workdir, stage, _overrides(stage))
  env = tts.cli_env(cache)
  total = loop.read_info(reference, stage)["steps"]
  # Pretrain has 4 short steps only: signal it right after step 1.
  delay = 0.0 if stage == "pretrain" else random.Random(stage).uniform(0.0, 0.3)
  code, exit_s, logged = _sigterm_run(args, env, log, workdir, stage, after,
                                      delay)
  out = log.read_text()
  assert code == preemption.exit_code(signal.SIGTERM) == 143, out[-3000:]
  assert exit_s < GRACE_S, exit_s
  assert logged < total, "the stage finished before the signal"
  # Nothing lost: the checkpoint holds the last step the run logged.
  assert tts._steps(workdir / stage / "ckpt")[-1] == logged  # pylint: disable=protected-access
  assert f"preempted: SIGTERM: {stage} stopped at step {logged}" in out, out
  assert "Traceback" not in out, out[-3000:]
  assert not loop.is_done(workdir, stage)
  code = tts._run(args, env, log)  # pylint: disable=protected-access
  assert code == 0, log.read_text()[-3000:]
  _assert_equal_finish(reference, workdir, stage)
  print(f"{stage}: SIGTERM after step {logged}, exit in {exit_s:.2f}s")


def test_guard_arms_records_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.guard():
    assert signal.getsignal(signal.SIGTERM) is before  # Start-up: dies.
    preemption.arm()
    assert signal.getsignal(signal.SIGTERM) is not before
    assert preemption.should_stop(1) is None
    os.kill(os.getpid(), signal.SIGTERM)
    preemption.arm()  # Idempotent: the recorded signal stays.
    assert preemption.should_stop(2) == signal.SIGTERM
    preemption.disarm()  # What the loop does when it stops on it.
  assert signal.getsignal(signal.SIGTERM) is before
  assert preemption.received() is None


def test_a_signal_during_the_last_step_reaches_the_previous_handler():
  got = []
  before = signal.signal(signal.SIGTERM, lambda signum, _: got.append(signum))
  try:
    with preemption.guard():
      preemption.arm()
      os.kill(os.getpid(), signal.SIGTERM)  # The loop ends without stopping.
      assert got == []
    assert got == [signal.SIGTERM]  # Not swallowed.
  finally:
    signal.signal(signal.SIGTERM, before)


# --- Damaged checkpoints. ---------------------------------------------------


def _tiny_state(i: int):
  import test_checkpoint  # pylint: disable=g-import-not-at-top
  state = test_checkpoint.make_state()
  return dict(state, step=jax.numpy.asarray(i, jax.numpy.int32),
              f32=state["f32"] + i)


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _damage(step_dir: pathlib.Path, how: str) -> None:
  if how == "meta":  # A torn JSON item.
    target = step_dir / "meta" / "metadata"
    target.write_bytes(target.read_bytes()[:7])
    return
  if how == "swapped":  # Valid files, other content: only checksums see it.
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")
    return
  # The arrays' data as restore reads it (the merged OCDBT data files; the
  # per-process ones under ocdbt.process_*/ are not read back).
  target = _largest_file(step_dir / "state" / "d")
  data = bytearray(target.read_bytes())
  if how == "truncate":
    data = data[:len(data) // 2]
  else:  # One flipped bit in the middle of the arrays' data.
    data[len(data) // 2] ^= 0x10
  target.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "bitflip", "meta", "swapped"])
def test_damaged_latest_falls_back_to_the_previous(tmp_path, caplog, how):
  from instructrl import checkpoint  # pylint: disable=g-import-not-at-top
  from instructrl import state_format  # pylint: disable=g-import-not-at-top
  import test_checkpoint  # pylint: disable=g-import-not-at-top
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_every=1) as c:
    for i in (1, 2, 3):
      c.save(i, _tiny_state(i), data_state={"i": i}, meta={"m": i})
  _damage(tmp_path / "3", how)
  target = state_format.abstract_like(_tiny_state(0))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_every=1) as c:
    state, data, meta = c.restore(abstract_state=target)
    test_checkpoint.assert_bitwise_equal(state, _tiny_state(2))
    assert (data, meta) == ({"i": 2}, {"m": 2})
    assert c.all_steps() == [1, 2]
    # The damaged step is kept aside, and the rerun saves that step anew.
    assert (tmp_path / "damaged.3").is_dir()
    assert c.save(3, _tiny_state(3), data_state={"i": 3}, force=True)
  # Our own line only: tensorstore's leaked futures log paths holding "damaged".
  warnings = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("checkpoint:") and "damaged" in r.getMessage()]
  assert len(warnings) == 1 and "step 3" in warnings[0], warnings
  assert "resuming from step 2" in warnings[0]


def test_a_target_that_matches_no_checkpoint_moves_nothing(tmp_path):
  from instructrl import checkpoint  # pylint: disable=g-import-not-at-top
  from instructrl import state_format  # pylint: disable=g-import-not-at-top
  with checkpoint.Checkpointer(tmp_path, save_every=1) as c:
    for i in (1, 2):
      c.save(i, _tiny_state(i), data_state={})
  other = dict(_tiny_state(0), f32=jax.numpy.zeros((5,)))  # A changed config.
  with checkpoint.Checkpointer(tmp_path, save_every=1) as c:
    with pytest.raises(ValueError):
      c.restore(abstract_state=state_format.abstract_like(other))
    assert c.all_steps() == [1, 2]
  assert not list(tmp_path.glob("damaged.*"))


def test_damaged_latest_sft_checkpoint_resumes_to_an_equal_finish(
    eight_devices, tmp_path):  # pylint: disable=redefined-outer-name
  """SFT's checkpoints without its export (a run killed before exporting);
  the latest, final one bit-flipped; the rerun falls back to the previous
  kept step, trains the rest again and ends as the uninterrupted run."""
  reference, cache = eight_devices
  work = tmp_path / "w"
  shutil.copytree(reference / "pretrain", work / "pretrain")
  steps = tts._steps(reference / "sft" / "ckpt")  # pylint: disable=protected-access
  assert len(steps) >= 2, steps
  shutil.copytree(reference / "sft" / "ckpt", work / "sft" / "ckpt")
  latest = steps[-1]
  _damage(work / "sft" / "ckpt" / str(latest), "bitflip")
  with tts._compilation_cache(cache):  # pylint: disable=protected-access
    config = tts.load_config({**_overrides("sft"), "stage": "sft"})
    runner.run(config, str(work), devices=jax.devices())
  assert (work / "sft" / "ckpt" / f"damaged.{latest}").is_dir()
  _assert_equal_finish(reference, work, "sft", all_steps=False)


# --- A full disk. -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs (we run as root here); unmounted afterwards."""
  mount = tmp_path / "disk"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                 check=True)
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_in_one_line_and_commits_nothing(small_disk):
  from instructrl import checkpoint  # pylint: disable=g-import-not-at-top
  from instructrl import state_format  # pylint: disable=g-import-not-at-top
  small = {"w": jax.numpy.ones((64,), jax.numpy.float32)}
  big = {"w": jax.numpy.asarray(np.random.default_rng(0).normal(
      size=(64, 1024)), jax.numpy.float32)}  # 256 KiB, incompressible
  c = checkpoint.Checkpointer(small_disk, max_to_keep=10, save_every=1)
  c.save(1, small, data_state={})
  c.wait()
  with pytest.raises(checkpoint.SaveFailed) as e:
    for i in range(2, 12):  # ~2.5 MiB onto a 1 MiB disk.
      c.save(i, dict(big, w=big["w"] + i), data_state={})
    c.wait()
  c.close()
  message = str(e.value)
  assert "\n" not in message and "no space left on device" in message, message
  assert "not committed" in message
  # Every committed step restores; the failed one never became a step.
  with checkpoint.Checkpointer(small_disk, max_to_keep=10, save_every=1) as c:
    for s in c.all_steps():
      target = state_format.abstract_like(small if s == 1 else big)
      c.restore(s, abstract_state=target)
    assert len(c.all_steps()) < 11


# --- A workdir on another storage backend. -----------------------------------


class _MemoryBackend(epath_backend.Backend):
  """epath's backend interface over fsspec's in-memory filesystem: a
  non-local store with object-store semantics, offline."""

  fs = fsspec.filesystem("memory")

  def open(self, path, mode):
    return self.fs.open(path, mode.replace("a", "w") if "a" in mode and
                        not self.fs.exists(path) else mode)

  def exists(self, path):
    return self.fs.exists(path)

  def isdir(self, path):
    return self.fs.isdir(path)

  def listdir(self, path):
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]

  def glob(self, path):
    return ["memory://" + p.lstrip("/") for p in self.fs.glob(path)]

  def walk(self, path, *, top_down=True, on_error=None):
    del on_error
    return self.fs.walk(path, topdown=top_down)

  def makedirs(self, path, *, exist_ok=False, mode=None):
    del mode
    self.fs.makedirs(path, exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    del mode
    if self.fs.exists(path) and not exist_ok:
      raise FileExistsError(path)
    self.fs.mkdir(path, create_parents=False)

  def rmtree(self, path):
    self.fs.rm(path, recursive=True)

  def remove(self, path):
    self.fs.rm(path)

  def rename(self, path, dst):
    self.fs.mv(path, dst, recursive=True)

  replace = rename

  def copy(self, path, dst, overwrite):
    if self.fs.exists(dst) and not overwrite:
      raise FileExistsError(dst)
    self.fs.copy(path, dst)

  def stat(self, path):
    raise NotImplementedError


_MEMORY = _MemoryBackend()


@epath.register_path_cls("memory://")
class _MemoryPath(gpath.PosixGPath):
  """`memory://a/b` for epath.Path, as epath spells gs:// (as /gs/...)."""

  def __new__(cls, *parts):
    full = "/".join(os.fspath(p) for p in parts)
    if full.startswith("memory://"):
      full = "/memory/" + full[len("memory://"):]
    return super().__new__(cls, full)

  @property
  def _uri_scheme(self):
    return "memory" if self.parts[:2] == ("/", "memory") else None

  @property
  def _backend(self):
    return _MEMORY


def test_paths_layer_on_an_in_memory_store():
  from instructrl import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from instructrl import paths  # pylint: disable=g-import-not-at-top
  workdir = "memory://bucket/run"
  assert not paths.is_local(workdir)
  assert os.fspath(paths.path(workdir) / "sft") == "memory://bucket/run/sft"
  # The done marker and info of a stage.
  assert not loop.is_done(workdir, "sft")
  paths.write_atomic(paths.join(loop.stage_dir(workdir, "sft"), "export",
                                "info.json"), json.dumps({"steps": 3}))
  assert loop.is_done(workdir, "sft") and loop.read_info(workdir, "sft") == {
      "steps": 3}
  assert _MEMORY.fs.exists("/bucket/run/sft/export/info.json")
  assert not pathlib.Path("memory:").exists()  # Nothing went to a local dir.
  # Metrics: no append on the store, so whole uploads; a torn tail (a
  # killed upload of a store without atomic objects) is dropped on reopen.
  with metrics_lib.MetricsWriter(workdir, "sft", active=True) as w:
    w.write_config({"lr": 0.1})
    w.write(1, {"loss": 2.0})
  _MEMORY.fs.pipe("/bucket/run/metrics.jsonl",
                  _MEMORY.fs.cat("/bucket/run/metrics.jsonl") + b'{"stage": "s')
  with metrics_lib.MetricsWriter(workdir, "sft", active=True,
                                 flush_s=0.0) as w:
    w.write(2, {"loss": 1.0})
    assert [r["step"] for r in metrics_lib.read_metrics(w.path)] == [1, 2]
  records = metrics_lib.read_metrics(paths.join(workdir, "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.0)]
  assert json.loads(paths.read_text(paths.join(workdir, "tb", "sft",
                                               "config.json"))) == {"lr": 0.1}
  assert not pathlib.Path("memory:").exists()
