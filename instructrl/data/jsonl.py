"""Reading and validating your own data: JSONL, Parquet and plain text.

Formats (one JSON object per line, or one Parquet row; blank lines are
ignored; extra fields are ignored; the first matching form is used):

  sft       {"prompt": str, "completion": str}
            {"messages": [{"role": str, "content": str}, ...]}  (loss on the
              assistant turns only; roles system, user, assistant, tool)
            {"prompt": [messages], "completion": [messages]}  (TRL's
              conversational prompt-completion: the same as "messages")
            {"text": str}  (loss on all of it)
  rm        {"prompt": str, "completions": [str, ...], "ranks": [int, ...],
             "group": int (optional)}  K >= 2, ranks parallel to
              completions, lower is better, ties allowed but not all tied
            {"prompt": str, "chosen": str, "rejected": str}  (K = 2, ranks
              [0, 1]: the same comparison, through the same Eq. 1)
            {"chosen": str, "rejected": str}  (implicit prompt, as in
              HH-RLHF: the shared prefix, cut back to a word boundary; its
              trailing spaces go with the answers)
  prompts   {"prompt": str} or {"messages": [...]} / {"prompt": [messages]}
              (ending before the answer)
  lm        {"text": str} lines, or a plain text file in which blank lines
            separate documents.

Every problem is a `DataError` naming the file and line (the row, for
Parquet) and the field, e.g. `data/foo.jsonl:17: comparisons need "ranks"
of the same length as "completions" (got 3 and 4)`; with `on_error="skip"`
bad lines are counted and skipped instead. Files are only ever read.
"""
import glob
import json
import os
from typing import Any, Callable, Iterator, Optional

from instructrl.data import chat
from instructrl.data import common

KINDS = ("lm", "sft", "rm", "prompts")


def expand(pattern: str) -> list[str]:
  """Files matching `pattern` (a path or a glob), sorted, at least one."""
  path = os.path.expanduser(pattern)
  if any(c in path for c in "*?["):
    files = sorted(glob.glob(path))
  else:
    files = [path] if os.path.isfile(path) else []
  if not files:
    raise common.DataError(pattern, "no such file")
  return files


def _lines(path: str, policy: common.ErrorPolicy
           ) -> Iterator[tuple[str, str]]:
  """(location, text) of each non-blank line."""
  for where, line in _lines_with_blanks(path, policy):
    if line is not None:
      yield where, line


