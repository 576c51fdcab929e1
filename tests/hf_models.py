"""Tiny transformers checkpoints built in a test (shared by the HF tests).

Weights are redrawn at a larger scale than transformers' init so that every
tensor (biases and norms included) moves the logits.
"""
import numpy as np
import torch
import transformers


def make_hf(config, seed=0, cls=transformers.AutoModelForCausalLM):
  """A transformers model with weights large enough that each one counts."""
  torch.manual_seed(seed)
  model = cls.from_config(config).eval()
  gemma = config.model_type.startswith("gemma")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or ".ln_" in name:  # Gemma stores w of (1 + w).
        one = 0.0 if gemma or name.endswith(".bias") else 1.0
        p.copy_(one + 0.2 * torch.randn_like(p))
      elif gemma and "embed" in name:  # Its inputs are scaled by sqrt(d) = 5.7:
        p.copy_(0.06 * torch.randn_like(p))  # else each token repeats itself.
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def save_dirs(tmp_path_factory, makers: dict) -> dict:
  """{name: a directory holding make()'s model, saved as safetensors}."""
  dirs = {}
  for name, make in makers.items():
    d = str(tmp_path_factory.mktemp(name))
    make_hf(make()).save_pretrained(d, safe_serialization=True)
    dirs[name] = d
  return dirs


def hf_logits(path, tokens, dtype=torch.float32):
  """transformers' logits of `tokens` for the checkpoint at `path` (numpy f32)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


# --- Whole checkpoints: a model and a tokenizer trained here -----------------

WORDS = ("apple pear plum kiwi lime fig date grape melon peach cherry lemon mango "
         "olive onion bean corn rice salt sugar").split()
TASKS = ("Reverse the word {w}.", "Spell {w} in capitals.", "Repeat {w} twice.",
         "Sort the letters of {w}.")
SPECIALS = {  # The released tokenizers' special tokens, after the BPE pieces.
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
               "<|start_header_id|>", "<|end_header_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def task(i: int) -> tuple[str, str]:
  """A prompt and its answer (a few hundred distinct ones)."""
  w = WORDS[i % len(WORDS)]
  kind = (i // len(WORDS)) % len(TASKS)
  answer = (w[::-1], w.upper(), f"{w} {w}", "".join(sorted(w)))[kind]
  return TASKS[kind].format(w=w), " " + answer


def _json(path, name, obj):
  import json  # pylint: disable=g-import-not-at-top
  (path / name).write_text(json.dumps(obj))


def write_tokenizer(path, family: str) -> dict:
  """tokenizer.json (byte-level BPE trained on the tasks) with the family's
  special tokens, whose ids are past the pieces (not 0, 1 or 2), and its
  tokenizer_config/generation_config. llama3: BOS added by the
  post-processor, EOS <|eot_id|> and <|end_of_text|>, no PAD (EOS pads);
  qwen2: no BOS, EOS <|im_end|> and <|endoftext|>, PAD <|endoftext|>."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [p + a for p, a in map(task, range(400))]
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  specials = SPECIALS[family]
  tok.add_special_tokens(specials)
  ids = {s: tok.token_to_id(s) for s in specials}
  byte = processors.ByteLevel(trim_offsets=False)
  if family == "llama3":
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([byte, processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, ids[bos])])])
    _json(path, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
        "eos_token": "<|eot_id|>"})
    tokens = dict(bos_token_id=ids[bos],
                  eos_token_id=[ids["<|eot_id|>"], ids["<|end_of_text|>"]])
  else:
    tok.post_processor = byte
    _json(path, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokens = dict(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                  pad_token_id=ids["<|endoftext|>"])
  tok.save(str(path / "tokenizer.json"))
  _json(path, "generation_config.json", tokens)
  assert min(ids.values()) > 2
  return dict(tokens, size=tok.get_vocab_size(), ids=ids)


def family_config(family: str, vocab: dict):
  """A tiny Llama-3.2-style (llama3 RoPE, GQA, tied) or Qwen2.5-style (q/k/v
  biases, tied, embedding padded past the tokenizer) transformers config."""
  shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=True,
               bos_token_id=vocab.get("bos_token_id"),
               eos_token_id=vocab["eos_token_id"],
               pad_token_id=vocab.get("pad_token_id"))
  if family == "llama3":
    return transformers.LlamaConfig(
        **shape, vocab_size=vocab["size"], head_dim=16, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
  return transformers.Qwen2Config(**shape, vocab_size=64 * -(-vocab["size"] // 64))


def write_checkpoint(path, family: str, seed: int = 0) -> dict:
  """A whole HF directory: tokenizer files, config.json, model.safetensors."""
  path.mkdir(parents=True, exist_ok=True)
  vocab = write_tokenizer(path, family)
  make_hf(family_config(family, vocab), seed).save_pretrained(
      str(path), safe_serialization=True)
  return vocab
