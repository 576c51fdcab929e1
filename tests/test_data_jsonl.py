"""Own data: the JSONL / text formats and one clear error per bad input."""
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

from instructrl.data import common
from instructrl.data import jsonl
from instructrl.data import pipeline
from instructrl.data import sources


def _write(path, lines):
  """Writes JSON objects (or raw str/bytes lines) one per line."""
  data = b""
  for line in lines:
    if isinstance(line, bytes):
      data += line + b"\n"
    elif isinstance(line, str):
      data += line.encode() + b"\n"
    else:
      data += json.dumps(line).encode() + b"\n"
  path.write_bytes(data)
  return str(path)


def _error(kind, path, **kw):
  with pytest.raises(common.DataError) as info:
    jsonl.read_jsonl(kind, path, **kw)
  msg = str(info.value)
  assert "\n" not in msg
  return msg


GOOD = {"prompt": "Say hi.", "completions": ["hi", "hello there", "no"],
        "ranks": [0, 1, 1], "group": 2}


def test_reads_each_format(tmp_path):
  demos = _write(tmp_path / "d.jsonl", [
      {"prompt": "Reverse 'ab'.", "completion": "ba", "extra": 1}, "",
      {"prompt": "Say 'é'.", "completion": "é"}])
  got = jsonl.read_jsonl("sft", demos)
  assert [(d.prompt, d.completion) for d in got] == [("Reverse 'ab'.", "ba"),
                                                     ("Say 'é'.", "é")]
  assert got[1].where == f"{demos}:3"
  comps = jsonl.read_jsonl("rm", _write(tmp_path / "c.jsonl", [
      GOOD, {"prompt": "p", "completions": ["a", "b"], "ranks": [2, 1]}]))
  assert comps[0].ranks == (0, 1, 1) and comps[0].group == 2
  assert comps[1].group == 0  # Optional.
  prompts = jsonl.read_jsonl("prompts", _write(tmp_path / "p.jsonl", [
      {"prompt": "a"}, {"prompt": "b"}]))
  assert [p.prompt for p in prompts] == ["a", "b"]
  docs = jsonl.read_jsonl("lm", _write(tmp_path / "t.jsonl", [{"text": "x y"}]))
  assert docs[0].text == "x y"


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("First doc,\nline two.\n\n\nSecond doc.\n")
  docs = jsonl.read_text(str(path))
  assert [d.text for d in docs] == ["First doc,\nline two.", "Second doc."]
  assert docs[1].where == f"{path}:5"


def test_split_placeholder_and_globs(tmp_path):
  _write(tmp_path / "sft_train.jsonl", [{"prompt": "a", "completion": "b"}])
  _write(tmp_path / "sft_test.jsonl", [{"prompt": "c", "completion": "d"}] * 2)
  spec = f"jsonl:{tmp_path}/sft_{{split}}.jsonl"
  assert len(sources.load_records("sft", spec, "train")) == 1
  assert len(sources.load_records("sft", spec, "test")) == 2
  assert len(sources.load_records("sft", f"jsonl:{tmp_path}/sft_*.jsonl",
                                  "train")) == 3


@pytest.mark.parametrize("kind,line,message", [
    ("sft", '{"prompt": "a", "completion": ', "malformed JSON"),
    ("sft", '["prompt", "completion"]', "expected a JSON object, got list"),
    ("sft", {"prompt": "a"}, 'missing field "completion"'),
    ("sft", {"prompt": "a", "completion": 3},
     '"completion" must be a string (got int)'),
    ("sft", {"prompt": "a", "completion": ""}, '"completion" is empty'),
    ("sft", {"prompt": " ", "completion": "b"}, '"prompt" is empty'),
    ("rm", {"prompt": "a", "completions": ["x"], "ranks": [0]},
     "comparisons need K >= 2 completions (got 1)"),
    ("rm", {"prompt": "a", "completions": ["x", "y", "z", "w"],
            "ranks": [0, 1, 2]},
     'comparisons need "ranks" of the same length as "completions" '
     "(got 3 and 4)"),
    ("rm", {"prompt": "a", "completions": ["x", "y", "z"], "ranks": [1, 1, 1]},
     "all completions are tied"),
    ("rm", {"prompt": "a", "completions": ["x", ""], "ranks": [0, 1]},
     '"completions"[1] is empty'),
    ("rm", {"prompt": "a", "completions": ["x", "y"], "ranks": [0, "1"]},
     '"ranks"[1] must be an integer (got str)'),
    ("rm", {"prompt": "a", "completions": ["x", "y"], "ranks": [0, True]},
     '"ranks"[1] must be an integer (got bool)'),
    ("rm", {"prompt": "a", "completions": "xy", "ranks": [0, 1]},
     '"completions" must be a list (got str)'),
    ("rm", {"prompt": "a", "completions": ["x", "y"], "ranks": [0, 1],
            "group": -1}, '"group" must be a non-negative integer'),
    ("prompts", {"text": "a"}, 'missing field "prompt"'),
    ("lm", {"prompt": "a"}, 'missing field "text"'),
])
def test_each_bad_line_is_one_clear_error(tmp_path, kind, line, message):
  good = {"sft": {"prompt": "p", "completion": "c"}, "rm": GOOD,
          "prompts": {"prompt": "p"}, "lm": {"text": "t"}}[kind]
  path = _write(tmp_path / "data.jsonl", [good, good, line, good])
  msg = _error(kind, path)
  assert msg.startswith(f"{path}:3: "), msg
  assert message in msg


