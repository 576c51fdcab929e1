"""The whole pipeline from a Hugging Face checkpoint, back to transformers.

Tiny random Llama-3.2-style and Qwen2.5-style checkpoints with tokenizers
trained here (special ids past the BPE pieces, not 0, 1 or 2), a few hundred
rows of TRL-format JSONL: `python -m instructrl.main --config=configs/hf.py
--config.hf_model=DIR` runs SFT, RM, PPO and PPO-ptx; transformers loads
W/ppo_ptx/hf and W/rm/hf and gives our logits and scores (the RM's: ours
minus the bias config.json records, RMSNorm families having nowhere to fold
it). The Qwen2.5-style one runs SFT and the RM in-process, and PPO's inits
load from HF directories; the convert CLI goes both ways. Then each bad
input: one line, exit 2, the workdir as it was.
"""
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_models
from instructrl import config_files
from instructrl import hf
from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.rl import rollout
from instructrl.stages import inputs
from instructrl.stages import loop
from instructrl.stages import runner
from instructrl.stages import validate
from instructrl.tools import hf_convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
_NOISE = re.compile(r"^([IWE]\d{4} |WARNING: All log messages before absl|\w+ \d+/\d+ \()")
# The overrides that shrink configs/hf.py to seconds (docs/hf.md).
TINY = {
    # Unscanned layers compile faster at 2 layers; the Qwen run scans.
    "model.dtype": "float32", "model.remat_policy": "none", "model.scan_layers": False,
    "sft.steps": 3, "sft.batch_size": 4, "sft.seq_len": 32, "sft.lr": 1e-3,
    "sft.eval_every": 0, "sft.eval_batches": 1, "sft.log_every": 1,
    "rm.steps": 3, "rm.batch_size": 4, "rm.seq_len": 32, "rm.lr": 0.05,
    "rm.eval_every": 0, "rm.demo_batches": 1, "rm.log_every": 1,
    "ppo.iterations": 2, "ppo.batch_size": 4, "ppo.minibatch_size": 4,
    "ppo.prompt_len": 24, "ppo.max_new_tokens": 4, "ppo.ptx_ratio": 1,
    "ppo.ptx_seq_len": 32, "ppo.warmup_iterations": 1,
}


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """{"llama3", "qwen2": checkpoint dirs, "data": {key: spec}}."""
  root = tmp_path_factory.mktemp("hf_pipeline")
  out = {f: str(root / f) for f in ("llama3", "qwen2")}
  for family, path in out.items():
    hf_models.write_checkpoint(pathlib.Path(path), family)
  d = root / "data"
  d.mkdir()
  rows = [hf_models.task(i) for i in range(260)]
  _jsonl(d / "sft_train.jsonl", [{"prompt": p, "completion": a} for p, a in rows[:240]])
  _jsonl(d / "sft_validation.jsonl", [{"prompt": p, "completion": a}
                                      for p, a in rows[240:]])
  prefs = [{"prompt": p, "chosen": a, "rejected": rows[(i + 7) % 260][1]}
           for i, (p, a) in enumerate(rows)]
  _jsonl(d / "prefs_train.jsonl", prefs[:240])
  _jsonl(d / "prefs_validation.jsonl", prefs[240:])
  _jsonl(d / "prompts.jsonl", [{"prompt": p} for p, _ in rows[:200]])
  (d / "pretrain.txt").write_text("\n\n".join(p + a for p, a in rows))
  out["data"] = {"sft.data": f"jsonl:{d}/sft_{{split}}.jsonl",
                 "rm.data": f"jsonl:{d}/prefs_{{split}}.jsonl",
                 "ppo.data": f"jsonl:{d}/prompts.jsonl",
                 "ppo.ptx_data": f"text:{d}/pretrain.txt"}
  return out


def _flags(world, model_dir, **extra) -> list[str]:
  keys = {**world["data"], **TINY, "hf_model": model_dir, **extra}
  return ["--config=configs/hf.py"] + [f"--config.{k}={v}" for k, v in keys.items()]


