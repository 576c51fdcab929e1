"""Converts between Hugging Face directories and instructrl params, no training.

    # A HF checkpoint -> orbax params, for `--config.<stage>.init=OUT`:
    python -m instructrl.tools.hf_convert --from=/models/Llama-3.2-1B --to=OUT \\
        [--scan_layers] [--param_dtype=bfloat16]
    # A finished stage of a workdir -> a HF directory (transformers loads it):
    python -m instructrl.tools.hf_convert --from=W/sft --to=OUT_DIR

The direction is read from `--from`: a directory with config.json is a
checkpoint, one with export/info.json a stage. A checkpoint becomes a
LanguageModel, or a ScalarModel for a *ForSequenceClassification or with
`--reward`; the params' tree follows `--scan_layers`, which must be the
run's `model.scan_layers`; the model config it describes is printed (set
config.model to it, or run with `--config.hf_model=DIR` and `init="hf"`,
which needs no conversion). A stage is exported with the run's own config
(W/tb/<stage>/config.json), as `W/<stage>/hf/` would be. Every mistake is
one line on stderr and exit code 2. A tool, not part of `instructrl.hf`:
exporting a stage needs the stages' reading of the config, and the hf layer
sits below the stages.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

_FROM = flags.DEFINE_string("from", None, "A HF directory, or a workdir's stage "
                            "directory (W/<stage>).", required=True)
_TO = flags.DEFINE_string("to", None, "Where to write (must not exist).",
                          required=True)
_REWARD = flags.DEFINE_bool("reward", False, "HF -> ours: as a reward model.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "HF -> ours: stacked layers.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32",
                                 ["float32", "bfloat16", "float16"],
                                 "HF -> ours: the params' dtype.")


def hf_to_params(src: str, out: str, *, reward: bool, **overrides) -> dict:
  """Writes `src`'s weights as orbax params at `out`; returns the model
  config's fields."""
  from instructrl import hf  # pylint: disable=g-import-not-at-top
  from instructrl.stages import loop  # pylint: disable=g-import-not-at-top
  classifier = "ForSequenceClassification" in str(
      (hf.read_hf_config(src).get("architectures") or [""])[0])
  load = hf.load_reward_model if reward or classifier else hf.load_pretrained
  pre = load(src, **overrides)
  loop.save_params(out, pre.params)
  return dataclasses.asdict(pre.cfg)


def stage_to_hf(stage_dir: str, out: str) -> None:
  """Writes a finished stage (W/<stage>) as the HF directory `out`."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  from instructrl import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from instructrl.stages import runner  # pylint: disable=g-import-not-at-top
  from instructrl.stages.errors import ConfigError  # pylint: disable=g-import-not-at-top
  stage_dir = os.path.abspath(stage_dir)
  workdir, stage = os.path.dirname(stage_dir), os.path.basename(stage_dir)
  saved = os.path.join(workdir, "tb", stage, "config.json")
  if not os.path.exists(saved):
    raise ConfigError(f"--from={stage_dir}: no {saved} (the run's config) to "
                      "export it with")
  with open(saved) as f:
    config = mlc.ConfigDict(json.load(f))
  mesh = mesh_lib.make_mesh({"fsdp": -1}, jax.local_devices())
  runner.write_hf(config, workdir, stage, mesh, out)


def convert(src: str, out: str, *, reward: bool = False, scan_layers: bool = False,
            param_dtype: str = "float32") -> str:
  """One conversion (the module docstring); returns what it did."""
  from instructrl.stages.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if os.path.exists(out):
    raise ConfigError(f"--to={out} exists; name a new path")
  if os.path.exists(os.path.join(src, "config.json")):
    fields = hf_to_params(src, os.path.abspath(out), reward=reward,
                          scan_layers=scan_layers, param_dtype=param_dtype)
    return f"params of {src} in {out}; model: {json.dumps(fields, default=str)}"
  if os.path.exists(os.path.join(src, "export", "info.json")):
    stage_to_hf(src, out)
    return f"Hugging Face directory of {src} in {out}"
  raise ConfigError(f"--from={src}: neither a Hugging Face directory (config.json) "
                    "nor a finished stage (export/info.json)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  from instructrl.stages import runner  # pylint: disable=g-import-not-at-top
  try:
    print(convert(_FROM.value, _TO.value, reward=_REWARD.value,
                  scan_layers=_SCAN.value, param_dtype=_PARAM_DTYPE.value))
  except runner.user_errors() as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
