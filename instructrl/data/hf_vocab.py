"""A Hugging Face checkpoint directory's tokenizer, exactly (no TensorFlow).

    vocab = hf_vocab.load("/path/to/llama-3.2-1b")   # or get_vocabulary("hf:DIR")

`tokenizer.json` is read with the `tokenizers` library (what transformers
itself runs); without one, `tokenizer.model` with SentencePiece. The
special ids come from the directory's configs:

  BOS  tokenizer_config.json "bos_token", else generation_config.json /
       config.json "bos_token_id"
  EOS  tokenizer_config.json "eos_token" first (it ends training
       sequences), then every "eos_token_id" of generation_config.json and
       config.json (an int or a list: Llama 3 stops on <|eot_id|> and
       <|end_of_text|>); generation stops on any of them
  PAD  "pad_token", else "pad_token_id", else EOS (logged)

BOS is added where the tokenizer adds it: with tokenizer.json, where its
post-processor puts BOS before the text (as transformers does); with only
tokenizer.model, per "add_bos_token" (default: yes when there is a BOS, as
LlamaTokenizer). The chat template is `chat_template.jinja`, else
`chat_template.json`, else tokenizer_config.json's "chat_template".
"""
import json
import logging
import os
from typing import Any, Optional, Sequence

from instructrl.data import common
from instructrl.data import vocabulary


