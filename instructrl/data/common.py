"""Shared pieces of the data layer: records, errors, cache, hashing.

Pure Python on purpose: everything here imports in milliseconds and never
pulls in TensorFlow, so the world, the corpus and JSONL validation stay light.
Special token ids are not here: each vocabulary carries its own (vocab.py).
"""
import dataclasses
import hashlib
import logging
import os
import tempfile
from typing import Optional, Sequence

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
  """Bad input data. The message is one line: `where: what is wrong`.

  `where` is `file:line` for user files, or a synthetic location such as
  `world:rm:train:12` for generated data, so the CLI can print it as is.
  """

  def __init__(self, where: str, what: str):
    self.where = where
    self.what = what
    super().__init__(f"{where}: {what}" if where else what)


@dataclasses.dataclass(frozen=True)
class Document:
  """A pretraining document (plain text)."""
  text: str
  where: str = ""


@dataclasses.dataclass(frozen=True)
class Demo:
  """A demonstration for SFT: the completion is the labeler's answer."""
  prompt: str
  completion: str
  where: str = ""


@dataclasses.dataclass(frozen=True)
class Comparison:
  """K >= 2 completions of one prompt, ranked: lower rank is preferred."""
  prompt: str
  completions: tuple[str, ...]
  ranks: tuple[int, ...]
  group: int = 0
  where: str = ""


@dataclasses.dataclass(frozen=True)
class Chat:
  """A conversation for SFT: (role, content) turns; the loss is on the
  assistant turns only (pipeline.py renders it, with or without the
  tokenizer's chat template)."""
  messages: tuple[tuple[str, str], ...]
  where: str = ""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """A prompt without an answer (PPO rollouts and evaluation).

  `messages` is set for a conversational prompt (then `prompt` is only its
  display text, the turns' contents joined by blank lines).
  """
  prompt: str
  where: str = ""
  messages: tuple[tuple[str, str], ...] = ()


def default_cache_dir(cache_dir: Optional[str] = None) -> str:
  """The caller's dir, else $INSTRUCTRL_CACHE, else ~/.cache/instructrl."""
  if cache_dir:
    return os.path.expanduser(cache_dir)
  env = os.environ.get("INSTRUCTRL_CACHE")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), ".cache", "instructrl")


def atomic_write(path: str, data: bytes) -> None:
  """Writes `path` so that readers see either nothing or the whole file.

  Concurrent writers of the same deterministic content are harmless: the last
  rename wins and every version is complete.
  """
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is meant to be shared.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def stable_hash(*parts: object) -> int:
  """A 64-bit hash that is the same in every process (unlike `hash`)."""
  text = "\x1f".join(str(p) for p in parts)
  return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:8], "big")


def fingerprint(items: Sequence[str]) -> str:
  """A short content hash of a list of strings (for cache keys and states)."""
  h = hashlib.sha256()
  for item in items:
    h.update(item.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
  return h.hexdigest()[:16]


class ErrorPolicy:
  """Raise on the first bad record, or skip bad records and count them.

  Skips are logged once per source with the first few locations, so a user
  who chose `on_error="skip"` still sees what was dropped.
  """

  def __init__(self, on_error: str = "raise"):
    if on_error not in ("raise", "skip"):
      raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    self.on_error = on_error
    self.skipped: list[DataError] = []

  def handle(self, error: DataError) -> None:
    if self.on_error == "raise":
      raise error
    self.skipped.append(error)

  def report(self, what: str) -> None:
    if self.skipped:
      first = "; ".join(str(e) for e in self.skipped[:3])
      logging.warning("skipped %d bad records in %s (first: %s)",
                      len(self.skipped), what, first)


def hide_accelerators_from_tensorflow() -> None:
  """TF only tokenizes here; keep it off the GPUs/TPUs that JAX trains on
  (by default TF reserves most of every GPU's memory when it starts)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (ImportError, RuntimeError, ValueError):
    pass  # No TF, or its devices were already initialised.
