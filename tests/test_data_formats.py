"""The data formats researchers already have (TRL's), JSONL and Parquet,
and the miniature's tables pinned to what they were before vocabularies
carried their own special ids."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrl.data import common
from instructrl.data import jsonl
from instructrl.data import packing
from instructrl.data import pipeline
from instructrl.data import vocab as vocab_lib

BYTE = pipeline.ReadOptions(vocab="byte")
WORLD = dict(sft=64, rm=32, ppo=32, validation=16, test=16)  # default.py:tiny.


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _table(kind, path, seq_len=64, read=BYTE, scheme="jsonl", **kw):
  return pipeline.make_table(kind, f"{scheme}:{path}", seq_len=seq_len,
                             read=read, **kw)


def _error(kind, rows, tmp_path):
  path = _write(tmp_path / "bad.jsonl", [rows[0], rows[1]])
  with pytest.raises(common.DataError) as info:
    jsonl.read_jsonl(kind, path)
  msg = str(info.value)
  assert msg.startswith(f"{path}:2: ") and "\n" not in msg, msg
  return msg[len(f"{path}:2: "):]


def test_miniature_tables_are_pinned():
  """Computed before the change (seqio vocabularies, PAD/EOS constants); the
  tiny pipeline's data must stay byte-identical."""
  pins = {("sft", "train"): "62b4c0843c934a62", ("sft", "test"): "b5437e30e95dd645",
          ("rm", "train"): "af1680fcb2728b2d", ("rm", "test"): "f34fd558e0ea3038",
          ("prompts", "train"): "97f9db4535c08149",
          ("prompts", "test"): "3c10ec3e38d8cebe"}
  seq = {"sft": 128, "rm": 192, "prompts": 144}
  read = pipeline.ReadOptions(vocab="byte", world=WORLD)
  for (kind, split), want in pins.items():
    _, info = pipeline.make_table(kind, "world", split, seq_len=seq[kind], read=read)
    assert info["fingerprint"] == want, (kind, split)


def test_text_lm_table_is_pinned(tmp_path):
  path = tmp_path / "docs.txt"
  path.write_text("First document,\nwith two lines.\n\nSecond: caf\u00e9 "
                  "\U0001F600.\n\n" + "x y z " * 40 + "\n")
  _, info = pipeline.make_table("lm", f"text:{path}", seq_len=16, read=BYTE)
  assert info["fingerprint"] == "a7e8247161ac09b4"


def test_sft_formats(tmp_path):
  pc = _table("sft", _write(tmp_path / "pc.jsonl", [
      {"prompt": "Say hi.", "completion": " hi"}]))[0]
  chat = _table("sft", _write(tmp_path / "m.jsonl", [{"messages": [
      {"role": "user", "content": "Say hi."},
      {"role": "assistant", "content": " hi"}]}]))[0]
  trl = _table("sft", _write(tmp_path / "c.jsonl", [{
      "prompt": [{"role": "user", "content": "Say hi."}],
      "completion": [{"role": "assistant", "content": " hi"}]}]))[0]
  for t in (chat, trl):  # One exchange, plainly rendered: the same row.
    for key in pc:
      np.testing.assert_array_equal(t[key], pc[key])
  text = _table("sft", _write(tmp_path / "t.jsonl", [{"text": "abc"}]))[0]
  np.testing.assert_array_equal(text["tokens"][0, :3], [100, 101, 102])
  np.testing.assert_array_equal(text["targets"][0, :3], [101, 102, 1])
  np.testing.assert_array_equal(text["loss_mask"][0, :4], [1, 1, 1, 0])


def test_messages_train_on_assistant_turns_only(tmp_path):
  turns = [("system", "S"), ("user", "ab"), ("assistant", "cd"), ("user", "e"),
           ("assistant", "fg")]
  t, _ = _table("sft", _write(tmp_path / "m.jsonl", [{"messages": [
      {"role": r, "content": c} for r, c in turns]}]))
  # Plain rendering: S a b c d EOS e f g EOS; loss on c d EOS and f g EOS.
  v, seq, learned = vocab_lib.ByteVocabulary(), [], []
  for role, content in turns:
    part = v.encode(content) + ([v.eos_id] if role == "assistant" else [])
    seq += part
    learned += [role == "assistant"] * len(part)
  n = len(seq) - 1
  np.testing.assert_array_equal(t["tokens"][0, :n], seq[:-1])
  np.testing.assert_array_equal(t["targets"][0, :n], seq[1:])
  np.testing.assert_array_equal(t["loss_mask"][0, :n], learned[1:])
  assert t["loss_mask"][0].sum() == 6


