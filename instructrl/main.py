"""Entry point: `python -m instructrl.main --config=configs/X.py --workdir=DIR`.

Kept thin on purpose (nanodo): parse flags, build the mesh, dispatch on
`config.stage`. The stages live in `instructrl.stages`; user mistakes end in
one line on stderr and exit code 2, not a traceback.
"""
import difflib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF (data layer) start-up noise.

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                               "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "Experiment config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics, results.")
# Multi-process runs (instructrl/tools/distributed.py): explicit values, else the
# JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID environment, else
# a cluster jax detects (TPU VM, SLURM, Open MPI), else one process.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "off"],
                                 "'off': never call jax.distributed.initialize.")
_LOST_PROCESS_TIMEOUT = flags.DEFINE_integer(
    "lost_process_timeout_s", 120,
    "Multi-process: end every process this long after one stops responding.")


def _fail(message, code: int) -> None:
  """Prints `message` as one line on stderr and exits with `code`."""
  lines = [l.strip() for l in str(message).strip().splitlines() if l.strip()]
  if len(lines) > 1 and any(l.startswith("Traceback") for l in lines):
    # ml_collections embeds the config file's traceback in its message; its
    # first line says which flag, its last line says what went wrong.
    lines = [lines[0], lines[-1]]
  print("error: " + " ".join(lines), file=sys.stderr)
  sys.exit(code)


def main(argv):
  del argv
  # orbax logs every save at INFO; our own progress lines are enough.
  logging.set_verbosity(logging.WARNING)
  from instructrl.stages import runner  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value
    config.get("stage")  # A config file that failed to load raises here.
  except OSError as e:
    _fail(f"--config: {e}", 2)
  from instructrl.tools import distributed  # pylint: disable=g-import-not-at-top
  try:
    if distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                              _PROCESS_ID.value, _DISTRIBUTED.value,
                              lost_process_timeout_s=_LOST_PROCESS_TIMEOUT.value):
      print(distributed.describe(), file=sys.stderr)
  except ValueError as e:
    _fail(f"--distributed: {e}", 2)
  from instructrl import checkpoint  # pylint: disable=g-import-not-at-top
  from instructrl import preemption  # pylint: disable=g-import-not-at-top
  try:
    runner.run(config, _WORKDIR.value)
  except preemption.Preempted as e:  # Saved; 143 (SIGTERM) or 130 (SIGINT).
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except runner.user_errors() as e:
    _fail(e, 2)
  except FloatingPointError as e:
    _fail(e, 3)
  except checkpoint.SaveFailed as e:  # A full disk, a storage error.
    _fail(e, 4)
  except Exception as e:  # pylint: disable=broad-except
    if not distributed.lost_peer(e):
      raise
    # jax's shutdown then names the process that stopped heartbeating.
    _fail(f"lost another process ({str(e).splitlines()[0][:160]}); every "
          "process ends: restart them all to resume from the last checkpoint", 5)


def _unknown_key(argv, error) -> str:
  """Names the `--config.a.b` override whose path the config lacks.

  ml_collections lets the KeyError/AttributeError of the missing key escape
  without the flag's name, so we walk each override's path through the
  config, loaded again by the flag's own parser.
  """
  args, path = argv[1:], _DEFAULT_CONFIG
  for arg, after in zip(args, args[1:] + [""]):
    name, eq, value = arg.lstrip("-").partition("=")
    if name == "config":
      path = value if eq else after
  try:
    config = flags.FLAGS["config"].parser.parse(path)
  except Exception:  # pylint: disable=broad-except
    return f"--config: {error}"
  for arg in args:
    name = arg.lstrip("-").partition("=")[0]
    if not name.startswith("config."):
      continue
    node = config
    for key in name.split(".")[1:]:
      if not hasattr(node, "keys") or key not in node:
        keys = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, keys, 1, 0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"--{name}: unknown config key {key!r}{hint}"
      node = node[key]
  return f"--config: {error}"


def _parse_flags(argv):
  # A bad flag or override (unknown key, wrong type, bad config file) is a
  # user mistake: one line, exit 2, instead of absl's usage dump.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(e, 2)
  except (AttributeError, KeyError, IndexError) as e:
    # ml_collections lets an override of a missing key escape unwrapped.
    _fail(_unknown_key(argv, e), 2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
