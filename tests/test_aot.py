"""The full-size configs and the AOT planner.

The config tests need nothing beyond the core install. The compile tests need
libtpu (`pip install -e ".[tpu]"`; CI installs it) and compile the runlocal
SFT config for a 4-chip v5p slice from this CPU host, then check the figures
against the parameter count and the sharding.
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import pytest

from instructrl import config_files
from instructrl import mesh as mesh_lib
from instructrl.stages import sft_extras
from instructrl.tools import aot
from instructrl.model import LanguageModel, ModelConfig
from instructrl.model.sharded import abstract

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("sft_1p3b", "sft_6b", "sft_175b", "rm_6b", "ppo_ptx_1p3b",
           "ppo_ptx_6b", "ppo_ptx_175b")
PARAMS = {"1p3b": 1.3e9, "6b": 6.7e9, "175b": 175e9}


def load(name: str, arg: str = ""):
  return config_files.get_config(ROOT / "configs" / f"{name}.py", arg)


def key_paths(d, prefix="") -> set[str]:
  out = set()
  for k, v in d.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= key_paths(v, f"{prefix}{k}.")
  return out


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_configs_keep_the_default_structure(name, arg):
  want = key_paths(load("default"))
  got = key_paths(load(name, arg))
  extra = {k for k in got - want if not k.startswith(("tpu", "rm_model"))}
  assert not want - got and not extra
  assert key_paths(load(name, arg).rm_model) == key_paths(load("default").model)


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_divide_their_slice(name):
  """Mesh = the slice's chips, and every axis divides what it splits.

  mesh.logical_to_spec replicates a dimension its axis does not divide, which
  would silently multiply memory: the configs must not rely on that.
  """
  c = load(name)
  chips = math.prod(int(x) for x in c.tpu.topology.split(":")[1].split("x"))
  mesh = dict(c.mesh)
  assert math.prod(mesh.values()) == chips
  rows = mesh["data"] * mesh["fsdp"]
  batch = {"sft": c.sft.batch_size, "rm": c.rm.batch_size,
           "ppo_ptx": c.ppo.minibatch_size}[c.stage]
  assert batch % rows == 0
  for m in (c.model, c.rm_model):
    assert m.d_model % mesh["fsdp"] == 0
    assert m.num_heads % mesh["tensor"] == 0
    assert m.vocab_size % 128 == 0 and m.vocab_size % mesh["tensor"] == 0
    assert m.scan_layers and m.dtype == "bfloat16" and m.param_dtype == "float32"
  size = name.split("_")[-1]
  n = ModelConfig.from_dict(dict(c.model)).num_params()
  assert n == pytest.approx(PARAMS[size], rel=0.05)
  assert c.rm_model.d_model == 4096 and c.rm_model.num_layers == 32


def test_configs_hold_the_paper_numbers():
  small, big, rm = load("sft_1p3b"), load("sft_175b"), load("rm_6b")
  assert (small.sft.lr, small.sft.batch_size, big.sft.lr, big.sft.batch_size) == (
      9.65e-6, 32, 5.03e-6, 8)
  assert (small.sft.epochs, small.sft.dropout) == (16, 0.2)
  assert (rm.rm.lr, rm.rm.batch_size, rm.rm.epochs) == (9e-6, 64, 1)
  for size, value_lr in (("1p3b", 9e-6), ("6b", 9e-6), ("175b", 5e-6)):
    p = load(f"ppo_ptx_{size}").ppo
    assert (p.batch_size, p.minibatch_size, p.epochs, p.clip_eps, p.kl_coef) == (
        512, 64, 1, 0.2, 0.02)
    assert (p.ptx_coef, p.ptx_ratio, p.ema_decay, p.warmup_iterations) == (
        27.8, 8, 0.992, 10)
    assert p.value_lr == value_lr and p.iterations * p.batch_size == 256_000


def test_forward_flops_is_two_per_weight_per_token():
  cfg = ModelConfig(vocab_size=512, num_layers=3, d_model=64, num_heads=4,
                    max_len=32)
  matmul = cfg.num_params(include_embeddings=False) - cfg.num_layers * (
      4 * 64 + 4 * 64 + 3 * 64 + 64 + 64) - 2 * 64  # Less biases and norms.
  no_attention = aot.forward_flops(cfg, 10, 0)
  assert no_attention == 10 * 2 * (matmul + 64 * 512)
  assert aot.forward_flops(cfg, 10, 32) - no_attention == 10 * 3 * 4 * 64 * 32


def tpu_host() -> None:
  """libtpu, set up to describe TPU slices from this CPU host."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:  # Fail, not skip: CI installs libtpu.
    raise ImportError(f'{e}; pip install -e ".[tpu]"') from e
  aot.quiet_libtpu()


def sft_rows(c, data_parallel: int = 4) -> int:
  """Rows of SFT's step: demonstrations plus the pretraining rows mixed in."""
  return c.sft.batch_size + sft_extras.ptx_rows(c.sft.batch_size, c.sft.ptx_frac,
                                                data_parallel)


