"""The vocabulary interface, and the byte and SentencePiece vocabularies.

Every user of token ids takes the special ones from a `Vocabulary`, never
from a constant: `eos_ids` (generation stops on any of them; the first is
the one appended to training sequences), `pad_id`, `bos_id` and `add_bos`
(whether sequences start with BOS, as the tokenizer's post-processor does).
Pure Python plus `sentencepiece`: no TensorFlow. `vocab.get_vocabulary`
builds these from a spec; `hf_vocab` adds a checkpoint's `tokenizer.json`.
"""
import hashlib
import logging
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from instructrl.data import common


class Vocabulary:
  """What the data layer and the stages need of a tokenizer.

  Attributes (set by subclasses):
    vocab_size: ids are in [0, vocab_size).
    eos_ids: the end-of-sequence ids; generation stops on any of them, and
      `eos_ids[0]` (`eos_id`) ends every training sequence.
    pad_id: fills padding (always masked; may equal an EOS id).
    bos_id: the begin-of-sequence id, or None.
    add_bos: sequences (documents, prompts) start with `bos_id`.
    unk_id: what out-of-range ids decode as, or None.
    chat_template: the tokenizer's Jinja chat template, or None.
    special_tokens: token strings a chat template refers to ("bos_token", ...).
    fingerprint: identifies the token mapping (for caches and states).
  """
  vocab_size: int
  eos_ids: tuple[int, ...]
  pad_id: int
  bos_id: Optional[int] = None
  add_bos: bool = False
  unk_id: Optional[int] = None
  chat_template: Optional[str] = None
  special_tokens: Optional[dict] = None
  fingerprint: str = ""

  @property
  def eos_id(self) -> int:
    return self.eos_ids[0]

  @property
  def prefix(self) -> list[int]:
    """The ids a sequence starts with: [bos_id] if add_bos, else []."""
    return [self.bos_id] if self.add_bos else []

  def encode(self, text: str) -> list[int]:
    """The text's ids, no special tokens added."""
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids` up to the first EOS; special tokens dropped."""
    clean = []
    for i in ids:
      i = int(i)
      if i in self.eos_ids:
        break
      if not 0 <= i < self.vocab_size:
        if self.unk_id is None:
          continue
        i = self.unk_id
      clean.append(i)
    return self._decode(clean)

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def __repr__(self):
    return (f"{type(self).__name__}(size={self.vocab_size}, eos={self.eos_ids}, "
            f"pad={self.pad_id}, bos={self.bos_id}, add_bos={self.add_bos})")


class ByteVocabulary(Vocabulary):
  """UTF-8 bytes shifted by 3 (ByT5's and seqio's byte vocabulary)."""
  vocab_size = 259
  eos_ids = (1,)
  pad_id = 0
  unk_id = 2
  fingerprint = "ByteVocabulary-259"

  def encode(self, text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]

  def _decode(self, ids: list[int]) -> str:
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "ignore")


class SentencePieceVocabulary(Vocabulary):
  """A SentencePiece model, through the `sentencepiece` library directly.

  The special ids are the model's own unless given (a checkpoint's configs
  may name other EOS ids, or a PAD the model lacks); a model without PAD
  pads with its EOS.
  """

  def __init__(self, path: str, *, eos_ids: Sequence[int] = (),
               pad_id: Optional[int] = None, bos_id: Optional[int] = None,
               add_bos: bool = False):
    with open(path, "rb") as f:
      self.model_bytes = f.read()
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(self.model_bytes)
    except Exception as e:  # The protobuf parser's errors vary by version.
      raise common.DataError(path, f"not a SentencePiece model ({e})") from None
    self.vocab_size = self.sp.GetPieceSize()
    own_eos = self.sp.eos_id()
    self.eos_ids = tuple(eos_ids) or ((own_eos,) if own_eos >= 0 else ())
    if not self.eos_ids:
      raise common.DataError(path, "the SentencePiece model has no EOS id; "
                             "train it with --eos_id=N")
    if pad_id is None:
      pad_id = self.sp.pad_id()
      if pad_id < 0:
        pad_id = self.eos_ids[0]
        logging.info("%s has no PAD; padding with EOS (id %d)", path, pad_id)
    self.pad_id = pad_id
    own_bos = self.sp.bos_id()
    self.bos_id = bos_id if bos_id is not None else (own_bos if own_bos >= 0 else None)
    self.add_bos = bool(add_bos and self.bos_id is not None)
    self.unk_id = self.sp.unk_id()
    self.fingerprint = "spm-" + hashlib.sha256(self.model_bytes).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self.sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts), out_type=int)  # One C++ call.

  def _decode(self, ids: list[int]) -> str:
    return self.sp.DecodeIds(ids)
