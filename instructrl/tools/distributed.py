"""Multi-process start-up: `jax.distributed.initialize` from flags or environment.

One process per host (TPU VM worker, GPU node, or a test's subprocess); each
sees its local devices, and after `initialize` all of them form one global
device list, so the same mesh, jitted steps and orbax checkpoints serve one
host or many. Data iterators read `jax.process_index()/process_count()` and
yield only their process's rows; `mesh.put_batch` assembles global arrays.

Where the settings come from (the first that applies wins):
  1. explicit values: `--coordinator_address`, `--num_processes`,
     `--process_id` (main.py's flags), else the environment variables
     JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  2. a cluster jax finds by itself (`jax.distributed.initialize()` with no
     arguments): a Cloud TPU VM (every worker of a pod slice), a SLURM job
     of several tasks, an Open MPI job of several ranks;
  3. otherwise one process and no initialisation at all.
`mode="off"` skips both; `mode="auto"` (the default) follows the list.

On CPU-only processes (JAX_PLATFORMS=cpu) the cross-process collectives use
gloo: that is how tests run several processes on one machine.
"""
from __future__ import annotations

import glob
import os
from typing import Mapping

import jax

# jax's default is 100 s; a pod's collectives stall longer on a slow host
# only in pathologies worth ending anyway.
LOST_PROCESS_TIMEOUT_S = 120

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
       "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def _on_cloud_tpu_vm() -> bool:
  # TPU VMs expose the chips as /dev/accel* (v4, v5e) or VFIO groups (v5p, v6e).
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _auto_cluster(environ: Mapping[str, str]) -> str | None:
  """The kind of cluster jax can detect by itself, or None."""
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
    return "slurm"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "ompi"
  if _on_cloud_tpu_vm() and environ.get("JAX_PLATFORMS", "") in ("", "tpu"):
    return "tpu"
  return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, mode: str = "auto",
            environ: Mapping[str, str] | None = None) -> dict | None:
  """What `initialize` would do, as the keyword arguments it would pass.

  Returns None for a single process, {} for jax's own cluster detection, or
  {"coordinator_address", "num_processes", "process_id"}. Raises ValueError
  on a half-given explicit setting.
  """
  if mode not in ("auto", "off"):
    raise ValueError(f"--distributed must be 'auto' or 'off', got {mode!r}")
  environ = os.environ if environ is None else environ
  if mode == "off":
    return None
  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  for key, var in ENV.items():
    if given[key] in (None, "") and environ.get(var, "") != "":
      given[key] = environ[var]
  if any(v not in (None, "") for v in given.values()):
    missing = [f"--{k} (or ${ENV[k]})" for k, v in given.items() if v in (None, "")]
    if missing:
      raise ValueError(f"multi-process start-up also needs {', '.join(missing)}")
    n, i = int(given["num_processes"]), int(given["process_id"])
    if n < 1 or not 0 <= i < n:
      raise ValueError(f"process_id {i} is not in [0, num_processes={n})")
    return {"coordinator_address": str(given["coordinator_address"]),
            "num_processes": n, "process_id": i}
  return {} if _auto_cluster(environ) else None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               mode: str = "auto", timeout_s: int = 300,
               lost_process_timeout_s: int = LOST_PROCESS_TIMEOUT_S) -> bool:
  """Joins the processes of this job; returns whether it is multi-process.

  Call before anything touches a jax backend (device lists, arrays). A
  second call is a no-op.

  `lost_process_timeout_s`: a process that stops sending heartbeats to the
  coordination service for this long is declared dead, and the service ends
  every other process with an error naming it (`/job:jax_worker/.../task:<i>`
  = process i), instead of leaving them blocked in a collective. If process
  0 (the coordinator) dies, the others notice their heartbeats failing
  within the same time. Too small and a long pause (a slow checkpoint
  write, swapping) kills a healthy job.
  """
  if lost_process_timeout_s < 1:
    raise ValueError(f"--lost_process_timeout_s must be >= 1, got "
                     f"{lost_process_timeout_s}")
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  kwargs = resolve(coordinator_address, num_processes, process_id, mode)
  if kwargs is None:
    return False
  if (jax.config.jax_platforms or "") == "cpu":
    # The CPU backend has no cross-process collectives unless told which.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        **kwargs, initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=int(lost_process_timeout_s),
        # A process that exits waits this long for the others at shutdown.
        shutdown_timeout_seconds=int(lost_process_timeout_s))
  except ValueError:
    if kwargs:
      raise
    # Our guess of a cluster was wrong (jax found none): one process.
    return False
  return jax.process_count() > 1


def lost_peer(error: BaseException) -> bool:
  """Whether `error` is a collective failing because a peer process died
  (gloo's reset connection, the coordination service's unhealthy task)."""
  if jax.process_count() < 2 or not isinstance(error, jax.errors.JaxRuntimeError):
    return False
  text = str(error)
  return any(s in text for s in ("Connection reset by peer", "Connection closed",
                                 "heartbeat", "unhealthy", "UNAVAILABLE"))


def describe() -> str:
  """One line: this process, the process count and the device counts."""
  return (f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} devices "
          f"({jax.devices()[0].platform})")
