"""Training metrics without TensorFlow: JSON lines, TensorBoard files, progress.

  writer = MetricsWriter(workdir, "sft")      # workdir/metrics.jsonl and
                                              # workdir/tb/sft/events.out...
  writer.write_config(config_dict)            # tb/sft/config.json, text,
                                              # hparams
  host = to_host(metrics)                     # one device_get per log step
  check_finite(host, step)                    # FloatingPointError on NaN loss
  writer.write(step, host)
  progress = Progress(total_steps, "sft")
  progress.update(step, tokens=n)             # prints every `every_s` seconds
  read_metrics(workdir / "metrics.jsonl")     # tolerates a torn last line

`metrics.jsonl` holds one JSON object per line: {"stage", "step", "time",
"elapsed", <metric>: value...}. Non-finite floats are written as null and
named in a "nonfinite" list, so every line stays valid JSON. Each line is
written whole and flushed, so a killed process leaves at most one partial
last line, which the next writer truncates on open.

TensorBoard event files go to workdir/tb/<stage>/ through tensorboardX (no
TensorFlow): one scalar per numeric metric and step, the config as text, and
the config's scalar leaves (nested keys joined with ".") as hyperparameters
for TensorBoard's HParams tab, all in that one run directory.

Only process 0 writes (multi-host), unless `active` says otherwise.

Paths go through `instructrl.paths` (etils.epath), so the workdir may be on
an object store (`gs://...`). Those have no append: there the writer keeps
the file's text and uploads it whole at most every `flush_s` seconds and on
close (a killed process loses at most those seconds of lines; the steps
they logged are replayed from the checkpoint anyway). TensorBoard events are
written for local workdirs only: tensorboardX writes through its own
gs/s3 clients, not epath, so elsewhere they are skipped with one warning.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

import jax
import numpy as np
import tensorboardX
from tensorboardX import summary as tbx_summary

from instructrl import paths

# --- Host values. ------------------------------------------------------------


def _scalar(name: str, v):
  """A Python scalar (int/float/bool/str/None) from a host value."""
  if v is None or isinstance(v, (str, bool)):
    return v
  if isinstance(v, int):
    return int(v)  # also numpy's int subclasses -> plain int
  if isinstance(v, float):
    return float(v)
  a = np.asarray(v)
  if a.size != 1:
    raise TypeError(f"metric {name!r} is not a scalar (shape {a.shape})")
  return a.reshape(()).item()


def to_host(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Device values -> Python scalars, with one device_get for the whole dict."""
  names = list(metrics)  # a list keeps the caller's order (dicts get sorted)
  values = jax.device_get([metrics[k] for k in names])
  return {str(k): _scalar(k, v) for k, v in zip(names, values)}


def _nonfinite(metrics: Mapping[str, Any]) -> list[str]:
  return [k for k, v in metrics.items()
          if isinstance(v, float) and not math.isfinite(v)]


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises FloatingPointError if a metric named like a loss is NaN/Inf.

  Call it before saving a checkpoint so a diverged run halts with its last
  good checkpoint intact.
  """
  losses = {k: _scalar(k, v) for k, v in metrics.items() if "loss" in k.lower()}
  bad = _nonfinite(losses)
  if bad:
    shown = ", ".join(f"{k}={losses[k]}" for k in bad)
    raise FloatingPointError(
        f"non-finite loss at step {step}: {shown}; halting (no checkpoint "
        "written)")


# --- JSON lines. -------------------------------------------------------------

_RESERVED = ("stage", "step", "time", "elapsed", "nonfinite")


def _repair_torn_tail(path: str) -> bytes:
  """Truncates a partial last line left by a killed writer; returns the rest."""
  p = paths.path(path)
  if not p.exists():
    return b""
  data = p.read_bytes()  # once per start; even long runs log only megabytes
  keep = data.rfind(b"\n") + 1
  if keep != len(data):
    if paths.is_local(path):
      with open(path, "rb+") as f:
        f.truncate(keep)
    else:
      p.write_bytes(data[:keep])
    logging.warning("metrics: dropped a torn last line in %s", path)
  return data[:keep]


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """All records of a metrics.jsonl; a torn last line is skipped."""
  lines = paths.path(path).read_bytes().split(b"\n")
  out = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:  # not just a torn tail: say so, keep going
        logging.warning("metrics: skipping corrupt line %d of %s", i + 1, path)
  return out


# --- TensorBoard. -------------------------------------------------------------

# Event file names carry `.<pid>.<n>`: tensorboardX names files by the second
# and host only and opens them "wb", so two writers for one stage in the same
# second (a quick restart, a resume) would otherwise clobber each other.
_EVENT_FILES = itertools.count()


def _hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The scalar leaves (int/float/bool/str) of a nested config, keys joined
  with "."; lists, None and other values are left out."""
  out = {}
  for k, v in config.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_hparams(v, name + "."))
      continue
    if isinstance(v, np.generic):
      v = v.item()
    if isinstance(v, (bool, int, float, str)):
      out[name] = v
  return out


