"""Batches for the trainers: exact formats, sharding and exact resume."""
import dataclasses
import json
import os

import numpy as np
import pytest

import seqio  # noqa: F401  The data extras are required: pip install .[data]

from instructrl.data import common
from instructrl.data import iterators
from instructrl.data import packing
from instructrl.data import pipeline
from instructrl.data import vocab as vocab_lib
from instructrl.data import world

SMALL_WORLD = {"sft": 300, "rm": 120, "ppo": 150, "validation": 60,
               "test": 60}


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


_BATCHING = {f.name for f in dataclasses.fields(pipeline.Batching)}
_READ = {f.name for f in dataclasses.fields(pipeline.ReadOptions)}


def _make(vocab, kind, spec="world", split="train", **kw):
  """make_iterator with Batching and ReadOptions fields given as keywords."""
  kw.setdefault("seq_len", 128 if kind != "prompts" else 96)
  kw.setdefault("batch_size", 8)
  if spec == "world":
    kw.setdefault("world", SMALL_WORLD)
  batching = pipeline.Batching(
      **{k: kw.pop(k) for k in _BATCHING & kw.keys()})
  read = pipeline.ReadOptions(
      vocab=vocab, **{k: kw.pop(k) for k in _READ & kw.keys()})
  return pipeline.make_iterator(kind, spec, split, batching=batching,
                                read=read, **kw)


def test_pack_lm_by_hand():
  t = packing.pack_lm([[5, 6, 7], [8, 9], []], seq_len=4, eos_id=1, pad_id=0)
  np.testing.assert_array_equal(t["tokens"], [[5, 6, 7, 8], [9, 0, 0, 0],
                                              [0, 0, 0, 0]])
  np.testing.assert_array_equal(t["targets"], [[6, 7, 1, 9], [1, 0, 0, 0],
                                               [0, 0, 0, 0]])
  np.testing.assert_array_equal(t["segment_ids"], [[1, 1, 1, 2], [1, 0, 0, 0],
                                                   [0, 0, 0, 0]])
  np.testing.assert_array_equal(t["positions"], [[0, 1, 2, 0], [0, 0, 0, 0],
                                                 [0, 0, 0, 0]])
  np.testing.assert_array_equal(t["loss_mask"], [[1, 1, 1, 1], [1, 0, 0, 0],
                                                 [0, 0, 0, 0]])


