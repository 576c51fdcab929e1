"""Vocabularies and the pretraining corpus."""
import io
import os
import sys

import pytest

import sentencepiece as spm

from instructrl.data import common
from instructrl.data import corpus
from instructrl.data import vocab as vocab_lib
from instructrl.data import world


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """One cache per test session: the corpus and model are built once."""
  path = tmp_path_factory.getbasetemp() / "instructrl_cache"
  old = os.environ.get("INSTRUCTRL_CACHE")
  os.environ["INSTRUCTRL_CACHE"] = str(path)
  yield str(path)
  if old is None:
    del os.environ["INSTRUCTRL_CACHE"]
  else:
    os.environ["INSTRUCTRL_CACHE"] = old


@pytest.fixture(scope="module")
def default_vocab(cache_dir):
  return vocab_lib.get_vocabulary("default", cache_dir)


def test_default_vocab_ids_and_cache(default_vocab, cache_dir):
  # The miniature's own ids (seqio's convention), read from the model.
  assert (default_vocab.pad_id, default_vocab.eos_ids) == (0, (1,))
  assert (default_vocab.bos_id, default_vocab.add_bos) == (None, False)
  assert default_vocab.vocab_size == vocab_lib.DEFAULT_VOCAB_SIZE
  path = vocab_lib.default_model_path(cache_dir=cache_dir)
  assert os.path.isfile(path)
  mtime = os.path.getmtime(path)
  again = vocab_lib.get_vocabulary("default")  # From $INSTRUCTRL_CACHE.
  assert os.path.getmtime(path) == mtime
  assert again.model_bytes == default_vocab.model_bytes
  assert not [f for f in os.listdir(cache_dir) if f.startswith(".tmp")]


def test_training_is_deterministic(cache_dir):
  path = vocab_lib.train_default_model(512, cache_dir)
  first = open(path, "rb").read()
  os.remove(path)
  assert open(vocab_lib.train_default_model(512, cache_dir), "rb").read() == (
      first)
  with pytest.raises(common.DataError, match="cannot train the vocabulary"):
    vocab_lib.get_vocabulary("default:100", cache_dir)


def test_digits_are_single_pieces(default_vocab):
  pieces = [default_vocab.sp.id_to_piece(i)
            for i in default_vocab.encode("In 2024 we had 1234567 files.")]
  digits = [p.lstrip("\u2581") for p in pieces if any(c.isdigit() for c in p)]
  assert digits == list("2024") + list("1234567")


SPECIAL = ["elppa", "  two  spaces ", "tab\there", "line\nbreak\n",
           "APPLE PIE", "[x] {y} ~`|\\ \"q\" 'a'", "café naïve 😀 漢字",
           "1, 3, 7, 9", "-12",
           "a,b;c:d!e?f(g)h*i=j+k%l#m@n$o^p&q<r>s/t_u"]


@pytest.mark.parametrize("spec", ["default", "byte"])
def test_round_trips(spec, cache_dir):
  vocab = vocab_lib.get_vocabulary(spec, cache_dir)
  for s in SPECIAL:
    assert vocab.decode(vocab.encode(s)) == s, s


@pytest.mark.parametrize("spec", ["default", "byte"])
def test_every_world_string_round_trips(spec, cache_dir):
  """References, prompts and comparison responses of every family."""
  vocab = vocab_lib.get_vocabulary(spec, cache_dir)
  w = world.World(world.WorldConfig(sft=600, rm=300, ppo=300))
  strings = []
  families = set()
  for split in ("train", "validation", "test"):
    for kind in world.KINDS:
      for p in w.prompts(kind, split):
        strings += [p.text, p.reference]
        families.add(p.family)
    strings += [r for c in w.comparisons(split) for r in c.completions]
  assert families == set(world.FAMILIES)
  ids = vocab_lib.encode_batch(vocab, strings)
  bad = [s for s, i in zip(strings, ids) if vocab.decode(i) != s]
  assert not bad, bad[:5]
  specials = set(vocab.eos_ids) | {vocab.pad_id}
  assert all(not specials & set(i) for i in ids)


def test_encode_batch_matches_encode(default_vocab):
  assert vocab_lib.encode_batch(default_vocab, SPECIAL) == [
      list(default_vocab.encode(s)) for s in SPECIAL]


