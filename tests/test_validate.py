"""`stages.validate`: every numeric key is checked before any stage runs."""
from __future__ import annotations

import math
import pathlib

import jax
import pytest

from instructrl import config_files
from instructrl import mesh as mesh_lib
from instructrl.stages import limits
from instructrl.stages import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every config file with its variants: each must pass, and each of its
# numeric keys must have a row in limits.LIMITS.
CONFIGS = [("default.py", ""), ("default.py", "tiny"), ("world_v2.py", ""),
           ("sft_1p3b.py", ""), ("sft_6b.py", ""), ("sft_175b.py", ""),
           ("rm_6b.py", ""), ("ppo_ptx_1p3b.py", ""), ("ppo_ptx_6b.py", ""),
           ("ppo_ptx_175b.py", ""), ("ppo_ptx_1p3b.py", "runlocal")]
STAGE_OF = {"pretrain": "pretrain", "sft": "sft", "rm": "rm", "ppo": "ppo_ptx",
            "eval": "eval"}


def load(variant: str = "tiny"):
  return config_files.get_config(ROOT / "configs" / "default.py", variant)


def mesh():
  return mesh_lib.make_mesh({}, jax.devices()[:1])


def test_the_default_configs_pass(tmp_path):
  for variant in ("", "tiny"):
    assert validate.validate(load(variant), str(tmp_path), mesh()) == list(
        validate.STAGES)


def numeric_keys(c, prefix: str = ""):
  """The dotted key of every int or float leaf of a config."""
  for k, v in c.items():
    if hasattr(v, "items"):
      yield from numeric_keys(v, f"{prefix}{k}.")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      yield f"{prefix}{k}"


def test_every_numeric_key_of_every_config_has_a_limit_and_passes_it():
  missing = set()
  for name, variant in CONFIGS:
    c = config_files.get_config(ROOT / "configs" / name, variant)
    missing |= {k for k in numeric_keys(c) if k not in limits.LIMITS}
    limits.check(c)
  assert not sorted(missing)


def test_limits_say_their_range():
  assert limits.POSITIVE_INT.describe() == "an integer >= 1"
  assert limits.FRACTION.describe() == "a number in [0, 1)"
  assert limits.POSITIVE.describe() == "a number > 0"
  assert limits.MESH_AXIS.describe() == "an integer >= 1 or -1"
  assert limits.LIMITS["ppo.missing_eos_penalty"].describe() == "a number or None"
  assert limits.LIMITS["rm.heldout_group"].describe() == "an integer in [0, 5) or -1"
  # Values a ConfigDict would refuse to hold still fail in a plain dict.
  for bad in (2.0, True, None, "3"):
    assert not limits.POSITIVE_INT.admits(bad)
  assert limits.MESH_AXIS.admits(-1) and not limits.MESH_AXIS.admits(-2)
  assert not limits.UNIT.admits(float("nan")) and limits.UNIT.admits(1)
  limits.check({"sft": {}})  # A key the config lacks is not checked.
  with pytest.raises(validate.ConfigError) as e:
    limits.check({"sft": {"batch_size": 2.0}})
  assert str(e.value) == "config.sft.batch_size=2.0: must be an integer >= 1"


def _bad_values(limit: limits.Limit) -> list:
  """Just outside each end (and the end itself if open), not in `also`; a
  float key gets floats, as the ConfigDict stores them."""
  out = []
  step = 1 if limit.integer else 0.5
  num = int if limit.integer else float
  if math.isfinite(limit.lo):
    below = [num(limit.lo - step), num(limit.lo - 2 * step)]
    out += [next(v for v in below if not limit.admits(v))]
    out += [num(limit.lo)] if limit.lo_open else []
  if math.isfinite(limit.hi):
    out += [num(limit.hi + step)] + ([num(limit.hi)] if limit.hi_open else [])
  if not limit.integer:
    out.append(float("nan") if out else float("inf"))
  return out  # A float in an int key: the config's own type check refuses it.


CASES = [(k, v) for k, limit in limits.LIMITS.items() for v in _bad_values(limit)]