def _cli(module, *args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _config(world, model_dir, **extra):
  c = config_files.get_config(ROOT / "configs" / "hf.py")
  for k, v in {**world["data"], **TINY, "hf_model": model_dir, **extra}.items():
    *path, leaf = k.split(".")
    node = c
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def _mesh():
  return mesh_lib.make_mesh({"fsdp": -1}, jax.devices()[:1])


def _tokens(vocab_size, seed=0):
  return np.random.RandomState(seed).randint(0, vocab_size, (2, 13)).astype(np.int32)


def _check_lm(config, workdir, stage):
  """transformers' logits of W/<stage>/hf = ours of W/<stage>/export."""
  cfg = inputs.model_config(config)
  g, params, _ = inputs.load_model(workdir, stage, LanguageModel, cfg, _mesh())
  tokens = _tokens(cfg.vocab_size)
  ours = np.asarray(nnx.merge(g, params)(jnp.asarray(tokens))[0])
  theirs = hf_models.hf_logits(os.path.join(workdir, stage, "hf"), tokens)
  assert np.abs(theirs).max() > 1.0  # Not vacuous.
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _check_rm(config, workdir):
  """transformers' scores of W/rm/hf = ours minus the recorded bias, on a
  right-padded batch without EOS (transformers reads the last non-PAD)."""
  cfg = inputs.rm_model_config(config)
  g, params, _ = inputs.load_model(workdir, "rm", ScalarModel, cfg, _mesh())
  vocab = inputs.vocabulary(config)
  real = [i for i in range(vocab.vocab_size) if i not in vocab.eos_ids
          and i != vocab.pad_id]
  seq = np.full((3, 13), vocab.pad_id, np.int32)
  mask = np.zeros((3, 13), bool)
  for i, n in enumerate((13, 9, 4)):
    seq[i, :n] = np.random.RandomState(i).choice(real, n)
    mask[i, :n] = True
  ours = np.asarray(rollout.sequence_scores(g, params, jnp.asarray(seq),
                                            jnp.asarray(mask)))
  path = os.path.join(workdir, "rm", "hf")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(seq), attention_mask=torch.tensor(
        mask.astype(np.int64))).logits[:, 0].numpy()
  saved = json.load(open(os.path.join(path, "config.json")))
  bias = float(params["bias"].get_value())
  assert abs(bias) > 1e-3  # Set so that demonstrations score 0: it matters.
  assert saved[hf.REWARD_BIAS_KEY] == pytest.approx(bias, abs=1e-7)
  assert saved["num_labels"] == 1 and saved["architectures"][0].endswith(
      "ForSequenceClassification")
  np.testing.assert_allclose(ours - bias, theirs, atol=1e-4, rtol=0)


def test_llama32_pipeline_through_the_cli(world, tmp_path):
  workdir = str(tmp_path / "w")
  proc = _cli("instructrl.main", f"--workdir={workdir}", *_flags(world, world["llama3"]))
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert list(summary) == ["sft", "rm", "ppo", "ppo_ptx"]
  for stage in ("sft", "rm", "ppo", "ppo_ptx"):
    hf_dir = os.path.join(workdir, stage, "hf")
    assert summary[stage]["hf_export"] == hf_dir
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "model.safetensors"):
      assert os.path.exists(os.path.join(hf_dir, name)), (stage, name)
  config = _config(world, world["llama3"])
  _check_lm(config, workdir, "ppo_ptx")
  _check_rm(config, workdir)
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(workdir, "ppo_ptx", "hf"))
  vocab = inputs.vocabulary(config)
  assert tok("Reverse the word fig.")["input_ids"] == vocab.prefix + vocab.encode(
      "Reverse the word fig.")


def test_qwen25_sft_and_rm_through_the_python_api(world, tmp_path):
  """The other family, through `runner.run`, with scanned layers (read from
  the file layer by layer): SFT and the RM (PPO's code is the same for every
  family, and the Llama run went through it)."""
  workdir = str(tmp_path / "w")
  config = _config(world, world["qwen2"], pipeline_stages=("sft", "rm"),
                   **{"model.scan_layers": True})
  results = runner.run(config, workdir, jax.devices()[:1])
  assert results["sft"]["hf_export"] == os.path.join(workdir, "sft", "hf")
  _check_lm(config, workdir, "sft")
  _check_rm(config, workdir)
  # A killed export is redone: without W/sft/hf, the rerun writes it again.
  shutil.rmtree(os.path.join(workdir, "sft", "hf"))
  again = runner.run(config, workdir, jax.devices()[:1])
  assert again["sft"]["reused"] and os.path.isdir(os.path.join(workdir, "sft", "hf"))
  _check_lm(config, workdir, "sft")
  # PPO from HF directories: the policy from the checkpoint ("hf"), the RM
  # and value model from the RM's HF export; checked, then loaded sharded.
  config.ppo.init, config.ppo.rm_init = "hf", f"hf:{workdir}/rm/hf"
  config.stage, mesh = "ppo", _mesh()
  assert validate.validate(config, workdir, mesh) == ["ppo"]
  rm_cfg = inputs.rm_model_config(config)
  got = inputs.init_params(config, workdir, "ppo", ScalarModel, rm_cfg, mesh,
                           "rm_init", "rm")
  want = inputs.load_model(workdir, "rm", ScalarModel, rm_cfg, mesh)[1]
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(got),
               nnx.to_pure_dict(want))  # Bias included, exactly.
  policy = inputs.init_params(config, workdir, "ppo", LanguageModel,
                              inputs.model_config(config), mesh, "init", "sft")
  tokens = _tokens(rm_cfg.vocab_size)
  ours = nnx.merge(abstract(LanguageModel, inputs.model_config(config))[0], policy)
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))[0]),
                             hf_models.hf_logits(world["qwen2"], tokens),
                             atol=1e-4, rtol=0)


