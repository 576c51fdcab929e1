"""Vocabularies without TensorFlow, from a spec; the miniature's own model.

Every user of token ids takes the special ones from a `Vocabulary`
(vocabulary.py), never from a constant: `eos_ids` (generation stops on any
of them; the first is the one appended to training sequences), `pad_id`,
`bos_id` and `add_bos` (whether sequences start with BOS, as the
tokenizer's post-processor does).

  get_vocabulary("default")          SentencePiece, 2048 pieces, trained on
                                     the corpus on first use and cached
  get_vocabulary("byte")             UTF-8 bytes + 3 (PAD 0, EOS 1, UNK 2)
  get_vocabulary("sentencepiece:P")  any SentencePiece model file
  get_vocabulary("hf:DIR")           a Hugging Face checkpoint's tokenizer
                                     (hf_vocab.py)

The default model's options are chosen so that every string round-trips
exactly, which the world's tasks need (reversing 'apple' must give back
'elppa', spaces and all): identity normalisation, byte fallback for
characters outside the vocabulary, digits split into single-digit pieces.
Training is single-threaded because the unigram trainer's result depends on
the thread count, and we want the same model bytes on every machine (~5 s).
The miniature's models keep PAD 0 and EOS 1 (seqio's convention) as their
own ids; nothing else in the code assumes them. seqio vocabularies are built
from these only for seqio Tasks (seqio_vocab.py).
"""
import io
import os
import string
from typing import Optional

import sentencepiece as spm

from instructrl.data import common
from instructrl.data import corpus
from instructrl.data import hf_vocab
from instructrl.data import vocabulary

DEFAULT_VOCAB_SIZE = 2048
_TRAINER_VERSION = 2  # Bump when the options below change.
_TRAINER_OPTIONS = dict(
    model_type="unigram",
    pad_id=0,
    eos_id=1,
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


Vocabulary = vocabulary.Vocabulary
ByteVocabulary = vocabulary.ByteVocabulary
SentencePieceVocabulary = vocabulary.SentencePieceVocabulary


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


def default_size(spec: str) -> int:
  """The size of a "default" or "default:<size>" spec."""
  if ":" not in spec:
    return DEFAULT_VOCAB_SIZE
  try:
    return int(spec.split(":", 1)[1])
  except ValueError:
    raise common.DataError("vocab", f"bad size in {spec!r}") from None


def get_vocabulary(spec: str = "default",
                   cache_dir: Optional[str] = None) -> Vocabulary:
  """A vocabulary from its spec (module docstring); no TensorFlow.

  Args:
    spec: "default", "default:<size>", "byte", "sentencepiece:/path/to/model"
      or "hf:/path/to/checkpoint_dir".
    cache_dir: where the default model is cached; None means
      $INSTRUCTRL_CACHE or ~/.cache/instructrl.

  Raises:
    DataError: unknown spec, missing or unreadable model, no EOS.
  """
  if spec == "byte":
    return ByteVocabulary()
  if spec == "default" or spec.startswith("default:"):
    return SentencePieceVocabulary(train_default_model(default_size(spec),
                                                       cache_dir))
  if spec.startswith("sentencepiece:"):
    path = os.path.expanduser(spec.split(":", 1)[1])
    if not os.path.isfile(path):
      raise common.DataError(path, "no such SentencePiece model file")
    return SentencePieceVocabulary(path)
  if spec.startswith("hf:"):
    return hf_vocab.load(os.path.expanduser(spec.split(":", 1)[1]))
  raise common.DataError(
      "vocab", f"unknown vocabulary {spec!r}; use 'default', 'default:<size>', "
      "'byte', 'sentencepiece:/path' or 'hf:/checkpoint/dir'")


def vocab_fingerprint(vocab: Vocabulary) -> str:
  """Identifies a vocabulary's token mapping (for caches and states)."""
  return vocab.fingerprint or f"{type(vocab).__name__}-{vocab.vocab_size}"


def encode_batch(vocab: Vocabulary, texts: list[str]) -> list[list[int]]:
  """vocab.encode over many strings (the batch call where there is one)."""
  return vocab.encode_batch(texts)
