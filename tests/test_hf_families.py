"""Each Hugging Face family against `transformers` itself (docs/hf.md's table).

Per family, on a tiny model that transformers builds and initialises here:
fp32 logits within 1e-4, greedy decoding with our KV-cache sampler token for
token equal to `generate`, and a bf16 import -> export that transformers
loads with every tensor bit-equal. Windows, RoPE bands and soft-caps are
sized so that each feature moves the numbers at these lengths. Then reward
models both ways, and the one-line errors.
"""
import contextlib
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

try:
  import torch
  import transformers
except ImportError as e:  # Fail, not skip: CI installs the extra.
  raise ImportError(f'{e}; pip install -e ".[hf-test]"') from e

import hf_models
from hf_models import hf_logits
from instructrl import mesh as mesh_lib
from instructrl.data.common import DataError
from instructrl.model import LanguageModel, ModelConfig, ScalarModel, init_cache
from instructrl.sampling import SampleConfig, sample
from instructrl import hf

V = 67
_SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "llama2": lambda: transformers.LlamaConfig(**_SHAPE, tie_word_embeddings=False),
    # Llama 3.2: llama3 RoPE (head_dim 16, original length 64: one band kept,
    # one blended, the rest divided by the factor), GQA, tied embeddings.
    "llama3": lambda: transformers.LlamaConfig(
        **dict(_SHAPE, max_position_embeddings=128), head_dim=16,
        tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}),
    "mistral": lambda: transformers.MistralConfig(**_SHAPE, sliding_window=4,
                                                  tie_word_embeddings=False),
    # Qwen2.5: q/k/v biases, tied (as the 0.5B-3B models).
    "qwen2": lambda: transformers.Qwen2Config(**_SHAPE, tie_word_embeddings=True),
    # Qwen3: q/k norms, head_dim != hidden/heads, the top layer sliding.
    "qwen3": lambda: transformers.Qwen3Config(
        **_SHAPE, head_dim=16, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, tie_word_embeddings=False),
    "gemma2": lambda: transformers.Gemma2Config(
        **_SHAPE, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **dict(_SHAPE, num_hidden_layers=3), head_dim=16, sliding_window=4,
        query_pre_attn_scalar=12, layer_types=["sliding_attention",
                                               "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0,
                               "rope_theta": 10000.0}}),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  return hf_models.save_dirs(tmp_path_factory, FAMILIES)


def _tokens(b=2, t=13, seed=0):
  return np.random.RandomState(seed).randint(3, V, (b, t)).astype(np.int32)


def logits_diff(path, mesh=None, **overrides):
  """max |ours - transformers| over fp32 logits [2, 13, V]."""
  pre = hf.load_pretrained(path, mesh=mesh, **overrides)
  tokens = _tokens()
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    ours, _ = jax.jit(lambda p, t: nnx.merge(pre.graphdef, p)(t))(pre.params, tokens)
  theirs = hf_logits(path, tokens)
  assert np.abs(theirs).max() > 1.0  # The check is not vacuous.
  return float(np.abs(np.asarray(ours) - theirs).max())


def greedy_match(path, new=8):
  """Our sampler (left-padded batch, KV cache) vs `generate`, per prompt."""
  pre = hf.load_pretrained(path)
  prompts = [[5, 9, 13, 22, 40, 7], [11, 3, 29]]
  width = max(map(len, prompts))
  toks = np.zeros((2, width), np.int32)
  mask = np.zeros((2, width), bool)
  for i, p in enumerate(prompts):
    toks[i, width - len(p):], mask[i, width - len(p):] = p, True
  sc = SampleConfig(max_new_tokens=new, temperature=0.0, eos_ids=(), pad_id=0)
  out = jax.jit(lambda p, t, m: sample(pre.graphdef, p, t, m, jax.random.key(0), sc))(
      pre.params, toks, mask)
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  ours, theirs = [], []
  for i, p in enumerate(prompts):
    gen = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    ours.append(np.asarray(out.response[i]).tolist())
    theirs.append(gen[0, len(p):].tolist())
  return ours, theirs


