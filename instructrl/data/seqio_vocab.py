"""seqio views of our vocabularies, for seqio Tasks only (imports TensorFlow).

The trainers tokenize with `vocab.Vocabulary` directly; this module exists
so that `tasks.py` can register seqio Tasks with the same token ids. Only
tasks.py imports it, so TensorFlow starts only when a seqio Task is used.
"""
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf

from instructrl.data import common
from instructrl.data import vocab as vocab_lib

common.hide_accelerators_from_tensorflow()


class LazyDefaultVocabulary(seqio.SentencePieceVocabulary):
  """The default vocabulary, trained when first used rather than when built.

  seqio tasks are registered at import time; this keeps that import cheap
  (no corpus, no training). The cache dir is also resolved at first use, so
  setting $INSTRUCTRL_CACHE after the import still takes effect.
  """

  def __init__(self, vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE,
               cache_dir: Optional[str] = None):
    self._vocab_size = vocab_size
    self._cache_dir = cache_dir
    super().__init__(vocab_lib.default_model_path(vocab_size, cache_dir))

  def _model_context(self):
    # seqio reads the model file here, lazily: make sure it exists first.
    if not self._model:
      self._sentencepiece_model_file = vocab_lib.train_default_model(
          self._vocab_size, self._cache_dir)
    return super()._model_context()


class SeqioVocabulary(seqio.Vocabulary):
  """Any `vocab.Vocabulary` as a seqio.Vocabulary (TF ops call back into
  Python through `tf.numpy_function`). seqio appends `eos_id`, the first of
  the vocabulary's EOS ids, and pads with its `pad_id`."""

  def __init__(self, vocab: vocab_lib.Vocabulary):
    self.vocab = vocab
    super().__init__()

  @property
  def bos_id(self):
    return self.vocab.bos_id

  @property
  def eos_id(self):
    return self.vocab.eos_id

  @property
  def pad_id(self):
    return self.vocab.pad_id

  @property
  def unk_id(self):
    return self.vocab.unk_id

  @property
  def _base_vocab_size(self):
    return self.vocab.vocab_size

  def _encode(self, s):
    return self.vocab.encode(s)

  def _decode(self, ids):
    return self.vocab.decode(ids)

  def _encode_tf(self, s):
    def enc(x):
      x = np.asarray(x).item()
      return np.asarray(self.vocab.encode(
          x.decode("utf-8") if isinstance(x, bytes) else x), np.int32)
    return tf.ensure_shape(tf.numpy_function(enc, [s], tf.int32), [None])

  def _decode_tf(self, ids):
    def dec(a):  # [..., T] ids -> [...] strings.
      rows = a.reshape(-1, a.shape[-1])
      out = np.array([self.vocab.decode(r).encode("utf-8") for r in rows], object)
      return out.reshape(a.shape[:-1])
    return tf.numpy_function(dec, [ids], tf.string)

  def __eq__(self, other):
    return (isinstance(other, SeqioVocabulary) and
            other.vocab.fingerprint == self.vocab.fingerprint)

  def __hash__(self):
    return hash(self.vocab.fingerprint)


def as_seqio(vocab) -> seqio.Vocabulary:
  """A seqio.Vocabulary with the same ids as `vocab` (seqio's own classes
  where they are exact: their TF ops are native)."""
  if isinstance(vocab, seqio.Vocabulary):
    return vocab
  if isinstance(vocab, vocab_lib.ByteVocabulary):
    return seqio.ByteVocabulary()
  if (isinstance(vocab, vocab_lib.SentencePieceVocabulary) and not vocab.add_bos
      and vocab.eos_ids == (vocab.sp.eos_id(),) and vocab.pad_id == 0):
    sp = seqio.SentencePieceVocabulary(vocab.path)  # seqio pads with 0.
    sp.load_model()
    return sp
  return SeqioVocabulary(vocab)