def test_convert_both_ways_without_training(world, tmp_path):
  src = world["qwen2"]
  out = str(tmp_path / "params")
  hf_convert.convert(src, out, scan_layers=True)
  pre = hf.load_pretrained(src, scan_layers=True)
  g, abs_params = abstract(LanguageModel, pre.cfg)
  mesh = _mesh()
  params = loop.load_params(out, abs_params, mesh_lib.param_shardings(abs_params, mesh))
  tokens = _tokens(pre.cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(nnx.merge(g, params)(jnp.asarray(tokens))[0]),
                             hf_models.hf_logits(src, tokens), atol=1e-4, rtol=0)
  # A stage export -> HF: W/sft/export of a run, written as W/sft/hf would be.
  workdir = tmp_path / "w"
  loop.export(str(workdir), "sft", params, {"stage": "sft", "steps": 0})
  config = _config(world, src)
  config.model.scan_layers = True
  (workdir / "tb" / "sft").mkdir(parents=True)
  (workdir / "tb" / "sft" / "config.json").write_text(config.to_json())
  hf_convert.convert(str(workdir / "sft"), str(tmp_path / "back"))
  np.testing.assert_allclose(hf_models.hf_logits(str(tmp_path / "back"), tokens),
                             hf_models.hf_logits(src, tokens), atol=1e-5, rtol=0)


# --- Bad inputs: one line, exit 2, the workdir as it was ------------------------


def _digest(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _edit_json(path, **changes):
  d = json.loads(path.read_text())
  for k, v in changes.items():
    if v is None:
      d.pop(k, None)
    else:
      d[k] = v
  path.write_text(json.dumps(d))


def _no_config(d):
  (d / "config.json").unlink()


def _bert(d):
  _edit_json(d / "config.json", architectures=["BertForMaskedLM"])


def _truncated(d):
  st = d / "model.safetensors"
  st.write_bytes(st.read_bytes()[:-100])


def _no_eos(d):
  _edit_json(d / "tokenizer_config.json", eos_token=None)
  _edit_json(d / "generation_config.json", eos_token_id=None)
  _edit_json(d / "config.json", eos_token_id=None)


BAD = {  # (how the llama3 copy is broken, extra flags, what the line names)
    "no_config_json": (_no_config, {}, "config.json: no such file"),
    "unsupported_architecture": (_bert, {}, "unsupported architectures[0] "
                                 "'BertForMaskedLM'"),
    "truncated_safetensors": (_truncated, {}, "model.safetensors: tensor"),
    "tokenizer_without_eos": (_no_eos, {}, "the tokenizer has no EOS"),
    "rm_vocabulary_differs": (None, {"hf_rm_model": "qwen2"}, "config.hf_rm_model"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line_and_exit_2(world, tmp_path, case):
  edit, extra, names = BAD[case]
  model = tmp_path / "model"
  shutil.copytree(world["llama3"], model)
  if edit:
    edit(model)
  extra = {k: world.get(v, v) for k, v in extra.items()}
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("untouched")
  before = _digest(workdir)
  proc = _cli("instructrl.main", f"--workdir={workdir}",
              *_flags(world, str(model), **extra))
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not _NOISE.match(l)]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert names in lines[0], lines[0]
  assert _digest(workdir) == before and sorted(os.listdir(workdir)) == ["keep.txt"]


def test_convert_cli_refuses_what_it_cannot_read(tmp_path):
  proc = _cli("instructrl.tools.hf_convert", f"--from={tmp_path}",
              f"--to={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not _NOISE.match(l)]
  assert len(lines) == 1 and "neither a Hugging Face directory" in lines[0], lines
  assert not (tmp_path / "out").exists()