def bf16_round_trip(path, out):
  """bf16 file -> ours (bf16 params) -> export; returns (tensors equal, logits
  of transformers on the export == on the original)."""
  src = out + "_src"
  half = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
  half.save_pretrained(src, safe_serialization=True)
  pre = hf.load_pretrained(src, param_dtype="bfloat16", dtype="bfloat16")
  assert pre.params["backbone"]["embed"].get_value().dtype == jnp.bfloat16
  hf.save_pretrained(out, pre.cfg, pre.params, hf_config=pre.hf_config)
  a, b = hf.read_checkpoint(src)[0], hf.read_checkpoint(out)[0]
  if pre.cfg.tie_embeddings:  # Some versions save a tied head anyway.
    a.pop("lm_head.weight", None)
  same = a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint16),
                                                  b[k].view(np.uint16)) for k in a)
  tokens = _tokens(seed=2)
  logits_same = np.array_equal(hf_logits(src, tokens, torch.bfloat16),
                               hf_logits(out, tokens, torch.bfloat16))
  return same, logits_same


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_parity(hf_dirs, family, tmp_path):
  assert logits_diff(hf_dirs[family]) < 1e-4
  ours, theirs = greedy_match(hf_dirs[family])
  assert ours == theirs
  assert bf16_round_trip(hf_dirs[family], str(tmp_path / "bf16")) == (True, True)


@pytest.mark.parametrize("family,off", [
    ("llama3", {"rope_scaling": "none"}), ("mistral", {"sliding_window": None}),
    ("qwen3", {"layer_types": (), "sliding_window": None}),
    ("gemma2", {"attn_softcap": None}), ("gemma2", {"final_softcap": None}),
    ("gemma2", {"query_scale": None}), ("gemma3", {"rope_local_theta": None})])
def test_each_feature_moves_the_logits(hf_dirs, family, off):
  """The parity rows are not vacuous: without the feature, no parity."""
  assert logits_diff(hf_dirs[family], **off) > 1e-2


def test_config_switches(hf_dirs):
  get = lambda f: hf.load_pretrained(hf_dirs[f]).cfg
  c = get("llama3")
  assert (c.rope_scaling, c.rope_factor, c.rope_original_max_len, c.tie_embeddings,
          c.kv_heads, c.dim_per_head) == ("llama3", 8.0, 64, True, 2, 16)
  assert get("mistral").sliding_layers == (True, True)
  assert (get("qwen2").qkv_bias, get("qwen2").tie_embeddings) == (True, True)
  c = get("qwen3")
  assert (c.qk_norm, c.layer_types, c.sliding_window) == (True, ("full", "sliding"), 4)
  c = get("gemma2")
  assert (c.norm_plus_one, c.embed_scale, c.post_norms, c.mlp_act, c.attn_softcap,
          c.final_softcap, c.query_scale) == (True, True, True, "gelu_tanh", 3.0, 5.0, 12)
  assert c.layer_types == ("sliding", "full")
  c = get("gemma3")
  assert (c.qk_norm, c.rope_local_theta, c.rope_scaling, c.attn_softcap) == (
      True, 100.0, "linear", None)


@pytest.mark.parametrize("family,remat", [("gemma3", "none"),
                                          ("qwen3", "nothing_saveable")])
def test_mixed_layer_types_under_scan(hf_dirs, family, remat):
  """Per-layer sliding flags scanned with the stacked layers (docs/design.md)."""
  assert logits_diff(hf_dirs[family], scan_layers=True, remat_policy=remat) < 1e-4


def test_sharded_import(hf_dirs):
  """Each device reads its slice of the file (q/k norms, biases included)."""
  mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
  for family in ("gemma3", "qwen2"):
    assert logits_diff(hf_dirs[family], mesh=mesh, scan_layers=True) < 1e-4


def test_param_count_with_family_switches():
  for kw in (dict(qkv_bias=True, sliding_window=4), dict(
      qk_norm=True, norm_plus_one=True, embed_scale=True, mlp_act="gelu_tanh",
      post_norms=True, head_dim=12, layer_types=("sliding", "full"), sliding_window=4)):
    for tied in (True, False):
      cfg = ModelConfig(vocab_size=V, num_layers=2, d_model=16, num_heads=2, d_ff=24,
                        style="llama", tie_embeddings=tied, **kw)
      state = nnx.state(nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0))))
      assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params()


