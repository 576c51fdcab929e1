"""HF interop: logits parity with `transformers`, round trips, errors, tokenizers.

Models are tiny, randomly initialised by `transformers` itself and saved with
`save_pretrained(safe_serialization=True)`; weights are redrawn at a larger
scale so that every tensor (biases and norms included) moves the logits.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

try:  # Parity checks against the libraries themselves.
  import safetensors.numpy
  import sentencepiece as spm
  import tokenizers
  import torch
  import transformers
except ImportError as e:  # Fail, not skip: CI installs both extras.
  raise ImportError(f'{e}; pip install -e ".[data,hf-test]"') from e

import hf_models
from hf_models import hf_logits
from instructrl import hf
from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel, ModelConfig
from instructrl.sampling import SampleConfig, sample

V = 61
ARCHS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=40, n_embd=24, n_layer=2, n_head=3, n_inner=40,
        layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=1),
    # Grouped-query attention, untied head, head_dim != hidden / heads, and
    # non-default theta and eps so that each of them is exercised.
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=500.0, bos_token_id=1, eos_token_id=2),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  return hf_models.save_dirs(tmp_path_factory, ARCHS)


def _tokens(b=2, t=13, seed=0):
  return np.random.RandomState(seed).randint(0, V, (b, t)).astype(np.int32)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(hf_dirs, arch):
  pre = hf.load_pretrained(hf_dirs[arch])
  tokens = _tokens()
  ours, _ = pre.model()(jnp.asarray(tokens))
  theirs = hf_logits(hf_dirs[arch], tokens)
  assert np.abs(theirs).max() > 1.0  # The check is not vacuous.
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_config_mapping(hf_dirs):
  cfg = hf.load_pretrained(hf_dirs["llama_gqa"]).cfg
  assert (cfg.style, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head) == ("llama", 4, 2, 8)
  assert (cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (False, 500.0, 1e-5)
  cfg = hf.load_pretrained(hf_dirs["gpt2"]).cfg
  assert (cfg.style, cfg.tie_embeddings, cfg.ff_dim, cfg.max_len) == ("gpt", True, 40, 40)
  half = hf.load_pretrained(hf_dirs["gpt2"], param_dtype="bfloat16")
  assert half.params["backbone"]["embed"].get_value().dtype == jnp.bfloat16


def test_sharded_scanned_import_matches(hf_dirs):
  mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 4})
  pre = hf.load_pretrained(hf_dirs["llama_gqa"], mesh=mesh, scan_layers=True)
  wq = pre.params["backbone"]["layers"]["attn"]["wq"].get_value()
  assert wq.shape == (2, 24, 4, 8)
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  tokens = _tokens()
  with jax.set_mesh(mesh):
    ours, _ = jax.jit(lambda p, t: nnx.merge(pre.graphdef, p)(t))(pre.params, tokens)
  np.testing.assert_allclose(np.asarray(ours), hf_logits(hf_dirs["llama_gqa"], tokens),
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_round_trip_through_export(hf_dirs, arch, tmp_path):
  pre = hf.load_pretrained(hf_dirs[arch], scan_layers=True)
  out = str(tmp_path / "export")
  hf.save_pretrained(out, pre.cfg, pre.params, hf_config=pre.hf_config)
  tokens = _tokens(seed=1)
  np.testing.assert_allclose(hf_logits(out, tokens), hf_logits(hf_dirs[arch], tokens),
                             atol=1e-5, rtol=0)
  again = hf.load_pretrained(out)
  assert again.cfg == hf.load_pretrained(hf_dirs[arch]).cfg


def _native(style, scan=False):
  cfg = ModelConfig(vocab_size=V, num_layers=2, d_model=16, num_heads=4,
                    num_kv_heads=2 if style == "llama" else None, d_ff=24, max_len=32,
                    style=style, tie_embeddings=style == "gpt", rope_theta=300.0,
                    scan_layers=scan)
  graphdef, params = nnx.split(LanguageModel(cfg, nnx.Rngs(3)))
  params = jax.tree.map(lambda x: x * 5, params)  # Logits of order one.
  return cfg, params, _logits(graphdef, params, _tokens())


def _logits(graphdef, params, tokens):
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens))


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_native_model_exports_to_transformers(style, tmp_path):
  cfg, params, ours = _native(style)
  hf.save_pretrained(str(tmp_path), cfg, params)
  np.testing.assert_allclose(ours, hf_logits(str(tmp_path), _tokens()), atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_native_round_trip_without_transformers(style, tmp_path):
  cfg, params, ours = _native(style, scan=True)
  hf.save_pretrained(str(tmp_path), cfg, params)
  again = hf.load_pretrained(str(tmp_path), scan_layers=True)
  unused_theta = {"rope_theta": 10000.0} if style == "gpt" else {}  # No RoPE.
  assert again.cfg == dataclasses.replace(cfg, d_ff=cfg.ff_dim, **unused_theta)
  np.testing.assert_array_equal(_logits(again.graphdef, again.params, _tokens()), ours)


def test_greedy_sampler_matches_generate(hf_dirs):
  pre = hf.load_pretrained(hf_dirs["llama_gqa"])
  prompts = [[5, 9, 13, 2, 40, 7], [11, 3, 29]]
  # Left-padded batch for our sampler; HF runs each prompt on its own.
  width = max(map(len, prompts))
  toks = np.zeros((2, width), np.int32)
  mask = np.zeros((2, width), bool)
  for i, p in enumerate(prompts):
    toks[i, width - len(p):], mask[i, width - len(p):] = p, True
  sc = SampleConfig(max_new_tokens=6, temperature=0.0, eos_ids=(), pad_id=0)
  out = jax.jit(lambda p, t, m: sample(pre.graphdef, p, t, m, jax.random.key(0), sc))(
      pre.params, toks, mask)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama_gqa"]).eval()
  for i, p in enumerate(prompts):
    gen = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6,
                         min_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert np.asarray(out.response[i]).tolist() == gen[0, len(p):].tolist()


# --- Errors -------------------------------------------------------------------


def _copy(src, dst, edit_config=None):
  shutil.copytree(src, dst)
  if edit_config:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
      c = json.load(f)
    edit_config(c)
    with open(path, "w") as f:
      json.dump(c, f)
  return str(dst)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(architectures=["BertModel"]),
     r"unsupported architectures\[0\] 'BertModel'"),
    (lambda c: c.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "unsupported rope_scaling.rope_type 'dynamic'"),
    (lambda c: c.update(attention_bias=True), "unsupported attention_bias=True"),
    (lambda c: c.update(num_local_experts=8), "unsupported num_local_experts=8"),
    (lambda c: c.update(hidden_act="gelu"), "unsupported hidden_act='gelu'"),
])
def test_unsupported_configs_name_the_file(hf_dirs, tmp_path, edit, match):
  d = _copy(hf_dirs["llama_gqa"], tmp_path / "m", edit)
  with pytest.raises(ValueError, match=match) as e:
    hf.load_pretrained(d)
  assert str(e.value).startswith(os.path.join(d, "config.json") + ":")
  assert "\n" not in str(e.value)


def test_missing_and_extra_tensors(hf_dirs, tmp_path):
  d = _copy(hf_dirs["gpt2"], tmp_path / "m")
  st = os.path.join(d, "model.safetensors")
  tensors = {k: np.array(v) for k, v in hf.read_safetensors(st).items()}
  hf.write_safetensors(st, {k: v for k, v in tensors.items() if "h.1.mlp.c_fc.bias" not in k})
  with pytest.raises(ValueError, match=r"model.safetensors: missing tensor "
                     r"'transformer.h.1.mlp.c_fc.bias'"):
    hf.load_pretrained(d)
  hf.write_safetensors(st, dict(tensors, **{"transformer.h.0.attn.q_attn.weight":
                                            np.zeros((2, 2), np.float32)}))
  with pytest.raises(ValueError, match="unexpected tensor"):
    hf.load_pretrained(d)
  bad = dict(tensors)
  bad["transformer.wpe.weight"] = bad["transformer.wpe.weight"][:-1]
  hf.write_safetensors(st, bad)
  with pytest.raises(ValueError, match="config.json implies"):
    hf.load_pretrained(d)


def test_shapes_that_disagree_with_the_config(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_gqa"], tmp_path / "m",
            lambda c: c.update(num_key_value_heads=1))
  with pytest.raises(ValueError, match="model.safetensors: tensor "
                     "'model.layers.0.self_attn.k_proj.weight' has shape"):
    hf.load_pretrained(d)


def test_no_pickle_and_not_a_model(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
  with pytest.raises(ValueError, match="pickle"):
    hf.read_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match="no such file"):
    hf.load_pretrained(str(tmp_path / "nowhere"))
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
  with pytest.raises(ValueError, match="not a safetensors file"):
    hf.read_safetensors(str(tmp_path / "junk.safetensors"))


# --- safetensors and tokenizers -------------------------------------------------


def test_safetensors_format_agrees_with_the_library(tmp_path):
  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b": np.arange(5, dtype=np.int64), "c": np.ones((2, 3), np.float16),
            "empty": np.zeros((0, 3), np.float32)}
  ours = str(tmp_path / "ours.safetensors")
  hf.write_safetensors(ours, arrays, {"format": "pt"})
  for k, v in safetensors.numpy.load_file(ours).items():
    np.testing.assert_array_equal(v, arrays[k])
  theirs = str(tmp_path / "theirs.safetensors")
  safetensors.numpy.save_file(arrays, theirs)
  for k, v in hf.read_safetensors(theirs).items():
    assert v.dtype == arrays[k].dtype
    np.testing.assert_array_equal(v, arrays[k])


def test_tokenizer_json_vocabulary(tmp_path):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<eos>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["reverse the word apple", "sort: b a c", "hello world"] * 5,
                          trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1,
                                                    "pad_token_id": 0}))
  vocab = hf.load_vocabulary(str(tmp_path))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  text = "reverse the word 'pear', then sort!"
  ids = list(vocab.encode(text))
  assert ids == fast(text, add_special_tokens=False)["input_ids"]
  assert vocab.decode(ids) == text
  assert vocab.decode(ids + [1, 7, 8]) == text  # Decoding stops at EOS.
  assert (vocab.eos_ids, vocab.pad_id, vocab.vocab_size) == ((1,), 0, tok.get_vocab_size())


def test_sentencepiece_vocabulary(tmp_path):
  text = tmp_path / "corpus.txt"
  text.write_text("\n".join(["the quick brown fox", "jumps over the lazy dog"] * 20))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tokenizer"),
                                 vocab_size=31, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 minloglevel=2)
  vocab = hf.load_vocabulary(str(tmp_path))
  proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
  assert list(vocab.encode("the lazy fox")) == proc.encode("the lazy fox")
  assert vocab.decode(vocab.encode("the lazy fox")) == "the lazy fox"