def test_the_exact_message_of_the_spec(tmp_path):
  path = _write(tmp_path / "foo.jsonl", [GOOD] * 16 + [
      {"prompt": "a", "completions": ["w", "x", "y", "z"], "ranks": [0, 1, 2]}])
  assert _error("rm", path) == (
      f"{path}:17: comparisons need \"ranks\" of the same length as "
      "\"completions\" (got 3 and 4)")


def test_bytes_that_are_not_utf8(tmp_path):
  path = _write(tmp_path / "bad.jsonl", [
      {"prompt": "a", "completion": "b"},
      b'{"prompt": "caf\xe9", "completion": "b"}'])
  msg = _error("sft", path)
  assert msg == f"{path}:2: not valid UTF-8 (byte 0xe9 at column 16)"
  text = tmp_path / "bad.txt"
  text.write_bytes(b"ok\n\xff\xfe\n")
  with pytest.raises(common.DataError, match=r"bad.txt:2: not valid UTF-8"):
    jsonl.read_text(str(text))


def test_missing_file_and_unknown_spec(tmp_path):
  with pytest.raises(common.DataError, match="no such file"):
    jsonl.read_jsonl("sft", str(tmp_path / "nope.jsonl"))
  with pytest.raises(common.DataError, match="unknown data spec"):
    sources.load_records("sft", "csv:/x", "train")
  with pytest.raises(common.DataError, match="only serves lm"):
    sources.load_records("sft", "corpus", "train")
  with pytest.raises(common.DataError, match="no pretraining text"):
    sources.load_records("lm", "world", "train")


def test_skip_mode_counts_and_keeps_good_lines(tmp_path, caplog):
  path = _write(tmp_path / "mixed.jsonl", [
      GOOD, "{oops", {"prompt": "a", "completions": ["x"], "ranks": [0]},
      b"\xff", GOOD])
  policy = common.ErrorPolicy("skip")
  got = jsonl.read_jsonl("rm", path, policy)
  assert len(got) == 2
  assert [e.where for e in policy.skipped] == [f"{path}:{i}" for i in (2, 3, 4)]
  assert "skipped 3 bad records" in caplog.text


def test_reading_never_modifies_user_files(tmp_path):
  path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
  before = hashlib.sha256(open(path, "rb").read()).hexdigest()
  jsonl.read_jsonl("sft", path)
  assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before
  assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_atomic_write_leaves_no_temp_files(tmp_path):
  target = tmp_path / "cache" / "x.bin"
  common.atomic_write(str(target), b"one")
  common.atomic_write(str(target), b"two")
  assert target.read_bytes() == b"two"
  assert os.listdir(tmp_path / "cache") == ["x.bin"]


# Length checks need a vocabulary; bytes keep them cheap and predictable.


def test_prompt_longer_than_the_maximum_length(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "short"},
                                       {"prompt": "x" * 40}])
  with pytest.raises(common.DataError) as info:
    pipeline.make_iterator("prompts", f"jsonl:{path}", seq_len=32,
                           batching=pipeline.Batching(batch_size=2),
                           read=pipeline.ReadOptions(vocab="byte"))
  assert str(info.value) == (f"{path}:2: the prompt is 40 tokens, longer than "
                             "the maximum prompt length 32")
  it = pipeline.make_iterator(
      "prompts", f"jsonl:{path}", seq_len=32,
      batching=pipeline.Batching(batch_size=2),
      read=pipeline.ReadOptions(vocab="byte", on_error="skip"))
  assert it.info["skipped"] == 1 and it.num_examples == 1
  assert next(it)["prompt_id"].tolist() == [0, 0]


def test_sequences_longer_than_seq_len(tmp_path):
  sft = _write(tmp_path / "s.jsonl", [{"prompt": "ab", "completion": "c" * 9}])
  with pytest.raises(common.DataError, match=r"s.jsonl:1: prompt \+ completion"
                     r" \+ EOS is 12 tokens, longer than seq_len 8"):
    pipeline.make_iterator("sft", f"jsonl:{sft}", seq_len=8,
                           batching=pipeline.Batching(batch_size=1),
                           read=pipeline.ReadOptions(vocab="byte"))
  rm = _write(tmp_path / "r.jsonl", [{"prompt": "p", "completions": list(
      "abcdefghij"), "ranks": list(range(10))}])
  with pytest.raises(common.DataError, match="K = 10 completions, more than "
                     "k_max = 9"):
    pipeline.make_iterator("rm", f"jsonl:{rm}", seq_len=8,
                           batching=pipeline.Batching(batch_size=1),
                           read=pipeline.ReadOptions(vocab="byte"))


def test_jsonl_batches_hold_the_right_tokens(tmp_path):
  path = _write(tmp_path / "c.jsonl", [GOOD])
  it = pipeline.make_iterator("rm", f"jsonl:{path}", seq_len=24,
                              batching=pipeline.Batching(batch_size=1),
                              read=pipeline.ReadOptions(vocab="byte"), k_max=4)
  b = next(it)
  assert b["ranks"].tolist() == [[0, 1, 1, np.iinfo(np.int32).max]]
  assert b["valid"].tolist() == [[True, True, True, False]]
  assert b["group"].tolist() == [2]
  first = b["tokens"][0, 0]
  assert bytes((first[first > 2] - 3).tolist()).decode() == "Say hi.hi"
  assert first[b["segment_ids"][0, 0] > 0][-1] == 1  # The byte vocabulary's EOS.
