"""The CLI's contract for mistakes: one line, an exit code, nothing damaged.

Config mistakes exit with 2 and a NaN/Inf loss with 3; in both cases stderr
holds one `error: ...` line (no traceback), and the workdir keeps every good
file it had. Each case runs `python -m instructrl.main` in a subprocess.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from instructrl import config_files
from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel
from instructrl.model.sharded import abstract
from instructrl.stages import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH8 = ["--config.mesh.data=2", "--config.mesh.fsdp=2",
         "--config.mesh.tensor=2"]
# C++ start-up lines of TensorFlow (imported by the data layer) and XLA:
# not ours, and not silenced by TF_CPP_MIN_LOG_LEVEL.
_NOISE = re.compile(r"^([IWE]0000 |WARNING: All log messages before absl)")
_PROGRESS = re.compile(r"^\w+ \d+/\d+ \(")  # metrics.Progress lines.


def load_config(variant: str = "tiny"):
  return config_files.get_config(ROOT / "configs" / "default.py", variant)


def run_cli(workdir, *args, devices: int = 8) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if not any(a.startswith("--config=") for a in args):
    args = ("--config=configs/default.py:tiny",) + args
  return subprocess.run(
      [sys.executable, "-m", "instructrl.main", f"--workdir={workdir}", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def our_lines(stderr: str) -> list[str]:
  """stderr without the C++ noise and progress lines."""
  return [l for l in stderr.strip().splitlines()
          if l.strip() and not _NOISE.match(l) and not _PROGRESS.match(l)]


def tree_digest(workdir) -> dict[str, str]:
  root = pathlib.Path(workdir)
  if not root.exists():
    return {}
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_pretrain(tmp_path_factory):
  """A workdir whose pretrain stage is done (fresh params, exported)."""
  from instructrl.stages import inputs  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("cli") / "w"
  cfg = inputs.model_config(load_config())
  params = nnx.split(LanguageModel(cfg, nnx.Rngs(0)))[1]
  loop.export(str(workdir), "pretrain", params,
                {"stage": "pretrain", "steps": 0})
  return workdir, cfg, jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def _assert_export_loads(workdir, cfg, expected) -> None:
  mesh = mesh_lib.make_mesh({"fsdp": -1}, jax.devices()[:1])
  _, abs_params = abstract(LanguageModel, cfg)
  params = loop.load_export(str(workdir), "pretrain", abs_params,
                              mesh_lib.param_shardings(abs_params, mesh))
  got = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  jax.tree.map(np.testing.assert_array_equal, got, expected)


# (flags, what the one error line must name). The workdir holds a finished
# pretrain stage only; with 8 devices and MESH8, data * fsdp = 4.
CONFIG_ERRORS = {
    "unknown_key": (["--config.sft.lr_typo=1"], "config.sft.lr_typo"),
    "unknown_nested_key": (["--config.sftt.lr=1"], "sftt"),
    "wrong_type": (["--config.sft.lr=abc"], "config.sft.lr"),
    "wrong_int": (["--config.mesh.data=1.5"], "config.mesh.data"),
    "mesh_does_not_divide": (["--config.mesh.data=3", "--config.mesh.fsdp=1"],
                             "config.mesh"),
    "batch_does_not_divide": (
        ["--config.stage=sft", "--config.sft.batch_size=6", *MESH8],
        "config.sft.batch_size"),
    # A pipeline checks every stage before it starts the first.
    "pipeline_checks_rm_first": (["--config.rm.batch_size=6", *MESH8],
                                 "config.rm.batch_size"),
    "missing_init_stage": (["--config.stage=rm", *MESH8], "config.rm.init"),
    "missing_init_path": (
        ["--config.stage=sft", "--config.sft.init=/nonexistent", *MESH8],
        "config.sft.init"),
    "unknown_stage": (["--config.stage=bogus"], "config.stage"),
    "unknown_world_family": (["--config.data.world.families=list,bogus"],
                             "config.data.world"),
    "seq_len_over_max_len": (["--config.stage=sft", "--config.sft.seq_len=500",
                              *MESH8], "config.sft.seq_len"),
    "zero_ppo_lr": (["--config.ppo.lr=0", *MESH8], "config.ppo.lr"),
    "ptx_frac_of_one": (["--config.sft.ptx_frac=1.0", *MESH8], "config.sft.ptx_frac"),
    "unknown_variant": (["--config=configs/default.py:bogus"], "bogus"),
    "missing_config_file": (["--config=configs/nonexistent.py"],
                            "nonexistent.py"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_is_one_line_and_exit_2(finished_pretrain, case):
  workdir, cfg, expected = finished_pretrain
  args, names = CONFIG_ERRORS[case]
  before = tree_digest(workdir)
  proc = run_cli(workdir, *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = our_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert names in lines[0], lines[0]
  assert tree_digest(workdir) == before  # Nothing written, nothing removed.
  _assert_export_loads(workdir, cfg, expected)


def test_a_negative_batch_size_is_one_line_and_creates_nothing(tmp_path):
  # Once a ValueError traceback from the data layer (issue 19); every numeric
  # key is now a row of stages/limits.py, checked before the workdir exists.
  workdir = tmp_path / "never_created"
  proc = run_cli(workdir, "--config.stage=sft", "--config.sft.batch_size=-4",
                 devices=1)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert our_lines(proc.stderr) == [
      "error: config.sft.batch_size=-4: must be an integer >= 1"], proc.stderr[-3000:]
  assert not workdir.exists()


def test_missing_pretrain_in_an_empty_workdir(tmp_path):
  workdir = tmp_path / "never_created"
  proc = run_cli(workdir, "--config.stage=sft", devices=1)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = our_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "config.sft.init" in lines[0] and "'pretrain'" in lines[0], lines
  assert not workdir.exists()


def _finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_nan_loss_halts_with_exit_3_and_no_bad_checkpoint(tmp_path):
  # lr 1e30 from the first step: Adam moves every weight by ~1e30, so the
  # second forward pass overflows and the loss of step 2 is NaN.
  workdir = tmp_path / "w"
  proc = run_cli(workdir, "--config.stage=pretrain",
                 "--config.pretrain.lr=1e30",
                 "--config.pretrain.warmup_steps=0",
                 "--config.pretrain.save_every=1",
                 "--config.pretrain.log_every=100", devices=1)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = our_lines(proc.stderr)
  assert len(lines) == 1 and "non-finite loss" in lines[0], proc.stderr[-3000:]
  assert not loop.is_done(str(workdir), "pretrain")
  assert not (workdir / "pretrain" / "export").exists()
  ckpt = workdir / "pretrain" / "ckpt"
  # The last good step (1) was committed in full before the halt; the
  # NaN step was never saved, not even partly.
  assert sorted(os.listdir(ckpt)) == ["1"], os.listdir(ckpt)
  with ocp.StandardCheckpointer() as c:
    state = c.restore(str(ckpt / "1" / "state"))
  assert _finite(jax.tree.map(np.asarray, state))