class MetricsWriter:
  """Logs one stage's metrics to workdir/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, stage: str, *,
               tensorboard: bool = True, active: bool | None = None,
               flush_s: float = 10.0):
    self.stage = stage
    self.active = jax.process_index() == 0 if active is None else active
    self.path = paths.join(workdir, "metrics.jsonl")
    self.tb_dir = paths.join(workdir, "tb", stage)
    self._start = time.monotonic()
    self._f = None
    self._tb = None
    self._remote = None  # [text so far, last upload time] off a local disk
    self._flush_s = flush_s
    if not self.active:
      return
    paths.makedirs(workdir)
    kept = _repair_torn_tail(self.path)
    if paths.is_local(self.path):
      self._f = open(self.path, "a", encoding="utf-8")
    else:
      self._remote = [kept.decode("utf-8"), time.monotonic()]
    if tensorboard and not paths.is_local(self.tb_dir):
      logging.warning("metrics: no TensorBoard events for %s (tensorboardX "
                      "writes local paths only here); metrics.jsonl has all",
                      self.tb_dir)
    elif tensorboard:
      # flush_secs=1: tensorboardX's writer thread puts queued events on disk
      # within a second, so a killed process loses at most the last second.
      self._tb = tensorboardX.SummaryWriter(
          logdir=self.tb_dir, flush_secs=1,
          filename_suffix=f".{os.getpid()}.{next(_EVENT_FILES)}")

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Logs scalars for `step`; returns the JSON record (also when inactive)."""
    host = to_host(metrics)
    clash = [k for k in host if k in _RESERVED]
    if clash:
      raise ValueError(f"metric names {clash} are reserved")
    now = time.time()
    record = {"stage": self.stage, "step": int(step), "time": round(now, 3),
              "elapsed": round(time.monotonic() - self._start, 3)}
    bad = _nonfinite(host)
    record.update({k: None if k in bad else v for k, v in host.items()})
    if bad:
      record["nonfinite"] = bad
    line = json.dumps(record, allow_nan=False) + "\n"
    if self._f is not None:
      # One write of a whole line, then flush: a crash tears at most the end.
      self._f.write(line)
      self._f.flush()
    if self._remote is not None:
      self._remote[0] += line
      if time.monotonic() - self._remote[1] >= self._flush_s:
        self._upload()
    if self._tb is not None:
      for k, v in host.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, float(v), int(step), walltime=now)
    return record

  def write_config(self, config: Mapping[str, Any] | str,
                   step: int = 0) -> None:
    """Saves the config as tb/<stage>/config.json, a TensorBoard text and
    hyperparameters (a JSON string config is parsed for those)."""
    if not self.active:
      return
    text = config if isinstance(config, str) else json.dumps(
        config, indent=2, sort_keys=True, default=str)
    paths.write_atomic(paths.join(self.tb_dir, "config.json"), text + "\n")
    if self._tb is None:
      return
    # Indented lines render as preformatted text in the markdown view.
    self._tb.add_text("config", "\n".join(
        "    " + line for line in text.splitlines()), int(step))
    if isinstance(config, str):
      try:
        config = json.loads(config)
      except ValueError:
        config = None
    hparams = _hparams(config) if isinstance(config, Mapping) else {}
    if hparams:
      # Only the session-start summary, in this run's own directory (not
      # add_hparams' timestamped sub-run). No experiment summary: TensorBoard
      # uses the first one it finds verbatim, so one stage's (with no metrics)
      # would hide the other stages' hparams; without it, it gathers the
      # hparams of every stage's run and their scalars as metrics.
      _, session_start, _ = tbx_summary.hparams(hparams, {})
      self._tb.file_writer.add_summary(session_start, int(step))

  def _upload(self) -> None:
    paths.path(self.path).write_text(self._remote[0])
    self._remote[1] = time.monotonic()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    if self._remote is not None:
      self._upload()
      self._remote = None
    if self._tb is not None:
      self._tb.close()  # writes what is queued, flushes, closes the file
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --- Progress line. ----------------------------------------------------------


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(seconds)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.1f}"


class Progress:
  """Prints `desc step/total, rate, ETA` to stderr every `every_s` seconds.

  On a TTY the line is redrawn in place; in logs (non-TTY) each report is a
  new line. `tokens` passed to `update` are the tokens processed since the
  previous `update` call.
  """

  def __init__(self, total: int, desc: str = "", *, every_s: float = 10.0,
               start_step: int = 0, stream: TextIO | None = None,
               clock=time.monotonic):
    self.total, self.desc, self.every_s = int(total), desc, every_s
    self._stream = stream or sys.stderr
    self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
    self._clock = clock
    self._t0 = self._last_t = clock()
    self._last_step = self._step = int(start_step)
    self._tokens = 0.0  # since the last report
    self._shown = False

  def update(self, step: int, *, tokens: float | None = None) -> str | None:
    """Records progress; returns the line if one was printed."""
    self._step = int(step)
    if tokens is not None:
      self._tokens += float(tokens)
    now = self._clock()
    if now - self._last_t < self.every_s and self._step < self.total:
      return None
    return self._report(now)

  def _report(self, now: float) -> str:
    dt = max(now - self._last_t, 1e-9)
    rate = (self._step - self._last_step) / dt  # recent, not since start
    parts = [f"{self.desc} {self._step}/{self.total}".strip()]
    if self.total > 0:
      parts[0] += f" ({100.0 * self._step / self.total:.1f}%)"
    parts.append(f"{rate:.2f} steps/s")
    if self._tokens:
      parts.append(f"{_si(self._tokens / dt)} tok/s")
    eta = (self.total - self._step) / rate if rate > 0 else math.inf
    parts.append(f"elapsed {_hms(now - self._t0)}")
    parts.append(f"eta {_hms(max(eta, 0.0))}")
    line = " | ".join(parts)
    if self._tty:
      self._stream.write("\r" + line + "\x1b[K")
    else:
      self._stream.write(line + "\n")
    self._stream.flush()
    self._shown = True
    self._last_t, self._last_step, self._tokens = now, self._step, 0.0
    return line

  def close(self) -> None:
    """Prints a final report if progress was made since the last one."""
    if self._step != self._last_step:
      self._report(self._clock())
    if self._tty and self._shown:
      self._stream.write("\n")
      self._stream.flush()
