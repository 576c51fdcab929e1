"""Preemption benchmark: the tiny pipeline under SIGTERMs at random moments.

  python -m bench.preempt [--n=6] [--seed=0] [--out=bench/results/preempt.jsonl]

Runs `configs/default.py:tiny --config.stage=pipeline` (every stage logging
every step) in a subprocess; `--n` times it sends SIGTERM at a random moment
(uniform over `--window` seconds after the run's first logged step, so
most land mid-step or mid-save, some between stages; `--from_start` counts
from the process start instead, which on a loaded CPU mostly hits start-up)
and restarts, until the pipeline finishes. For each SIGTERM it records:

  exit_s      seconds from SIGTERM to the process's exit
  code        its exit status (143: saved and stopped at a step boundary;
              -15: killed at once, outside a training loop or before its
              first step returned: start-up, compiling, export, eval)
  stage/step  the stage in progress and the last step it logged
  saved       that stage's latest checkpoint step (or its export's steps)
  lost        step - saved (goal: 0)

One JSON line per SIGTERM, and a summary line, go to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")
OVERRIDES = [f"--config.{s}.log_every=1" for s in ("pretrain", "sft", "rm", "ppo")]


def _records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      pass  # a torn last line
  return out


def _saved(workdir: pathlib.Path, stage: str) -> int:
  info = workdir / stage / "export" / "info.json"
  if info.exists():
    return int(json.loads(info.read_text())["steps"])
  ckpt = workdir / stage / "ckpt"
  steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if (
      ckpt.is_dir()) else []
  return max(steps, default=0)


def _in_progress(workdir: pathlib.Path):
  """(stage, last logged step) of the latest training record, or None."""
  recs = [r for r in _records(workdir) if r.get("stage") in STAGES]
  return (recs[-1]["stage"], recs[-1]["step"]) if recs else (None, 0)


def run(n: int, seed: int, window: float, out: pathlib.Path,
        mid_training: bool = True) -> list[dict]:
  rng = random.Random(seed)
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="preempt_"))
  cache = workdir.parent / f"{workdir.name}_jax_cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = [sys.executable, "-m", "instructrl.main",
          "--config=configs/default.py:tiny", f"--workdir={workdir}",
          "--config.stage=pipeline", *OVERRIDES]
  log = open(workdir.parent / f"{workdir.name}.log", "ab")
  rows, t_start = [], time.monotonic()
  for i in range(n + 100):
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
    if i < n:
      delay = rng.uniform(0.0, window)
      if mid_training:  # Count from this run's first logged step.
        seen = len(_records(workdir))
        while proc.poll() is None and len(_records(workdir)) == seen:
          time.sleep(0.05)
      try:
        proc.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        stage, step = _in_progress(workdir)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait()
        exit_s = time.monotonic() - t0
        stage, step = _in_progress(workdir)
        saved = _saved(workdir, stage) if stage else 0
        row = {"bench": "preempt", "sigterm": i + 1, "delay_s": round(delay, 2),
               "code": code, "exit_s": round(exit_s, 2), "stage": stage,
               "step": step, "saved": saved, "lost": max(step - saved, 0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if code == 0:  # It finished (a signal during eval lets eval end).
          break
        continue
    code = proc.wait()
    if code != 0:
      raise SystemExit(f"pipeline exited {code}; see {log.name}")
    break
  summary = {"bench": "preempt_summary", "sigterms": len(rows),
             "lost_total": sum(r["lost"] for r in rows),
             "exit_s_max": max((r["exit_s"] for r in rows), default=None),
             "codes": sorted({r["code"] for r in rows}),
             "wall_s": round(time.monotonic() - t_start, 1),
             "workdir": str(workdir)}
  print(json.dumps(summary), flush=True)
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "a", encoding="utf-8") as f:
    for r in rows + [summary]:
      f.write(json.dumps(dict(r, when=time.strftime("%Y-%m-%d %H:%M"))) + "\n")
  return rows


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=6)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--window", type=float, default=15.0,
                 help="SIGTERM uniformly within this many s after each "
                 "run's first logged step (or start, with --from_start)")
  p.add_argument("--from_start", action="store_true")
  p.add_argument("--out", default=str(ROOT / "bench" / "results" / "preempt.jsonl"))
  a = p.parse_args()
  run(a.n, a.seed, a.window, pathlib.Path(a.out), not a.from_start)


if __name__ == "__main__":
  main()
