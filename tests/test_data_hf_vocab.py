"""A checkpoint's own tokenizer, against transformers: ids, special ids from
the configs, BOS where the post-processor adds it, chat templates and their
assistant masks, and one clear line for each bad directory."""
import json
import logging

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from instructrl.data import chat
from instructrl.data import common
from instructrl.data import hf_vocab
from instructrl.data import pipeline
from instructrl.data import vocab as vocab_lib

CORPUS = ["Reverse the word 'apple', then sort: b a c.", "Hello world! It's 2026.",
          "Name three colours; answer in one line.", "café naïve 😀 漢字"] * 10

LLAMA3 = (  # Llama 3's shape, with transformers' {% generation %} marks.
    "{{- bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}{% else %}"
    "{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
    "\n\n{% endif %}")
QWEN = (  # Qwen2.5's shape: a default system turn, no BOS.
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse 'apple'."},
        {"role": "assistant", "content": "elppa"},
        {"role": "user", "content": "Sort: b a c."},
        {"role": "assistant", "content": "a b c"}]


# Qwen2's pre-tokenizer (transformers 5's Qwen2Tokenizer rebuilds it so, as
# the released tokenizer.json files have it).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _tokenizer_json(path, specials, bos=None, qwen=False):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  if qwen:
    tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(specials)  # Ids past the BPE pieces: not 0, 1, 2.
  byte = processors.ByteLevel(trim_offsets=False)
  tok.post_processor = byte if bos is None else processors.Sequence([
      byte, processors.TemplateProcessing(
          single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
          special_tokens=[(bos, tok.token_to_id(bos))])])
  tok.save(str(path / "tokenizer.json"))
  return {s: tok.token_to_id(s) for s in specials}


def _write(path, name, obj):
  (path / name).write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama3")
  ids = _tokenizer_json(d, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                            "<|start_header_id|>", "<|end_header_id|>"],
                        bos="<|begin_of_text|>")
  _write(d, "tokenizer_config.json", {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
      "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
      "chat_template": LLAMA3})
  eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
  _write(d, "generation_config.json", {"bos_token_id": ids["<|begin_of_text|>"],
                                       "eos_token_id": eos})
  _write(d, "config.json", {"model_type": "llama", "bos_token_id": ids[
      "<|begin_of_text|>"], "eos_token_id": eos})
  return str(d), ids


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  d = tmp_path_factory.mktemp("qwen")
  ids = _tokenizer_json(d, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], qwen=True)
  _write(d, "tokenizer_config.json", {
      "tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
  (d / "chat_template.jinja").write_text(QWEN)  # Wins over the config's.
  _write(d, "generation_config.json", {
      "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
      "pad_token_id": ids["<|endoftext|>"]})
  _write(d, "config.json", {"model_type": "qwen2", "eos_token_id": ids["<|endoftext|>"]})
  return str(d), ids


def test_llama3_ids_bos_and_two_eos(llama3, caplog):
  path, ids = llama3
  with caplog.at_level(logging.WARNING):
    v = vocab_lib.get_vocabulary(f"hf:{path}")
  assert v.eos_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"])  # Config's first.
  assert v.pad_id == ids["<|eot_id|>"] and "names no PAD token" in caplog.text
  assert (v.bos_id, v.add_bos) == (ids["<|begin_of_text|>"], True)
  assert min(ids.values()) > 2
  hf = transformers.AutoTokenizer.from_pretrained(path)
  for text in CORPUS[:4] + ["  spaces , and . dots", "a<|eot_id|>b"]:
    assert v.prefix + v.encode(text) == hf(text)["input_ids"], text
  for text in CORPUS[:4] + ["  spaces , and . dots"]:  # Decoding stops at EOS.
    full = hf(text)["input_ids"] + [ids["<|eot_id|>"], 300]
    assert v.decode(full) == hf.decode(full[:-2], skip_special_tokens=True)
  assert v.decode(v.encode("ab") + [ids["<|end_of_text|>"]] + v.encode("cd")) == "ab"


def test_qwen_no_bos_pad_and_template_file(qwen):
  path, ids = qwen
  v = hf_vocab.load(path)
  assert v.eos_ids == (ids["<|im_end|>"], ids["<|endoftext|>"])
  assert (v.pad_id, v.bos_id, v.add_bos) == (ids["<|endoftext|>"], None, False)
  assert v.chat_template == QWEN
  hf = transformers.AutoTokenizer.from_pretrained(path)
  for text in CORPUS[:4]:
    assert v.prefix + v.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("name", ["llama3", "qwen"])
def test_chat_template_ids_and_assistant_mask_match_transformers(name, request):
  path, _ = request.getfixturevalue(name)
  v = hf_vocab.load(path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  msgs = [(m["role"], m["content"]) for m in CHAT]
  want = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  ids, trained = chat.template_sequence(v, msgs, "x:1")
  assert ids == list(want["input_ids"])
  assert [int(t) for t in trained] == list(want["assistant_masks"])
  prompt = hf.apply_chat_template(CHAT[:2], tokenize=True, return_dict=True,
                                  add_generation_prompt=True)["input_ids"]
  assert chat.template_prompt(v, msgs[:2], "x:1") == list(prompt)


def test_pipeline_rows_with_a_checkpoints_tokenizer(llama3, tmp_path):
  path, ids = llama3
  v = hf_vocab.load(path)
  bos, eot = ids["<|begin_of_text|>"], ids["<|eot_id|>"]
  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"prompt": "Reverse 'ab'.", "completion": " ba"}) + "\n" +
                  json.dumps({"messages": CHAT}) + "\n")
  read = pipeline.ReadOptions(vocab=f"hf:{path}")
  t, _ = pipeline.make_table("sft", f"jsonl:{data}", seq_len=96, read=read)
  p, c = v.encode("Reverse 'ab'."), v.encode(" ba")
  seq = [bos] + p + c + [eot]
  n = len(seq) - 1
  np.testing.assert_array_equal(t["tokens"][0, :n], seq[:-1])
  np.testing.assert_array_equal(t["targets"][0, :n], seq[1:])
  assert t["loss_mask"][0].sum() == len(c) + 1
  assert np.all(t["tokens"][0, n:] == v.pad_id)
  # With the template: the template's ids, the loss on the assistant turns.
  templ = pipeline.ReadOptions(vocab=f"hf:{path}", chat_template=True)
  t2, _ = pipeline.make_table("sft", f"jsonl:{data}", seq_len=96, read=templ)
  ids2, trained = chat.template_sequence(v, [(m["role"], m["content"]) for m in CHAT], "")
  np.testing.assert_array_equal(t2["tokens"][1, :len(ids2) - 1], ids2[:-1])
  np.testing.assert_array_equal(t2["loss_mask"][1, :len(ids2) - 1], trained[1:])
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
  pr, _ = pipeline.make_table("prompts", f"jsonl:{prompts}", seq_len=8, read=read)
  want = [v.pad_id] * (7 - len(v.encode("Hi"))) + [bos] + v.encode("Hi")
  np.testing.assert_array_equal(pr["prompt_tokens"][0], want)