def test_sliding_window_in_training_and_cache():
  """Window 3: teacher-forced logits and cached decoding agree, and differ
  from full attention (so the window is in force in both paths)."""
  cfg = ModelConfig(vocab_size=V, num_layers=2, d_model=16, num_heads=2, d_ff=32,
                    max_len=32, style="llama", sliding_window=3,
                    layer_types=("sliding", "full"))
  wide = dataclasses.replace(cfg, sliding_window=None, layer_types=())
  g, p = nnx.split(LanguageModel(cfg, nnx.Rngs(0)))
  g_wide = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(wide, nnx.Rngs(0))))
  p = jax.tree.map(lambda x: x * 4, p)
  tokens = jnp.asarray(_tokens(1, 10))
  forward = jax.jit(lambda g, p, t: nnx.merge(g, p)(t)[0], static_argnums=0)
  full, unwindowed = forward(g, p, tokens), forward(g_wide, p, tokens)

  @jax.jit
  def step(p, cache, t):  # One token at a time through the cache.
    tok = jax.lax.dynamic_slice(tokens, (0, t), (1, 1))
    out, cache = nnx.merge(g, p)(tok, jnp.full((1, 1), t), jnp.ones((1, 1), jnp.int32),
                                 cache=cache, cache_index=t)
    return out[:, 0], cache
  cache, steps = init_cache(cfg, 1, 10), []
  for t in range(10):
    out, cache = step(p, cache, t)
    steps.append(out)
  np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)
  np.testing.assert_allclose(unwindowed[:, :3], full[:, :3], atol=1e-5)
  assert np.abs(unwindowed - full)[:, 3:].max() > 1e-3


# --- Reward models --------------------------------------------------------------


def _hf_scores(path, tokens):
  model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits[:, 0].numpy()


def _right_padded(seed=3):
  """Rows of 9, 6 and 4 real tokens (never PAD 0), then PAD."""
  tokens = _tokens(3, 9, seed)
  for row, n in enumerate((9, 6, 4)):
    tokens[row, n:] = 0
  return tokens


def _our_rewards(pre, tokens):
  model = nnx.merge(pre.graphdef, pre.params)
  return np.asarray(model.reward(jnp.asarray(tokens),
                                 segment_ids=jnp.asarray(tokens != 0, jnp.int32)))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gpt2"])
