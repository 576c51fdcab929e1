"""Vocabularies (seqio): a small SentencePiece model trained offline, bytes,
or any SentencePiece model file.

The default model is trained on first use from the pretraining corpus's
training split and cached; later runs reuse the file. Training is
single-threaded because the unigram trainer's result depends on the thread
count, and we want the same model bytes on every machine (~5 s at 2048).

Options chosen so that every string round-trips exactly, which the world's
tasks need (reversing 'apple' must give back 'elppa', spaces and all):
identity normalisation (no NFKC, no whitespace squashing), byte fallback for
characters outside the vocabulary (newlines, tabs, emoji), and digits split
into single-digit pieces so numbers are spelled digit by digit.
"""
import hashlib
import io
import os
import string
from typing import Optional

import seqio
import sentencepiece as spm

from instructrl.data import common
from instructrl.data import corpus

common.hide_accelerators_from_tensorflow()

DEFAULT_VOCAB_SIZE = 2048
_TRAINER_VERSION = 2  # Bump when the options below change.
_TRAINER_OPTIONS = dict(
    model_type="unigram",
    pad_id=common.PAD_ID,
    eos_id=common.EOS_ID,
    unk_id=2,
    bos_id=-1,
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    character_coverage=0.9995,
    # Every printable ASCII character gets a piece of its own (else rare
    # ones such as "?" or "Z" in the docstrings fall back to bytes).
    required_chars=string.printable.strip(),
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
)


def default_model_path(vocab_size: int = DEFAULT_VOCAB_SIZE,
                       cache_dir: Optional[str] = None) -> str:
  """Where the default model of this size lives (trained or not)."""
  corpus_name = os.path.basename(corpus.cache_path(cache_dir))
  key = common.fingerprint([corpus_name, str(vocab_size),
                            str(_TRAINER_VERSION), repr(_TRAINER_OPTIONS)])
  return os.path.join(common.default_cache_dir(cache_dir),
                      f"spm-{vocab_size}-{key}.model")


def train_default_model(vocab_size: int = DEFAULT_VOCAB_SIZE,
                        cache_dir: Optional[str] = None) -> str:
  """Trains the default model unless cached; returns its path."""
  path = default_model_path(vocab_size, cache_dir)
  if os.path.exists(path):
    return path
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.sentences(cache_dir)),
        model_writer=model, vocab_size=vocab_size, **_TRAINER_OPTIONS)
  except RuntimeError as e:  # E.g. a size below the 256 byte pieces + chars.
    raise common.DataError(f"default:{vocab_size}", "cannot train the "
                           f"vocabulary: {str(e).splitlines()[0]}") from None
  common.atomic_write(path, model.getvalue())
  return path


class LazyDefaultVocabulary(seqio.SentencePieceVocabulary):
  """The default vocabulary, trained when first used rather than when built.

  seqio tasks are registered at import time; this keeps that import cheap
  (no corpus, no training). The cache dir is also resolved at first use, so
  setting $INSTRUCTRL_CACHE after the import still takes effect.
  """

  def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE,
               cache_dir: Optional[str] = None):
    self._vocab_size = vocab_size
    self._cache_dir = cache_dir
    super().__init__(default_model_path(vocab_size, cache_dir))

  def _model_context(self):
    # seqio reads the model file here, lazily: make sure it exists first.
    if not self._model:
      self._sentencepiece_model_file = train_default_model(
          self._vocab_size, self._cache_dir)
    return super()._model_context()


def _check_special_ids(vocab: seqio.Vocabulary, where: str) -> None:
  if vocab.eos_id != common.EOS_ID:
    raise common.DataError(
        where, f"EOS must be id {common.EOS_ID} (seqio's convention), this "
        f"model has {vocab.eos_id}; train it with --pad_id=0 --eos_id=1 "
        "--unk_id=2 --bos_id=-1")


def get_vocabulary(spec: str = "default",
                   cache_dir: Optional[str] = None) -> seqio.Vocabulary:
  """A seqio vocabulary with PAD_ID = 0 and EOS_ID = 1.

  Args:
    spec: "default" (SentencePiece, 2048 pieces, trained on the corpus and
      cached), "default:<size>" (another size), "byte" (UTF-8 bytes + 3), or
      "sentencepiece:/path/to/model".
    cache_dir: where the default model is cached; None means
      $INSTRUCTRL_CACHE or ~/.cache/instructrl.

  Returns:
    The vocabulary, its model already loaded.

  Raises:
    DataError: unknown spec, missing model file or wrong special ids.
  """
  if spec == "byte":
    return seqio.ByteVocabulary()
  if spec == "default" or spec.startswith("default:"):
    size = DEFAULT_VOCAB_SIZE
    if ":" in spec:
      try:
        size = int(spec.split(":", 1)[1])
      except ValueError:
        raise common.DataError("vocab", f"bad size in {spec!r}") from None
    vocab = seqio.SentencePieceVocabulary(train_default_model(size, cache_dir))
  elif spec.startswith("sentencepiece:"):
    path = os.path.expanduser(spec.split(":", 1)[1])
    if not os.path.isfile(path):
      raise common.DataError(path, "no such SentencePiece model file")
    vocab = seqio.SentencePieceVocabulary(path)
    try:
      vocab.load_model()
    except Exception as e:  # The protobuf parser's errors vary by version.
      raise common.DataError(path, f"not a SentencePiece model ({e})") from None
  else:
    raise common.DataError(
        "vocab", f"unknown vocabulary {spec!r}; use 'default', "
        "'default:<size>', 'byte' or 'sentencepiece:/path'")
  vocab.load_model()
  _check_special_ids(vocab, spec)
  return vocab


def vocab_fingerprint(vocab: seqio.Vocabulary) -> str:
  """Identifies a vocabulary's token mapping (for caches and states)."""
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return "spm-" + hashlib.sha256(vocab.sp_model).hexdigest()[:16]
  return f"{type(vocab).__name__}-{vocab.vocab_size}"


def encode_batch(vocab: seqio.Vocabulary, texts: list[str]) -> list[list[int]]:
  """vocab.encode over many strings; SentencePiece's batch call is faster."""
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return vocab.tokenizer.encode(texts, out_type=int)
  return [list(vocab.encode(t)) for t in texts]