def test_sentencepiece_checkpoint(tmp_path, caplog):
  spm.SentencePieceTrainer.train(  # Llama 2's ids: unk 0, bos 1, eos 2.
      sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "tokenizer"),
      vocab_size=50, minloglevel=2)
  _write(tmp_path, "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>",
                                             "chat_template": LLAMA3})
  with caplog.at_level(logging.WARNING):
    v = hf_vocab.load(str(tmp_path))
  assert (v.bos_id, v.eos_ids, v.pad_id, v.add_bos) == (1, (2,), 2, True)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
  assert v.prefix + v.encode("Hello world") == [1] + sp.encode("Hello world")
  with pytest.raises(common.DataError, match="x:3: chat templates need a tokenizer.json"):
    chat.template_sequence(v, [("user", "a"), ("assistant", "b")], "x:3")


def _dir(tmp_path, tok_config=None, gen=None):
  tmp_path.mkdir()
  _tokenizer_json(tmp_path, ["<e>", "<p>"])
  _write(tmp_path, "tokenizer_config.json", tok_config or {})
  if gen is not None:
    _write(tmp_path, "generation_config.json", gen)
  return str(tmp_path)


def test_bad_checkpoint_tokenizers_are_one_line(tmp_path):
  cases = [
      (str(tmp_path / "missing"), "no such checkpoint directory"),
      (_dir(tmp_path / "a"), "the tokenizer has no EOS"),
      (_dir(tmp_path / "b", {"eos_token": "<nope>"}),
       "tokenizer_config.json: \"eos_token\" '<nope>' is not in the tokenizer"),
      (_dir(tmp_path / "c", {"eos_token": "<e>"}, {"eos_token_id": 99999}),
       "generation_config.json: \"eos_token_id\" 99999 is outside the tokenizer's"),
  ]
  (tmp_path / "e").mkdir()
  _write(tmp_path / "e", "config.json", {})
  cases.append((str(tmp_path / "e"), "no tokenizer.json or tokenizer.model"))
  for path, message in cases:
    with pytest.raises(common.DataError) as info:
      vocab_lib.get_vocabulary(f"hf:{path}")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_chat_template_errors(tmp_path, qwen):
  v = hf_vocab.load(_dir(tmp_path / "a", {"eos_token": "<e>"}))
  with pytest.raises(common.DataError, match="f:1: data.chat_template is set but "
                     "the tokenizer has no chat template"):
    chat.template_sequence(v, [("user", "a"), ("assistant", "b")], "f:1")
  v.chat_template = "{{ raise_exception('only user turns') }}"
  with pytest.raises(common.DataError, match="f:2: the chat template failed: "
                     "only user turns"):
    chat.template_sequence(v, [("user", "a"), ("assistant", "b")], "f:2")
  v.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}!"
  with pytest.raises(common.DataError, match="f:3: the chat template does not "
                     "render each turn as a prefix"):
    chat.template_sequence(v, [("user", "a"), ("assistant", "b")], "f:3")
