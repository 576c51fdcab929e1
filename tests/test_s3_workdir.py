"""The tiny pipeline end to end with `--workdir=s3://...` on a local S3 server.

The server is moto's (tests/object_store.py): S3's REST API on localhost,
offline. Every file the project writes goes there: through the path layer
(epath) for metrics, markers, info and reports, and through orbax and
tensorstore's s3 driver for checkpoints and exports. Each stage reads the
previous one's export back from the store, and each training stage its best
checkpoint; nothing lands on the local disk.
"""
from __future__ import annotations

import json
import os

import jax

import object_store
from instructrl import paths
from instructrl.stages import loop
from instructrl.stages import runner
from instructrl.stages import validate
from test_train_stages import MESH1, OVERRIDES, load_config

# test_train_stages' smaller tiny run, with fewer saves and PPO iterations:
# each save is a few dozen HTTP requests.
SMALLER = {"pretrain.save_every": 4, "sft.save_every": 6, "rm.epochs": 1.0,
           "rm.save_every": 4, "ppo.iterations": 2, "ppo.save_every": 2,
           "eval.num_prompts": 8, "eval.bootstrap_resamples": 200}


def test_the_tiny_pipeline_runs_on_an_s3_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A relative local write would land here.
  bucket = object_store.BUCKET
  workdir = f"s3://{bucket}/run"
  with object_store.s3_store() as store:
    config = load_config({**OVERRIDES, **SMALLER, **MESH1, "stage": "pipeline"})
    runner.run(config, workdir, devices=jax.devices()[:1])
    assert all(loop.is_done(workdir, s) for s in validate.STAGES if s != "eval")
    # A rerun finds every training stage done (eval keeps no state).
    assert validate.stages_to_run(config, workdir) == ["eval"]
    keys = set(store.keys(bucket, "run/"))
    report = json.loads(paths.read_text(paths.join(workdir, "eval", "report.json")))
    records = [json.loads(l) for l in paths.read_text(
        paths.join(workdir, "metrics.jsonl")).splitlines()]
  for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx"):
    assert f"run/{stage}/export/info.json" in keys
    # Orbax's arrays went through tensorstore's s3 driver (OCDBT).
    ckpt = sorted(k for k in keys if k.startswith(f"run/{stage}/ckpt/")
                  and k.endswith("/state/manifest.ocdbt"))
    assert ckpt, stage
  assert not any("orbax-checkpoint-tmp" in k for k in keys)  # All committed.
  for stage in ("pretrain", "sft", "rm"):
    assert f"run/{stage}/export/params/manifest.ocdbt" in keys
  assert {"run/eval/report.json", "run/eval/samples.jsonl",
          "run/summary.json"} <= keys
  assert set(report) >= {"base", "sft", "ppo", "ppo_ptx"}, report.keys()
  assert {r["stage"] for r in records} >= {"pretrain", "sft", "rm", "ppo", "ppo_ptx"}
  assert os.listdir(tmp_path) == []  # Nothing local.
