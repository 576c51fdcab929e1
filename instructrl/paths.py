"""One path layer for every file under a workdir: etils.epath.

orbax already reads and writes checkpoints through epath, so the same
`--workdir` string serves both: a local directory, or `gs://bucket/run`
(epath's GCS backend: tf.io.gfile when TensorFlow is installed, else
fsspec/gcsfs), or any scheme registered with `epath.register_path_cls`
(the tests register an fsspec in-memory store).

Object stores differ from POSIX in two ways that matter here, so writers
ask `is_local`:
  - no atomic rename (a rename is a copy and a delete): on them a whole
    object written by one `write_text` is already all-or-nothing, so
    `write_atomic` writes it in place; locally it writes a tmp file and
    renames it.
  - no append: `metrics.MetricsWriter` rewrites its object instead.
"""
from __future__ import annotations

import os

from etils import epath


def path(p) -> epath.Path:
  """An epath.Path; a local relative path is made absolute (orbax needs it)."""
  if isinstance(p, epath.Path):
    return p
  p = os.fspath(p)
  return epath.Path(p if "://" in p else os.path.abspath(p))


def is_local(p) -> bool:
  return "://" not in os.fspath(p)


def join(p, *parts) -> str:
  """`p/part/...` as a string (a URI keeps its scheme)."""
  return os.fspath(path(p).joinpath(*parts))


def exists(p) -> bool:
  return path(p).exists()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  return path(p).read_text()


def write_atomic(p, text: str) -> None:
  """Writes `text` so that readers see the old file or the whole new one."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(target):
    target.write_text(text)  # One object upload: all or nothing.
    return
  tmp = target.parent / (target.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def rmtree(p) -> None:
  target = path(p)
  if target.exists():
    target.rmtree()