def test_a_pair_is_a_two_way_ranking(tmp_path):
  """{"prompt","chosen","rejected"} is K = 2 of the K-way form, through the
  same rows (so the same Eq. 1 loss); the implicit form finds the prompt."""
  ranked = _table("rm", _write(tmp_path / "k.jsonl", [{
      "prompt": "Q: 2+2?\nA:", "completions": [" 4", " 5"], "ranks": [0, 1]}]),
      k_max=4)[0]
  pair = _table("rm", _write(tmp_path / "p.jsonl", [{
      "prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}]), k_max=4)[0]
  hh = _table("rm", _write(tmp_path / "hh.jsonl", [{
      "chosen": "Q: 2+2?\nA: 4", "rejected": "Q: 2+2?\nA: 5"}]), k_max=4)[0]
  for t in (pair, hh):
    for key in ranked:
      np.testing.assert_array_equal(t[key], ranked[key])


@pytest.mark.parametrize("chosen,rejected,want", [
    ("\n\nHuman: hi\n\nAssistant: Yes, sure.", "\n\nHuman: hi\n\nAssistant: No.",
     ("\n\nHuman: hi\n\nAssistant:", " Yes, sure.", " No.")),
    ("Q: name?\nA: yes", "Q: name?\nA: yesterday",  # A shared partial word.
     ("Q: name?\nA:", " yes", " yesterday")),
    ("Q: x\nA: the cat", "Q: x\nA: the cow",
     ("Q: x\nA: the", " cat", " cow")),
    ("Tell me.\nOK", "Tell me.\nNo", ("Tell me.\n", "OK", "No")),
])
def test_implicit_prompt_is_the_shared_prefix(chosen, rejected, want):
  assert jsonl.split_shared_prefix(chosen, rejected, "x") == want


def test_prompts_formats(tmp_path):
  t, _ = _table("prompts", _write(tmp_path / "p.jsonl", [
      {"prompt": "ab"}, {"messages": [{"role": "system", "content": "s"},
                                      {"role": "user", "content": "ab"}]}]),
      seq_len=4)
  np.testing.assert_array_equal(t["prompt_tokens"][:2], [[0, 0, 100, 101],
                                                        [0, 118, 100, 101]])
  records = jsonl.read_jsonl("prompts", str(tmp_path / "p.jsonl"))
  assert records[1].messages == (("system", "s"), ("user", "ab"))
  assert records[1].prompt == "s\n\nab"


@pytest.mark.parametrize("kind,good,bad,message", [
    ("sft", {"text": "t"}, {"question": "q"},
     'expected "prompt" and "completion", "messages", or "text"'),
    ("sft", {"text": "t"}, {"messages": "hi"}, '"messages" must be a list (got str)'),
    ("sft", {"text": "t"}, {"messages": []}, '"messages" is empty'),
    ("sft", {"text": "t"}, {"messages": [{"role": "user"}]},
     '"messages"[0] must be an object with "role" and "content"'),
    ("sft", {"text": "t"}, {"messages": [{"role": "bot", "content": "x"}]},
     '"messages"[0]["role"] must be one of system, user, assistant, tool (got \'bot\')'),
    ("sft", {"text": "t"}, {"messages": [{"role": "user", "content": "a"},
                                         {"role": "assistant", "content": 3}]},
     '"messages"[1]["content"] must be a string (got int)'),
    ("sft", {"text": "t"}, {"messages": [{"role": "user", "content": "a"},
                                         {"role": "assistant", "content": " "}]},
     '"messages"[1]["content"] is empty'),
    ("sft", {"text": "t"}, {"messages": [{"role": "user", "content": "a"}]},
     'a conversation needs an "assistant" turn'),
    ("sft", {"text": "t"}, {"text": ""}, '"text" is empty'),
    ("sft", {"text": "t"}, {"prompt": [{"role": "user", "content": "a"}],
                            "completion": "b"},
     '"completion" must be a list (got str)'),
    ("rm", {"chosen": "a b", "rejected": "a c"}, {"prompt": "p", "chosen": "x"},
     'missing field "rejected"'),
    ("rm", {"chosen": "a b", "rejected": "a c"}, {"prompt": "p", "chosen": 1,
                                                  "rejected": "r"},
     '"chosen" must be a string (got int)'),
    ("rm", {"chosen": "a b", "rejected": "a c"}, {"prompt": "p", "chosen": "x",
                                                  "rejected": "x"},
     '"chosen" and "rejected" are the same text'),
    ("rm", {"chosen": "a b", "rejected": "a c"}, {"chosen": "yes", "rejected": "no"},
     '"chosen" and "rejected" share no prompt; give it as "prompt"'),
    ("rm", {"chosen": "a b", "rejected": "a c"}, {"better": "x"},
     'expected "prompt", "completions" and "ranks", or "chosen" and "rejected"'),
    ("prompts", {"prompt": "p"}, {"messages": [{"role": "user", "content": "a"},
                                               {"role": "assistant", "content": "b"}]},
     "the conversation ends with an assistant turn"),
])
def test_each_bad_record_is_one_line(tmp_path, kind, good, bad, message):
  assert message in _error(kind, [good, bad], tmp_path)


def test_skip_counts_bad_records_of_the_new_formats(tmp_path, caplog):
  path = _write(tmp_path / "mixed.jsonl", [
      {"chosen": "Q: a\nA: x", "rejected": "Q: a\nA: y"},
      {"chosen": "same", "rejected": "same"},
      {"prompt": "p", "chosen": "x", "rejected": "y"}, {"messages": []}])
  t, info = _table("rm", path, read=pipeline.ReadOptions(vocab="byte", on_error="skip"))
  assert (info["examples"], info["skipped"]) == (2, 2)
  assert "skipped 2 bad records" in caplog.text


def test_parquet_reads_the_same_records(tmp_path):
  rows = [{"prompt": "Q: 1?", "chosen": " one", "rejected": " two"},
          {"prompt": "Q: 2?", "chosen": " two", "rejected": " three"}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
  a = _table("rm", str(tmp_path / "p.parquet"), scheme="parquet")[0]
  b = _table("rm", _write(tmp_path / "p.jsonl", rows))[0]
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  chats = [{"messages": [{"role": "user", "content": "a"},
                         {"role": "assistant", "content": "b"}]}] * 2
  pq.write_table(pa.Table.from_pylist(chats), tmp_path / "m.parquet")
  recs = jsonl.read_parquet("sft", str(tmp_path / "m.parquet"))
  assert recs[1] == common.Chat((("user", "a"), ("assistant", "b")),
                                f"{tmp_path}/m.parquet:2")
  # Nulls are missing fields; a bad row names file:row and the field.
  pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"},
                                       {"prompt": "p", "completion": None}]),
                 tmp_path / "bad.parquet")
  with pytest.raises(common.DataError, match=r"bad.parquet:2: missing field "
                     r'"completion"$'):
    jsonl.read_parquet("sft", str(tmp_path / "bad.parquet"))
  policy = common.ErrorPolicy("skip")
  assert len(jsonl.read_parquet("sft", str(tmp_path / "bad.parquet"), policy)) == 1
  assert len(policy.skipped) == 1
  (tmp_path / "junk.parquet").write_bytes(b"not parquet")
  with pytest.raises(common.DataError, match="junk.parquet: not a Parquet file"):
    jsonl.read_parquet("sft", str(tmp_path / "junk.parquet"))


def test_packing_uses_the_vocabularys_ids():
  """No id is assumed: EOS 7 ends each sequence, PAD 9 fills."""
  t = packing.sft_rows([[3, 4]], [[5]], seq_len=5, eos_id=7, pad_id=9)
  np.testing.assert_array_equal(t["tokens"], [[3, 4, 5, 9, 9], [9] * 5])
  np.testing.assert_array_equal(t["targets"], [[4, 5, 7, 9, 9], [9] * 5])
  r = packing.rm_rows([[3]], [[[4], [5, 6]]], [[0, 1]], [0], seq_len=4, k_max=2,
                      eos_id=7, pad_id=9)
  np.testing.assert_array_equal(r["tokens"][0], [[3, 4, 7, 9], [3, 5, 6, 7]])
  p = packing.prompt_rows([[3]], [0], max_len=3, pad_id=9)
  np.testing.assert_array_equal(p["prompt_tokens"], [[9, 9, 3], [9, 9, 9]])
  lm = packing.pack_lm([[3, 4]], seq_len=4, eos_id=7, pad_id=9)
  np.testing.assert_array_equal(lm["targets"][0], [4, 7, 9, 9])