def small_config():
  """runlocal, widened so that TPU tile padding is ~1% of the bytes."""
  c = load("sft_1p3b", "runlocal")
  c.model.update(d_model=256, num_heads=2, vocab_size=512)
  return c


@pytest.fixture(scope="module")
def tpu_rows():
  tpu_host()
  return aot.plan(small_config(), ["sft"], mfu=0.5)


def test_compile_for_a_tpu_slice(tpu_rows):
  (row,) = tpu_rows
  assert (row["program"], row["chip"], row["chips"], row["mesh"]) == (
      "sft", "v5p", 4, {"data": 1, "fsdp": 4, "tensor": 1})
  assert row["fits"] and row["compile_s"] > 0
  assert row["hbm"] == 95 * 1024**3
  total = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
           + row["temp_bytes"])
  assert row["total_bytes"] == total <= row["hbm"]
  # The state (fp32 params + Adam's two moments) is split over 4 chips, and
  # the donated state aliases the new one.
  c = small_config()
  cfg = ModelConfig.from_dict(dict(c.model))
  state_bytes = 3 * 4 * cfg.num_params()
  assert state_bytes / 4 <= row["argument_bytes"] < 1.1 * state_bytes / 4
  assert state_bytes / 4 <= row["alias_bytes"] <= row["argument_bytes"]
  tokens = sft_rows(c) * c.sft.seq_len  # The planner compiles the stage's step.
  flops = 3 * aot.forward_flops(cfg, tokens, c.sft.seq_len) / 4
  assert row["model_flops_per_chip"] == pytest.approx(flops)
  assert row["step_s_at_mfu"] == pytest.approx(flops / (0.5 * 459e12))
  assert row["xla_flops_per_chip"] > 0


def test_interconnect_bytes_of_fsdp(tpu_rows):
  """FSDP over 4 chips: the bf16 weights are gathered (>= once, forward) and
  the gradients reduced (>= a reduce-scatter of bf16 grads): each moves 3/4
  of 2 bytes per parameter per chip at least. Hand counts of single
  collectives are in test_hlo_comm.py."""
  (row,) = tpu_rows
  c = small_config()
  n = ModelConfig.from_dict(dict(c.model)).num_params()
  assert row["ici_unknown_trips"] == 0
  kinds = row["ici_by_kind"]
  assert kinds["all-gather"] >= 0.95 * 2 * n * 3 / 4
  reduced = kinds.get("all-reduce", 0) + kinds.get("reduce-scatter", 0)
  assert reduced >= 0.95 * 2 * n * 3 / 4
  assert row["ici_s"] == pytest.approx(row["ici_bytes"] / 1200e9)


def test_argument_bytes_are_the_shards(tpu_rows):
  """Per chip: the state's shards under the mesh rules, plus the batch rows."""
  (row,) = tpu_rows
  c = small_config()
  mesh = mesh_lib.make_mesh(dict(c.mesh), aot.topology_devices(c.tpu))
  _, params = abstract(LanguageModel, ModelConfig.from_dict(dict(c.model)))
  shardings = mesh_lib.param_shardings(params, mesh)
  shard_bytes = sum(4 * math.prod(s.shard_shape(p.shape)) for p, s in zip(
      jax.tree.leaves(params), jax.tree.leaves(shardings)))
  batch_bytes = 5 * 4 * sft_rows(c) * c.sft.seq_len / 4
  want = 3 * shard_bytes + batch_bytes
  # XLA:TPU pads arrays to its tiles: a few percent at this size.
  assert want <= row["argument_bytes"] <= 1.05 * want


def test_a_program_that_does_not_fit_says_so():
  """XLA:TPU refuses to compile past HBM; the planner reports it, no crash."""
  tpu_host()
  c = small_config()
  c.model.update(d_model=16384, num_heads=128)  # 6.4B params on 4 v5e chips.
  c.tpu.topology = "v5e:2x2"
  (row,) = aot.plan(c, ["sft"])
  assert (row["chip"], row["hbm"], row["fits"]) == ("v5e", 16 * 1024**3, False)
  assert row["total_bytes"] > row["hbm"] and "HBM" in row["error"]
  assert "  NO  " in aot.format_table([row])


def test_table_and_json(tpu_rows):
  text = aot.format_table(tpu_rows)
  assert "v5p:2x2x1 (4 v5p chips)" in text and "sft" in text and "yes" in text
  json.dumps(tpu_rows)  # Every figure is JSON-serialisable.


def test_chip_figures_per_device():
  tpu_host()
  c = load("sft_1p3b", "runlocal")
  c.tpu.update(topology="v4:2x2x1")
  devices = aot.topology_devices(c.tpu)
  spec = aot.chip_spec(devices, "v4:2x2x1")  # Two cores per chip, no megacore.
  assert (spec["chips"], spec["devices"]) == (4, 8)
  assert spec["hbm"] == 16 * 1024**3 and spec["peak"] == 275e12 / 2
