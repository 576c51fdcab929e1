"""Entry point: `python -m instructrl.main --config=configs/X.py --workdir=DIR`.

Kept thin on purpose (nanodo): parse flags, build the mesh, dispatch on
`config.stage`. The stages live in `instructrl.train`; user mistakes end in
one line on stderr and exit code 2, not a traceback.
"""
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


def main(argv):
  del argv
  # orbax logs every save at INFO; our own progress lines are enough.
  logging.set_verbosity(logging.WARNING)
  from instructrl.train import pipeline  # pylint: disable=g-import-not-at-top
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except pipeline.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def _parse_flags(argv):
  # A bad flag or override (unknown key, wrong type, bad config file) is a
  # user mistake: one line, exit 2, instead of absl's usage dump.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