def _field(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
  if name not in obj:
    raise common.DataError(where, f'missing field "{name}"')
  value = obj[name]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise common.DataError(where, f'"{name}" must be {_TYPE_NAMES[kind]} '
                           f"(got {type(value).__name__})")
  return value


_TYPE_NAMES = {str: "a string", list: "a list", int: "an integer"}


def _text(obj, name, where) -> str:
  value = _field(obj, name, str, where)
  if not value.strip():
    raise common.DataError(where, f'"{name}" is empty')
  return value


def _demo(obj, where) -> common.Demo:
  return common.Demo(_text(obj, "prompt", where),
                     _text(obj, "completion", where), where)


def _messages(value: Any, name: str, where: str) -> tuple[tuple[str, str], ...]:
  """Validated chat turns: a non-empty list of {"role", "content"}."""
  if not isinstance(value, list):
    raise common.DataError(where, f'"{name}" must be a list (got '
                           f"{type(value).__name__})")
  if not value:
    raise common.DataError(where, f'"{name}" is empty')
  out = []
  for i, m in enumerate(value):
    at = f'"{name}"[{i}]'
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise common.DataError(where, f'{at} must be an object with "role" and '
                             '"content"')
    role, content = m["role"], m["content"]
    if role not in chat.ROLES:
      raise common.DataError(where, f'{at}["role"] must be one of '
                             f"{', '.join(chat.ROLES)} (got {role!r})")
    if not isinstance(content, str):
      raise common.DataError(where, f'{at}["content"] must be a string (got '
                             f"{type(content).__name__})")
    if role != "system" and not content.strip():
      raise common.DataError(where, f'{at}["content"] is empty')
    out.append((role, content))
  return tuple(out)


def _conversation(obj, where) -> tuple[tuple[str, str], ...]:
  """"messages", or TRL's conversational "prompt" (+ "completion")."""
  if "messages" in obj:
    return _messages(obj["messages"], "messages", where)
  turns = _messages(obj["prompt"], "prompt", where)
  if "completion" in obj:
    turns += _messages(obj["completion"], "completion", where)
  return turns


def _sft(obj, where):
  if not any(k in obj for k in ("prompt", "completion", "messages", "text")):
    raise common.DataError(where, 'expected "prompt" and "completion", '
                           '"messages", or "text"')
  if "messages" in obj or isinstance(obj.get("prompt"), list):
    turns = _conversation(obj, where)
    if not any(role == "assistant" for role, _ in turns):
      raise common.DataError(where, 'a conversation needs an "assistant" turn '
                             "to learn from")
    return common.Chat(turns, where)
  if "prompt" in obj or "completion" in obj or "text" not in obj:
    return _demo(obj, where)
  return common.Document(_text(obj, "text", where), where)


def _group(obj, where) -> int:
  group = obj.get("group", 0)
  if not isinstance(group, int) or isinstance(group, bool) or group < 0:
    raise common.DataError(where, f'"group" must be a non-negative integer '
                           f"(got {group!r})")
  return group


def _ranked(obj, where) -> common.Comparison:
  prompt = _text(obj, "prompt", where)
  completions = _field(obj, "completions", list, where)
  ranks = _field(obj, "ranks", list, where)
  if len(completions) < 2:
    raise common.DataError(
        where, f"comparisons need K >= 2 completions (got {len(completions)})")
  if len(ranks) != len(completions):
    raise common.DataError(
        where, 'comparisons need "ranks" of the same length as "completions" '
        f"(got {len(ranks)} and {len(completions)})")
  for i, c in enumerate(completions):
    if not isinstance(c, str):
      raise common.DataError(where, f'"completions"[{i}] must be a string '
                             f"(got {type(c).__name__})")
    if not c.strip():
      raise common.DataError(where, f'"completions"[{i}] is empty')
  for i, r in enumerate(ranks):
    if not isinstance(r, int) or isinstance(r, bool):
      raise common.DataError(where, f'"ranks"[{i}] must be an integer '
                             f"(got {type(r).__name__})")
  if len(set(ranks)) == 1:
    raise common.DataError(where, "all completions are tied; a comparison "
                           "needs at least one preference")
  return common.Comparison(prompt, tuple(completions), tuple(ranks),
                           _group(obj, where), where)


def split_shared_prefix(chosen: str, rejected: str,
                        where: str) -> tuple[str, str, str]:
  """(prompt, chosen answer, rejected answer) of an implicit-prompt pair.

  The prompt is the longest common prefix, cut back so that it ends at a
  word boundary and both answers are non-empty; spaces at its end move to
  the answers ("...Assistant:" + " Yes").
  """
  n, limit = 0, min(len(chosen), len(rejected))
  while n < limit and chosen[n] == rejected[n]:
    n += 1

  def mid_word(k):
    return not chosen[k - 1].isspace() and any(
        k < len(x) and not x[k].isspace() for x in (chosen, rejected))
  while n > 0 and (n == len(chosen) or n == len(rejected) or mid_word(n)):
    n -= 1
  while n > 0 and chosen[n - 1] == " ":
    n -= 1
  if not chosen[:n].strip():
    raise common.DataError(where, '"chosen" and "rejected" share no prompt; '
                           'give it as "prompt"')
  return chosen[:n], chosen[n:], rejected[n:]


def _comparison(obj, where) -> common.Comparison:
  if not any(k in obj for k in ("prompt", "completions", "chosen", "rejected")):
    raise common.DataError(where, 'expected "prompt", "completions" and '
                           '"ranks", or "chosen" and "rejected"')
  if "chosen" in obj or "rejected" in obj:
    chosen, rejected = _text(obj, "chosen", where), _text(obj, "rejected", where)
    if "prompt" in obj:
      prompt = _text(obj, "prompt", where)
    else:
      prompt, chosen, rejected = split_shared_prefix(chosen, rejected, where)
    if chosen == rejected:
      raise common.DataError(where, '"chosen" and "rejected" are the same text')
    return common.Comparison(prompt, (chosen, rejected), (0, 1),
                             _group(obj, where), where)
  return _ranked(obj, where)


def _prompt(obj, where) -> common.PromptRecord:
  if "messages" in obj or isinstance(obj.get("prompt"), list):
    turns = _conversation(obj, where)
    if turns[-1][0] == "assistant":
      raise common.DataError(where, "the conversation ends with an assistant "
                             "turn; a prompt ends where the answer starts")
    return common.PromptRecord("\n\n".join(c for _, c in turns), where, turns)
  return common.PromptRecord(_text(obj, "prompt", where), where)


def _document(obj, where) -> common.Document:
  return common.Document(_text(obj, "text", where), where)


PARSERS: dict[str, Callable[[dict[str, Any], str], Any]] = {
    "lm": _document, "sft": _sft, "rm": _comparison, "prompts": _prompt}


def read_jsonl(kind: str, pattern: str,
               policy: Optional[common.ErrorPolicy] = None) -> list[Any]:
  """Validated records of `kind` from the JSONL file(s) `pattern`."""
  if kind not in PARSERS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  policy = policy or common.ErrorPolicy()
  out = []
  for path in expand(pattern):
    for where, line in _lines(path, policy):
      try:
        try:
          obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
          raise common.DataError(where, f"malformed JSON ({e.msg} at column "
                                 f"{e.colno})") from None
        if not isinstance(obj, dict):
          raise common.DataError(where, "expected a JSON object, got "
                                 f"{type(obj).__name__}")
        out.append(PARSERS[kind](obj, where))
      except common.DataError as e:
        policy.handle(e)
  policy.report(pattern)
  return out


def read_parquet(kind: str, pattern: str,
                 policy: Optional[common.ErrorPolicy] = None) -> list[Any]:
  """Validated records of `kind` from Parquet file(s): one row, one record
  (the same fields as JSONL; null fields count as missing). Locations are
  `file:row`, rows numbered from 1. Needs pyarrow."""
  if kind not in PARSERS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise common.DataError(pattern, "reading Parquet needs pyarrow "
                           "(pip install pyarrow)") from None
  policy = policy or common.ErrorPolicy()
  out = []
  for path in expand(pattern):
    try:
      batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
      row = 0
      for batch in batches:
        for obj in batch.to_pylist():
          row += 1
          where = f"{path}:{row}"
          try:
            out.append(PARSERS[kind]({k: v for k, v in obj.items()
                                      if v is not None}, where))
          except common.DataError as e:
            policy.handle(e)
    except (OSError, pa.ArrowException) as e:  # Not DataError (a ValueError).
      raise common.DataError(path, f"not a Parquet file ({e})".splitlines()[0]
                             ) from None
  policy.report(pattern)
  return out


def read_text(pattern: str, policy: Optional[common.ErrorPolicy] = None
              ) -> list[common.Document]:
  """Plain-text documents; blank lines separate them."""
  policy = policy or common.ErrorPolicy()
  out = []
  for path in expand(pattern):
    lines, start = [], None
    for where, line in _lines_with_blanks(path, policy):
      if line is None:
        if lines:
          out.append(common.Document("".join(lines).strip("\n"), start))
        lines, start = [], None
      else:
        lines.append(line)
        start = start or where
    if lines:
      out.append(common.Document("".join(lines).strip("\n"), start))
  policy.report(pattern)
  return out


def _lines_with_blanks(path: str, policy: common.ErrorPolicy
                       ) -> Iterator[tuple[str, Optional[str]]]:
  """(location, text) of each line, text None if blank; checks UTF-8."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        policy.handle(common.DataError(
            where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
            f"{e.start + 1})"))
        continue
      yield where, (line if line.strip() else None)
