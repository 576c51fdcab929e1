"""The allowed range of every numeric config key: one table, one check.

`--config.sft.batch_size=-4` must end in one line that names the key and
what it may be, before any stage starts, not in a traceback from the first
layer that divides by it. `LIMITS` maps each key (dotted, under `config.`)
to a `Limit`; `check` tests the keys a config has under some sections. A
key missing from a config is not checked (a config file may drop one), and
a config key with no entry here is a bug that tests/test_validate.py finds.

Relations between keys that need more than two numbers (a batch that
divides over the mesh, a prompt that fits `max_len`) stay in `validate`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from instructrl.data.labelers import NUM_GROUPS as NUM_LABELER_GROUPS
from instructrl.data.pipeline import K_MAX
from instructrl.stages.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Limit:
  """A finite number (an integer if `integer`) in the interval from `lo` to
  `hi` (`lo_open`/`hi_open`: that end excluded), or one of `also`."""
  integer: bool
  lo: float = -math.inf
  hi: float = math.inf
  lo_open: bool = False
  hi_open: bool = False
  also: tuple = ()

  def admits(self, v: Any) -> bool:
    if any(v is a if a is None else (not isinstance(v, bool) and v == a)
           for a in self.also):
      return True
    if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)):
      return False
    if not math.isfinite(v) or v < self.lo or v > self.hi:
      return False
    return not ((self.lo_open and v == self.lo) or (self.hi_open and v == self.hi))

  def describe(self) -> str:
    """E.g. "an integer >= 1", "a number in [0, 1)", "an integer >= 1 or -1"."""
    out = "an integer" if self.integer else "a number"
    if math.isfinite(self.lo) and math.isfinite(self.hi):
      out += (f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
              f"{')' if self.hi_open else ']'}")
    elif math.isfinite(self.lo):
      out += f" {'>' if self.lo_open else '>='} {self.lo:g}"
    elif math.isfinite(self.hi):
      out += f" {'<' if self.hi_open else '<='} {self.hi:g}"
    return out + "".join(f" or {a!r}" for a in self.also)


POSITIVE_INT = Limit(True, lo=1)
NONNEG_INT = Limit(True, lo=0)
POSITIVE = Limit(False, lo=0, lo_open=True)
NONNEG = Limit(False, lo=0)
UNIT = Limit(False, lo=0, hi=1)  # [0, 1]
FRACTION = Limit(False, lo=0, hi=1, hi_open=True)  # [0, 1)
FINITE = Limit(False)
MESH_AXIS = Limit(True, lo=1, also=(-1,))  # -1: the remaining devices.


def _or_none(limit: Limit) -> Limit:
  return dataclasses.replace(limit, also=limit.also + (None,))


def _section(name: str, rules: dict) -> dict[str, Limit]:
  return {f"{name}.{k}": v for k, v in rules.items()}


_LM = {  # configs/default.py: _lm_stage. steps: pretrain's; epochs: the others'.
    "steps": NONNEG_INT, "epochs": POSITIVE, "batch_size": POSITIVE_INT,
    "seq_len": POSITIVE_INT, "lr": POSITIVE, "warmup_steps": NONNEG_INT,
    "weight_decay": NONNEG, "dropout": FRACTION, "microbatches": POSITIVE_INT,
    "log_every": POSITIVE_INT, "save_every": POSITIVE_INT,
    "eval_every": NONNEG_INT,  # 0: no evaluation during training.
    "eval_batches": NONNEG_INT,
}
_MODEL = {  # model.ModelConfig's numeric fields.
    "vocab_size": NONNEG_INT,  # 0: the data's vocabulary.
    "num_layers": POSITIVE_INT, "d_model": POSITIVE_INT, "num_heads": POSITIVE_INT,
    "num_kv_heads": _or_none(POSITIVE_INT), "head_dim": _or_none(POSITIVE_INT),
    "d_ff": _or_none(POSITIVE_INT), "max_len": POSITIVE_INT,
    "dropout_rate": FRACTION, "norm_eps": POSITIVE, "rope_theta": POSITIVE,
    "attn_softcap": _or_none(POSITIVE), "final_softcap": _or_none(POSITIVE),
    "query_scale": _or_none(POSITIVE), "sliding_window": _or_none(POSITIVE_INT),
    "rope_factor": POSITIVE, "rope_low_freq_factor": POSITIVE,
    "rope_high_freq_factor": POSITIVE, "rope_original_max_len": POSITIVE_INT,
    "rope_local_theta": _or_none(POSITIVE),
}
LIMITS: dict[str, Limit] = {
    "seed": NONNEG_INT,
    **_section("mesh", {"data": MESH_AXIS, "fsdp": MESH_AXIS, "tensor": MESH_AXIS}),
    **_section("data.world", {
        "seed": NONNEG_INT, "sft": POSITIVE_INT, "rm": POSITIVE_INT,
        "ppo": POSITIVE_INT, "validation": POSITIVE_INT, "test": POSITIVE_INT,
        "k_min": Limit(True, lo=2, hi=K_MAX), "k_max": Limit(True, lo=2, hi=K_MAX),
        "sign_off": UNIT, "demo_errors": UNIT, "labeler_temperature": POSITIVE}),
    **_section("model", _MODEL),
    **_section("rm_model", _MODEL),
    **_section("pretrain", dict(_LM, steps=POSITIVE_INT)),
    **_section("sft", dict(_LM, ptx_frac=FRACTION, select_prompt_len=POSITIVE_INT,
                           select_new_tokens=POSITIVE_INT)),
    **_section("rm", dict(
        _LM, demo_batches=NONNEG_INT, sample_temperature=POSITIVE,
        sample_new_tokens=POSITIVE_INT, sample_batch_size=POSITIVE_INT,
        # A labeler group held out of training, or -1: none.
        heldout_group=Limit(True, lo=0, hi=NUM_LABELER_GROUPS, hi_open=True,
                            also=(-1,)))),
    **_section("ppo", {
        "iterations": POSITIVE_INT, "batch_size": POSITIVE_INT,
        "minibatch_size": POSITIVE_INT, "epochs": POSITIVE_INT, "lr": POSITIVE,
        "value_lr": POSITIVE, "warmup_iterations": NONNEG_INT,
        "clip_eps": POSITIVE, "value_clip_eps": POSITIVE,
        "clip_norm": NONNEG,  # 0: no clipping.
        "kl_coef": NONNEG, "kl_target": NONNEG,  # kl_target 0: a fixed kl_coef.
        "kl_horizon": POSITIVE_INT, "ptx_coef": NONNEG, "ptx_ratio": POSITIVE_INT,
        "ptx_seq_len": POSITIVE_INT, "lam": UNIT, "ema_decay": FRACTION,
        "prompt_len": POSITIVE_INT, "max_new_tokens": POSITIVE_INT,
        # The reward of a response cut at max_new_tokens; None: the RM's score.
        "missing_eos_penalty": _or_none(FINITE),
        "log_every": POSITIVE_INT, "save_every": POSITIVE_INT,
        # 0: sample in the training layout; k: a tensor group size (validate
        # checks that it divides fsdp).
        "sampling_layout": NONNEG_INT}),
    **_section("eval", {
        "num_prompts": NONNEG_INT,  # 0: the whole test split.
        "batch_size": POSITIVE_INT, "max_new_tokens": POSITIVE_INT,
        "fewshot": NONNEG_INT, "fewshot_prompt_len": POSITIVE_INT,
        "heldout_batches": NONNEG_INT, "bootstrap_resamples": POSITIVE_INT}),
    "tpu.num_slices": POSITIVE_INT,  # configs/gpt3_shapes.py: the AOT target.
}
# (a, b): config.a <= config.b.
ORDERED = (("data.world.k_min", "data.world.k_max"),)
# The sections that every stage reads (the rest: one stage each).
SHARED = ("seed", "mesh", "data", "model", "rm_model", "tpu")

_MISSING = object()


def get(config, key: str) -> Any:
  """`config.<key>` for a dotted key, or `_MISSING`."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def _under(key: str, sections) -> bool:
  return any(key == s or key.startswith(s + ".") for s in sections)


def check(config, sections=None) -> None:
  """Raises ConfigError, one line naming `config.<key>` and its range, for
  the first key under `sections` (dotted prefixes; None: all) out of its
  `LIMITS` entry or out of order (`ORDERED`)."""
  for key, limit in LIMITS.items():
    if sections is not None and not _under(key, sections):
      continue
    v = get(config, key)
    if v is not _MISSING and not limit.admits(v):
      raise ConfigError(f"config.{key}={v!r}: must be {limit.describe()}")
  for a, b in ORDERED:
    if sections is not None and not (_under(a, sections) and _under(b, sections)):
      continue
    va, vb = get(config, a), get(config, b)
    if va is not _MISSING and vb is not _MISSING and va > vb:
      raise ConfigError(f"config.{a}={va!r}: must be <= config.{b}={vb!r}")
