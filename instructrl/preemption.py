"""Stopping at a step boundary on SIGTERM/SIGINT, on every process at once.

Spot/preemptible TPU VMs and SLURM send SIGTERM with a short grace period
(tens of seconds). Without a handler the process dies where it is and up to
`save_every` steps are lost. Once train_loop has `arm()`ed (after its first
step, inside `guard()`) a signal only records itself; the loop asks
`should_stop(step)` at each step boundary, saves a checkpoint of that step
and raises `Preempted`, which main turns into one line and `exit_code`.
Outside a training loop (start-up, compiling the first step, export, eval)
a signal kills at once, as before: nothing is lost there that a rerun does
not redo (exports are atomic; eval keeps no state).

Agreement across processes: one process may get the signal a step before
another, so each must not decide alone. With several processes jax's
preemption service decides (maxtext's and orbax's mechanism,
`multihost_utils.reached_preemption_sync_point`): jax.distributed installs
its own SIGTERM notifier, which tells the coordination service, which picks
the step after the furthest one any process reached; every process stops
there. We therefore leave SIGTERM to jax then, and turn a SIGINT into a
SIGTERM to ourselves so that it takes the same path. With one process the
Python handler's flag is the decision.

A second SIGINT raises KeyboardInterrupt at once (an impatient Ctrl-C).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
  """The shell's status for death by `signum` (143 SIGTERM, 130 SIGINT): what
  schedulers expect, and distinct from our own 2 (config) and 3 (NaN)."""
  return 128 + int(signum)


class Preempted(Exception):
  """A stage stopped on a signal after saving `step`; rerunning resumes."""

  def __init__(self, stage: str, step: int, signum: int, where: str):
    self.stage, self.step, self.signum = stage, int(step), int(signum)
    self.exit_code = exit_code(signum)
    super().__init__(
        f"{signal.Signals(self.signum).name}: {stage} stopped at step {step} "
        f"(saved in {where}); rerun the same command to resume")


class _State:
  received: int | None = None
  old: dict = {}
  multi = False


def _multi_process() -> bool:
  return jax.process_count() > 1 and jax.distributed.is_initialized()


def _handler(signum, frame):
  del frame
  if signum == signal.SIGINT and _State.received == signal.SIGINT:
    raise KeyboardInterrupt
  _State.received = signum
  if _State.multi and signum == signal.SIGINT:
    # jax's notifier (a C handler) owns SIGTERM; route Ctrl-C through it.
    os.kill(os.getpid(), signal.SIGTERM)


def arm() -> None:
  """From now on SIGTERM/SIGINT record themselves instead of killing.

  The loop arms after its first step returns: before that nothing is
  computed that a checkpoint would keep, and a signal during start-up or
  compilation (which Python cannot interrupt) should still kill at once.
  Idempotent; a no-op outside the main thread (no handlers there).
  """
  if _State.old or threading.current_thread() is not threading.main_thread():
    return
  _State.multi = _multi_process()
  ours = [s for s in SIGNALS if not (_State.multi and s == signal.SIGTERM)]
  _State.received = None
  _State.old = {s: signal.signal(s, _handler) for s in ours}


def disarm(redeliver: bool = False) -> None:
  """Puts the previous handlers back; with `redeliver`, a signal recorded
  but not acted on (it came during a stage's last step) is sent again, to
  the previous handler (by default: death, after the final save)."""
  pending = _State.received if _State.old else None
  for s, old in _State.old.items():
    signal.signal(s, old)
  _State.old, _State.received = {}, None
  if redeliver and pending is not None:
    os.kill(os.getpid(), pending)


@contextlib.contextmanager
def guard():
  """On the way out, however the block ends (train_loop's): `disarm`, and
  a signal still pending goes to the previous handler. A loop that stopped
  on the signal calls `disarm()` itself first: it was acted on."""
  try:
    yield
  finally:
    disarm(redeliver=True)


def received() -> int | None:
  """The signal recorded by this process, if any (SIGTERM under jax's
  notifier with several processes: then see `should_stop`)."""
  return _State.received


def should_stop(step: int) -> int | None:
  """The signal to stop on at this step boundary, the same on every process
  (call it on all of them at every step); None to go on."""
  if _multi_process():
    try:
      reached = multihost_utils.reached_preemption_sync_point(int(step))
    except RuntimeError:  # jax's preemption service is disabled.
      reached = False
    return (_State.received or signal.SIGTERM) if reached else None
  return _State.received
