"""bench/ runs end to end at its tiny shape (figures, not speed, are checked).

Speed itself is never asserted in tests; this keeps the harness from rotting:
every figure is produced, finite and positive, the PPO phases are each
timed, and the FLOP count behind MFU matches 6 * params * tokens plus
attention for a shape small enough to count by hand.
"""
import json
import math
import os
import subprocess
import sys

from bench import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_at_the_tiny_shape(tmp_path):
  out = tmp_path / "bench.jsonl"
  subprocess.run([sys.executable, "-m", "bench.run", "--shape=tiny", "--quick",
                  "--only=sft,rm,sample,ppo", f"--out={out}"], cwd=ROOT, check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True)
  rows = {r["figure"]: r for r in map(json.loads, out.read_text().splitlines())}
  assert {"sft", "rm", "sample", "ppo", "meta"} <= set(rows)
  for name in ("sft", "rm", "sample", "ppo"):
    for side in ("ours", "torch"):
      assert math.isfinite(rows[name][side]) and rows[name][side] > 0, (name, side)
  split = rows["ppo"]["ours_split_s"]
  assert set(split) == {"ppo_sample", "ppo_score", "ppo_ref_value", "ppo_learn"}
  assert all(v > 0 for v in split.values())


def test_mfu_counts_the_model_s_own_matmul_parameters():
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from bench import ours  # pylint: disable=g-import-not-at-top
  from instructrl.model import LanguageModel  # pylint: disable=g-import-not-at-top
  from instructrl.model.sharded import abstract  # pylint: disable=g-import-not-at-top
  for shape in (common.SHAPES["ref"], common.SHAPES["w512"]):
    _, params = abstract(LanguageModel, ours.model_config(shape))
    leaves = jax.tree.leaves_with_path(nnx.to_pure_dict(params))
    # Weight matrices only: not norms or biases (the q/k/v biases are
    # [heads, head_dim]), nor the position table (a lookup).
    n = sum(v.size for k, v in leaves if v.ndim >= 2 and not (
        k[-1].key.startswith("b") or k[-1].key == "pos_embed"))
    assert n == shape.matmul_params(), shape.name
    tokens = shape.sft_batch * shape.seq_len
    assert shape.train_flops(shape.sft_batch, shape.seq_len) == (
        6 * n * tokens + 12 * shape.num_layers * shape.d_model * shape.seq_len * tokens)