class TokenizersVocabulary(vocabulary.Vocabulary):
  """A `tokenizer.json` through the `tokenizers` library."""

  def __init__(self, path: str, *, clean_up_spaces: bool = False):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = path
    try:
      self.tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
      raise common.DataError(path, f"not a tokenizer.json ({e})".splitlines()[0]
                             ) from None
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    unk = getattr(self.tokenizer.model, "unk_token", None)
    self.unk_id = self.tokenizer.token_to_id(unk) if unk else None
    # transformers skips the WordPiece-era clean-up for BPE models.
    self.clean_up_spaces = (clean_up_spaces and
                            type(self.tokenizer.model).__name__ != "BPE")
    with open(path, "rb") as f:
      self.fingerprint = "tok-" + common.fingerprint([f.read().decode("utf-8")])

  def token_id(self, token: str) -> Optional[int]:
    return self.tokenizer.token_to_id(token)

  def post_processor_prefix(self) -> list[int]:
    """The ids the post-processor puts before a text (e.g. [BOS])."""
    plain = self.tokenizer.encode("a", add_special_tokens=False).ids
    full = self.tokenizer.encode("a", add_special_tokens=True).ids
    n = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
    return full[:n]

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(
        list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """(ids, start character of each token): special tokens in `text` (a
    rendered chat template) become their ids."""
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    return enc.ids, [a for a, _ in enc.offsets]

  def _decode(self, ids: list[int]) -> str:
    text = self.tokenizer.decode(ids, skip_special_tokens=True)
    if self.clean_up_spaces:  # transformers' clean_up_tokenization.
      for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","),
                   (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"),
                   (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise common.DataError(path, f"malformed JSON ({e})") from None
  if not isinstance(data, dict):
    raise common.DataError(path, "expected a JSON object")
  return data


def _token_text(value: Any) -> Optional[str]:
  """A token as tokenizer_config.json writes it: a string or {"content": s}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _int_ids(value: Any) -> list[int]:
  if isinstance(value, bool):
    return []
  if isinstance(value, int):
    return [value]
  if isinstance(value, list):
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
  return []


class _Configs:
  """The directory's tokenizer_config, generation_config and config JSON."""

  def __init__(self, path: str):
    self.dir = path
    self.tok = _read_json(os.path.join(path, "tokenizer_config.json"))
    self.gen = _read_json(os.path.join(path, "generation_config.json"))
    model = _read_json(os.path.join(path, "config.json"))
    # Multimodal checkpoints (Gemma 3) keep the language model's ids inside.
    text = model.get("text_config") if isinstance(model.get("text_config"), dict) else {}
    self.model = {**text, **model}
    added = self.tok.get("added_tokens_decoder") or {}
    self.added = {_token_text(v): int(k) for k, v in added.items()
                  if _token_text(v) and str(k).isdigit()}

  def token(self, name: str, lookup, size: int) -> Optional[int]:
    """The id of tokenizer_config.json's `name` ("eos_token"), or None."""
    text = _token_text(self.tok.get(name))
    if text is None:
      return None
    found = lookup(text)
    found = self.added.get(text) if found is None else found
    if found is None or not 0 <= found < size:
      raise common.DataError(os.path.join(self.dir, "tokenizer_config.json"),
                             f'"{name}" {text!r} is not in the tokenizer')
    return found

  def ids(self, name: str, size: int) -> list[int]:
    """Every id named `name` ("eos_token_id") by generation_config, config."""
    out = []
    for file, cfg in (("generation_config.json", self.gen),
                      ("config.json", self.model)):
      for i in _int_ids(cfg.get(name)):
        if not 0 <= i < size:
          raise common.DataError(os.path.join(self.dir, file), f'"{name}" {i} is '
                                 f"outside the tokenizer's {size} ids")
        out.append(i)
    return out

  def chat_template(self) -> Optional[str]:
    jinja = os.path.join(self.dir, "chat_template.jinja")
    if os.path.exists(jinja):
      with open(jinja, encoding="utf-8") as f:
        return f.read()
    template = _read_json(os.path.join(self.dir, "chat_template.json")).get(
        "chat_template", self.tok.get("chat_template"))
    if isinstance(template, list):  # Named templates: the default one.
      named = {t.get("name"): t.get("template") for t in template
               if isinstance(t, dict)}
      template = named.get("default")
    return template if isinstance(template, str) else None


def _spm_lookup(path: str):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromFile(path)
  except Exception as e:  # The protobuf parser's errors vary by version.
    raise common.DataError(path, f"not a SentencePiece model ({e})") from None

  def lookup(text):
    i = sp.PieceToId(text)
    return i if sp.IdToPiece(i) == text else None
  own = {"eos": sp.eos_id(), "bos": sp.bos_id(), "pad": sp.pad_id()}
  return lookup, sp.GetPieceSize(), {k: i for k, i in own.items() if i >= 0}


def _special_ids(cfg: _Configs, lookup, size: int, own: dict[str, int]):
  """(bos, eos_ids, pad) from the configs; `own`: a SentencePiece model's."""
  path = cfg.dir
  bos = cfg.token("bos_token", lookup, size)
  bos = bos if bos is not None else next(iter(cfg.ids("bos_token_id", size)),
                                         own.get("bos"))
  first = cfg.token("eos_token", lookup, size)
  eos = ([first] if first is not None else []) + cfg.ids("eos_token_id", size)
  eos = tuple(dict.fromkeys(eos or ([own["eos"]] if "eos" in own else [])))
  if not eos:
    raise common.DataError(path, "the tokenizer has no EOS: set \"eos_token\" in "
                           "tokenizer_config.json or \"eos_token_id\" in "
                           "generation_config.json or config.json")
  pad = cfg.token("pad_token", lookup, size)
  pad = pad if pad is not None else next(iter(cfg.ids("pad_token_id", size)),
                                         own.get("pad"))
  if pad is None:
    pad = eos[0]
    logging.warning("%s names no PAD token; padding with EOS (id %d)", path, pad)
  return bos, eos, pad


def load(path: str) -> vocabulary.Vocabulary:
  """The tokenizer of the checkpoint directory `path` (module docstring).

  Raises:
    DataError: no directory or tokenizer file, a special token the tokenizer
      lacks, an id outside it, or no EOS at all.
  """
  if not os.path.isdir(path):
    raise common.DataError(path, "no such checkpoint directory")
  cfg = _Configs(path)
  json_path = os.path.join(path, "tokenizer.json")
  spm_path = os.path.join(path, "tokenizer.model")
  if os.path.exists(json_path):
    v = TokenizersVocabulary(json_path, clean_up_spaces=bool(
        cfg.tok.get("clean_up_tokenization_spaces", False)))
    bos, eos, pad = _special_ids(cfg, v.token_id, v.vocab_size, {})
    prefix = v.post_processor_prefix()
    if len(prefix) > 1:
      raise common.DataError(json_path, f"the post-processor puts {len(prefix)} "
                             "tokens before the text; only a BOS is supported")
    v.add_bos = bool(prefix)  # transformers follows the post-processor too.
    v.bos_id = prefix[0] if prefix else bos
    v.eos_ids, v.pad_id = eos, pad
  elif os.path.exists(spm_path):
    lookup, size, own = _spm_lookup(spm_path)
    bos, eos, pad = _special_ids(cfg, lookup, size, own)
    v = vocabulary.SentencePieceVocabulary(
        spm_path, eos_ids=eos, pad_id=pad, bos_id=bos,
        add_bos=bool(cfg.tok.get("add_bos_token", True)) and bos is not None)
  else:
    raise common.DataError(path, "no tokenizer.json or tokenizer.model")
  v.chat_template = cfg.chat_template()
  v.special_tokens = {name: _token_text(cfg.tok.get(name)) for name in
                      ("bos_token", "eos_token", "pad_token", "unk_token")}
  if isinstance(v, TokenizersVocabulary):  # Templates may use ids' strings.
    for name, i in (("bos_token", v.bos_id), ("eos_token", v.eos_id)):
      if v.special_tokens[name] is None and i is not None:
        v.special_tokens[name] = v.tokenizer.id_to_token(i)
  logging.info("tokenizer of %s: %r", path, v)
  return v
