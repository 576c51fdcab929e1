"""Reading and validating your own data: JSONL and plain text.

Formats (one JSON object per line; blank lines are ignored; extra fields
are ignored):

  demonstrations  {"prompt": str, "completion": str}
  comparisons     {"prompt": str, "completions": [str, ...],
                   "ranks": [int, ...], "group": int (optional)}
                  K >= 2, ranks parallel to completions, lower is better,
                  ties allowed but not all tied.
  prompts         {"prompt": str}
  pretraining     {"text": str} lines, or a plain text file in which blank
                  lines separate documents.

Every problem is a `DataError` naming the file and line, e.g.
`data/foo.jsonl:17: comparisons need "ranks" of the same length as
"completions" (got 3 and 4)`; with `on_error="skip"` bad lines are counted
and skipped instead. Files are only ever read.
"""
import glob
import json
import os
from typing import Any, Callable, Iterator, Optional

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


def _comparison(obj, where) -> common.Comparison:
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
  group = obj.get("group", 0)
  if not isinstance(group, int) or isinstance(group, bool) or group < 0:
    raise common.DataError(where, f'"group" must be a non-negative integer '
                           f"(got {group!r})")
  return common.Comparison(prompt, tuple(completions), tuple(ranks), group,
                           where)


def _prompt(obj, where) -> common.PromptRecord:
  return common.PromptRecord(_text(obj, "prompt", where), where)


def _document(obj, where) -> common.Document:
  return common.Document(_text(obj, "text", where), where)


PARSERS: dict[str, Callable[[dict[str, Any], str], Any]] = {
    "lm": _document, "sft": _demo, "rm": _comparison, "prompts": _prompt}


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
