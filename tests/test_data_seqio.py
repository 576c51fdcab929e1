"""seqio Tasks/Mixtures and TFDS datasets (a local one; nothing downloaded)."""
import dataclasses
import importlib
import os

import numpy as np
import pytest

import seqio  # The data extras are required: pip install .[data]
import tensorflow as tf
import tensorflow_datasets as tfds

from instructrl.data import common
from instructrl.data import pipeline
from instructrl.data import tasks
from instructrl.data import vocab as vocab_lib

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  """The default vocabulary, trained once per session in a shared tmp dir."""
  path = str(tmp_path_factory.getbasetemp() / "instructrl_cache")
  old = os.environ.get("INSTRUCTRL_CACHE")
  os.environ["INSTRUCTRL_CACHE"] = path
  yield vocab_lib.get_vocabulary("default")
  if old is None:
    del os.environ["INSTRUCTRL_CACHE"]
  else:
    os.environ["INSTRUCTRL_CACHE"] = old


class TinyInstructions(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset with its own feature names, built from memory."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    text = tfds.features.Text
    features = tfds.features.FeaturesDict({
        "question": text(), "answer": text(), "body": text(),
        "completions": tfds.features.Sequence(text()),
        "ranks": tfds.features.Sequence(tf.int32),
    })
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples(6),
            "validation": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      ranks = [0, 1, 2] if i else [1, 1, 1]  # Example 0 is all ties: bad.
      yield i, {"question": f"Reverse 'ab{i}'.", "answer": f"{i}ba",
                "body": f"Document number {i}.",
                "completions": [f"{i}ba", "ab", "no"], "ranks": ranks}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyInstructions(data_dir=data_dir).download_and_prepare()
  return data_dir


TFDS = "tfds:tiny_instructions:1.0.0"


def test_default_tasks_and_mixture_are_registered():
  names = set(seqio.TaskRegistry.names())
  assert set(tasks.TASK_NAMES.values()) <= names
  assert tasks.PTX_MIXTURE in seqio.MixtureRegistry.names()
  # Idempotent: calling again or re-importing changes nothing.
  assert tasks.register_defaults()["sft"] == "instructrl_world_sft"
  importlib.reload(tasks)
  assert set(seqio.TaskRegistry.names()) == names


def test_sft_task_matches_the_pipeline(vocab):
  task = seqio.get_mixture_or_task("instructrl_world_sft")
  ds = task.get_dataset(sequence_length=None, split="validation",
                        shuffle=False)
  it = pipeline.make_iterator(
      "sft", "world", "validation", seq_len=128,
      batching=pipeline.Batching(batch_size=5, shuffle=False),
      read=pipeline.ReadOptions(vocab=vocab))
  batch = next(it)
  for row, ex in enumerate(ds.take(5).as_numpy_iterator()):
    seq = np.concatenate([ex["inputs"], ex["targets"]])
    assert seq[-1] == vocab.eos_id
    n = len(seq) - 1
    np.testing.assert_array_equal(batch["tokens"][row, :n], seq[:-1])
    np.testing.assert_array_equal(batch["targets"][row, :n], seq[1:])


def test_rm_task_matches_the_pipeline(vocab):
  task = seqio.get_mixture_or_task("instructrl_world_rm")
  ex = next(task.get_dataset(sequence_length=None, split="test",
                             shuffle=False).as_numpy_iterator())
  batch = next(pipeline.make_iterator(
      "rm", "world", "test", seq_len=128,
      batching=pipeline.Batching(batch_size=1, shuffle=False),
      read=pipeline.ReadOptions(vocab=vocab)))
  k = len(ex["ranks"])
  np.testing.assert_array_equal(batch["ranks"][0, :k], ex["ranks"])
  p = len(ex["inputs"])
  for j in range(k):
    completion = ex["targets"][j][ex["targets"][j] > 0]
    row = batch["tokens"][0, j]
    np.testing.assert_array_equal(row[:p], ex["inputs"])
    np.testing.assert_array_equal(row[p:p + len(completion)], completion)


def test_t5x_style_feature_converters(vocab):
  # `vocab` also makes sure the default model is in the test cache.
  ds = seqio.get_dataset(
      "instructrl_corpus", task_feature_lengths={"targets": 64},
      dataset_split="validation", shuffle=False,
      feature_converter=seqio.LMFeatureConverter(pack=True))
  ex = next(ds.as_numpy_iterator())
  assert ex["decoder_target_tokens"].shape == (64,)
  assert ex["decoder_segment_ids"].max() >= 1
  ds = seqio.get_dataset(
      tasks.PTX_MIXTURE, task_feature_lengths={"inputs": 64, "targets": 64},
      dataset_split="train", shuffle=True, seed=0,
      feature_converter=seqio.PrefixLMFeatureConverter(pack=False))
  ex = next(ds.as_numpy_iterator())
  assert ex["decoder_loss_weights"].sum() > 0
  prompts = seqio.get_mixture_or_task("instructrl_world_prompts")
  ex = next(prompts.get_dataset(None, split="test",
                                shuffle=False).as_numpy_iterator())
  assert vocab.eos_id not in ex["inputs"]


def test_tfds_through_the_pipeline(vocab, tfds_dir):
  def batching(batch_size):
    return pipeline.Batching(batch_size=batch_size, shuffle=False,
                             infinite=False)

  def read(fields):
    return pipeline.ReadOptions(vocab=vocab, tfds_data_dir=tfds_dir,
                                fields=fields)

  sft = pipeline.make_iterator(
      "sft", TFDS, seq_len=32, batching=batching(6),
      read=read({"prompt": "question", "completion": "answer"}))
  b = next(sft)
  texts = {vocab.decode(t[s > 0]) for t, s in zip(b["tokens"],
                                                   b["segment_ids"])}
  assert texts == {f"Reverse 'ab{i}'. {i}ba" for i in range(6)}
  lm = pipeline.make_iterator("lm", TFDS, "validation", seq_len=64,
                              batching=batching(2), read=read({"text": "body"}))
  assert lm.info["examples"] == 1 and lm.info["records"] == 2
  prompts = pipeline.get_prompts(TFDS, "train", tfds_data_dir=tfds_dir,
                                 fields={"prompt": "question"})
  assert sorted(prompts) == [f"Reverse 'ab{i}'." for i in range(6)]


def test_tfds_bad_records_and_missing_datasets(vocab, tfds_dir):
  read = pipeline.ReadOptions(vocab=vocab, tfds_data_dir=tfds_dir,
                              fields={"prompt": "question"})
  args = dict(seq_len=32, batching=pipeline.Batching(batch_size=2))
  with pytest.raises(common.DataError, match=r"tfds:tiny_instructions:1.0.0:"
                     r"train:\d+: all completions are tied"):
    pipeline.make_iterator("rm", TFDS, read=read, **args)
  it = pipeline.make_iterator(
      "rm", TFDS, read=dataclasses.replace(read, on_error="skip"), **args)
  assert it.info["skipped"] == 1 and it.num_examples == 5
  with pytest.raises(common.DataError, match="cannot read split"):
    pipeline.make_iterator("sft", "tfds:no_such_dataset:1.0.0", read=read,
                           **args)


def test_tfds_task_registration(tfds_dir):
  kw = dict(vocab="byte", tfds_data_dir=tfds_dir,
            fields={"prompt": "question", "completion": "answer"})
  name = tasks.register_task("sft", TFDS, **kw)
  assert tasks.register_task("sft", TFDS, **kw) == name  # Idempotent.
  ex = next(seqio.get_mixture_or_task(name).get_dataset(
      None, split="validation", shuffle=False).as_numpy_iterator())
  assert bytes((ex["targets"][:-1] - 3).tolist()).decode().endswith("ba")
  assert ex["targets"][-1] == 1  # The byte vocabulary's EOS.
  rm = tasks.register_task("rm", TFDS, vocab="byte", tfds_data_dir=tfds_dir,
                           fields={"prompt": "question"})
  ex = next(seqio.get_mixture_or_task(rm).get_dataset(
      None, split="validation", shuffle=False).as_numpy_iterator())
  assert ex["targets"].shape[0] == 3 and ex["ranks"].tolist() in (
      [0, 1, 2], [1, 1, 1])


def test_jsonl_task_registration(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "Say hi."}\n{"prompt": "Say bye."}\n')
  name = tasks.register_task("prompts", f"jsonl:{path}", vocab="byte")
  got = [bytes((ex["inputs"] - 3).tolist()).decode() for ex in
         seqio.get_mixture_or_task(name).get_dataset(
             None, split="train", shuffle=False).as_numpy_iterator()]
  assert got == ["Say hi.", "Say bye."]