def test_sft_and_prompt_rows_by_hand():
  t = packing.sft_rows([[5, 6]], [[7]], seq_len=5, eos_id=1, pad_id=0)
  np.testing.assert_array_equal(t["tokens"][0], [5, 6, 7, 0, 0])
  np.testing.assert_array_equal(t["targets"][0], [6, 7, 1, 0, 0])
  np.testing.assert_array_equal(t["loss_mask"][0], [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(t["segment_ids"][0], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(t["positions"][0], [0, 1, 2, 0, 0])
  p = packing.prompt_rows([[5, 6], [7]], [0, 3], max_len=3, pad_id=0)
  np.testing.assert_array_equal(p["prompt_tokens"], [[0, 5, 6], [0, 0, 7],
                                                     [0, 0, 0]])
  np.testing.assert_array_equal(p["prompt_mask"][1], [False, False, True])
  np.testing.assert_array_equal(p["prompt_id"], [0, 3, -1])


def _check_dtypes(batch, expected):
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == expected


def test_batch_formats(vocab):
  b, t = 8, 128
  lm = {k: ((b, t), "int32") for k in ("tokens", "targets", "segment_ids",
                                       "positions")}
  lm["loss_mask"] = ((b, t), "float32")
  _check_dtypes(next(_make(vocab, "sft")), lm)
  _check_dtypes(next(_make(vocab, "lm", "corpus")), lm)
  k = pipeline.K_MAX
  _check_dtypes(next(_make(vocab, "rm")), {
      "tokens": ((b, k, t), "int32"), "segment_ids": ((b, k, t), "int32"),
      "positions": ((b, k, t), "int32"), "ranks": ((b, k), "int32"),
      "valid": ((b, k), "bool"), "group": ((b,), "int32")})
  _check_dtypes(next(_make(vocab, "prompts", split="test")), {
      "prompt_tokens": ((b, 96), "int32"), "prompt_mask": ((b, 96), "bool"),
      "prompt_id": ((b,), "int32")})


def test_sft_rows_are_prompt_completion_eos(vocab):
  it = _make(vocab, "sft", shuffle=False, infinite=False, batch_size=50)
  demos = pipeline.sources.load_records("sft", "world", "train",
                                        world=SMALL_WORLD)
  batch = next(it)
  for row, demo in enumerate(demos[:50]):
    seg = batch["segment_ids"][row] > 0
    tokens, targets = batch["tokens"][row][seg], batch["targets"][row][seg]
    np.testing.assert_array_equal(tokens[1:], targets[:-1])  # Shifted by one.
    assert targets[-1] == vocab.eos_id
    assert vocab.decode(tokens) == demo.prompt + " " + demo.completion
    answer = batch["targets"][row][batch["loss_mask"][row] > 0]
    assert vocab.decode(answer[:-1]) == demo.completion
    assert batch["loss_mask"][row].sum() == len(vocab.encode(
        demo.completion)) + 1


def test_lm_rows_follow_documents(vocab):
  it = _make(vocab, "lm", "corpus", split="validation", shuffle=False,
             infinite=False, batch_size=4)
  b = next(it)
  seg, pos = b["segment_ids"], b["positions"]
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  np.testing.assert_array_equal(b["tokens"][:, 1:][same],
                                b["targets"][:, :-1][same])
  np.testing.assert_array_equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
  assert np.all(pos[:, 0] == 0) and np.all(seg[:, 0] == 1)
  np.testing.assert_array_equal(b["loss_mask"] > 0, seg > 0)
  assert it.info["tokens"] > 30_000


def test_rm_rows_and_group_filter(vocab):
  it = _make(vocab, "rm", groups=[0, 1, 2, 3])
  seen = set()
  for _ in range(5):
    b = next(it)
    seen |= set(b["group"].tolist())
    k = b["valid"].sum(axis=1)
    assert np.all((k >= 4) & (k <= 9))
    for r in range(len(k)):
      assert sorted(b["ranks"][r, :k[r]].tolist()) == list(range(k[r]))
      ends = b["segment_ids"][r, :k[r]].sum(axis=1) - 1
      assert np.all(b["tokens"][r, np.arange(k[r]), ends] == vocab.eos_id)
    assert not b["tokens"][~b["valid"]].any()
  assert seen <= {0, 1, 2, 3}
  held_out = _make(vocab, "rm", groups=[4])
  assert set(next(held_out)["group"].tolist()) == {4}


def test_prompt_ids_index_the_prompt_list(vocab):
  it = _make(vocab, "prompts", split="test", infinite=False, batch_size=16)
  prompts = pipeline.get_prompts("world", "test", world=SMALL_WORLD)
  seen = []
  for b in it:
    for row, pid in enumerate(b["prompt_id"]):
      if pid < 0:
        assert not b["prompt_mask"][row].any()
        continue
      seen.append(pid)
      toks = b["prompt_tokens"][row][b["prompt_mask"][row]]
      assert vocab.decode(toks) == prompts[pid].text
      assert b["prompt_mask"][row, -1]  # Left padded.
  assert sorted(seen) == list(range(len(prompts)))  # One pass, each once.
  assert it.step == len(it) == 4


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype
             for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("kind,spec", [("sft", "world"), ("rm", "world"),
                                       ("prompts", "world"), ("lm", "corpus")])
def test_exact_resume(vocab, kind, spec):
  """Consume n batches, save, restore into a fresh iterator: same batches."""
  it = _make(vocab, kind, spec, batch_size=32, seed=7)
  n = int(2.5 * it.num_examples / 32)  # Past two epoch boundaries.
  _batches(it, n)
  state = json.loads(json.dumps(it.get_state()))
  assert len(json.dumps(state)) < 300
  expected = _batches(it, 4)
  fresh = _make(vocab, kind, spec, batch_size=32, seed=0)  # Seed restored.
  fresh.set_state(state)
  assert fresh.step == n and fresh.epoch == n * 32 // it.num_examples >= 2
  for want, got in zip(expected, _batches(fresh, 4)):
    assert _equal(want, got)


def test_epochs_are_fresh_permutations(vocab):
  it = _make(vocab, "prompts", split="test", batch_size=12, seed=1)
  per_epoch = it.num_examples // 12  # 60 prompts: 5 batches per epoch.
  first = np.concatenate([b["prompt_id"] for b in _batches(it, per_epoch)])
  assert it.epoch == 1
  second = np.concatenate([b["prompt_id"] for b in _batches(it, per_epoch)])
  assert sorted(first) == sorted(second) == list(range(60))
  assert not np.array_equal(first, second)
  again = _make(vocab, "prompts", split="test", batch_size=12, seed=1)
  np.testing.assert_array_equal(next(again)["prompt_id"], first[:12])


def test_processes_get_their_rows_of_the_global_batch(vocab):
  whole = _make(vocab, "sft", batch_size=8, seed=3)
  parts = [_make(vocab, "sft", batch_size=8, seed=3, process_index=i,
                 process_count=4) for i in range(4)]
  for _ in range(3):
    want = next(whole)
    got = [next(p) for p in parts]
    assert got[0]["tokens"].shape == (2, 128)
    for k in want:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]),
                                    want[k])
  with pytest.raises(ValueError, match="multiple of process_count"):
    _make(vocab, "sft", batch_size=6, process_count=4)


def test_state_for_other_data_is_refused(vocab):
  state = _make(vocab, "sft", batch_size=8).get_state()
  other = _make(vocab, "sft", batch_size=8, world=dict(SMALL_WORLD, seed=1))
  with pytest.raises(common.DataError, match="saved for other data"):
    other.set_state(state)


def test_iterator_on_a_tiny_table():
  table = packing.prompt_rows([[3], [4], [5]], [0, 1, 2], max_len=2, pad_id=0)
  it = iterators.BatchIterator(table, batch_size=4, seed=0)  # B > N.
  ids = np.concatenate([next(it)["prompt_id"] for _ in range(3)])
  assert sorted(ids.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
  one = iterators.BatchIterator(table, batch_size=2, infinite=False,
                                shuffle=False)
  assert [b["prompt_id"].tolist() for b in one] == [[0, 1], [2, -1]]


def test_policy_samples_are_ranked_and_batched(vocab):
  prompts = pipeline.get_prompts("world", "train", world=SMALL_WORLD)[:6]
  samples = [[p.reference, p.reference + " I hope this helps.", "no"]
             for p in prompts]
  comps = world.label_comparisons(prompts, samples, seed=0, groups=[0, 1])
  assert comps == world.label_comparisons(prompts, samples, seed=0,
                                          groups=[0, 1])
  assert {c.group for c in comps} <= {0, 1}
  it = pipeline.iterator_from_records(
      "rm", comps, seq_len=128, batching=pipeline.Batching(batch_size=2),
      vocab=vocab)
  b = next(it)
  assert b["valid"].sum(axis=1).tolist() == [3, 3]
  assert it.get_state()["fingerprint"] == it.fingerprint