def set_key(c, key: str, value) -> None:
  """`config.<key> = value`, adding the key (and config.rm_model, a copy of
  config.model; config.tpu) if absent."""
  with c.unlocked():
    if key.startswith("rm_model.") and "rm_model" not in c:
      c.rm_model = c.model.copy_and_resolve_references()
    *parents, last = key.split(".")
    node = c
    for p in parents:
      if p not in node:
        node[p] = {}
      node = node[p]
    node[last] = value


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_value_out_of_range_is_one_line_naming_key_and_range(tmp_path, key, value):
  """Through the runner's own calls: make_mesh, then validate."""
  c = load("tiny")
  set_key(c, key, value)
  with c.unlocked():
    c.stage = STAGE_OF.get(key.split(".")[0], "pipeline")
  with pytest.raises(validate.ConfigError) as e:
    validate.validate(c, str(tmp_path), validate.make_mesh(c, jax.devices()[:1]))
  assert str(e.value) == (f"config.{key}={value!r}: must be "
                          f"{limits.LIMITS[key].describe()}")
  assert not list(tmp_path.iterdir())


def test_messages_a_user_reads():
  cases = {
      "sft.batch_size": (-4, "config.sft.batch_size=-4: must be an integer >= 1"),
      "sft.ptx_frac": (1.0, "config.sft.ptx_frac=1.0: must be a number in [0, 1)"),
      "model.num_heads": (0, "config.model.num_heads=0: must be an integer >= 1"),
      "mesh.data": (0, "config.mesh.data=0: must be an integer >= 1 or -1"),
      "data.world.k_max": (3, "config.data.world.k_min=4: must be <= "
                              "config.data.world.k_max=3"),
  }
  for key, (value, message) in cases.items():
    c = load("tiny")
    set_key(c, key, value)
    with pytest.raises(validate.ConfigError) as e:
      validate.validate(c, "/nonexistent", validate.make_mesh(c, jax.devices()[:1]))
    assert str(e.value) == message


def test_a_pipeline_checks_later_stages_before_the_first(tmp_path):
  c = load("tiny")
  c.ppo.minibatch_size = 3  # 8 rows do not split into minibatches of 3.
  with pytest.raises(validate.ConfigError, match="config.ppo.minibatch_size"):
    validate.validate(c, str(tmp_path), mesh())
  c = load("tiny")
  c.eval.fewshot_prompt_len = 1000
  with pytest.raises(validate.ConfigError, match="config.eval.fewshot_prompt_len"):
    validate.validate(c, str(tmp_path), mesh())


def test_finished_stages_are_not_checked_again(tmp_path):
  c = load("tiny")
  c.pretrain.batch_size = -4
  (tmp_path / "pretrain" / "export").mkdir(parents=True)
  (tmp_path / "pretrain" / "export" / "info.json").write_text("{}")
  todo = validate.validate(c, str(tmp_path), mesh())
  assert "pretrain" not in todo and todo[0] == "sft"


def test_checks_that_need_the_whole_step_or_the_models():
  eight = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  c = load("tiny")
  c.sft.update(batch_size=8, ptx_frac=0.3, microbatches=8)  # 8 + 4 rows.
  with pytest.raises(validate.ConfigError, match=r"microbatches=8 .* 12 rows"):
    validate.check_stage(c, "sft", eight)
  c = load("tiny")
  c.eval.batch_size = 6
  with pytest.raises(validate.ConfigError, match="config.eval.batch_size=6"):
    validate.check_stage(c, "eval", eight)
  c = load("tiny")
  c.rm.sample_batch_size = 6
  with pytest.raises(validate.ConfigError, match="config.rm.sample_batch_size=6"):
    validate.check_stage(c, "rm", eight)
  c = load("tiny")
  with c.unlocked():
    c.model.not_a_field = 1
  with pytest.raises(validate.ConfigError, match=r"^config\.model: "):
    validate.check_stage(c, "pretrain", mesh())
  c = load("tiny")
  with c.unlocked():
    c.rm_model = c.model.copy_and_resolve_references()
  c.model.vocab_size, c.rm_model.vocab_size = 259, 300
  with pytest.raises(validate.ConfigError, match="config.rm_model.vocab_size=300"):
    validate.check_stage(c, "rm", mesh())
