"""A checkpoint's tokenizer as a seqio.Vocabulary (imports seqio and TF).

`tokenizer.model` (SentencePiece) goes through seqio's own vocabulary;
otherwise `tokenizer.json` is wrapped with the `tokenizers` library. Only
`instructrl.tools.hf.load_vocabulary` imports this module, so `instructrl.tools.hf`
itself imports without TensorFlow.
"""
from __future__ import annotations

import json
import os

import numpy as np
import seqio
import tensorflow as tf


def load_vocabulary(path: str) -> seqio.Vocabulary:
  """EOS and PAD of a tokenizer.json come from the directory's config.json."""
  spm_path = os.path.join(path, "tokenizer.model")
  if os.path.exists(spm_path):
    vocab = seqio.SentencePieceVocabulary(spm_path)
    vocab.load_model()
    return vocab
  json_path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(json_path):
    raise ValueError(f"{path}: no tokenizer.model or tokenizer.json")
  hf = {}
  if os.path.exists(os.path.join(path, "config.json")):
    with open(os.path.join(path, "config.json")) as f:
      hf = json.load(f)
  eos = hf.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos  # Llama 3 lists several.
  return TokenizersVocabulary(json_path, eos, hf.get("pad_token_id"))


class TokenizersVocabulary(seqio.Vocabulary):
  """A `tokenizer.json` (Hugging Face `tokenizers`) as a seqio.Vocabulary.

  Encoding adds no special tokens (seqio's convention: EOS is appended by the
  task, never by the vocabulary); decoding drops them and, as seqio does,
  stops at EOS.
  """

  def __init__(self, path: str, eos_id: int | None = None,
               pad_id: int | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = path
    self.tokenizer = tokenizers.Tokenizer.from_file(path)
    unk = getattr(self.tokenizer.model, "unk_token", None)
    self._unk = self.tokenizer.token_to_id(unk) if unk else None
    self._eos, self._pad = eos_id, pad_id
    super().__init__()

  @property
  def eos_id(self):
    return self._eos

  @property
  def pad_id(self):
    return 0 if self._pad is None else self._pad

  @property
  def unk_id(self):
    return self._unk  # None for byte-level BPE, which never needs one.

  @property
  def _base_vocab_size(self):
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s):
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids):
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s):
    def enc(x):
      x = np.asarray(x).item()
      text = x.decode("utf-8") if isinstance(x, bytes) else x
      return np.asarray(self._encode(text), np.int32)
    return tf.ensure_shape(tf.numpy_function(enc, [s], tf.int32), [None])

  def _decode_tf(self, ids):
    def dec(a):  # [..., T] ids -> [...] strings.
      rows = a.reshape(-1, a.shape[-1])
      out = np.array([self._decode(r).encode("utf-8") for r in rows], object)
      return out.reshape(a.shape[:-1])
    return tf.numpy_function(dec, [ids], tf.string)

  def __eq__(self, other):
    return isinstance(other, TokenizersVocabulary) and other.path == self.path

  def __hash__(self):
    return hash(self.path)