def test_reward_model_export(hf_dirs, family, tmp_path):
  if family == "gpt2":
    cfg = ModelConfig(vocab_size=V, num_layers=2, d_model=16, num_heads=2, max_len=32)
    g, p = nnx.split(ScalarModel(cfg, nnx.Rngs(1)))
    p = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, p)
  else:  # An RM initialised from the LM checkpoint: zero head, then trained.
    pre = hf.load_reward_model(hf_dirs[family])
    assert not np.any(np.asarray(pre.params["head"].get_value()))
    cfg, g, p = pre.cfg, pre.graphdef, pre.params
  p["head"].set_value(jax.random.normal(jax.random.key(2), (cfg.d_model,)))
  p["bias"].set_value(jnp.float32(0.75))
  tokens = _right_padded()
  ours = _our_rewards(hf.Pretrained(cfg, g, p, {}, ""), tokens)
  out = str(tmp_path / "rm")
  hf.save_reward_model(out, cfg, p, hf_config={"pad_token_id": 0})
  written = hf.read_hf_config(out)
  assert written["architectures"][0].endswith("ForSequenceClassification")
  assert written["num_labels"] == 1 and written["pad_token_id"] == 0
  theirs = _hf_scores(out, tokens)
  # GPT-2 folds the bias into ln_f.bias; RMSNorm families carry it aside.
  offset = written.get(hf.REWARD_BIAS_KEY, 0.0)
  assert offset == (0.0 if family == "gpt2" else 0.75)
  np.testing.assert_allclose(theirs + offset, ours, atol=1e-4, rtol=0)
  assert np.ptp(ours) > 0.5  # Rows differ: the pooled positions matter.
  again = hf.load_reward_model(out)
  np.testing.assert_allclose(_our_rewards(again, tokens), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_reward_model_import(hf_dirs, family, tmp_path):
  config = FAMILIES[family]()
  config.num_labels = 1
  d = str(tmp_path / "cls")
  hf_models.make_hf(config, seed=4, cls=transformers.AutoModelForSequenceClassification
           ).save_pretrained(d, safe_serialization=True)
  tokens = _right_padded(seed=5)
  pre = hf.load_reward_model(d)
  np.testing.assert_allclose(_our_rewards(pre, tokens), _hf_scores(d, tokens),
                             atol=1e-4, rtol=0)
  with pytest.raises(DataError, match="load_reward_model"):
    hf.load_pretrained(d)


# --- Errors -------------------------------------------------------------------


def _copy(src, dst, edit=None):
  shutil.copytree(src, dst)
  if edit:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
      c = json.load(f)
    edit(c)
    with open(path, "w") as f:
      json.dump(c, f)
  return str(dst)


@pytest.mark.parametrize("family,edit,match", [
    ("llama3", lambda c: c.update(architectures=["Phi3ForCausalLM"]),
     "unsupported architectures\\[0\\] 'Phi3ForCausalLM'"),
    ("llama3", lambda c: c["rope_parameters"].update(rope_type="yarn"),
     "rope_parameters.rope_type 'yarn'"),
    ("llama3", lambda c: c.update(partial_rotary_factor=0.5, rope_parameters=dict(
        c["rope_parameters"], partial_rotary_factor=0.5)), "partial_rotary_factor"),
    ("qwen3", lambda c: c.update(layer_types=["full_attention", "chunked_attention"]),
     "layer_types='chunked_attention'"),
    ("qwen3", lambda c: c.update(attention_bias=True), "attention_bias=True"),
    ("gemma2", lambda c: c.update(hidden_activation="relu"), "hidden_activation='relu'"),
    ("mistral", lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    ("qwen2", lambda c: c.update(architectures=None, model_type="gemma3"),
     "model_type 'gemma3' \\(use the text model"),
    ("qwen2", lambda c: c.update(architectures=["Qwen2ForSequenceClassification"],
                                 num_labels=3), "num_labels=3"),
])
def test_unsupported_name_file_and_field(hf_dirs, tmp_path, family, edit, match):
  d = _copy(hf_dirs[family], tmp_path / "m", edit)
  with pytest.raises(DataError, match=match) as e:
    (hf.load_reward_model if "num_labels" in match else hf.load_pretrained)(d)
  assert str(e.value).startswith(os.path.join(d, "config.json") + ": ")
  assert "\n" not in str(e.value)


def test_tensor_errors(hf_dirs, tmp_path):
  d = _copy(hf_dirs["qwen3"], tmp_path / "m")
  st = os.path.join(d, "model.safetensors")
  tensors = {k: np.array(v) for k, v in hf.read_safetensors(st).items()}
  name = "model.layers.1.self_attn.k_norm.weight"
  hf.write_safetensors(st, {k: v for k, v in tensors.items() if k != name})
  with pytest.raises(DataError, match=f"model.safetensors: missing tensor '{name}'"):
    hf.load_pretrained(d)
  hf.write_safetensors(st, dict(tensors, **{"model.layers.0.self_attn.o_proj.bias":
                                            np.zeros(32, np.float32)}))
  with pytest.raises(DataError, match="unexpected tensor 'model.layers.0.self_attn"):
    hf.load_pretrained(d)
  hf.write_safetensors(st, dict(tensors, **{name: tensors[name][:-1]}))
  with pytest.raises(DataError, match=r"has shape \(15,\), config.json implies \(16,\)"):
    hf.load_pretrained(d)
  with open(st, "r+b") as f:  # Truncated (an interrupted download).
    f.truncate(os.path.getsize(st) - 100)
  with pytest.raises(DataError, match="bad byte range"):
    hf.load_pretrained(d)


def test_sharded_export_with_index(hf_dirs, tmp_path):
  pre = hf.load_pretrained(hf_dirs["qwen2"])
  out = str(tmp_path / "sharded")
  hf.save_pretrained(out, pre.cfg, pre.params, hf_config=pre.hf_config,
                     max_shard_bytes=20_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 2
  tokens = _tokens(seed=4)
  np.testing.assert_allclose(hf_logits(out, tokens), hf_logits(hf_dirs["qwen2"], tokens),
                             atol=1e-5, rtol=0)
  again = hf.load_pretrained(out)
  assert again.cfg == pre.cfg


def test_export_refuses_configs_no_family_has():
  from instructrl.hf import FamilyError as ConfigError  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(style="llama", norm_plus_one=True)  # Gemma's norm alone.
  with pytest.raises(ConfigError, match="no Hugging Face family"):
    hf.hf_config_from_model(cfg)
  cfg = ModelConfig(style="llama", qkv_bias=True, num_layers=2, sliding_window=4,
                    layer_types=("sliding", "full"))  # Qwen2 slides only a suffix.
  with pytest.raises(ConfigError, match="no supported Hugging Face family"):
    hf.hf_config_from_model(cfg)
  assert hf.family_for(ModelConfig(style="llama", sliding_window=8)).model_type == "mistral"
