"""`stages.validate`: every numeric key is checked before any stage runs."""
from __future__ import annotations

import pathlib

import jax
import pytest

from instructrl import config_files
from instructrl import mesh as mesh_lib
from instructrl.stages import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Numeric keys with no bound to check: read by no stage (an LM section's
# unused `steps`/`epochs`), any real value (a penalty), or checked apart
# (heldout_group: a labeler group or -1).
UNBOUNDED = {("sft", "steps"), ("rm", "steps"), ("pretrain", "epochs"),
             ("rm", "heldout_group"), ("ppo", "missing_eos_penalty")}


def load(variant: str = "tiny"):
  return config_files.get_config(ROOT / "configs" / "default.py", variant)


def mesh():
  return mesh_lib.make_mesh({}, jax.devices()[:1])


def test_the_default_configs_pass(tmp_path):
  for variant in ("", "tiny"):
    assert validate.validate(load(variant), str(tmp_path), mesh()) == list(
        validate.STAGES)


def test_every_numeric_key_of_the_default_has_a_rule():
  c = load("")
  missing = [(s, k) for s in validate.RULES for k, v in c[s].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k not in validate.RULES[s] and (s, k) not in UNBOUNDED]
  assert not missing


def _bad_values(kind, lo, lo_incl, hi):
  out = [lo - 1 if kind == "int" else -0.5]
  if not lo_incl:
    out.append(lo)
  if hi is not None:
    out.append(hi)
  return out  # A float in an int key: the config's own type check refuses it.


CASES = [(s, k, v) for s, rules in validate.RULES.items()
         for k, rule in sorted(rules.items()) for v in _bad_values(*rule)]


@pytest.mark.parametrize("section, key, value", CASES,
                         ids=[f"{s}.{k}={v}" for s, k, v in CASES])
def test_a_value_out_of_bounds_names_its_key(tmp_path, section, key, value):
  c = load("tiny")
  stage = "ppo_ptx" if section == "ppo" else section
  with c.unlocked():
    c.stage = stage
    c[section][key] = value
  with pytest.raises(validate.ConfigError, match=rf"config\.{section}\.{key}="):
    validate.check_stage(c, stage, mesh())


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