def test_sentencepiece_model_by_path(default_vocab, cache_dir, tmp_path):
  path = vocab_lib.default_model_path(cache_dir=cache_dir)
  v = vocab_lib.get_vocabulary(f"sentencepiece:{path}")
  assert isinstance(v, vocab_lib.SentencePieceVocabulary)
  assert v.encode("Reverse 'apple'.") == default_vocab.encode(
      "Reverse 'apple'.")
  with pytest.raises(common.DataError, match="no such SentencePiece model"):
    vocab_lib.get_vocabulary(f"sentencepiece:{tmp_path}/missing.model")
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(common.DataError, match="not a SentencePiece model"):
    vocab_lib.get_vocabulary(f"sentencepiece:{junk}")


def _spm(tmp_path, name, **options):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["hello world", "good morning"] * 50),
      model_writer=model, vocab_size=15, minloglevel=2, **options)
  path = tmp_path / name
  path.write_bytes(model.getvalue())
  return str(path)


def test_sentencepiece_model_keeps_its_own_ids(tmp_path, caplog):
  # SentencePiece's defaults: unk 0, bos 1, eos 2, no PAD (pads with EOS).
  caplog.set_level("INFO")
  v = vocab_lib.get_vocabulary(f"sentencepiece:{_spm(tmp_path, 'a.model')}")
  assert (v.eos_ids, v.pad_id, v.bos_id, v.add_bos) == ((2,), 2, 1, False)
  assert "no PAD; padding with EOS (id 2)" in caplog.text
  ids = v.encode("hello world")
  assert v.decode(ids + [2] + ids) == "hello world"  # Stops at its EOS.
  with pytest.raises(common.DataError, match="has no EOS id"):
    vocab_lib.get_vocabulary(
        f"sentencepiece:{_spm(tmp_path, 'b.model', eos_id=-1)}")


def test_same_ids_as_seqio(default_vocab, cache_dir):
  """Our TF-free vocabularies encode and decode as seqio's did (the
  miniature's data is unchanged): every world string, and ids past EOS,
  out of range or special."""
  import seqio  # pylint: disable=g-import-not-at-top
  ours = {"default": default_vocab, "byte": vocab_lib.get_vocabulary("byte")}
  theirs = {"default": seqio.SentencePieceVocabulary(
      vocab_lib.default_model_path(cache_dir=cache_dir)),
            "byte": seqio.ByteVocabulary()}
  w = world.World(world.WorldConfig(sft=100, rm=50, ppo=50))
  strings = SPECIAL + [p.text for p in w.prompts("sft", "train")] + [
      r for c in w.comparisons("train") for r in c.completions]
  for name in ours:
    a, b = ours[name], theirs[name]
    assert (a.vocab_size, a.eos_id, a.pad_id, a.unk_id) == (
        b.vocab_size, b.eos_id, b.pad_id, b.unk_id)
    ids = a.encode_batch(strings)
    assert ids == [list(b.encode(s)) for s in strings]
    for i in ids[:50]:
      tail = [0, 2, 1, 5, a.vocab_size + 3]
      assert a.decode(i + tail) == b.decode(i + tail)
      assert a.decode([0, 2] + i) == b.decode([0, 2] + i)


def test_unknown_vocab_spec():
  with pytest.raises(common.DataError, match="unknown vocabulary"):
    vocab_lib.get_vocabulary("wordpiece")
  with pytest.raises(common.DataError, match="bad size"):
    vocab_lib.get_vocabulary("default:big")


def test_lazy_vocabulary_uses_the_cache_at_first_use(default_vocab):
  from instructrl.data import seqio_vocab  # pylint: disable=g-import-not-at-top
  lazy = seqio_vocab.LazyDefaultVocabulary()
  assert lazy.encode("hello") == default_vocab.encode("hello")


def test_corpus_is_split_deterministically_without_imports(cache_dir):
  before = set(sys.modules)
  built = corpus.build()
  new = set(sys.modules) - before
  assert not new & {"antigravity", "this", "tkinter", "turtle", "idlelib"}
  assert corpus.load(cache_dir) == built  # Same as the cached copy.
  train, held = built["train"], built["validation"]
  assert not set(train) & set(held)
  assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
  assert sum(map(len, train)) > 1_000_000
  assert all(len(d) >= 100 and ">>>" not in d for d in train + held)
  docs = corpus.documents("validation", cache_dir)
  assert docs[0].text == held[0] and docs[0].where == "corpus:validation:0"
  with pytest.raises(ValueError):
    corpus.documents("test", cache_dir)
