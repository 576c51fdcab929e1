"""Conversations -> token ids and per-token loss flags.

Two renderings of `messages` [(role, content), ...]:

* plain (the default): each turn's content is encoded on its own and the
  turns are laid end to end after the vocabulary's BOS; an assistant turn
  is followed by EOS and is what the loss is on. One user turn and one
  assistant turn give exactly the {"prompt", "completion"} sequence.
* the tokenizer's chat template (`ReadOptions.chat_template`): rendered
  with Jinja as transformers' `apply_chat_template` renders it (sandboxed,
  trim_blocks/lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`,
  the special token strings) and tokenized as one text without added
  special tokens (the template writes BOS itself). An assistant turn's
  characters are what rendering the conversation up to that turn adds to
  rendering it up to the turn before with the generation prompt; the loss
  is on the tokens that start inside them, up to and including the first
  EOS. Needs jinja2 and a tokenizer.json (offsets tie tokens to characters).
"""
import datetime
import json
from typing import Sequence

from instructrl.data import common

Messages = Sequence[tuple[str, str]]
ROLES = ("system", "user", "assistant", "tool")


def plain_sequence(vocab, messages: Messages) -> tuple[list[int], list[bool]]:
  """(ids, trained) of the plain rendering."""
  ids, trained = list(vocab.prefix), [False] * len(vocab.prefix)
  for role, content in messages:
    part = vocab.encode(content)
    if role == "assistant":
      part = part + [vocab.eos_id]
    ids += part
    trained += [role == "assistant"] * len(part)
  return ids, trained


def plain_prompt(vocab, messages: Messages) -> list[int]:
  """A conversational prompt's ids, plainly rendered."""
  return plain_sequence(vocab, messages)[0]


def _environment():
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    import jinja2.ext  # pylint: disable=g-import-not-at-top
    import jinja2.sandbox  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise common.DataError("data.chat_template", "rendering the tokenizer's "
                           "chat template needs jinja2 (pip install jinja2)"
                           ) from None

  class Generation(jinja2.ext.Extension):
    """transformers' {% generation %} marks assistant text; we find it by
    rendering prefixes instead, so the tag only passes its body through."""
    tags = {"generation"}

    def parse(self, parser):
      next(parser.stream)
      return parser.parse_statements(("name:endgeneration",), drop_needle=True)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None,
             sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda f: datetime.datetime.now().strftime(f)
  return env, jinja2.exceptions.TemplateError


_COMPILED = {}


def render(vocab, messages: Messages, add_generation_prompt: bool,
           where: str) -> str:
  """The chat template's text for `messages`."""
  if not vocab.chat_template:
    raise common.DataError(where, "data.chat_template is set but the "
                           "tokenizer has no chat template")
  key = vocab.chat_template
  if key not in _COMPILED:
    env, error = _environment()
    try:
      _COMPILED[key] = (env.from_string(key), error)
    except error as e:
      raise common.DataError("chat_template", f"the chat template does not "
                             f"parse: {e}") from None
  template, error = _COMPILED[key]
  special = {k: v for k, v in (vocab.special_tokens or {}).items() if v is not None}
  try:
    return template.render(
        messages=[{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=add_generation_prompt, tools=None,
        documents=None, **special)
  except error as e:
    raise common.DataError(where, f"the chat template failed: {e}") from None


def _offsets(vocab, text: str, where: str):
  if not hasattr(vocab, "encode_with_offsets"):
    raise common.DataError(where, "chat templates need a tokenizer.json (a "
                           "SentencePiece model cannot tell the template's "
                           "special tokens from text)")
  return vocab.encode_with_offsets(text)


def template_sequence(vocab, messages: Messages,
                      where: str) -> tuple[list[int], list[bool]]:
  """(ids, trained) of the chat-template rendering (module docstring)."""
  full = render(vocab, messages, False, where)
  spans = []
  for i, (role, _) in enumerate(messages):
    if role != "assistant":
      continue
    before = render(vocab, messages[:i], True, where)
    upto = render(vocab, messages[:i + 1], False, where)
    if not (upto.startswith(before) and full.startswith(upto)):
      raise common.DataError(where, "the chat template does not render each "
                             "turn as a prefix of the next, so the assistant "
                             f"turns cannot be found (turn {i})")
    spans.append((len(before), len(upto)))
  ids, starts = _offsets(vocab, full, where)
  trained, span, ended = [], None, False
  eos = set(vocab.eos_ids)
  for tok, start in zip(ids, starts):
    inside = next((k for k, (a, b) in enumerate(spans) if a <= start < b), None)
    if inside != span:
      span, ended = inside, False
    trained.append(inside is not None and not ended)
    ended = ended or (inside is not None and tok in eos)
  return ids, trained


def template_prompt(vocab, messages: Messages, where: str) -> list[int]:
  """A conversational prompt's ids: the template with the generation prompt."""
  return _offsets(vocab, render(vocab, messages, True, where), where)[0]
